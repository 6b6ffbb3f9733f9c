//! CGI/1.1 (RFC 3875): the request meta-variables a handler gets as its environment, and the
//! parser for the response a handler writes on its stdout.

use std::net::SocketAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// Longest response header block accepted from a handler.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// PATH given to handlers unless the route's environment sets one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// SERVER_SOFTWARE for every request: `xcgi/<version>`.
pub const SERVER_SOFTWARE: &str = concat!("xcgi/", env!("CARGO_PKG_VERSION"));

/// Longest single `NAME=value` string handed to a handler: Linux refuses a longer one in
/// execve (MAX_ARG_STRLEN, 128 KiB with its NUL).
pub const MAX_ENV_STRING: usize = 128 * 1024 - 1;
/// Most bytes of environment (all strings together) handed to a handler.
pub const MAX_ENV_TOTAL: usize = 256 * 1024;

/// The request's environment is too large for a handler (the client gets 431).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// One `NAME=value` string is longer than [`MAX_ENV_STRING`].
    #[error("the variable {name} is {len} bytes: more than a handler accepts ({MAX_ENV_STRING})")]
    VariableTooLong {
        /// The variable's name.
        name: String,
        /// Length of its `NAME=value` string, in bytes.
        len: usize,
    },
    /// All strings together, with their NULs, exceed [`MAX_ENV_TOTAL`]; holds their total in
    /// bytes.
    #[error(
        "the request's environment is {0} bytes: more than a handler accepts ({MAX_ENV_TOTAL})"
    )]
    TooLarge(usize),
}

/// What the meta-variables are made from.
#[derive(Debug, Clone)]
pub struct RequestInfo<'a> {
    /// The request method (REQUEST_METHOD).
    pub method: &'a Method,
    /// The request's protocol (SERVER_PROTOCOL).
    pub version: hyper::Version,
    /// The decoded, normalised request path (see [`crate::path`]).
    pub path: &'a str,
    /// The query string as sent (not decoded), without `?`.
    pub query: &'a str,
    /// The request's header fields: the `HTTP_*` variables, CONTENT_TYPE, and SERVER_NAME
    /// and SERVER_PORT from `Host`.
    pub headers: &'a HeaderMap,
    /// The client's address: REMOTE_ADDR, REMOTE_HOST (the address again, no reverse
    /// lookup) and REMOTE_PORT.
    pub remote: SocketAddr,
    /// The address the request came in on: SERVER_NAME without a `Host` field, SERVER_PORT
    /// when `Host` names no port.
    pub local: SocketAddr,
    /// The route's prefix: SCRIPT_NAME.
    pub script_name: &'a str,
    /// The directory PATH_TRANSLATED maps PATH_INFO into (in the handler's filesystem).
    pub document_root: &'a str,
    /// The body length when there is a body.
    pub content_length: Option<u64>,
    /// Pass `Authorization` as HTTP_AUTHORIZATION (the route opted in).
    pub pass_authorization: bool,
}

