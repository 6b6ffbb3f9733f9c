//! The CGI response head as the gateway reads it from an untrusted handler: the incremental
//! `cgi::HeadScanner` (the handler's stdout arrives in pieces), `cgi::header_end` and
//! `cgi::parse_head`.
//!
//! Input: `[n][n chunk sizes][flags][stdout...]`. Invariants:
//! - the scanner, given the growing buffer piece by piece, answers `None` exactly until the
//!   blank line is in, then the index `header_end` gives for the whole output, which is that
//!   of a plain reference scan; it never claims to have looked at more bytes than it was given;
//! - `parse_head` never panics; a document's status is a final status (200..=599) and its
//!   headers carry no framing or hop-by-hop fields; a local redirect is a path with no body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcgi_gateway::cgi::{header_end, parse_head, CgiHead, HeadScanner};

/// The end of the header block as documented: after the first empty line (LF or CRLF ends a
/// line).
fn reference(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < n + 1 {
        return;
    }
    let (size_bytes, rest) = rest.split_at(n);
    let (flags, out) = (rest[0], &rest[1..]);
    let sizes: Vec<usize> = size_bytes.iter().map(|&b| usize::from(b % 64)).collect();

    let want = reference(out);
    assert_eq!(
        header_end(out),
        want,
        "header_end disagrees with the reference"
    );

    // The buffer grows as the server's does; the scanner sees every intermediate state.
    let mut scanner = HeadScanner::default();
    let mut len = 0;
    let mut i = 0;
    let found = loop {
        let step = sizes[i % sizes.len()];
        i += 1;
        // Progress even if every size is 0 (an empty read is still a call).
        let step = if i > sizes.len() && sizes.iter().all(|&s| s == 0) {
            1
        } else {
            step
        };
        len = (len + step).min(out.len());
        let got = scanner.scan(&out[..len]);
        assert!(
            scanner.scanned() <= len,
            "scanned {} of {len} bytes",
            scanner.scanned()
        );
        match got {
            Some(end) => break Some((end, len)),
            None => {
                if let Some(w) = want {
                    assert!(w > len, "blank line at {w} missed with {len} bytes in");
                }
                if len == out.len() {
                    break None;
                }
            }
        }
    };
    match (found, want) {
        (Some((end, _)), Some(w)) => assert_eq!(end, w, "incremental scan ended elsewhere"),
        (None, None) => {}
        (f, w) => panic!("incremental scan {f:?}, whole buffer {w:?}"),
    }

    let Some(end) = want else {
        return;
    };
    let body_follows = end < out.len() || flags & 1 != 0;
    match parse_head(&out[..end], body_follows) {
        Ok(CgiHead::Document { status, headers }) => {
            assert!(
                (200..=599).contains(&status.as_u16()),
                "status {status} passed through"
            );
            for framing in [
                "connection",
                "transfer-encoding",
                "keep-alive",
                "content-length",
            ] {
                assert!(!headers.contains_key(framing), "{framing} passed through");
            }
        }
        Ok(CgiHead::LocalRedirect { location }) => {
            assert!(location.starts_with('/'), "local redirect to {location:?}");
            assert!(!body_follows, "local redirect with a body");
        }
        Err(_) => {}
    }
});
