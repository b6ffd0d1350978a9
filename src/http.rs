//! HTTP/1.1 head codec: parses request and response heads into byte ranges, decides their framing (RFC 9112 §6.3) in one pass, and writes the heads sent on.

// This file holds the types and the field vocabulary; `parse` turns bytes into heads and
// `write` turns heads back into bytes. Both are re-exported, so callers only see `http::*`.
mod conditional;
mod parse;
mod write;

pub use conditional::not_modified;
pub use parse::{parse_request, parse_response};
pub use write::{
    reason_phrase, write_error_head_for, write_error_response, write_error_response_for,
    write_forward_request, write_hit_head, write_not_modified_head, write_response_head,
    write_stored_head,
};

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Largest request head, request line included; more gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in a request; more gets 431.
pub const MAX_HEADERS: usize = 100;
/// Longest request-target; longer gets 414.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Most header fields in a backend response; more is a bad response (502).
pub const MAX_RESPONSE_HEADERS: usize = 200;

/// Protocol version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    #[default]
    Http11,
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestFraming {
    /// No body.
    #[default]
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseFraming {
    /// No body (HEAD request, 1xx, 204, 304).
    #[default]
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// The body runs until the backend closes the connection.
    Close,
}

/// One header field as byte ranges into the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRange {
    /// The field name.
    pub name: Range<usize>,
    /// The field value, without surrounding whitespace.
    pub value: Range<usize>,
    /// What the name is to the codec, classified once by the parser: a head is scanned for
    /// framing and rewritten for the other side, and each pass would otherwise compare
    /// every name again.
    field: Field,
}

/// Why a head was refused; `status` maps each reason to the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// 400: the reason names the rule that was broken.
    BadRequest(&'static str),
    /// 431: the request head is over `MAX_HEAD_BYTES`.
    HeadTooLarge,
    /// 431: the request has over `MAX_HEADERS` fields.
    TooManyHeaders,
    /// 414: the request-target is over `MAX_TARGET_BYTES`.
    UriTooLong,
    /// 405: CONNECT is refused.
    MethodNotAllowed,
    /// 505: a request line with a version other than 1.0 or 1.1.
    VersionNotSupported,
    /// 501: a request body with a transfer coding other than chunked (RFC 9112 §6.1), which
    /// the balancer does not decode and will not pass on for a backend to read differently.
    NotImplemented(&'static str),
    /// 408: the head was not complete in time; raised by the caller, which owns the clock.
    RequestTimeout,
    /// 502: a malformed backend response; the reason names the rule.
    BadResponse(&'static str),
}

impl HttpError {
    /// The status code the balancer answers with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::UriTooLong => 414,
            HttpError::MethodNotAllowed => 405,
            HttpError::VersionNotSupported => 505,
            HttpError::NotImplemented(_) => 501,
            HttpError::RequestTimeout => 408,
            HttpError::BadResponse(_) => 502,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(why) => write!(f, "bad request: {why}"),
            HttpError::HeadTooLarge => write!(
                f,
                "request header fields too large: head over {MAX_HEAD_BYTES} bytes"
            ),
            HttpError::TooManyHeaders => write!(
                f,
                "request header fields too large: over {MAX_HEADERS} fields"
            ),
            HttpError::UriTooLong => {
                write!(
                    f,
                    "uri too long: request-target over {MAX_TARGET_BYTES} bytes"
                )
            }
            HttpError::MethodNotAllowed => write!(f, "method not allowed: connect"),
            HttpError::VersionNotSupported => write!(f, "http version not supported"),
            HttpError::NotImplemented(why) => write!(f, "not implemented: {why}"),
            HttpError::RequestTimeout => {
                write!(
                    f,
                    "request timeout: head not complete within the header timeout"
                )
            }
            HttpError::BadResponse(why) => write!(f, "bad response from backend: {why}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A parsed request head; ranges index the buffer given to `parse_request`.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// The method token.
    pub method: Range<usize>,
    /// The request-target as sent.
    pub target: Range<usize>,
    /// The request's version.
    pub version: Version,
    /// Every header field, in order.
    pub headers: Vec<HeaderRange>,
    /// Bytes of the head, final CRLF included: the body (or next request) starts here.
    pub head_len: usize,
    /// How the request body is delimited.
    pub framing: RequestFraming,
    /// The client connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// A GET HTTP/1.1 with `Upgrade: websocket` and `Connection: upgrade`.
    pub websocket_upgrade: bool,
    /// The Host header value.
    pub host: Option<Range<usize>>,
    /// The authority of an absolute-form target.
    pub authority: Option<Range<usize>>,
    /// The path and query of the target (for absolute-form, what follows the authority:
    /// possibly empty or starting with `?`; the forwarded request line prepends `/` then).
    pub path: Range<usize>,
    /// The method is HEAD.
    pub is_head: bool,
    /// The method is GET, HEAD, OPTIONS, PUT, DELETE or TRACE.
    pub idempotent: bool,
    /// An Authorization header was sent.
    pub has_authorization: bool,
}

/// A parsed response head; ranges index the buffer given to `parse_response`.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The reason phrase (empty when the backend sent none or one with obs-text).
    pub reason: Range<usize>,
    /// The response's version.
    pub version: Version,
    /// Every header field, in order.
    pub headers: Vec<HeaderRange>,
    /// Bytes of the head, final CRLF included.
    pub head_len: usize,
    /// How the response body is delimited.
    pub framing: ResponseFraming,
    /// The backend connection can be reused after this response.
    pub keep_alive: bool,
    /// A 1xx other than 101: the final response follows.
    pub interim: bool,
    /// 101 Switching Protocols: the connection becomes a tunnel.
    pub upgraded: bool,
    /// The body has a transfer coding other than chunked (`gzip, chunked`), which the balancer
    /// cannot remove: it can reach only an HTTP/1.1 client, with its Transfer-Encoding.
    pub transfer_coded: bool,
}

/// How `write_response_head` adapts a backend response for the client.
pub struct ResponseOptions<'a> {
    /// False writes `Connection: close`; true to an HTTP/1.0 client writes `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The client's version.
    pub client_version: Version,
    /// Drop Transfer-Encoding: the caller decodes a chunked body and closes after it.
    pub dechunk: bool,
    /// Extra header fields, written after the backend's.
    pub extra: &'a [(&'a str, &'a str)],
}

/// The non-empty elements of a comma-separated field value (RFC 9110 §5.6.1).
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|s| !s.is_empty())
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t');
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(a), Some(b)) => &s[a..=b],
        _ => &[],
    }
}