/// The environment for a CGI handler, as `NAME=value` strings: the RFC 3875 meta-variables,
/// one `HTTP_*` per request header (minus Authorization unless the route passes it,
/// Proxy-Authorization, Content-Type, Content-Length, hop-by-hop Connection, and any name
/// with `_`, which would pass for the same variable as its `-` twin), then `extra` (route
/// configuration), which wins over PATH only.
///
/// The server authenticates nobody, so REMOTE_USER and AUTH_TYPE are never set: a handler
/// must not take a client's unverified Basic credentials for an identity (RFC 3875 4.1.1,
/// 4.1.11 say both come from the server's own authentication).
pub fn environment(
    req: &RequestInfo<'_>,
    extra: &[(String, String)],
) -> Result<Vec<String>, EnvError> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(32 + req.headers.len());
    meta_variables(req, &mut env);
    header_variables(req, &mut env);
    if !extra.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_string(), DEFAULT_PATH.into()));
    }
    for (k, v) in extra {
        env.push((k.clone(), v.clone()));
    }
    check_size(&env)?;
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// The RFC 3875 meta-variables (section 4.1), save the `HTTP_*` ones.
fn meta_variables(req: &RequestInfo<'_>, env: &mut Vec<(String, String)>) {
    let mut put = |k: &str, v: String| env.push((k.to_string(), v));
    put("GATEWAY_INTERFACE", "CGI/1.1".into());
    put("SERVER_PROTOCOL", protocol(req.version).into());
    put("SERVER_SOFTWARE", SERVER_SOFTWARE.into());
    let (server_name, server_port) = server_name_port(req);
    put("SERVER_NAME", server_name);
    put("SERVER_PORT", server_port.to_string());
    put("REQUEST_METHOD", req.method.as_str().into());
    let script_name = req.script_name.trim_end_matches('/');
    put("SCRIPT_NAME", script_name.into());
    let path_info = req.path.strip_prefix(script_name).unwrap_or("");
    if !path_info.is_empty() {
        put("PATH_INFO", path_info.into());
        let root = req.document_root.trim_end_matches('/');
        put("PATH_TRANSLATED", format!("{root}{path_info}"));
    }
    put("QUERY_STRING", req.query.into());
    put("REMOTE_ADDR", req.remote.ip().to_string());
    put("REMOTE_HOST", req.remote.ip().to_string());
    put("REMOTE_PORT", req.remote.port().to_string());
    if let Some(len) = req.content_length {
        put("CONTENT_LENGTH", len.to_string());
    }
    if let Some(ct) = header_str(req.headers, "content-type") {
        put("CONTENT_TYPE", ct);
    }
}

/// One `HTTP_*` per header field, repeated fields joined with ", " (RFC 3875 4.1.18), minus
/// the fields [`environment`] names.
fn header_variables(req: &RequestInfo<'_>, env: &mut Vec<(String, String)>) {
    let mut seen: Vec<&HeaderName> = Vec::new();
    for name in req.headers.keys() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let n = name.as_str();
        if matches!(
            n,
            "proxy-authorization" | "content-type" | "content-length" | "connection"
        ) || (n == "authorization" && !req.pass_authorization)
            || n.contains('_')
        {
            continue;
        }
        let values: Vec<String> = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let var = format!("HTTP_{}", n.to_ascii_uppercase().replace('-', "_"));
        // "Proxy" would become HTTP_PROXY, which CGI libraries read as their proxy (httpoxy).
        if var == "HTTP_PROXY" {
            continue;
        }
        env.push((var, values.join(", ")));
    }
}

/// Whether execve would take the environment: no `NAME=value` string over
/// [`MAX_ENV_STRING`], all together (with their NULs) no more than [`MAX_ENV_TOTAL`].
fn check_size(env: &[(String, String)]) -> Result<(), EnvError> {
    let mut total = 0;
    for (k, v) in env {
        let len = k.len() + 1 + v.len();
        if len > MAX_ENV_STRING {
            return Err(EnvError::VariableTooLong {
                name: k.clone(),
                len,
            });
        }
        total += len + 1;
    }
    if total > MAX_ENV_TOTAL {
        return Err(EnvError::TooLarge(total));
    }
    Ok(())
}

/// Whether the server sets `name` itself for every request (a route's `env` may not: the
/// environment would hold it twice, and which one a handler sees depends on its language).
/// `PATH` is the one a route may set.
pub fn is_gateway_variable(name: &str) -> bool {
    name.starts_with("HTTP_")
        || matches!(
            name,
            "GATEWAY_INTERFACE"
                | "SERVER_PROTOCOL"
                | "SERVER_SOFTWARE"
                | "SERVER_NAME"
                | "SERVER_PORT"
                | "REQUEST_METHOD"
                | "SCRIPT_NAME"
                | "PATH_INFO"
                | "PATH_TRANSLATED"
                | "QUERY_STRING"
                | "REMOTE_ADDR"
                | "REMOTE_HOST"
                | "REMOTE_PORT"
                | "REMOTE_USER"
                | "AUTH_TYPE"
                | "CONTENT_LENGTH"
                | "CONTENT_TYPE"
        )
}

