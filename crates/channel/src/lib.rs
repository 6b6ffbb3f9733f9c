//! The protocol spoken over the host-guest channel (virtio-console, `/dev/hvc0` in the guest)
//! between the gateway and `xcgi-init`, the guest's PID 1 in CGI mode.
//!
//! Everything travels in frames: one type byte, a little-endian `u32` payload length, then the
//! payload. No dependencies, no allocation beyond the payload, usable from the static init.
//!
//! ```text
//! guest -> host   H  (empty)         init is up, the channel is in raw mode: send the request
//! host  -> guest  S  Start           program, arguments, environment (see [`Start`])
//! host  -> guest  D  bytes           request body (the program's stdin), in order
//! host  -> guest  E  (empty)         end of the request body
//! guest -> host   O  bytes           the program's stdout, as it is produced
//! guest -> host   R  bytes           the program's stderr
//! guest -> host   C  (empty)         the program closed its stdout: the response is complete
//! guest -> host   X  u32 LE          the program's wait status (exited or killed); init exits
//! guest -> host   F  text            init failed (cannot open the channel, exec failed, ...)
//! ```

#![warn(missing_docs)]
// Lengths cross between host and guest here: no silent truncation.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::fmt;

/// Bytes in a frame header: type + length.
pub const HEADER_LEN: usize = 5;
/// Largest payload accepted in one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk senders put in one `D`, `O` or `R` frame.
pub const CHUNK: usize = 64 * 1024;

/// Guest to host: init is up, the channel is in raw mode.
pub const HELLO: u8 = b'H';
/// Host to guest: what to run ([`Start`]).
pub const START: u8 = b'S';
/// Host to guest: request body bytes.
pub const DATA: u8 = b'D';
/// Host to guest: end of the request body.
pub const DATA_END: u8 = b'E';
/// Guest to host: the program's stdout.
pub const STDOUT: u8 = b'O';
/// Guest to host: the program's stderr.
pub const STDERR: u8 = b'R';
/// Guest to host: the program closed its stdout (the response is complete).
pub const STDOUT_CLOSED: u8 = b'C';
/// Guest to host: the program's wait status (u32 LE).
pub const EXIT: u8 = b'X';
/// Guest to host: init failed (text).
pub const FAILED: u8 = b'F';

/// A frame that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A frame type this side does not know.
    UnknownType(u8),
    /// A frame longer than [`MAX_FRAME`].
    TooLong(usize),
    /// A payload that does not decode as its type says.
    Malformed(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::UnknownType(t) => write!(f, "unknown frame type {t:#04x}"),
            ProtoError::TooLong(n) => write!(f, "frame of {n} bytes exceeds {MAX_FRAME}"),
            ProtoError::Malformed(what) => write!(f, "malformed frame: {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Appends one frame to `out`. Senders keep payloads within [`MAX_FRAME`]; a payload too long
/// for the `u32` length says `u32::MAX`, which every receiver refuses ([`ProtoError::TooLong`]).
pub fn encode(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&len_u32(payload.len()).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A length as the protocol's `u32` (`u32::MAX` when it does not fit: refused by receivers).
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One frame as a fresh buffer.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    encode(&mut v, kind, payload);
    v
}

/// Splits a byte stream into frames. Feed it whatever arrives; take frames out as they
/// complete.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes as they arrived.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, ProtoError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            self.compact();
            return Ok(None);
        }
        let kind = avail[0];
        if !is_known(kind) {
            return Err(ProtoError::UnknownType(kind));
        }
        let len = u32::from_le_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLong(len));
        }
        if avail.len() < HEADER_LEN + len {
            self.compact();
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        Ok(Some((kind, payload)))
    }

    /// Bytes received but not yet returned in a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

fn is_known(kind: u8) -> bool {
    matches!(
        kind,
        HELLO | START | DATA | DATA_END | STDOUT | STDERR | STDOUT_CLOSED | EXIT | FAILED
    )
}

/// What the guest's init runs: `program` with `args` (argv[0] included) and exactly `env`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Start {
    /// The program's path in the guest.
    pub program: Vec<u8>,
    /// argv, argv[0] included.
    pub args: Vec<Vec<u8>>,
    /// `NAME=value` entries.
    pub env: Vec<Vec<u8>>,
    /// Working directory for the program (empty: `/`).
    pub cwd: Vec<u8>,
    /// Fresh random bytes from the host, mixed into the guest's entropy pool (and its CRNG
    /// reseeded) before the program starts: a VM cloned from a snapshot must not share the
    /// random state of its siblings (at most [`MAX_SEED`] bytes; empty: none).
    pub seed: Vec<u8>,
    /// The host's wall-clock time, ns since the Unix epoch, set as the guest's before the
    /// program starts (0: not set).
    pub now_ns: u64,
}

/// Largest [`Start::seed`].
pub const MAX_SEED: usize = 256;