/// Header fields the codec acts on; everything else passes through as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Host,
    Expect,
    Authorization,
    XForwardedFor,
    XForwardedProto,
    IfNoneMatch,
    IfModifiedSince,
    IfMatch,
    IfUnmodifiedSince,
    IfRange,
    Range,
    Other,
}

impl Field {
    fn of(name: &[u8]) -> Field {
        // Dispatch on length first so most names cost one comparison at most.
        let candidates: &[(&[u8], Field)] = match name.len() {
            2 => &[(b"te", Field::Te)],
            4 => &[(b"host", Field::Host)],
            5 => &[(b"range", Field::Range)],
            6 => &[(b"expect", Field::Expect)],
            7 => &[(b"upgrade", Field::Upgrade), (b"trailer", Field::Trailer)],
            8 => &[(b"if-match", Field::IfMatch), (b"if-range", Field::IfRange)],
            10 => &[
                (b"connection", Field::Connection),
                (b"keep-alive", Field::KeepAlive),
            ],
            13 => &[
                (b"authorization", Field::Authorization),
                (b"if-none-match", Field::IfNoneMatch),
            ],
            14 => &[(b"content-length", Field::ContentLength)],
            15 => &[(b"x-forwarded-for", Field::XForwardedFor)],
            16 => &[(b"proxy-connection", Field::ProxyConnection)],
            17 => &[
                (b"transfer-encoding", Field::TransferEncoding),
                (b"x-forwarded-proto", Field::XForwardedProto),
                (b"if-modified-since", Field::IfModifiedSince),
            ],
            19 => &[(b"if-unmodified-since", Field::IfUnmodifiedSince)],
            _ => &[],
        };
        candidates
            .iter()
            .find(|(known, _)| eq_lower(name, known))
            .map_or(Field::Other, |&(_, field)| field)
    }

    /// A condition on the validators a cache hit can answer 304 to.
    fn is_validator_condition(self) -> bool {
        matches!(self, Field::IfNoneMatch | Field::IfModifiedSince)
    }

    fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Field::Connection
                | Field::KeepAlive
                | Field::ProxyConnection
                | Field::Te
                | Field::Trailer
                | Field::Upgrade
        )
    }
}

/// Case-insensitive equality of a field name with a known one, which is lower-case letters
/// and '-'. Setting bit 0x20 lower-cases a letter; the only other byte it turns into a letter
/// or '-' is CR (into '-'), which a field name cannot hold, so the test is exact for names
/// httparse accepted. Every byte is compared (no early exit), which lets the loop vectorize.
fn eq_lower(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower)
            .fold(0, |differ, (&a, &b)| differ | ((a | 0x20) ^ b))
            == 0
}