fn protocol(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_09 => "HTTP/0.9",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2.0",
        hyper::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn server_name_port(req: &RequestInfo<'_>) -> (String, u16) {
    if let Some(host) = header_str(req.headers, "host") {
        // host [":" port], host may be a bracketed IPv6 literal.
        let (name, port) = match host.rfind(':') {
            Some(i) if !host[i..].contains(']') => (&host[..i], host[i + 1..].parse().ok()),
            _ => (host.as_str(), None),
        };
        if !name.is_empty() {
            return (name.to_string(), port.unwrap_or(req.local.port()));
        }
    }
    (req.local.ip().to_string(), req.local.port())
}

/// Why a handler's response cannot be used (the gateway answers 502 and logs this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgiResponseError {
    /// No blank line within the first [`MAX_HEADER_BLOCK`] bytes.
    #[error("the handler's header block exceeds {MAX_HEADER_BLOCK} bytes")]
    HeadersTooLong,
    /// The output ended before the blank line that ends the header block.
    #[error("the handler's output ended before the blank line that ends its headers")]
    Truncated,
    /// A line without `:`, or with an empty name or blanks around it; holds the line.
    #[error("malformed header line {0:?} (expected `Name: value`)")]
    BadLine(String),
    /// A field name HTTP does not allow; holds the name.
    #[error("invalid header field name {0:?}")]
    BadName(String),
    /// A field value HTTP does not allow (e.g. non-ASCII); holds the field's name.
    #[error("invalid value for header {0}")]
    BadValue(String),
    /// A `Status` whose code is not three digits from 200 to 599; holds its value.
    #[error("invalid Status {0:?} (expected a code from 200 to 599 and a reason)")]
    BadStatus(String),
    /// None of Content-Type, Location and Status (RFC 3875 6.2 needs one).
    #[error("no Content-Type, Location or Status header: not a CGI response")]
    NoCgiField,
    /// A local redirect (`Location: /...`) with other fields, a Status or a body; holds the
    /// location.
    #[error("local redirect {0:?} with other header fields or a body")]
    BadLocalRedirect(String),
}

/// A parsed CGI response head.
#[derive(Debug, Clone, PartialEq)]
pub enum CgiHead {
    /// Send to the client: status, headers, then the body.
    Document {
        /// `Status`, else 302 for a client redirect (a `Location` not starting with `/`),
        /// else 200.
        status: StatusCode,
        /// The handler's fields, less `Status` and the ones the server frames itself
        /// (Connection, Transfer-Encoding, Keep-Alive, Content-Length).
        headers: HeaderMap,
    },
    /// `Location: /path?query` alone: the server serves that path instead (RFC 3875 6.2.2).
    LocalRedirect {
        /// The path and query to serve instead, as the handler wrote it.
        location: String,
    },
}

/// Finds the end of the header block in `buf`: the index of the first body byte, or `None`
/// when the blank line has not arrived yet. Lines end with LF or CRLF.
pub fn header_end(buf: &[u8]) -> Option<usize> {
    HeadScanner::default().scan(buf)
}

/// Finds the end of a header block that arrives in pieces, looking at each byte once: a
/// handler (or a guest) writing its head a byte at a time costs linear time, not quadratic.
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Bytes of the buffer already looked at.
    scanned: usize,
    /// Where the line being scanned starts.
    line_start: usize,
}

impl HeadScanner {
    /// `buf` is everything received so far (the previous call's `buf` plus new bytes).
    /// Returns the index of the first body byte once the blank line is in `buf`.
    pub fn scan(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.min(buf.len());
        let mut found = None;
        for (off, &b) in buf[from..].iter().enumerate() {
            let i = from + off;
            if b == b'\n' {
                let line = &buf[self.line_start..i];
                if line.is_empty() || line == b"\r" {
                    found = Some(i + 1);
                    self.scanned = i + 1;
                    break;
                }
                self.line_start = i + 1;
            }
        }
        if found.is_none() {
            self.scanned = buf.len();
        }
        found
    }

    /// Bytes looked at so far.
    pub fn scanned(&self) -> usize {
        self.scanned
    }
}