impl Start {
    /// Payload layout: four sections, each a `u32` count of NUL-free strings followed by the
    /// strings, each a `u32` length and its bytes: program (1), args, env, cwd (0 or 1); then
    /// the seed (a `u32` length, at most [`MAX_SEED`], and its bytes) and the time (`u64`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put = |out: &mut Vec<u8>, items: &[&[u8]]| {
            out.extend_from_slice(&len_u32(items.len()).to_le_bytes());
            for s in items {
                out.extend_from_slice(&len_u32(s.len()).to_le_bytes());
                out.extend_from_slice(s);
            }
        };
        put(&mut out, &[&self.program]);
        put(
            &mut out,
            &self.args.iter().map(|a| a.as_slice()).collect::<Vec<_>>(),
        );
        put(
            &mut out,
            &self.env.iter().map(|a| a.as_slice()).collect::<Vec<_>>(),
        );
        if self.cwd.is_empty() {
            put(&mut out, &[]);
        } else {
            put(&mut out, &[&self.cwd]);
        }
        out.extend_from_slice(&len_u32(self.seed.len()).to_le_bytes());
        out.extend_from_slice(&self.seed);
        out.extend_from_slice(&self.now_ns.to_le_bytes());
        out
    }

    /// Reads a [`Start::encode`]d payload, checking every count and length against it.
    pub fn decode(mut data: &[u8]) -> Result<Start, ProtoError> {
        let mut sections: Vec<Vec<Vec<u8>>> = Vec::with_capacity(4);
        for _ in 0..4 {
            let count = take_u32(&mut data)? as usize;
            if count > data.len() {
                return Err(ProtoError::Malformed("string count exceeds the frame"));
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let len = take_u32(&mut data)? as usize;
                if len > data.len() {
                    return Err(ProtoError::Malformed("string length exceeds the frame"));
                }
                let (s, rest) = data.split_at(len);
                if s.contains(&0) {
                    return Err(ProtoError::Malformed("NUL byte in a string"));
                }
                items.push(s.to_vec());
                data = rest;
            }
            sections.push(items);
        }
        let seed_len = take_u32(&mut data)? as usize;
        if seed_len > MAX_SEED || seed_len > data.len() {
            return Err(ProtoError::Malformed("seed too long"));
        }
        let (seed, rest) = data.split_at(seed_len);
        data = rest;
        if data.len() != 8 {
            return Err(ProtoError::Malformed("no time, or trailing bytes"));
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(data);
        let now_ns = u64::from_le_bytes(t);
        let mut it = sections.into_iter();
        let mut program = it.next().unwrap_or_default();
        let args = it.next().unwrap_or_default();
        let env = it.next().unwrap_or_default();
        let mut cwd = it.next().unwrap_or_default();
        if program.len() != 1 || program[0].is_empty() {
            return Err(ProtoError::Malformed("exactly one non-empty program path"));
        }
        if cwd.len() > 1 {
            return Err(ProtoError::Malformed("more than one working directory"));
        }
        Ok(Start {
            program: program.remove(0),
            args,
            env,
            cwd: cwd.pop().unwrap_or_default(),
            seed: seed.to_vec(),
            now_ns,
        })
    }
}

fn take_u32(data: &mut &[u8]) -> Result<u32, ProtoError> {
    if data.len() < 4 {
        return Err(ProtoError::Malformed("truncated length"));
    }
    let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    *data = &data[4..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let mut stream = Vec::new();
        encode(&mut stream, HELLO, b"");
        encode(&mut stream, STDOUT, b"Status: 200\r\n\r\nhi");
        encode(&mut stream, EXIT, &0u32.to_le_bytes());
        for cut in 1..stream.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                d.feed(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 3, "cut {cut}");
            assert_eq!(got[0], (HELLO, vec![]));
            assert_eq!(got[1].1, b"Status: 200\r\n\r\nhi");
            assert_eq!(got[2], (EXIT, vec![0, 0, 0, 0]));
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn unknown_and_oversized_frames_are_errors() {
        let mut d = Decoder::new();
        d.feed(&[b'?', 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(ProtoError::UnknownType(b'?')));
        let mut d = Decoder::new();
        d.feed(&[DATA, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(ProtoError::TooLong(_))));
    }

    #[test]
    fn start_round_trips_and_rejects_garbage() {
        let s = Start {
            program: b"/handler".to_vec(),
            args: vec![b"/handler".to_vec(), b"a b".to_vec()],
            env: vec![b"QUERY_STRING=x=1&y=2".to_vec(), b"EMPTY=".to_vec()],
            cwd: b"/".to_vec(),
            seed: vec![0, 1, 2, 0, 255],
            now_ns: 1_800_000_000_000_000_000,
        };
        let enc = s.encode();
        assert_eq!(Start::decode(&enc).unwrap(), s);
        for cut in 0..enc.len() {
            assert!(Start::decode(&enc[..cut]).is_err(), "prefix {cut}");
        }
        let mut extra = enc.clone();
        extra.push(1);
        assert!(Start::decode(&extra).is_err());
        let long_seed = Start {
            program: b"/h".to_vec(),
            seed: vec![7; MAX_SEED + 1],
            ..Default::default()
        };
        assert!(
            Start::decode(&long_seed.encode()).is_err(),
            "a seed past MAX_SEED"
        );
        let nul = Start {
            program: b"/a\0b".to_vec(),
            ..Default::default()
        };
        assert!(Start::decode(&nul.encode()).is_err());
        let none = Start::default();
        assert!(Start::decode(&none.encode()).is_err());
    }
}
