//! The CGI/1.1 meta-variables (`xcgi_gateway::cgi::environment`) built from an untrusted
//! request: method, version, path (through `path::normalize`, as the server routes it), query,
//! header names and values (only what `http` accepts as valid, as hyper would hand it over),
//! plus a route from a configuration that `Config` accepts.
//!
//! Invariants (the environment goes to `execve` in the guest), when `environment` accepts the
//! request (it may refuse one too large for a handler):
//! - every entry is `NAME=value` with NAME non-empty, no NUL byte anywhere;
//! - no name appears twice;
//! - the values the gateway copies verbatim are there: REQUEST_METHOD, QUERY_STRING, the
//!   route's own variables, GATEWAY_INTERFACE; never HTTP_PROXY or HTTP_PROXY_AUTHORIZATION,
//!   HTTP_AUTHORIZATION only when the route passes it, REMOTE_USER and AUTH_TYPE never.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use libfuzzer_sys::fuzz_target;
use xcgi_gateway::cgi::{environment, RequestInfo};
use xcgi_gateway::config::{Config, Mode, NetworkSection, Route, ServerSection};
use xcgi_gateway::path::normalize;

/// Header names worth hitting often (special-cased by the gateway, or colliding once
/// upper-cased and `-` -> `_`).
const NAMES: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "authorization",
    "proxy-authorization",
    "proxy",
    "connection",
    "x-a",
    "x_a",
    "cookie",
    "path",
    "accept",
];

/// Route variables worth hitting often.
const ENV_NAMES: &[&str] = &[
    "PATH",
    "QUERY_STRING",
    "REQUEST_METHOD",
    "HTTP_HOST",
    "SCRIPT_NAME",
    "GREETING",
];

const METHODS: &[&str] = &["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"];

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    /// A length byte, then that many bytes (fewer at the end of the input).
    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn addr(&mut self) -> SocketAddr {
        let ip = if self.byte() & 1 == 0 {
            IpAddr::V4(Ipv4Addr::from([
                self.byte(),
                self.byte(),
                self.byte(),
                self.byte(),
            ]))
        } else {
            let mut b = [0u8; 16];
            b.iter_mut().for_each(|x| *x = self.byte());
            IpAddr::V6(Ipv6Addr::from(b))
        };
        SocketAddr::new(ip, self.u16())
    }
}

/// Text as it can reach `environment`: a request-target piece or a handler's `Location`
/// value, both of which `http` validated (visible ASCII, space, tab, bytes >= 0x80).
fn header_safe(s: String) -> String {
    s.chars()
        .filter(|&c| c == '\t' || (c >= ' ' && c != '\x7f'))
        .collect()
}

fn handler() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| std::env::current_exe().expect("current_exe"))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.byte();

    let method = match input.byte() {
        b if usize::from(b) < METHODS.len() => {
            Method::from_bytes(METHODS[usize::from(b)].as_bytes())
        }
        _ => Method::from_bytes(input.bytes()),
    };
    let Ok(method) = method else {
        return;
    };

    // The route, through the configuration's own checks.
    let mut route = Route::quick(handler(), Mode::Cgi);
    route.prefix = format!("/{}", input.string());
    route.document_root = input.string();
    route.pass_authorization = flags & 4 != 0;
    for _ in 0..input.byte() % 4 {
        let name = match input.byte() {
            b if usize::from(b) < ENV_NAMES.len() => ENV_NAMES[usize::from(b)].to_string(),
            _ => input.string(),
        };
        let value = input.string();
        route.env.insert(name, value);
    }
    let Ok(config) = Config::from_parts(
        ServerSection::default(),
        NetworkSection::default(),
        vec![route],
    ) else {
        return;
    };
    let route = &config.routes[0];

    // The request. As the server does: the path normalised, only under the route's prefix.
    let tail = input.string();
    // What reaches `normalize` is a request-target path or a `Location` value: both valid
    // for `http` (no control characters but tab).
    let raw = header_safe(if flags & 1 != 0 {
        format!("{}{}", route.prefix.trim_end_matches('/'), tail)
    } else {
        format!("/{tail}")
    });
    let Ok(path) = normalize(&raw) else {
        return;
    };
    let path = path.decoded;
    if config.route_for(&path).is_none() {
        return;
    }
    let version = [
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
        Version::HTTP_3,
    ][usize::from(flags >> 4) % 5];
    let query = header_safe(input.string());
    let mut headers = HeaderMap::new();
    for _ in 0..input.byte() % 8 {
        let name = match input.byte() {
            b if usize::from(b) < NAMES.len() => HeaderName::from_static(NAMES[usize::from(b)]),
            _ => match HeaderName::from_bytes(input.bytes()) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let Ok(value) = HeaderValue::from_bytes(input.bytes()) else {
            continue;
        };
        headers.append(name, value);
    }
    let remote = input.addr();
    let local = input.addr();
    let content_length = (flags & 2 != 0).then(|| {
        u64::from_le_bytes([
            input.byte(),
            input.byte(),
            input.byte(),
            input.byte(),
            0,
            0,
            0,
            input.byte(),
        ])
    });

    let info = RequestInfo {
        method: &method,
        version,
        path: &path,
        query: &query,
        headers: &headers,
        remote,
        local,
        script_name: &route.prefix,
        document_root: &route.document_root,
        content_length,
        pass_authorization: route.pass_authorization,
    };
    let extra: Vec<(String, String)> = route
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let Ok(env) = environment(&info, &extra) else {
        return;
    };

    let mut names = HashSet::new();
    for entry in &env {
        assert!(
            !entry.contains('\0'),
            "NUL byte in environment entry {entry:?}"
        );
        let Some((name, _)) = entry.split_once('=') else {
            panic!("environment entry without '=': {entry:?}");
        };
        assert!(
            !name.is_empty(),
            "empty name in environment entry {entry:?}"
        );
        assert!(names.insert(name), "{name} set twice: {env:#?}");
    }
    let has = |want: &str| env.iter().any(|e| e == want);
    assert!(has("GATEWAY_INTERFACE=CGI/1.1"), "{env:#?}");
    assert!(has(&format!("REQUEST_METHOD={method}")), "{env:#?}");
    assert!(has(&format!("QUERY_STRING={query}")), "{env:#?}");
    for (k, v) in &extra {
        assert!(
            has(&format!("{k}={v}")),
            "route variable {k} missing: {env:#?}"
        );
    }
    for forbidden in [
        "HTTP_PROXY",
        "HTTP_PROXY_AUTHORIZATION",
        "REMOTE_USER",
        "AUTH_TYPE",
    ] {
        let from_route = extra.iter().any(|(k, _)| k == forbidden);
        assert!(
            from_route || !names.contains(forbidden),
            "{forbidden} set: {env:#?}"
        );
    }
    if !route.pass_authorization && !extra.iter().any(|(k, _)| k == "HTTP_AUTHORIZATION") {
        assert!(
            !names.contains("HTTP_AUTHORIZATION"),
            "Authorization passed: {env:#?}"
        );
    }
});
