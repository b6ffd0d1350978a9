//! SPEC §7 rules: which requests the cache may answer and which responses it may store.

use std::time::Duration;

/// File extensions (case-insensitive) whose `GET`/`HEAD` requests may be served from the cache.
pub const CACHEABLE_EXTENSIONS: [&str; 17] = [
    "css", "js", "mjs", "map", "png", "jpg", "jpeg", "gif", "svg", "ico", "webp", "avif", "woff",
    "woff2", "ttf", "otf", "txt",
];

/// RFC 9111 §1.2.2: delta-seconds too large to represent count as 2^31.
pub(super) const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// SPEC §7 request rule: `GET` or `HEAD`, no `Authorization`, and a path (query excluded) whose
/// last segment ends in one of [`CACHEABLE_EXTENSIONS`] (case-insensitive).
pub fn is_cacheable_request(method: &[u8], target: &[u8], has_authorization: bool) -> bool {
    if has_authorization || !(method == b"GET" || method == b"HEAD") {
        return false;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    match name.iter().rposition(|&b| b == b'.') {
        Some(dot) => {
            let ext = &name[dot + 1..];
            CACHEABLE_EXTENSIONS
                .iter()
                .any(|e| e.as_bytes().eq_ignore_ascii_case(ext))
        }
        None => false,
    }
}

/// Whether a backend response may be stored, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub enum Storability {
    /// Store it for `ttl`; when `vary_accept_encoding`, the request's `Accept-Encoding` joins the key.
    Store {
        /// What is left of its freshness lifetime (`s-maxage`, else `max-age`, else the
        /// default) once the `Age` it arrived with is taken off.
        ttl: Duration,
        /// The `Age` it arrived with, in seconds (0 without one): hits add their time here.
        age: u64,
        /// `Vary: Accept-Encoding` was present.
        vary_accept_encoding: bool,
    },
    /// Do not store it, for this (lower-case) reason.
    Skip(&'static str),
}

/// SPEC §7 response rule: status 200; a body of at most `max_bytes`; no `Set-Cookie`; no
/// `Cache-Control` `no-store`, `private` or `no-cache` (in any header, any case, with or without
/// an argument); `Vary` absent or only `Accept-Encoding`. Lifetime: `s-maxage`, else `max-age`,
/// else `default_ttl`; the first well-formed value of each counts, malformed ones are ignored, and
/// a lifetime of 0 is not stored.
///
/// `body_len` is `None` when the length is not known from the head (chunked or close-delimited):
/// `Store` may still be returned, and the caller must then stop buffering, and not insert, once
/// the streamed body exceeds `max_bytes`.
pub fn storability(
    status: u16,
    headers: &[(&[u8], &[u8])],
    body_len: Option<u64>,
    default_ttl: Duration,
    max_bytes: usize,
) -> Storability {
    if status != 200 {
        return Storability::Skip("status is not 200");
    }
    if body_len.is_some_and(|n| n > max_bytes as u64) {
        return Storability::Skip("body is larger than cache_max_object_bytes");
    }
    let (mut s_maxage, mut max_age, mut age) = (None, None, None);
    let mut vary_accept_encoding = false;
    for &(name, value) in headers {
        if name.eq_ignore_ascii_case(b"age") {
            // RFC 9111 §5.1: the first member of the first line; an invalid one is ignored.
            let first = list_elements(value).next().unwrap_or_default();
            age = age.or_else(|| Some(delta_seconds(first)));
        } else if name.eq_ignore_ascii_case(b"set-cookie") {
            return Storability::Skip("response sets a cookie");
        } else if name.eq_ignore_ascii_case(b"vary") {
            for field in list_elements(value) {
                if field == b"*" {
                    return Storability::Skip("vary is *");
                } else if field.eq_ignore_ascii_case(b"accept-encoding") {
                    vary_accept_encoding = true;
                } else {
                    return Storability::Skip("vary names a field other than accept-encoding");
                }
            }
        } else if name.eq_ignore_ascii_case(b"cache-control") {
            for (directive, argument) in Directives(value) {
                if directive.eq_ignore_ascii_case(b"no-store") {
                    return Storability::Skip("cache-control no-store");
                } else if directive.eq_ignore_ascii_case(b"private") {
                    return Storability::Skip("cache-control private");
                } else if directive.eq_ignore_ascii_case(b"no-cache") {
                    return Storability::Skip("cache-control no-cache");
                } else if directive.eq_ignore_ascii_case(b"s-maxage") {
                    match argument.and_then(delta_seconds) {
                        Some(seconds) => s_maxage = s_maxage.or(Some(seconds)),
                        // RFC 9111 §4.2.1: invalid freshness information counts as stale
                        // (max-age=-1 means "do not keep this", not "use the default").
                        None => return Storability::Skip("s-maxage is not delta-seconds"),
                    }
                } else if directive.eq_ignore_ascii_case(b"max-age") {
                    match argument.and_then(delta_seconds) {
                        Some(seconds) => max_age = max_age.or(Some(seconds)),
                        None => return Storability::Skip("max-age is not delta-seconds"),
                    }
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            && list_elements(value).any(|coding| !coding.eq_ignore_ascii_case(b"chunked"))
        {
            // The stored body has its chunked framing removed but would keep any other coding
            // (gzip) while hits carry no Transfer-Encoding to say so.
            return Storability::Skip("transfer coding other than chunked");
        }
    }
    let lifetime = s_maxage
        .or(max_age)
        .map_or(default_ttl, Duration::from_secs);
    if lifetime.is_zero() {
        return Storability::Skip("lifetime is 0");
    }
    // RFC 9111 §4.2.3: a response that spent time in caches upstream arrives that much older.
    let age = age.flatten().unwrap_or(0);
    let ttl = lifetime.saturating_sub(Duration::from_secs(age));
    if ttl.is_zero() {
        return Storability::Skip("already stale: its age is at least its lifetime");
    }
    Storability::Store {
        ttl,
        age,
        vary_accept_encoding,
    }
}

/// Non-empty, trimmed elements of a comma-separated header list.
pub(super) fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|e| !e.is_empty())
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &bytes[s..=e],
        _ => &[],
    }
}

/// `Cache-Control` directives as (name, argument); commas inside quoted arguments
/// (`private="set-cookie, x"`) do not split.
struct Directives<'a>(&'a [u8]);

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.0.is_empty() {
            let (mut quoted, mut escaped, mut end) = (false, false, self.0.len());
            for (i, &b) in self.0.iter().enumerate() {
                if escaped {
                    escaped = false;
                } else if quoted && b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    quoted = !quoted;
                } else if b == b',' && !quoted {
                    end = i;
                    break;
                }
            }
            let element = trim(&self.0[..end]);
            self.0 = self.0.get(end + 1..).unwrap_or_default();
            if element.is_empty() {
                continue;
            }
            return Some(match element.iter().position(|&b| b == b'=') {
                Some(eq) => (trim(&element[..eq]), Some(trim(&element[eq + 1..]))),
                None => (element, None),
            });
        }
        None
    }
}