/// Parses the header block (`block` ends with its blank line). `body_follows` tells whether
/// the handler wrote anything after it (matters for local redirects).
pub fn parse_head(block: &[u8], body_follows: bool) -> Result<CgiHead, CgiResponseError> {
    let mut headers = HeaderMap::new();
    let mut status: Option<StatusCode> = None;
    let mut location: Option<String> = None;
    let mut has_content_type = false;
    let mut other_fields = 0;
    for raw in block.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(CgiResponseError::BadLine(text.into_owned()));
        };
        if name.is_empty() || name.starts_with([' ', '\t']) || name.ends_with([' ', '\t']) {
            return Err(CgiResponseError::BadLine(text.into_owned()));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("status") {
            status = Some(parse_status(value)?);
            continue;
        }
        let hname = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CgiResponseError::BadName(name.to_string()))?;
        let hvalue = HeaderValue::from_str(value)
            .map_err(|_| CgiResponseError::BadValue(name.to_string()))?;
        if hname == hyper::header::LOCATION {
            location = Some(value.to_string());
        } else {
            if hname == hyper::header::CONTENT_TYPE {
                has_content_type = true;
            }
            other_fields += 1;
        }
        // Hop-by-hop and framing fields are the server's business, not the handler's.
        if matches!(
            hname.as_str(),
            "connection" | "transfer-encoding" | "keep-alive" | "content-length"
        ) {
            continue;
        }
        headers.append(hname, hvalue);
    }
    if let Some(loc) = &location {
        if loc.starts_with('/') {
            if other_fields > 0 || status.is_some() || body_follows {
                return Err(CgiResponseError::BadLocalRedirect(loc.clone()));
            }
            return Ok(CgiHead::LocalRedirect {
                location: loc.clone(),
            });
        }
        // Client redirect: 302 unless the handler chose a status.
        return Ok(CgiHead::Document {
            status: status.unwrap_or(StatusCode::FOUND),
            headers,
        });
    }
    if status.is_none() && !has_content_type {
        return Err(CgiResponseError::NoCgiField);
    }
    Ok(CgiHead::Document {
        status: status.unwrap_or(StatusCode::OK),
        headers,
    })
}

