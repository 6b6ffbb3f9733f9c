//! Text that a client, a handler or a guest controls, made safe for a log line: control
//! characters escaped (a newline in a handler's stderr must not start a forged log line; an
//! escape sequence must not repaint the operator's terminal) and the length capped.

use std::fmt::Write;

/// Longest piece of untrusted text put into one log line, in characters.
pub const LOG_TEXT_MAX: usize = 1024;

/// `s` with control characters (C0, DEL, C1) escaped as `\n`, `\r`, `\t`, `\\` or `\u{..}`,
/// cut after `max` characters with a note of how much was left out.
pub fn for_log(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    let mut chars = s.chars();
    for (taken, c) in chars.by_ref().enumerate() {
        if taken == max {
            let rest = 1 + chars.count();
            let _ = write!(out, "…({rest} more characters)");
            return out;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// [`for_log`] of bytes that may not be UTF-8 (invalid sequences become U+FFFD).
pub fn bytes_for_log(b: &[u8], max: usize) -> String {
    for_log(&String::from_utf8_lossy(b), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_and_escapes_cannot_forge_a_line() {
        let forged = "oops\n2026-12-01T00:00:00Z  INFO forged status=200\r\x1b[2J\u{85}";
        let s = for_log(forged, LOG_TEXT_MAX);
        assert!(!s.contains('\n') && !s.contains('\r') && !s.contains('\x1b'));
        assert!(!s.contains('\u{85}'));
        assert_eq!(
            s,
            "oops\\n2026-12-01T00:00:00Z  INFO forged status=200\\r\\u{1b}[2J\\u{85}"
        );
        assert_eq!(for_log("a\\nb", 10), "a\\\\nb");
    }

    #[test]
    fn long_text_is_cut() {
        let s = for_log(&"x".repeat(1_000_000), 100);
        assert!(s.starts_with(&"x".repeat(100)));
        assert!(s.ends_with("…(999900 more characters)"), "{}", &s[90..]);
        assert_eq!(for_log("héllo", 5), "héllo");
        assert_eq!(bytes_for_log(b"a\xffb", 10), "a\u{fffd}b");
    }
}
