//! Head writing: the request sent to a backend, the response sent to a client, and the balancer's own small responses.

use std::net::IpAddr;
use std::ops::Range;

use super::{
    list, Field, HeaderRange, RequestFraming, RequestHead, ResponseFraming, ResponseHead,
    ResponseOptions, Version,
};

/// Whether some Connection field names a header other than close/keep-alive/upgrade.
fn names_extra_fields(headers: &[HeaderRange], buf: &[u8]) -> bool {
    connection_tokens(headers, buf).any(|t| {
        !t.eq_ignore_ascii_case(b"close")
            && !t.eq_ignore_ascii_case(b"keep-alive")
            && !t.eq_ignore_ascii_case(b"upgrade")
    })
}

fn connection_tokens<'a>(
    headers: &'a [HeaderRange],
    buf: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(|h| h.field == Field::Connection)
        .flat_map(move |h| list(&buf[h.value.clone()]))
}

fn named_by_connection(headers: &[HeaderRange], buf: &[u8], name: &[u8]) -> bool {
    connection_tokens(headers, buf).any(|t| t.eq_ignore_ascii_case(name))
}

/// Appends field lines the proxy forwards unchanged, copying runs of them at once: lines that
/// ended in CRLF sit back to back in the received buffer, so a run of them is one copy where
/// `put_header` per line would be four. A line goes out as received from its name to the end
/// of its value (httparse has checked the colon and whitespace between), then CRLF, so a bare
/// LF line ending or trailing whitespace is not passed on.
#[derive(Default)]
struct VerbatimLines {
    run: Option<Range<usize>>,
}

