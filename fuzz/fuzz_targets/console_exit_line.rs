//! The serial console's reading of how the guest ended (`devices::console::scan_line`, fed by
//! `Console::push`): an untrusted guest writes anything it likes on its console.
//!
//! Input: `[n][n chunk sizes][value: 4 bytes][console bytes...]`. Invariants:
//! - `scan_line` never panics, and reads init's exit status exactly as a reference does: the
//!   hex digits after the first "Attempted to kill init! exitcode=0x", when they fit a u32;
//! - round trip: the kernel's line for any wait status (`exitcode=0x%08x`) gives it back, with
//!   any prefix and suffix around it that does not itself hold a marker or extend the digits;
//! - `Console::push` reaches the same report however the bytes are split into writes.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use xcgi_vmm::devices::console::{scan_line, Console, GuestReport};

const KILL_INIT: &str = "Attempted to kill init! exitcode=0x";

fn reference_status(line: &str) -> Option<u32> {
    let pos = line.find(KILL_INIT)?;
    let digits: String = line[pos + KILL_INIT.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    // Leading zeros are fine, a value over 32 bits is not a wait status.
    let significant = digits.trim_start_matches('0');
    if digits.is_empty() || significant.len() > 8 {
        return None;
    }
    Some(
        u32::from_str_radix(
            if significant.is_empty() {
                "0"
            } else {
                significant
            },
            16,
        )
        .unwrap(),
    )
}

fn pushed(bytes: &[u8], sizes: &[usize]) -> GuestReport {
    let mut c = Console::new(Instant::now(), None);
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let size = sizes[i % sizes.len()].max(1);
        i += 1;
        let end = (at + size).min(bytes.len());
        c.push(&bytes[at..end]);
        at = end;
    }
    c.flush();
    c.report().clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < n + 4 {
        return;
    }
    let (size_bytes, rest) = rest.split_at(n);
    let (value, console) = rest.split_at(4);
    let value = u32::from_le_bytes(value.try_into().unwrap());
    let sizes: Vec<usize> = size_bytes.iter().map(|&b| usize::from(b)).collect();
    let text = String::from_utf8_lossy(console);

    // 1. Any line: never panics, same status as the reference.
    let mut report = GuestReport::default();
    let ended = scan_line(&text, &mut report);
    assert_eq!(report.init_status, reference_status(&text), "line {text:?}");
    assert_eq!(ended, report.halted);

    // 2. Round trip through the kernel's format, with junk around it.
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid -= 1;
    }
    let (prefix, suffix) = text.split_at(mid);
    if !prefix.contains(KILL_INIT) && !suffix.starts_with(|c: char| c.is_ascii_hexdigit()) {
        let line =
            format!("{prefix}[    0.1] Kernel panic - not syncing: {KILL_INIT}{value:08x}{suffix}");
        let mut report = GuestReport::default();
        scan_line(&line, &mut report);
        assert_eq!(report.init_status, Some(value), "line {line:?}");
    }

    // 3. The console splits lines itself; how the bytes arrive must not matter.
    let whole = pushed(console, &[console.len().max(1)]);
    let split = pushed(console, &sizes);
    assert_eq!(
        whole, split,
        "report depends on how the console output was split"
    );
});
