//! The request path, made safe before routing: percent-decoded (RFC 3875 4.1.5: PATH_INFO
//! is decoded) and with its dot segments removed (RFC 3986 5.2.4), so `/ok/../env` is routed
//! to `/env` and nothing can climb above the root (`/env/../../etc/passwd`: 400).
//!
//! Refused (400): a path that climbs above `/`, an encoded `/` (`%2F`: after decoding it
//! could not be told from a separator, and would let `..%2F` climb), an encoded NUL, a bad
//! `%` escape, and bytes that do not decode to UTF-8.

/// Why a request path is refused (the client gets 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// More `..` segments than segments before them.
    #[error("the path climbs above the root with '..'")]
    Climbs,
    /// A `%` not followed by two hex digits.
    #[error("the path has an invalid percent escape")]
    BadEscape,
    /// `%2F`: once decoded it could not be told from a separator.
    #[error("the path has an encoded '/' (%2F)")]
    EncodedSlash,
    /// `%00`: no CGI variable or file name can hold a NUL.
    #[error("the path has an encoded NUL (%00)")]
    EncodedNul,
    /// The decoded bytes are not UTF-8.
    #[error("the path is not UTF-8 once decoded")]
    NotUtf8,
}

/// A request path after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    /// Decoded and normalised: what routing, SCRIPT_NAME and PATH_INFO use.
    pub decoded: String,
    /// Normalised but still percent-encoded as the client sent it: what an HTTP-mode guest
    /// is sent.
    pub raw: String,
}

impl RequestPath {
    /// The raw path without the first `n` segments (an HTTP route's `strip_prefix`), always
    /// starting with `/`.
    pub fn raw_without_segments(&self, n: usize) -> String {
        let mut rest = self.raw.as_str();
        for _ in 0..n {
            let Some(after) = rest.strip_prefix('/') else {
                break;
            };
            rest = match after.find('/') {
                Some(i) => &after[i..],
                None => "",
            };
        }
        if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        }
    }
}

/// Decodes and normalises `raw` (the path of the request target, without the query).
pub fn normalize(raw: &str) -> Result<RequestPath, PathError> {
    let Some(body) = raw.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    let mut out: Vec<(&str, String)> = Vec::new();
    let mut trailing_slash = false;
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.into_iter().enumerate() {
        let decoded = decode_segment(seg)?;
        match decoded.as_str() {
            "." => trailing_slash = i == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::Climbs);
                }
                trailing_slash = i == last;
            }
            _ => {
                out.push((seg, decoded));
                trailing_slash = false;
            }
        }
    }
    let mut path = RequestPath {
        decoded: String::with_capacity(raw.len()),
        raw: String::with_capacity(raw.len()),
    };
    for (r, d) in &out {
        path.raw.push('/');
        path.raw.push_str(r);
        path.decoded.push('/');
        path.decoded.push_str(d);
    }
    if trailing_slash || out.is_empty() {
        path.raw.push('/');
        path.decoded.push('/');
    }
    Ok(path)
}

fn decode_segment(seg: &str) -> Result<String, PathError> {
    if !seg.contains('%') {
        return Ok(seg.to_string());
    }
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let byte = (hi * 16 + lo) as u8;
            match byte {
                b'/' => return Err(PathError::EncodedSlash),
                0 => return Err(PathError::EncodedNul),
                _ => out.push(byte),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(p: &str) -> Result<String, PathError> {
        normalize(p).map(|r| r.decoded)
    }

    #[test]
    fn dot_segments_are_removed_as_rfc3986_says() {
        assert_eq!(dec("/ok/../env").unwrap(), "/env");
        assert_eq!(dec("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(dec("/a/b/..").unwrap(), "/a/");
        assert_eq!(dec("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(dec("/").unwrap(), "/");
        assert_eq!(dec("/a/..").unwrap(), "/");
        assert_eq!(dec("/a//b").unwrap(), "/a//b");
        assert_eq!(dec("/a/").unwrap(), "/a/");
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        assert_eq!(dec("/env/../../etc/passwd"), Err(PathError::Climbs));
        assert_eq!(dec("/.."), Err(PathError::Climbs));
        assert_eq!(dec("/env/%2e%2e/%2E%2E/etc"), Err(PathError::Climbs));
        assert_eq!(dec("/a/%2e%2e%2f%2e%2e/etc"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn segments_are_decoded_and_bad_escapes_refused() {
        assert_eq!(dec("/env/a%20b").unwrap(), "/env/a b");
        assert_eq!(dec("/caf%C3%A9").unwrap(), "/café");
        assert_eq!(dec("/a%2").unwrap_err(), PathError::BadEscape);
        assert_eq!(dec("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(dec("/a%00b").unwrap_err(), PathError::EncodedNul);
        assert_eq!(dec("/a%ff").unwrap_err(), PathError::NotUtf8);
        assert_eq!(dec("a/b").unwrap_err(), PathError::NotAbsolute);
    }

    #[test]
    fn the_raw_form_keeps_the_clients_encoding() {
        let p = normalize("/app/x/../a%20b?").unwrap();
        assert_eq!(p.raw, "/app/a%20b?");
        assert_eq!(p.raw_without_segments(1), "/a%20b?");
        assert_eq!(p.raw_without_segments(0), "/app/a%20b?");
        assert_eq!(normalize("/app").unwrap().raw_without_segments(1), "/");
    }
}