fn parse_status(value: &str) -> Result<StatusCode, CgiResponseError> {
    let code = value.split_whitespace().next().unwrap_or("");
    if code.len() != 3 {
        return Err(CgiResponseError::BadStatus(value.to_string()));
    }
    code.parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        // 1xx are interim responses the server's framing owns (a bare 101 would promise an
        // upgrade that never happens); above 599 is no HTTP status.
        .filter(|c| (200..=599).contains(&c.as_u16()))
        .ok_or_else(|| CgiResponseError::BadStatus(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(method: &str, path: &str, query: &str, headers: &[(&str, &str)]) -> Vec<String> {
        env_with(method, path, query, headers, hyper::Version::HTTP_11, false).unwrap()
    }

    fn env_with(
        method: &str,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
        version: hyper::Version,
        pass_authorization: bool,
    ) -> Result<Vec<String>, EnvError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let info = RequestInfo {
            method: &m,
            version,
            path,
            query,
            headers: &h,
            remote: "10.1.2.3:5555".parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
            script_name: "/cgi/",
            document_root: "/srv",
            content_length: if method == "POST" { Some(5) } else { None },
            pass_authorization,
        };
        environment(&info, &[("ROUTE_VAR".into(), "x".into())])
    }

    fn get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
        env.iter()
            .find_map(|e| e.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    #[test]
    fn meta_variables_follow_rfc3875() {
        let env = env_of(
            "POST",
            "/cgi/extra/path",
            "a=1&b=%20",
            &[
                ("host", "example.org:8443"),
                ("content-type", "text/plain"),
                ("content-length", "5"),
                ("x-thing", "one"),
                ("x-thing", "two"),
                ("authorization", "Basic YWxpY2U6c2VjcmV0"),
                ("proxy", "evil"),
            ],
        );
        let want = [
            ("GATEWAY_INTERFACE", "CGI/1.1"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("SERVER_NAME", "example.org"),
            ("SERVER_PORT", "8443"),
            ("REQUEST_METHOD", "POST"),
            ("SCRIPT_NAME", "/cgi"),
            ("PATH_INFO", "/extra/path"),
            ("PATH_TRANSLATED", "/srv/extra/path"),
            ("QUERY_STRING", "a=1&b=%20"),
            ("REMOTE_ADDR", "10.1.2.3"),
            ("REMOTE_HOST", "10.1.2.3"),
            ("CONTENT_LENGTH", "5"),
            ("CONTENT_TYPE", "text/plain"),
            ("HTTP_HOST", "example.org:8443"),
            ("HTTP_X_THING", "one, two"),
            ("PATH", DEFAULT_PATH),
            ("ROUTE_VAR", "x"),
        ];
        for (k, v) in want {
            assert_eq!(get(&env, k), Some(v), "{k} in {env:?}");
        }
        assert!(get(&env, "SERVER_SOFTWARE").unwrap().starts_with("xcgi/"));
        for absent in [
            "HTTP_AUTHORIZATION",
            "HTTP_CONTENT_TYPE",
            "HTTP_CONTENT_LENGTH",
            "HTTP_PROXY",
            "REMOTE_USER",
            "AUTH_TYPE",
        ] {
            assert_eq!(get(&env, absent), None, "{absent} must not be set");
        }
    }

    #[test]
    fn get_without_body_host_or_path_info() {
        let env = env_of("GET", "/cgi", "", &[]);
        assert_eq!(get(&env, "QUERY_STRING"), Some(""));
        assert_eq!(get(&env, "PATH_INFO"), None);
        assert_eq!(get(&env, "PATH_TRANSLATED"), None);
        assert_eq!(get(&env, "CONTENT_LENGTH"), None);
        assert_eq!(get(&env, "AUTH_TYPE"), None);
        assert_eq!(get(&env, "SERVER_NAME"), Some("127.0.0.1"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("8080"));
    }

    #[test]
    fn header_block_end_with_lf_or_crlf() {
        assert_eq!(header_end(b"Content-Type: a\r\n\r\nbody"), Some(19));
        assert_eq!(header_end(b"Content-Type: a\n\nbody"), Some(17));
        assert_eq!(header_end(b"Content-Type: a\r\n"), None);
        assert_eq!(header_end(b""), None);
    }

    #[test]
    fn documents_and_status() {
        let h = parse_head(b"Content-Type: text/plain\r\nX-A: 1\r\n\r\n", true).unwrap();
        let CgiHead::Document { status, headers } = h else {
            panic!()
        };
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers["x-a"], "1");
        let h = parse_head(b"Status: 404 Not Found\nContent-Type: text/html\n\n", true).unwrap();
        assert!(matches!(h, CgiHead::Document { status, .. } if status == StatusCode::NOT_FOUND));
        // Status alone is a valid CGI response (no body).
        let h = parse_head(b"Status: 204 No Content\n\n", false).unwrap();
        assert!(matches!(h, CgiHead::Document { status, .. } if status.as_u16() == 204));
        // Framing headers from the handler are dropped.
        let h = parse_head(
            b"Content-Type: a/b\nContent-Length: 99\nTransfer-Encoding: chunked\n\n",
            true,
        )
        .unwrap();
        let CgiHead::Document { headers, .. } = h else {
            panic!()
        };
        assert!(headers.get("content-length").is_none());
        assert!(headers.get("transfer-encoding").is_none());
    }

    #[test]
    fn redirects() {
        assert_eq!(
            parse_head(b"Location: /other?x=1\n\n", false).unwrap(),
            CgiHead::LocalRedirect {
                location: "/other?x=1".into()
            }
        );
        let h = parse_head(b"Location: http://example.org/\n\n", false).unwrap();
        let CgiHead::Document { status, headers } = h else {
            panic!()
        };
        assert_eq!(status, StatusCode::FOUND);
        assert_eq!(headers["location"], "http://example.org/");
        let h = parse_head(
            b"Status: 301 Moved\nLocation: https://x.org/\nContent-Type: text/html\n\n",
            true,
        )
        .unwrap();
        assert!(matches!(h, CgiHead::Document { status, .. } if status.as_u16() == 301));
        assert!(matches!(
            parse_head(b"Location: /x\nContent-Type: a/b\n\n", false),
            Err(CgiResponseError::BadLocalRedirect(_))
        ));
        assert!(matches!(
            parse_head(b"Location: /x\n\n", true),
            Err(CgiResponseError::BadLocalRedirect(_))
        ));
    }

    #[test]
    fn malformed_responses() {
        assert_eq!(
            parse_head(b"X-Only: 1\n\n", true),
            Err(CgiResponseError::NoCgiField)
        );
        assert!(matches!(
            parse_head(b"hello world\n\n", true),
            Err(CgiResponseError::BadLine(_))
        ));
        assert!(matches!(
            parse_head(b"Status: abc\n\n", true),
            Err(CgiResponseError::BadStatus(_))
        ));
        assert!(matches!(
            parse_head(b"Status: 99 Low\n\n", true),
            Err(CgiResponseError::BadStatus(_))
        ));
        assert!(matches!(
            parse_head(b"Bad Name: x\nContent-Type: a/b\n\n", true),
            Err(CgiResponseError::BadName(_))
        ));
    }

    #[test]
    fn unverified_credentials_give_no_identity_unless_the_route_passes_them() {
        let hdr = [("authorization", "Basic YWRtaW46eA==")]; // admin:x
        let env = env_of("GET", "/cgi", "", &hdr);
        for absent in ["REMOTE_USER", "AUTH_TYPE", "HTTP_AUTHORIZATION"] {
            assert_eq!(get(&env, absent), None, "{absent} in {env:?}");
        }
        let env = env_with("GET", "/cgi", "", &hdr, hyper::Version::HTTP_11, true).unwrap();
        assert_eq!(get(&env, "HTTP_AUTHORIZATION"), Some("Basic YWRtaW46eA=="));
        assert_eq!(get(&env, "REMOTE_USER"), None);
    }

    #[test]
    fn header_names_with_underscores_cannot_pose_as_their_dash_twin() {
        let env = env_of(
            "GET",
            "/cgi",
            "",
            &[("x-forwarded-for", "good"), ("x_forwarded_for", "evil")],
        );
        let hits: Vec<_> = env
            .iter()
            .filter(|e| e.starts_with("HTTP_X_FORWARDED_FOR="))
            .collect();
        assert_eq!(hits, ["HTTP_X_FORWARDED_FOR=good"]);
    }

    #[test]
    fn server_protocol_is_the_requests() {
        let env = env_with("GET", "/cgi", "", &[], hyper::Version::HTTP_10, false).unwrap();
        assert_eq!(get(&env, "SERVER_PROTOCOL"), Some("HTTP/1.0"));
    }

    #[test]
    fn an_environment_too_large_for_execve_is_refused() {
        let big = "v".repeat(200 * 1024);
        let r = env_with(
            "GET",
            "/cgi",
            "",
            &[("x-big", &big)],
            hyper::Version::HTTP_11,
            false,
        );
        assert!(matches!(r, Err(EnvError::VariableTooLong { .. })), "{r:?}");
        let mid = "v".repeat(100 * 1024);
        let hdr = [
            ("x-a", mid.as_str()),
            ("x-b", mid.as_str()),
            ("x-c", mid.as_str()),
        ];
        let r = env_with("GET", "/cgi", "", &hdr, hyper::Version::HTTP_11, false);
        assert!(matches!(r, Err(EnvError::TooLarge(_))), "{r:?}");
    }

    #[test]
    fn status_outside_200_to_599_is_refused() {
        for bad in [
            "100 Continue",
            "101 Switching",
            "199 X",
            "600 X",
            "999 Nope",
        ] {
            let head = format!("Status: {bad}\nContent-Type: a/b\n\n");
            assert!(
                matches!(
                    parse_head(head.as_bytes(), true),
                    Err(CgiResponseError::BadStatus(_))
                ),
                "{bad}"
            );
        }
        for good in ["200 OK", "599 X"] {
            let head = format!("Status: {good}\nContent-Type: a/b\n\n");
            assert!(parse_head(head.as_bytes(), true).is_ok(), "{good}");
        }
    }

    #[test]
    fn head_scanner_looks_at_each_byte_once() {
        // 64 KiB of header lines arriving a byte at a time: the whole-buffer rescan this
        // replaced looked at ~2^31 bytes here; the scanner looks at each once.
        let mut head = Vec::new();
        while head.len() < 64 * 1024 - 64 {
            head.extend_from_slice(b"X-Filler: 0123456789abcdef\r\n");
        }
        head.extend_from_slice(b"Content-Type: a/b\r\n\r\nbody");
        let mut sc = HeadScanner::default();
        let mut looked = 0;
        let mut end = None;
        for n in 1..=head.len() {
            let before = sc.scanned();
            end = sc.scan(&head[..n]);
            looked += sc.scanned() - before;
            if end.is_some() {
                break;
            }
        }
        assert_eq!(end, Some(head.len() - 4));
        assert_eq!(looked, head.len() - 4, "each byte looked at once");
        assert_eq!(end, header_end(&head));
    }
}