/// A delta-seconds argument (quotes tolerated), clamped to 2^31; `None` when malformed.
fn delta_seconds(argument: &[u8]) -> Option<u64> {
    let digits = match argument {
        [b'"', inner @ .., b'"'] => inner,
        _ => argument,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| {
        (n * 10 + u64::from(d - b'0')).min(MAX_DELTA_SECONDS)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);
    const MAX: usize = 1024;

    fn store(ttl: u64, vary: bool) -> Storability {
        Storability::Store {
            ttl: Duration::from_secs(ttl),
            age: 0,
            vary_accept_encoding: vary,
        }
    }

    /// Stored with `ttl` left of its lifetime, having arrived `age` seconds old.
    fn aged(ttl: u64, age: u64) -> Storability {
        Storability::Store {
            ttl: Duration::from_secs(ttl),
            age,
            vary_accept_encoding: false,
        }
    }

    #[test]
    fn request_cacheability_follows_the_spec_table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool, bool)] = &[
            ("GET", "/app.css", false, true),
            ("HEAD", "/app.css", false, true),
            ("GET", "/a/b/c/app.JS", false, true),
            ("GET", "/font.WoFf2", false, true),
            ("GET", "/app.css?v=123", false, true),
            ("GET", "/app.css?file=x.php", false, true),
            ("GET", "http://example.com/app.css", false, true),
            ("GET", "/.css", false, true),
            ("GET", "/app.css", true, false),
            ("HEAD", "/app.css", true, false),
            ("POST", "/app.css", false, false),
            ("PUT", "/app.css", false, false),
            ("OPTIONS", "/app.css", false, false),
            ("get", "/app.css", false, false),
            ("GET", "/index.html", false, false),
            ("GET", "/", false, false),
            ("GET", "/css", false, false),
            ("GET", "/app.css/", false, false),
            ("GET", "/dir.css/file", false, false),
            ("GET", "/app.php?file=x.css", false, false),
            ("GET", "/app.css.php", false, false),
            ("GET", "/app.cs", false, false),
            ("GET", "/app.", false, false),
            ("GET", "", false, false),
        ];
        for &(method, target, auth, want) in cases {
            let got = is_cacheable_request(method.as_bytes(), target.as_bytes(), auth);
            assert_eq!(got, want, "{method} {target} authorization={auth}");
        }
    }

    #[test]
    fn every_listed_extension_is_cacheable() {
        for ext in CACHEABLE_EXTENSIONS {
            for name in [format!("/f.{ext}"), format!("/f.{}", ext.to_uppercase())] {
                assert!(
                    is_cacheable_request(b"GET", name.as_bytes(), false),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn storability_follows_the_spec_table() {
        type Case = (
            u16,
            &'static [(&'static str, &'static str)],
            Option<u64>,
            Storability,
        );
        let skip = Storability::Skip;
        let big = MAX as u64 + 1;
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (200, &[], Some(10), store(60, false)),
            (200, &[], None, store(60, false)),
            (200, &[], Some(MAX as u64), store(60, false)),
            (200, &[], Some(big), skip("body is larger than cache_max_object_bytes")),
            (203, &[], Some(1), skip("status is not 200")),
            (206, &[], Some(1), skip("status is not 200")),
            (304, &[], Some(0), skip("status is not 200")),
            (404, &[], Some(1), skip("status is not 200")),
            (200, &[("Set-Cookie", "a=b")], Some(1), skip("response sets a cookie")),
            (200, &[("set-cookie", "")], Some(1), skip("response sets a cookie")),
            (200, &[("Cache-Control", "no-store")], Some(1), skip("cache-control no-store")),
            (200, &[("cache-control", "public, NO-STORE")], None, skip("cache-control no-store")),
            (200, &[("Cache-Control", "private")], Some(1), skip("cache-control private")),
            (200, &[("Cache-Control", "private=\"x, y\"")], Some(1), skip("cache-control private")),
            (200, &[("Cache-Control", "no-cache")], Some(1), skip("cache-control no-cache")),
            (200, &[("Cache-Control", "no-cache=\"set-cookie\"")], Some(1), skip("cache-control no-cache")),
            (200, &[("Cache-Control", "max-age=5"), ("Cache-Control", "no-cache")], Some(1), skip("cache-control no-cache")),
            (200, &[("Cache-Control", "community=\"no-store, private\"")], Some(1), store(60, false)),
            (200, &[("Cache-Control", "no-storex, xprivate")], Some(1), store(60, false)),
            (200, &[("Vary", "Accept-Encoding")], Some(1), store(60, true)),
            (200, &[("vary", "accept-encoding , ACCEPT-ENCODING")], Some(1), store(60, true)),
            (200, &[("Vary", "")], Some(1), store(60, false)),
            (200, &[("Vary", "*")], Some(1), skip("vary is *")),
            (200, &[("Vary", "Accept-Encoding, *")], Some(1), skip("vary is *")),
            (200, &[("Vary", "Cookie")], Some(1), skip("vary names a field other than accept-encoding")),
            (200, &[("Vary", "Accept-Encoding"), ("Vary", "User-Agent")], Some(1), skip("vary names a field other than accept-encoding")),
            (200, &[("Cache-Control", "max-age=300")], Some(1), store(300, false)),
            (200, &[("Cache-Control", "max-age=52"), ("Age", "50")], Some(1), aged(2, 50)),
            (200, &[("Age", " 10 "), ("Age", "40")], Some(1), aged(50, 10)),
            (200, &[("Age", "abc")], Some(1), store(60, false)),
            (200, &[("Age", "3, 4")], Some(1), aged(57, 3)),
            (200, &[("Age", "1.5")], Some(1), store(60, false)),
            (200, &[("Age", "-5")], Some(1), store(60, false)),
            (200, &[("Cache-Control", "max-age=50"), ("Age", "50")], Some(1), skip("already stale: its age is at least its lifetime")),
            (200, &[("Age", "99999999999999999999")], Some(1), skip("already stale: its age is at least its lifetime")),
            (200, &[("Cache-Control", "max-age=\"300\"")], Some(1), store(300, false)),
            (200, &[("Cache-Control", "s-maxage=10, max-age=300")], Some(1), store(10, false)),
            (200, &[("Cache-Control", "max-age=300"), ("Cache-Control", "S-MAXAGE=10")], Some(1), store(10, false)),
            (200, &[("Cache-Control", "max-age=300, max-age=5")], Some(1), store(300, false)),
            (200, &[("Cache-Control", "max-age=abc")], Some(1), skip("max-age is not delta-seconds")),
            (200, &[("Cache-Control", "max-age=-1")], Some(1), skip("max-age is not delta-seconds")),
            (200, &[("Cache-Control", "max-age=")], Some(1), skip("max-age is not delta-seconds")),
            (200, &[("Cache-Control", "max-age")], Some(1), skip("max-age is not delta-seconds")),
            (200, &[("Cache-Control", "max-age=abc, max-age=7")], Some(1), skip("max-age is not delta-seconds")),
            (200, &[("Cache-Control", "s-maxage=x, max-age=7")], Some(1), skip("s-maxage is not delta-seconds")),
            (200, &[("Transfer-Encoding", "chunked")], None, store(60, false)),
            (200, &[("Transfer-Encoding", "gzip, chunked")], None, skip("transfer coding other than chunked")),
            (200, &[("Transfer-Encoding", "gzip")], None, skip("transfer coding other than chunked")),
            (200, &[("Cache-Control", "max-age=99999999999999999999999")], Some(1), store(1 << 31, false)),
            (200, &[("Cache-Control", "max-age=0")], Some(1), skip("lifetime is 0")),
            (200, &[("Cache-Control", "s-maxage=0, max-age=60")], Some(1), skip("lifetime is 0")),
            (200, &[("Cache-Control", "public, max-age=30, immutable")], Some(1), store(30, false)),
        ];
        for (status, headers, len, want) in cases {
            let headers: Vec<(&[u8], &[u8])> = headers
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect();
            let got = storability(*status, &headers, *len, TTL, MAX);
            assert_eq!(
                &got, want,
                "status={status} headers={headers:?} len={len:?}"
            );
        }
    }

    #[test]
    fn zero_default_ttl_without_max_age_is_not_stored() {
        let got = storability(200, &[], Some(1), Duration::ZERO, MAX);
        assert_eq!(got, Storability::Skip("lifetime is 0"));
    }

    #[test]
    fn response_with_set_cookie_can_never_be_stored() {
        let headers: &[(&[u8], &[u8])] = &[
            (b"Cache-Control", b"public, max-age=600"),
            (b"Set-Cookie", b"session=abc"),
        ];
        let got = storability(200, headers, Some(1), TTL, MAX);
        assert_eq!(got, Storability::Skip("response sets a cookie"));
    }
}