/// True for the fixed hop-by-hop fields: Connection, Keep-Alive, Proxy-Connection, TE,
/// Trailer, Upgrade (not the ones a Connection header names).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    Field::of(name).is_hop_by_hop()
}

/// The values of every field named `name` (case-insensitive), in order.
fn values<'h, 'b, 'n>(
    headers: &'h [HeaderRange],
    buf: &'b [u8],
    name: &'n str,
) -> impl Iterator<Item = &'b [u8]> + use<'h, 'b, 'n> {
    headers
        .iter()
        .filter(move |h| buf[h.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
        .map(move |h| &buf[h.value.clone()])
}

fn find<'a>(headers: &[HeaderRange], buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    values(headers, buf, name).next()
}

impl RequestHead {
    /// The method token.
    pub fn method<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.method.clone()]
    }

    /// The first header with this name (case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find(&self.headers, buf, name)
    }

    /// Every line of a list-valued header as one value, joined with `,` as RFC 9110 §5.3
    /// combines them; borrowed when there is a single line (the usual case).
    pub fn combined_header<'a>(&self, buf: &'a [u8], name: &str) -> Option<Cow<'a, [u8]>> {
        let mut lines = values(&self.headers, buf, name);
        let first = lines.next()?;
        let Some(second) = lines.next() else {
            return Some(Cow::Borrowed(first));
        };
        let mut joined = first.to_vec();
        for line in std::iter::once(second).chain(lines) {
            joined.push(b',');
            joined.extend_from_slice(line);
        }
        Some(Cow::Owned(joined))
    }

    /// An If-None-Match or If-Modified-Since header was sent (a cache hit may answer 304).
    /// Asked on cache hits only, so request parsing does not track it.
    pub fn is_conditional(&self) -> bool {
        self.headers
            .iter()
            .any(|h| h.field.is_validator_condition())
    }

    /// A GET whose answer is the whole current response, as the cache stores it: no
    /// precondition and no `Range`, whose 304, 412 or 206 would say nothing about whether the
    /// resource may be stored. Only such a request leads a fetch other misses wait for.
    pub fn is_plain_get(&self) -> bool {
        !self.is_head
            && !self.headers.iter().any(|h| {
                h.field.is_validator_condition()
                    || matches!(
                        h.field,
                        Field::IfMatch | Field::IfUnmodifiedSince | Field::IfRange | Field::Range
                    )
            })
    }

    /// The path and query; `/` for an absolute-form target with nothing after the authority.
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match &buf[self.path.clone()] {
            [] => b"/",
            path => path,
        }
    }

    /// The host a cache key uses: the authority of an absolute-form target, else Host, else empty.
    pub fn host_for_key<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match self.authority.as_ref().or(self.host.as_ref()) {
            Some(r) => &buf[r.clone()],
            None => b"",
        }
    }
}

