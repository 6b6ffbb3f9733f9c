//! The guest console as the host sees it: serial bytes become lines, each stamped with the
//! host time since the VMM started (`00.008020 Hello!`), streamed live and kept for the
//! outcome. The console also reads what the kernel says about how the guest ends.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vm::VmEvent;

/// Most console bytes kept for the outcome; the live stream gets everything.
const KEEP_MAX: usize = 1 << 20;
/// Longest line assembled before it is cut (a guest printing without newlines).
const LINE_MAX: usize = 4096;

/// How the kernel said the guest ended, read from console lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// Wait status of init, from "Attempted to kill init! exitcode=0x...".
    pub init_status: Option<u32>,
    /// The first "Kernel panic - not syncing: ..." message.
    pub panic: Option<String>,
    /// "reboot: Power down" / "System halted" seen.
    pub halted: bool,
}

/// Reads one console line for end-of-guest information.
pub fn scan_line(line: &str, report: &mut GuestReport) -> bool {
    const KILL_INIT: &str = "Attempted to kill init! exitcode=0x";
    const PANIC: &str = "Kernel panic - not syncing: ";
    let mut ended = false;
    if let Some(pos) = line.find(KILL_INIT) {
        let hex: String = line[pos + KILL_INIT.len()..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        if let Ok(v) = u32::from_str_radix(&hex, 16) {
            report.init_status.get_or_insert(v);
        }
    }
    if let Some(pos) = line.find(PANIC) {
        if report.panic.is_none() {
            report.panic = Some(line[pos + PANIC.len()..].trim_end().to_string());
        }
    }
    if line.contains("reboot: Power down") || line.contains("reboot: System halted") {
        report.halted = true;
        ended = true;
    }
    ended
}

/// Formats a host-relative timestamp the way the reference log does: `SS.micros`.
pub fn stamp(d: Duration) -> String {
    format!("{:02}.{:06}", d.as_secs(), d.subsec_micros())
}

/// Turns the guest's serial output into stamped lines: streamed to the live writer, kept
/// (up to 1 MiB) for the outcome, and scanned into a [`GuestReport`].
pub struct Console {
    start: Instant,
    live: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    line_started: Option<Duration>,
    kept: Vec<u8>,
    first_output: Option<Duration>,
    report: GuestReport,
    events: Option<Sender<VmEvent>>,
    /// A line holding this text sets the flag (a snapshot's marker).
    marker: Option<(String, crate::resources::Cancel)>,
}

impl Console {
    /// A console stamping lines from `start` and writing each finished line to `live`, if any.
    pub fn new(start: Instant, live: Option<Box<dyn Write + Send>>) -> Self {
        Console {
            start,
            live,
            line: Vec::new(),
            line_started: None,
            kept: Vec::new(),
            first_output: None,
            report: GuestReport::default(),
            events: None,
            marker: None,
        }
    }

    /// Where to send [`VmEvent::Halted`] when a line says the guest powered down or halted.
    pub fn set_events(&mut self, tx: Sender<VmEvent>) {
        self.events = Some(tx);
    }

    /// Sets `flag` when a line contains `text` (`xcgi run --snapshot-at`).
    pub fn set_marker(&mut self, text: String, flag: crate::resources::Cancel) {
        self.marker = Some((text, flag));
    }

    /// Takes serial output: `\n` ends a line, `\r` is dropped, and a line is cut at 4096
    /// bytes. A line is stamped with the arrival of its first byte.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let now = self.start.elapsed();
            self.first_output.get_or_insert(now);
            self.line_started.get_or_insert(now);
            match b {
                b'\n' => self.finish_line(),
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= LINE_MAX {
                        self.finish_line();
                    }
                }
            }
        }
    }

    fn finish_line(&mut self) {
        let at = self
            .line_started
            .take()
            .unwrap_or_else(|| self.start.elapsed());
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        let stamped = format!("{} {}\n", stamp(at), text);
        if let Some(live) = self.live.as_mut() {
            // A closed stdout must not stop the guest.
            let _ = live.write_all(stamped.as_bytes());
            let _ = live.flush();
        }
        if self.kept.len() + stamped.len() <= KEEP_MAX {
            self.kept.extend_from_slice(stamped.as_bytes());
        }
        if let Some((marker, flag)) = &self.marker {
            if text.contains(marker.as_str()) {
                flag.cancel();
            }
        }
        if scan_line(&text, &mut self.report) {
            if let Some(tx) = &self.events {
                let _ = tx.send(VmEvent::Halted);
            }
        }
    }

    /// Flushes a partial last line.
    pub fn flush(&mut self) {
        if !self.line.is_empty() {
            self.finish_line();
        }
    }

    /// When the first byte arrived, from `start`.
    pub fn first_output(&self) -> Option<Duration> {
        self.first_output
    }

    /// What the lines so far said about how the guest ends.
    pub fn report(&self) -> &GuestReport {
        &self.report
    }

    /// The kept stamped lines (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

/// The serial device's output end.
#[derive(Clone)]
pub struct ConsoleWriter(pub Arc<Mutex<Console>>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut c) = self.0.lock() {
            c.push(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_init_exit_status() {
        let mut r = GuestReport::default();
        scan_line(
            "[    0.120000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000400",
            &mut r,
        );
        assert_eq!(r.init_status, Some(0x400));
        assert!(r
            .panic
            .as_deref()
            .unwrap()
            .starts_with("Attempted to kill init!"));
        assert!(!r.halted);
    }

    #[test]
    fn first_panic_wins() {
        let mut r = GuestReport::default();
        scan_line(
            "Kernel panic - not syncing: VFS: Unable to mount root fs",
            &mut r,
        );
        scan_line("Kernel panic - not syncing: something else", &mut r);
        assert_eq!(r.panic.as_deref(), Some("VFS: Unable to mount root fs"));
        assert_eq!(r.init_status, None);
    }

    #[test]
    fn power_down_ends() {
        let mut r = GuestReport::default();
        assert!(scan_line("[    1.0] reboot: Power down", &mut r));
        assert!(r.halted);
    }

    #[test]
    fn stamps_look_like_the_reference_log() {
        assert_eq!(stamp(Duration::from_micros(8020)), "00.008020");
        assert_eq!(stamp(Duration::from_micros(12_345_678)), "12.345678");
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_stamped_streamed_and_kept() {
        let sink = Sink::default();
        let mut c = Console::new(Instant::now(), Some(Box::new(sink.clone())));
        c.push(b"Hel");
        assert!(
            sink.0.lock().unwrap().is_empty(),
            "no output before the line ends"
        );
        c.push(b"lo!\r\nsecond");
        c.flush();
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(" Hello!"), "{out}");
        assert!(lines[1].ends_with(" second"));
        assert_eq!(lines[0].split(' ').next().unwrap().len(), "00.000000".len());
        assert_eq!(c.text(), out);
        assert!(c.first_output().is_some());
    }

    #[test]
    fn power_down_line_sends_event() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = Console::new(Instant::now(), None);
        c.set_events(tx);
        c.push(b"reboot: Power down\n");
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Halted)));
    }
}