impl VerbatimLines {
    fn push(&mut self, out: &mut Vec<u8>, buf: &[u8], h: &HeaderRange) {
        // An empty value's range need not point into its line (httparse may hand out a
        // static ""), so that line ends at the colon.
        let end = if h.value.is_empty() {
            h.name.end + 1
        } else {
            h.value.end
        };
        if buf.get(h.name.end) != Some(&b':') || end <= h.name.end {
            // Not laid out as httparse leaves a line (its configuration here never does
            // this); written from the parts instead.
            self.flush(out, buf);
            put_header(out, &buf[h.name.clone()], &buf[h.value.clone()]);
            return;
        }
        match &mut self.run {
            Some(run) if buf.get(run.end..h.name.start) == Some(b"\r\n") => run.end = end,
            _ => {
                self.flush(out, buf);
                self.run = Some(h.name.start..end);
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>, buf: &[u8]) {
        if let Some(run) = self.run.take() {
            out.extend_from_slice(&buf[run]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    // Status codes, address octets and small lengths: pushed digit by digit, which is cheaper
    // than a copy call for one to three bytes; at least six of these per request.
    if n < 1000 {
        if n >= 100 {
            out.push(b'0' + (n / 100) as u8);
        }
        if n >= 10 {
            out.push(b'0' + (n / 10 % 10) as u8);
        }
        out.push(b'0' + (n % 10) as u8);
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn put_status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    put_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// Appends to `out` the HTTP/1.1 request head sent to the backend.
///
/// Origin-form target; Host first (the authority of an absolute-form target wins, an empty
/// Host when the client sent none); hop-by-hop fields and those Connection names dropped,
/// except that a websocket upgrade gets `Upgrade: websocket` and `Connection: upgrade`;
/// one normalized Content-Length; `X-Forwarded-For` extended with `client_ip`;
/// `X-Forwarded-Proto: http`; Expect kept except from an HTTP/1.0 client; one
/// `Transfer-Encoding: chunked` line for a chunked body. The fields the proxy itself defines
/// (Host, Content-Length, Transfer-Encoding, Expect, X-Forwarded-*) cannot be removed by
/// naming them in Connection, but a client's own `X-Forwarded-For` so named is dropped.
pub fn write_forward_request(head: &RequestHead, buf: &[u8], client_ip: IpAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method(buf));
    out.push(b' ');
    let path = &buf[head.path.clone()];
    if path.is_empty() && head.authority.is_some() && head.method(buf) == b"OPTIONS" {
        // RFC 9112 §3.2.4: the server-wide OPTIONS, asked through a proxy.
        out.push(b'*');
    } else if path.first() != Some(&b'/') && path != b"*" {
        out.push(b'/'); // absolute-form without a path, or with only a query
    }
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host = head.authority.as_ref().or(head.host.as_ref());
    put_header(out, b"Host", host.map_or(&b""[..], |r| &buf[r.clone()]));

    let check_named = names_extra_fields(&head.headers, buf);
    let mut has_xff = false;
    let mut lines = VerbatimLines::default();
    for h in &head.headers {
        let name = &buf[h.name.clone()];
        match h.field {
            // An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1).
            Field::Expect if head.version == Version::Http10 => continue,
            // Written below as one canonical line: the request passed parsing with chunked as
            // its only coding, however the client spread it over lines and empty elements.
            Field::TransferEncoding => continue,
            Field::Expect => {}
            Field::XForwardedFor => {
                // Named in Connection, the client's value goes like any field so named.
                has_xff = !(check_named && named_by_connection(&head.headers, buf, name));
                continue;
            }
            Field::Host | Field::ContentLength | Field::XForwardedProto => continue,
            f if f.is_hop_by_hop() => continue,
            _ if check_named && named_by_connection(&head.headers, buf, name) => continue,
            _ => {}
        }
        lines.push(out, buf, h);
    }
    lines.flush(out, buf);
    match head.framing {
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        RequestFraming::None => {}
    }
    if head.websocket_upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: upgrade\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if has_xff {
        let existing = head
            .headers
            .iter()
            .filter(|h| h.field == Field::XForwardedFor)
            .flat_map(|h| list(&buf[h.value.clone()]));
        for value in existing {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    put_ip(out, client_ip);
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\n\r\n");
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // The common case, without going through fmt.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                put_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing into a Vec cannot fail; the Vec only grows.
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends to `out` the response head sent to the client.
///
/// `HTTP/1.1 {status} {reason}` (the standard phrase when the backend sent none); the
/// backend's fields minus hop-by-hop and Connection-named ones (101 keeps Upgrade and gets
/// `Connection: upgrade`); Content-Length normalized for a length-delimited body and dropped
/// when Transfer-Encoding overrides it; Transfer-Encoding dropped when `dechunk` (which also
/// forces `Connection: close`); then `extra`; then Connection per `opts`, which interim (1xx)
/// responses never carry.
pub fn write_response_head(
    head: &ResponseHead,
    buf: &[u8],
    opts: &ResponseOptions<'_>,
    out: &mut Vec<u8>,
) {
    let reason = match &buf[head.reason.clone()] {
        [] => reason_phrase(head.status).as_bytes(),
        reason => reason,
    };
    put_status_line(out, head.status, reason);
    let check_named = names_extra_fields(&head.headers, buf);
    // RFC 9112 §6.2: a sender MUST NOT send Content-Length with Transfer-Encoding, which
    // overrides it (§6.3), bodiless responses (HEAD, 304) included.
    let has_te = head.framing == ResponseFraming::None
        && head
            .headers
            .iter()
            .any(|h| h.field == Field::TransferEncoding);
    // RFC 9110 §8.6, RFC 9112 §6.1: a 1xx or 204 carries neither (a backend's are dropped).
    let no_body_fields = head.status < 200 || head.status == 204;
    let mut lines = VerbatimLines::default();
    for h in &head.headers {
        let name = &buf[h.name.clone()];
        match h.field {
            Field::ContentLength | Field::TransferEncoding if no_body_fields => continue,
            Field::ContentLength if head.framing != ResponseFraming::None || has_te => continue,
            Field::ContentLength => {}
            // RFC 9112 §6.1: never to an HTTP/1.0 client (a chunked body is de-chunked; a
            // bodiless HEAD or 304 answer just loses the field).
            Field::TransferEncoding if opts.dechunk || opts.client_version == Version::Http10 => {
                continue
            }
            Field::TransferEncoding if list(&buf[h.value.clone()]).next().is_none() => continue,
            Field::TransferEncoding => {}
            Field::Upgrade if head.upgraded => {}
            f if f.is_hop_by_hop() => continue,
            _ if check_named && named_by_connection(&head.headers, buf, name) => continue,
            // The balancer's own (X-Cache) replaces a backend's field of the same name.
            _ if opts
                .extra
                .iter()
                .any(|(extra, _)| name.eq_ignore_ascii_case(extra.as_bytes())) =>
            {
                continue
            }
            _ => {}
        }
        lines.push(out, buf, h);
    }
    lines.flush(out, buf);
    if let ResponseFraming::Length(n) = head.framing {
        out.extend_from_slice(b"Content-Length: ");
        put_u64(out, n);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in opts.extra {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    if head.upgraded {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if !head.interim {
        put_connection(out, opts.keep_alive && !opts.dechunk, opts.client_version);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the part of a cached response's head that every hit repeats: the status line and
/// the stored fields. Rendered once when the response is stored, so a hit copies one slice.
pub fn write_stored_head<'a>(
    status: u16,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut Vec<u8>,
) {
    put_status_line(out, status, reason_phrase(status).as_bytes());
    for (name, value) in fields {
        put_header(out, name, value);
    }
}

/// Appends a cache hit's head: `stored` (see `write_stored_head`), then `Age`,
/// `X-Cache: HIT`, the body's Content-Length and the client connection's own field.
pub fn write_hit_head(
    stored: &[u8],
    age: u64,
    body_len: usize,
    keep_alive: bool,
    client_version: Version,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(stored);
    out.extend_from_slice(b"Age: ");
    put_u64(out, age);
    out.extend_from_slice(b"\r\nX-Cache: HIT\r\nContent-Length: ");
    put_u64(out, body_len as u64);
    out.extend_from_slice(b"\r\n");
    put_connection(out, keep_alive, client_version);
    out.extend_from_slice(b"\r\n");
}

/// Appends the head of a 304 answered from the cache: of the stored fields only those a 304
/// carries (RFC 9110 §15.4.5: the validators, `Cache-Control`, `Expires`, `Vary`,
/// `Content-Location`, `Date`), then `Age`, `X-Cache: HIT` and the connection field. No
/// `Content-Length`: no body follows, and the 200's length need not be repeated.
pub fn write_not_modified_head<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    age: u64,
    keep_alive: bool,
    client_version: Version,
    out: &mut Vec<u8>,
) {
    const KEPT: [&[u8]; 7] = [
        b"etag",
        b"last-modified",
        b"cache-control",
        b"expires",
        b"vary",
        b"content-location",
        b"date",
    ];
    put_status_line(out, 304, reason_phrase(304).as_bytes());
    for (name, value) in fields {
        if KEPT.iter().any(|kept| name.eq_ignore_ascii_case(kept)) {
            put_header(out, name, value);
        }
    }
    out.extend_from_slice(b"Age: ");
    put_u64(out, age);
    out.extend_from_slice(b"\r\nX-Cache: HIT\r\n");
    put_connection(out, keep_alive, client_version);
    out.extend_from_slice(b"\r\n");
}

/// Appends a complete response the balancer makes itself, for an HTTP/1.1 client.
pub fn write_error_response(status: u16, keep_alive: bool, out: &mut Vec<u8>) {
    write_error_response_for(status, keep_alive, Version::Http11, out);
}

/// Appends a complete response the balancer makes itself: a text/plain body such as
/// "502 bad gateway\n", Content-Length, and `Connection: close` unless `keep_alive`
/// (`Connection: keep-alive` to an HTTP/1.0 client that keeps the connection).
pub fn write_error_response_for(
    status: u16,
    keep_alive: bool,
    client_version: Version,
    out: &mut Vec<u8>,
) {
    write_error_head_for(status, keep_alive, client_version, out);
    put_error_body(status, out);
}

/// The head of `write_error_response_for` alone, as the answer to a HEAD request (its
/// Content-Length is the body's that a GET would get, RFC 9110 §9.3.2).
pub fn write_error_head_for(
    status: u16,
    keep_alive: bool,
    client_version: Version,
    out: &mut Vec<u8>,
) {
    let reason = reason_phrase(status);
    put_status_line(out, status, reason.as_bytes());
    out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: ");
    // Body: the status digits, a space, the phrase, a newline.
    let digits = status.checked_ilog10().unwrap_or(0) + 1;
    put_u64(out, u64::from(digits) + 1 + reason.len() as u64 + 1);
    out.extend_from_slice(b"\r\n");
    if status == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH\r\n");
    }
    put_connection(out, keep_alive, client_version);
    out.extend_from_slice(b"\r\n");
}

/// The Connection field of a response to a client: `close` unless `keep_alive`, and
/// `keep-alive` to an HTTP/1.0 client that keeps the connection (its default is to close).
fn put_connection(out: &mut Vec<u8>, keep_alive: bool, client_version: Version) {
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client_version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
}

/// The body of an answer the balancer makes: the status digits, a space, the lower-case
/// phrase, a newline.
fn put_error_body(status: u16, out: &mut Vec<u8>) {
    put_u64(out, u64::from(status));
    out.push(b' ');
    out.extend(
        reason_phrase(status)
            .bytes()
            .map(|b| b.to_ascii_lowercase()),
    );
    out.push(b'\n');
}

/// The standard reason phrase of a status code (RFC 9110 §15), or "" for an unknown one.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {

    use super::super::tests::{forward, forward_from, res, respond, IP, KEEP};
    use super::*;
    use crate::http::{parse_request, parse_response};
    use std::net::Ipv6Addr;

    #[test]
    fn absolute_form_is_rewritten_to_origin_form_with_its_host() {
        let cases = [
            (
                "GET http://a.b:8/x?y HTTP/1.1\r\nHost: other\r\n\r\n",
                "GET /x?y HTTP/1.1\r\nHost: a.b:8\r\n",
            ),
            (
                "GET http://a.b HTTP/1.0\r\n\r\n",
                "GET / HTTP/1.1\r\nHost: a.b\r\n",
            ),
            (
                "GET http://a.b?q HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "GET /?q HTTP/1.1\r\nHost: a.b\r\n",
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
                "OPTIONS * HTTP/1.1\r\nHost: h\r\n",
            ),
            (
                "OPTIONS http://a.b:8 HTTP/1.1\r\nHost: a.b:8\r\n\r\n",
                "OPTIONS * HTTP/1.1\r\nHost: a.b:8\r\n",
            ),
            (
                "OPTIONS http://a.b/ HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "OPTIONS / HTTP/1.1\r\nHost: a.b\r\n",
            ),
            (
                "OPTIONS http://a.b?q HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "OPTIONS /?q HTTP/1.1\r\nHost: a.b\r\n",
            ),
            ("GET /p HTTP/1.0\r\n\r\n", "GET /p HTTP/1.1\r\nHost: \r\n"),
        ];
        for (raw, start) in cases {
            let out = forward(raw);
            assert!(out.starts_with(start), "{raw:?} => {out:?}");
            assert_eq!(out.matches("Host:").count(), 1, "{out:?}");
        }
    }

    #[test]
    fn forward_request_is_exactly_as_expected() {
        let raw = "POST /form HTTP/1.0\r\nHost: shop\r\nConnection: keep-alive, X-Hop\r\n\
                   X-Hop: 1\r\nAccept: */*\r\nContent-Length: 005\r\nKeep-Alive: timeout=5\r\n\r\n";
        let expected = "POST /form HTTP/1.1\r\nHost: shop\r\nAccept: */*\r\nContent-Length: 5\r\n\
                        X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n\r\n";
        assert_eq!(forward(raw), expected);
    }

    #[test]
    fn x_forwarded_for_appends_the_client() {
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let cases = [
            ("", IP, "X-Forwarded-For: 10.1.2.3\r\n"),
            (
                "X-Forwarded-For: 1.1.1.1\r\n",
                IP,
                "X-Forwarded-For: 1.1.1.1, 10.1.2.3\r\n",
            ),
            (
                "X-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nAccept: */*\r\nx-forwarded-for: 3.3.3.3\r\n",
                IP,
                "X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3\r\n",
            ),
            ("X-Forwarded-For: \r\n", IP, "X-Forwarded-For: 10.1.2.3\r\n"),
            ("", v6, "X-Forwarded-For: ::1\r\n"),
        ];
        for (fields, ip, expected) in cases {
            let out = forward_from(&format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n"), ip);
            assert!(out.contains(expected), "{fields:?} => {out:?}");
            assert_eq!(
                out.to_ascii_lowercase().matches("x-forwarded-for").count(),
                1
            );
        }
    }

    #[test]
    fn expect_from_an_http10_client_is_ignored() {
        let raw = "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        assert!(!forward(raw).contains("Expect"));
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        assert!(forward(raw).contains("Expect: 100-continue\r\n"));
    }

    #[test]
    fn x_forwarded_proto_is_replaced() {
        let out = forward("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\nx-forwarded-proto: ftp\r\n\r\n");
        assert!(out.ends_with("X-Forwarded-Proto: http\r\n\r\n"), "{out:?}");
        assert_eq!(
            out.to_ascii_lowercase()
                .matches("x-forwarded-proto")
                .count(),
            1
        );
    }

    #[test]
    fn forward_drops_hop_by_hop_and_connection_named_fields() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Secret, x-other\r\nConnection: close\r\n\
                   Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\
                   Upgrade: h2c\r\nX-Secret: s\r\nX-Other: o\r\nX-Kept: k\r\n\r\n";
        let out = forward(raw).to_ascii_lowercase();
        for gone in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te:",
            "trailer",
            "upgrade",
            "x-secret",
            "x-other",
        ] {
            assert!(!out.contains(gone), "{gone} in {out:?}");
        }
        assert!(out.contains("x-kept: k\r\n"));
    }

    #[test]
    fn connection_cannot_remove_fields_the_proxy_defines() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nConnection: host, content-length, expect, x-forwarded-for\r\n\
                   Content-Length: 2\r\nExpect: 100-continue\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n";
        let out = forward(raw);
        for kept in [
            "Host: a\r\n",
            "Content-Length: 2\r\n",
            "Expect: 100-continue\r\n",
        ] {
            assert!(out.contains(kept), "{kept:?} missing from {out:?}");
        }
        // The client's own X-Forwarded-For, named in Connection, goes like any field so named;
        // the balancer's is still added.
        assert!(out.contains("X-Forwarded-For: 10.1.2.3\r\n"), "{out:?}");
        assert!(!out.contains("9.9.9.9"), "{out:?}");
    }

    #[test]
    fn forward_keeps_websocket_upgrade_and_chunked_framing() {
        let ws = forward("GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n");
        assert!(
            ws.contains("Upgrade: websocket\r\nConnection: upgrade\r\n"),
            "{ws:?}"
        );
        assert!(ws.contains("Sec-WebSocket-Key: k\r\n"));
        assert_eq!(ws.to_ascii_lowercase().matches("upgrade:").count(), 1);
        for spelled in [
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding: CHUNKED\r\n",
            "Transfer-Encoding: chunked,\r\n",
            "Transfer-Encoding: , chunked\r\n",
            "Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n",
        ] {
            let chunked = forward(&format!("POST / HTTP/1.1\r\nHost: a\r\n{spelled}\r\n"));
            assert_eq!(
                chunked.matches("Transfer-Encoding").count(),
                1,
                "{spelled:?}: {chunked:?}"
            );
            assert!(
                chunked.contains("\r\nTransfer-Encoding: chunked\r\n"),
                "{spelled:?}: {chunked:?}"
            );
            assert!(!chunked.contains("Content-Length"));
        }
    }

    #[test]
    fn response_head_is_exactly_as_expected() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nConnection: keep-alive, X-Hop\r\n\
                   X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTrailer: X-T\r\nUpgrade: h2c\r\n\
                   Proxy-Connection: x\r\nTE: trailers\r\nContent-Length: 10, 10\r\n\r\n";
        let extra = [("X-Cache", "MISS")];
        let opts = ResponseOptions {
            extra: &extra,
            ..KEEP
        };
        let expected = "HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nContent-Length: 10\r\nX-Cache: MISS\r\n\r\n";
        assert_eq!(respond(raw, &opts), expected);
    }

    #[test]
    fn response_connection_follows_the_options() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let cases = [
            (true, Version::Http11, false, ""),
            (false, Version::Http11, false, "Connection: close\r\n"),
            (true, Version::Http10, false, "Connection: keep-alive\r\n"),
            (false, Version::Http10, false, "Connection: close\r\n"),
            (true, Version::Http10, true, "Connection: close\r\n"),
        ];
        for (keep_alive, client_version, dechunk, connection) in cases {
            let opts = ResponseOptions {
                keep_alive,
                client_version,
                dechunk,
                extra: &[],
            };
            let expected = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{connection}\r\n");
            assert_eq!(respond(raw, &opts), expected);
        }
    }

    #[test]
    fn response_body_fields_follow_the_framing() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            respond(chunked, &KEEP),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let opts = ResponseOptions {
            client_version: Version::Http10,
            dechunk: true,
            ..KEEP
        };
        assert_eq!(
            respond(chunked, &opts),
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        );
        let not_modified = "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n";
        assert_eq!(respond(not_modified, &KEEP), not_modified);
    }

    #[test]
    fn an_http10_client_never_receives_transfer_encoding() {
        let http10 = ResponseOptions {
            client_version: Version::Http10,
            ..KEEP
        };
        let head_answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: 1\r\n\r\n";
        let head = res(head_answer, true).unwrap();
        let mut out = Vec::new();
        write_response_head(&head, head_answer.as_bytes(), &http10, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nX: 1\r\nConnection: keep-alive\r\n\r\n"
        );
        let not_modified = "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            respond(not_modified, &http10),
            "HTTP/1.1 304 Not Modified\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn the_balancers_own_fields_replace_a_backends_of_the_same_name() {
        let opts = ResponseOptions {
            extra: &[("X-Cache", "MISS")],
            ..KEEP
        };
        let raw = "HTTP/1.1 200 OK\r\nx-cache: HIT\r\nX-Other: 1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            respond(raw, &opts),
            "HTTP/1.1 200 OK\r\nX-Other: 1\r\nContent-Length: 0\r\nX-Cache: MISS\r\n\r\n"
        );
    }

    /// Found by fuzzing (response_head): a HEAD or 304 answer went out with both
    /// Transfer-Encoding and Content-Length, which RFC 9112 §6.2 forbids a sender.
    #[test]
    fn bodiless_response_never_carries_content_length_beside_transfer_encoding() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        let expected = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = res(raw, true).unwrap();
        let mut out = Vec::new();
        write_response_head(&head, raw.as_bytes(), &KEEP, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let not_modified =
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(
            respond(not_modified, &KEEP),
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip\r\n\r\n"
        );
    }

    #[test]
    fn no_content_and_interim_responses_carry_no_body_fields() {
        for (raw, expected) in [
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n",
                "HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
            ),
            (
                "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.1 204 No Content\r\n\r\n",
            ),
            (
                "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
            ),
        ] {
            assert_eq!(respond(raw, &KEEP), expected, "{raw:?}");
        }
    }

    /// Found by fuzzing (framing_diff): an empty Transfer-Encoding line beside "chunked" is
    /// valid (the lines combine into one list), and is not passed on.
    #[test]
    fn empty_transfer_encoding_lines_are_not_forwarded() {
        let raw = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n";
        let out = forward(raw);
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        assert_eq!(out.matches("Transfer-Encoding").count(), 1, "{out}");
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            respond(raw, &KEEP),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn switching_protocols_keeps_upgrade() {
        let raw = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
        let expected = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(respond(raw, &KEEP), expected);
    }

    #[test]
    fn interim_response_carries_no_connection_field() {
        let opts = ResponseOptions {
            keep_alive: false,
            ..KEEP
        };
        assert_eq!(
            respond("HTTP/1.1 100 Continue\r\n\r\n", &opts),
            "HTTP/1.1 100 Continue\r\n\r\n"
        );
    }

    #[test]
    fn missing_reason_gets_the_standard_phrase() {
        assert!(respond("HTTP/1.1 404\r\n\r\n", &KEEP).starts_with("HTTP/1.1 404 Not Found\r\n"));
        let obs_text = "HTTP/1.1 200 \u{e9}t\u{e9}\r\n\r\n";
        assert!(respond(obs_text, &KEEP).starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(
            respond("HTTP/1.1 299 Custom\r\n\r\n", &KEEP).starts_with("HTTP/1.1 299 Custom\r\n")
        );
    }

    #[test]
    fn error_responses_are_small_plain_text() {
        for status in [400, 405, 408, 414, 431, 502, 503, 504, 505] {
            for keep_alive in [true, false] {
                let mut out = Vec::new();
                write_error_response(status, keep_alive, &mut out);
                let text = String::from_utf8(out).unwrap();
                let (head, body) = text.split_once("\r\n\r\n").unwrap();
                assert!(text.len() < 1024, "{text}");
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)))
                );
                assert!(head.contains("Content-Type: text/plain"));
                assert!(head.contains(&format!("Content-Length: {}", body.len())));
                assert_eq!(head.contains("Connection: close"), !keep_alive, "{head}");
                assert_eq!(
                    body,
                    format!("{status} {}\n", reason_phrase(status).to_lowercase())
                );
            }
        }
        let mut out = Vec::new();
        write_error_response(502, false, &mut out);
        assert!(out.ends_with(b"\r\n\r\n502 bad gateway\n"));
    }

    #[test]
    fn error_response_to_http10_keep_alive_says_so() {
        let mut out = Vec::new();
        write_error_response_for(503, true, Version::Http10, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn reason_phrases_cover_the_balancers_own_answers() {
        for status in [400, 405, 408, 413, 414, 431, 500, 501, 502, 503, 504, 505] {
            assert!(!reason_phrase(status).is_empty(), "{status}");
        }
        assert_eq!(reason_phrase(999), "");
    }

    /// Mutates valid heads at random (fixed seed): parsing never panics, and whatever is
    /// accepted is forwarded as a head that parses again with the same framing and target.
    #[test]
    fn mutated_heads_never_panic_and_forward_round_trips() {
        let seeds = [
            "GET /a?b HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
            "POST http://h:8/p HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB:2\r\nC: \r\nKeep-Alive: 1\r\nD: d d\r\n\r\n",
        ];
        let alphabet = b" :\r\n\t,;/?*0123456789abcdefXHTP-\0\x7f\xff";
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut accepted, mut head, mut again) =
            (0, RequestHead::default(), RequestHead::default());
        for _ in 0..20_000 {
            let mut raw = seeds[rng.usize(..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..raw.len());
                match rng.u8(..3) {
                    0 => raw[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => raw.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    _ => drop(raw.remove(at)),
                }
            }
            let Ok(true) = parse_request(&raw, &mut head) else {
                continue;
            };
            accepted += 1;
            assert!(head.head_len <= raw.len());
            let mut out = Vec::new();
            write_forward_request(&head, &raw, IP, &mut out);
            let reparsed = parse_request(&out, &mut again);
            assert_eq!(reparsed, Ok(true), "{:?}", String::from_utf8_lossy(&out));
            assert_eq!(again.framing, head.framing);
            let path = head.path(&raw);
            match path.first() {
                Some(b'/' | b'*') => assert_eq!(again.path(&out), path),
                _ => assert_eq!(again.path(&out), [b"/", path].concat()), // "http://h?q"
            }
            assert_eq!(again.host_for_key(&out), head.host_for_key(&raw));
            assert_eq!(again.websocket_upgrade, head.websocket_upgrade);
            assert_eq!(again.head_len, out.len());
            assert_fields_kept(&raw, &head.headers, &out, &again.headers);
        }
        assert!(accepted > 1000, "only {accepted} mutants accepted");
    }

    /// The end-to-end fields of a written head are received ones, name and value unchanged and
    /// in their order, and every line of it ends in CRLF.
    fn assert_fields_kept(raw: &[u8], from: &[HeaderRange], out: &[u8], written: &[HeaderRange]) {
        let others = |buf: &[u8], headers: &[HeaderRange]| {
            headers
                .iter()
                .filter(|h| h.field == Field::Other)
                .map(|h| (buf[h.name.clone()].to_vec(), buf[h.value.clone()].to_vec()))
                .collect::<Vec<_>>()
        };
        let received = others(raw, from);
        let mut unmatched = received.iter();
        for field in others(out, written) {
            assert!(
                unmatched.any(|r| *r == field),
                "{field:?} not received in this order: {:?}",
                String::from_utf8_lossy(out)
            );
        }
        let bare_lf = out
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || out[i - 1] != b'\r'));
        assert!(!bare_lf, "{:?}", String::from_utf8_lossy(out));
    }

    /// The same for responses: whatever is accepted is written as a head that parses again
    /// with the same status and framing.
    #[test]
    fn mutated_responses_never_panic_and_round_trip() {
        let seeds = [
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: X-A\r\nX-A: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.0 304 Not Modified\r\nKeep-Alive: 5\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nContent-Length: 1\r\nE: \"e\"\r\nX: \r\nY:y\r\n\r\n",
        ];
        let alphabet = b" :\r\n\t,;0123456789abcdefXHTP-\0\x7f\xff";
        let mut rng = fastrand::Rng::with_seed(9);
        let (mut accepted, mut head, mut again) =
            (0, ResponseHead::default(), ResponseHead::default());
        for _ in 0..20_000 {
            let mut raw = seeds[rng.usize(..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..raw.len());
                match rng.u8(..3) {
                    0 => raw[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => raw.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    _ => drop(raw.remove(at)),
                }
            }
            let Ok(true) = parse_response(&raw, false, &mut head) else {
                continue;
            };
            accepted += 1;
            let mut out = Vec::new();
            write_response_head(&head, &raw, &KEEP, &mut out);
            let reparsed = parse_response(&out, false, &mut again);
            assert_eq!(reparsed, Ok(true), "{:?}", String::from_utf8_lossy(&out));
            assert_eq!((again.status, again.framing), (head.status, head.framing));
            assert_eq!(again.head_len, out.len());
            assert_fields_kept(&raw, &head.headers, &out, &again.headers);
        }
        assert!(accepted > 1000, "only {accepted} mutants accepted");
    }

    #[test]
    fn forwarded_field_lines_keep_their_bytes_and_end_in_crlf() {
        let raw = "GET / HTTP/1.1\r\nHost: h\r\nX-A:1\r\nX-B: \t spaced \t \r\nX-Empty:\r\n\
                   X-Blank:   \r\nConnection: close\r\nX-C: c\nX-D: d\r\nX-E: e\r\n\r\n";
        let expected = "GET / HTTP/1.1\r\nHost: h\r\nX-A:1\r\nX-B: \t spaced\r\nX-Empty:\r\n\
                        X-Blank:\r\nX-C: c\r\nX-D: d\r\nX-E: e\r\n\
                        X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n\r\n";
        assert_eq!(forward(raw), expected);
        let raw = "HTTP/1.1 200 OK\nServer: s\nDate: d\r\nContent-Length: 2\r\nX-Empty:\r\n\
                   Keep-Alive: 5\r\nETag: \"e\"\r\nX-B:b\r\n\r\n";
        let expected = "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nX-Empty:\r\nETag: \"e\"\r\n\
                        X-B:b\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(respond(raw, &KEEP), expected);
    }

    #[test]
    fn numbers_are_written_in_decimal_at_every_width() {
        let cases = [0, 9, 10, 99, 100, 255, 999, 1000, 65_536, u64::MAX];
        for n in cases {
            let mut out = b"x".to_vec();
            put_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
        let out = forward_from(
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "0.9.10.255".parse().unwrap(),
        );
        assert!(out.contains("X-Forwarded-For: 0.9.10.255\r\n"), "{out:?}");
    }
}
