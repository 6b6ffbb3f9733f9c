//! The gateway <-> guest frame protocol (crates/channel), as the host decodes what an
//! untrusted guest writes.
//!
//! Input: `[n][n chunk sizes][stream...]`. The stream is fed to a `Decoder` in pieces of those
//! sizes (cycling), frames taken out after every piece. Invariants:
//! - no panic; every frame has a known type and a payload of at most `MAX_FRAME` bytes;
//! - the frames (and the error, if any) are exactly those of a plain reference parse of the
//!   whole stream, however it was split; `pending()` is what the reference left over;
//! - encode -> decode round trip: frames built from the input come back unchanged, split
//!   anywhere;
//! - `Start::decode` never panics, and what it accepts re-encodes to something that decodes
//!   to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcgi_channel::{
    encode, Decoder, ProtoError, Start, DATA, DATA_END, EXIT, FAILED, HEADER_LEN, HELLO, MAX_FRAME,
    START, STDERR, STDOUT, STDOUT_CLOSED,
};

const KINDS: [u8; 9] = [
    HELLO,
    START,
    DATA,
    DATA_END,
    STDOUT,
    STDERR,
    STDOUT_CLOSED,
    EXIT,
    FAILED,
];

type Frame = (u8, Vec<u8>);

/// The protocol as the crate documents it, on the whole stream at once: frames until an error
/// or an incomplete frame; returns them, the error, and the bytes left over.
fn reference(stream: &[u8]) -> (Vec<Frame>, Option<ProtoError>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.len() < HEADER_LEN {
            return (frames, None, rest.len());
        }
        if !KINDS.contains(&rest[0]) {
            return (frames, Some(ProtoError::UnknownType(rest[0])), rest.len());
        }
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > MAX_FRAME {
            return (frames, Some(ProtoError::TooLong(len)), rest.len());
        }
        if rest.len() < HEADER_LEN + len {
            return (frames, None, rest.len());
        }
        frames.push((rest[0], rest[HEADER_LEN..HEADER_LEN + len].to_vec()));
        at += HEADER_LEN + len;
    }
}

/// Feed `stream` in pieces of `sizes` (cycling; 0 feeds nothing), taking frames out after
/// each piece, until the stream is done or the decoder reports an error.
fn chunked(stream: &[u8], sizes: &[usize]) -> (Vec<Frame>, Option<ProtoError>, Decoder) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut pieces = 0;
    while pieces == 0 || at < stream.len() {
        let mut size = sizes[pieces % sizes.len()];
        pieces += 1;
        if pieces > sizes.len() && sizes.iter().all(|&s| s == 0) {
            size = stream.len(); // all empty feeds once, then the rest
        }
        let end = (at + size).min(stream.len());
        d.feed(&stream[at..end]);
        at = end;
        loop {
            match d.next_frame() {
                Ok(Some((kind, payload))) => {
                    assert!(KINDS.contains(&kind), "frame of unknown type {kind:#x}");
                    assert!(
                        payload.len() <= MAX_FRAME,
                        "frame of {} bytes",
                        payload.len()
                    );
                    frames.push((kind, payload));
                }
                Ok(None) => break,
                Err(e) => {
                    // Asking again must give the same error, not a frame or a panic.
                    assert_eq!(d.next_frame(), Err(e.clone()), "error not sticky");
                    return (frames, Some(e), d);
                }
            }
        }
    }
    (frames, None, d)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < n {
        return;
    }
    let (size_bytes, stream) = rest.split_at(n);
    // Mostly small pieces; a high bit makes one large.
    let sizes: Vec<usize> = size_bytes
        .iter()
        .map(|&b| {
            if b & 0x80 != 0 {
                usize::from(b & 0x7f) * 64
            } else {
                usize::from(b)
            }
        })
        .collect();

    // 1. Arbitrary bytes, split anywhere: the same as the reference parse.
    let (want_frames, want_err, want_left) = reference(stream);
    let (frames, err, d) = chunked(stream, &sizes);
    assert_eq!(
        frames, want_frames,
        "frames depend on how the stream was split"
    );
    assert_eq!(err, want_err, "error depends on how the stream was split");
    if err.is_none() {
        assert_eq!(d.pending(), want_left, "pending() after the last frame");
    }

    // 2. Round trip: frames of known types whose payloads are pieces of the input.
    let mut built: Vec<Frame> = Vec::new();
    let mut encoded = Vec::new();
    let mut src = stream;
    while let Some((&k, tail)) = src.split_first() {
        let kind = KINDS[usize::from(k) % KINDS.len()];
        let len = usize::from(k >> 4).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        encode(&mut encoded, kind, payload);
        built.push((kind, payload.to_vec()));
        src = tail;
    }
    let (frames, err, d) = chunked(&encoded, &sizes);
    assert_eq!(err, None, "a well-formed stream was rejected");
    assert_eq!(frames, built, "encode -> decode changed the frames");
    assert_eq!(d.pending(), 0);

    // 3. The Start payload: decoding never panics and is stable.
    if let Ok(start) = Start::decode(stream) {
        assert!(!start.program.is_empty());
        let again = Start::decode(&start.encode()).expect("re-encoded Start must decode");
        assert_eq!(again, start);
    }
});