impl ResponseHead {
    /// The first header with this name (case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find(&self.headers, buf, name)
    }

    /// Every header field as (name, value), in order.
    pub fn headers<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.headers
            .iter()
            .map(move |h| (&buf[h.name.clone()], &buf[h.value.clone()]))
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    pub(super) const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

    pub(super) fn req(raw: &str) -> Result<RequestHead, HttpError> {
        let mut head = RequestHead::default();
        match parse_request(raw.as_bytes(), &mut head)? {
            true => Ok(head),
            false => panic!("partial: {raw:?}"),
        }
    }

    pub(super) fn res(raw: &str, was_head: bool) -> Result<ResponseHead, HttpError> {
        let mut head = ResponseHead::default();
        match parse_response(raw.as_bytes(), was_head, &mut head)? {
            true => Ok(head),
            false => panic!("partial: {raw:?}"),
        }
    }

    pub(super) fn forward(raw: &str) -> String {
        forward_from(raw, IP)
    }

    pub(super) fn forward_from(raw: &str, ip: IpAddr) -> String {
        let head = req(raw).expect("valid request");
        let mut out = Vec::new();
        write_forward_request(&head, raw.as_bytes(), ip, &mut out);
        String::from_utf8(out).expect("ascii head")
    }

    pub(super) fn respond(raw: &str, opts: &ResponseOptions<'_>) -> String {
        let head = res(raw, false).expect("valid response");
        let mut out = Vec::new();
        write_response_head(&head, raw.as_bytes(), opts, &mut out);
        String::from_utf8(out).expect("ascii head")
    }

    pub(super) const KEEP: ResponseOptions<'static> = ResponseOptions {
        keep_alive: true,
        client_version: Version::Http11,
        dechunk: false,
        extra: &[],
    };

    pub(super) const BROWSER_GET: &str = "GET /static/app.js?v=3 HTTP/1.1\r\n\
        Host: shop.example.com\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
        Accept: */*\r\n\
        Accept-Language: en-US,en;q=0.5\r\n\
        Accept-Encoding: gzip, deflate, br\r\n\
        Referer: https://shop.example.com/\r\n\
        Connection: keep-alive\r\n\
        Cookie: session=abc123\r\n\r\n";

    #[test]
    fn repeated_list_header_lines_combine_into_one_value() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\nX: 1\r\naccept-encoding: br, zstd\r\n\r\n";
        let head = req(raw).unwrap();
        let combined = head.combined_header(raw.as_bytes(), "accept-encoding");
        assert_eq!(combined.as_deref(), Some(&b"gzip,br, zstd"[..]));
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n";
        let head = req(raw).unwrap();
        let single = head.combined_header(raw.as_bytes(), "accept-encoding");
        assert!(matches!(single, Some(Cow::Borrowed(b"gzip"))));
        assert_eq!(head.combined_header(raw.as_bytes(), "te"), None);
    }

    #[test]
    fn every_error_maps_to_its_status() {
        use HttpError::*;
        let cases = [
            (BadRequest("x"), 400),
            (HeadTooLarge, 431),
            (TooManyHeaders, 431),
            (UriTooLong, 414),
            (MethodNotAllowed, 405),
            (VersionNotSupported, 505),
            (RequestTimeout, 408),
            (BadResponse("x"), 502),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
            let text = error.to_string();
            assert_eq!(text, text.to_lowercase(), "{text}");
        }
        assert_eq!(
            BadRequest("both content-length and transfer-encoding").to_string(),
            "bad request: both content-length and transfer-encoding"
        );
        assert!(HeadTooLarge
            .to_string()
            .starts_with("request header fields too large"));
    }

    #[test]
    fn hop_by_hop_table() {
        let cases = [
            ("Connection", true),
            ("keep-alive", true),
            ("PROXY-CONNECTION", true),
            ("te", true),
            ("Trailer", true),
            ("upgrade", true),
            ("Transfer-Encoding", false),
            ("Host", false),
            ("X-Custom", false),
            ("tes", false),
        ];
        for (name, hop) in cases {
            assert_eq!(is_hop_by_hop(name.as_bytes()), hop, "{name}");
        }
    }

    #[test]
    fn field_names_are_classified_ignoring_case_and_nothing_else() {
        let known = [
            ("te", Field::Te),
            ("host", Field::Host),
            ("expect", Field::Expect),
            ("upgrade", Field::Upgrade),
            ("trailer", Field::Trailer),
            ("connection", Field::Connection),
            ("keep-alive", Field::KeepAlive),
            ("authorization", Field::Authorization),
            ("content-length", Field::ContentLength),
            ("x-forwarded-for", Field::XForwardedFor),
            ("proxy-connection", Field::ProxyConnection),
            ("transfer-encoding", Field::TransferEncoding),
            ("x-forwarded-proto", Field::XForwardedProto),
            ("if-none-match", Field::IfNoneMatch),
            ("if-modified-since", Field::IfModifiedSince),
            ("if-match", Field::IfMatch),
            ("if-unmodified-since", Field::IfUnmodifiedSince),
            ("if-range", Field::IfRange),
            ("range", Field::Range),
        ];
        let tchars =
            b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        for (name, field) in known {
            assert_eq!(Field::of(name.as_bytes()), field, "{name}");
            assert_eq!(
                Field::of(name.to_ascii_uppercase().as_bytes()),
                field,
                "{name}"
            );
            let mut name = name.as_bytes().to_vec();
            for i in 0..name.len() {
                let original = name[i];
                for &other in tchars.iter().filter(|c| !c.eq_ignore_ascii_case(&original)) {
                    name[i] = other;
                    assert_eq!(
                        Field::of(&name),
                        Field::Other,
                        "{:?}",
                        String::from_utf8_lossy(&name)
                    );
                }
                name[i] = original.to_ascii_uppercase();
            }
            assert_eq!(
                Field::of(&name),
                field,
                "{:?}",
                String::from_utf8_lossy(&name)
            );
        }
    }
}
