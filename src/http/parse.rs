//! Request and response head parsing on httparse: limits, framing (RFC 9112 §6.3), Host, target forms, and every httparse error mapped to its `HttpError`.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::{
    list, trim, Field, HeaderRange, HttpError, RequestFraming, RequestHead, ResponseFraming,
    ResponseHead, Version, MAX_HEADERS, MAX_HEAD_BYTES, MAX_RESPONSE_HEADERS, MAX_TARGET_BYTES,
};

/// Slack over `MAX_TARGET_BYTES` for method and version while a request line is unfinished.
const REQUEST_LINE_SLACK: usize = 64;

/// Parses a request head at the start of `buf` into `head` (cleared first).
///
/// Returns `Ok(true)` when the head is complete, `Ok(false)` when more bytes are needed.
///
/// # Errors
/// Every framing, size and syntax rule of SPEC §6 as an `HttpError`; limits are enforced on
/// partial input too, so a client cannot make the caller buffer more than `MAX_HEAD_BYTES`.
pub fn parse_request(buf: &[u8], head: &mut RequestHead) -> Result<bool, HttpError> {
    // Never look past the limit: a head that is not complete inside it is too large anyway.
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(window, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if req.method == Some("CONNECT") {
                return Err(HttpError::MethodNotAllowed);
            }
            return match req.path {
                Some(path) if path.len() > MAX_TARGET_BYTES => Err(HttpError::UriTooLong),
                None if window.len() > MAX_TARGET_BYTES + REQUEST_LINE_SLACK => {
                    Err(HttpError::UriTooLong)
                }
                _ if buf.len() > MAX_HEAD_BYTES => Err(HttpError::HeadTooLarge),
                _ => Ok(false),
            };
        }
        Err(e) => return Err(request_error(e, window)),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::BadRequest("invalid request line"));
    };
    if method == "CONNECT" {
        return Err(HttpError::MethodNotAllowed);
    }
    if target.len() > MAX_TARGET_BYTES {
        return Err(HttpError::UriTooLong);
    }
    // A URI is ASCII (RFC 9112 §3.2, RFC 3986), but httparse lets UTF-8 sequences through
    // (other bytes over 0x7f it refuses), and they would be forwarded as sent.
    // A fragment is the client's own business (RFC 9112 §3.2 allows none in a request-target);
    // a `#` here is a malformed or hostile request, as HAProxy also treats it.
    if !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(bad("invalid request-target"));
    }
    head.method = range_of(buf, method.as_bytes());
    head.target = range_of(buf, target.as_bytes());
    head.version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    head.head_len = len;
    fill_headers(buf, req.headers, &mut head.headers);
    let method = method.as_bytes();
    head.is_head = method == b"HEAD";
    head.idempotent = matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE" | b"TRACE"
    );
    decide_request(buf, head)
}

/// Applies the request framing, Host and target rules in one pass over the fields.
fn decide_request(buf: &[u8], head: &mut RequestHead) -> Result<bool, HttpError> {
    let fields = Fields::scan(buf, &head.headers, HttpError::BadRequest)?;
    let http11 = head.version == Version::Http11;
    head.framing = match (fields.content_length, fields.te) {
        (Some(_), Some(_)) => return Err(bad("both content-length and transfer-encoding")),
        (None, Some(_)) if !http11 => return Err(bad("transfer-encoding in an http/1.0 request")),
        (None, Some(te)) if te.chunked > 1 => return Err(bad("chunked applied more than once")),
        (None, Some(te)) if !te.last_chunked => {
            return Err(bad("transfer-encoding does not end in chunked"))
        }
        // As NGINX: only chunked alone. Another coding before it (gzip, or identity, which is
        // no coding any more) is passed on by no proxy the same way to every backend.
        (None, Some(te)) if te.codings > 1 => {
            return Err(HttpError::NotImplemented(
                "transfer coding other than chunked",
            ))
        }
        (None, Some(_)) => RequestFraming::Chunked,
        (Some(n), None) => RequestFraming::Length(n),
        (None, None) => RequestFraming::None,
    };
    match fields.hosts {
        0 if http11 => return Err(bad("missing host")),
        0 | 1 => {}
        _ => return Err(bad("more than one host")),
    }
    head.host = fields.host;
    if let Some(host) = &head.host {
        if !is_host(&buf[host.clone()]) {
            return Err(bad("invalid host"));
        }
    }
    let target = head.target.clone();
    let (authority, path) = split_target(&buf[target.clone()], head.method(buf))?;
    head.authority = authority.map(|a| target.start + a.start..target.start + a.end);
    head.path = target.start + path.start..target.start + path.end;
    head.keep_alive = !fields.close && (http11 || fields.keep_alive);
    // An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1).
    head.expect_continue = http11 && fields.expect_continue;
    head.websocket_upgrade =
        http11 && fields.websocket && fields.conn_upgrade && head.method(buf) == b"GET";
    head.has_authorization = fields.authorization;
    Ok(true)
}

fn bad(why: &'static str) -> HttpError {
    HttpError::BadRequest(why)
}

/// Splits a request-target into (authority, origin-form path), both relative to the target.
fn split_target(
    target: &[u8],
    method: &[u8],
) -> Result<(Option<Range<usize>>, Range<usize>), HttpError> {
    if target.first() == Some(&b'/') {
        return Ok((None, 0..target.len()));
    }
    if target == b"*" {
        return match method {
            b"OPTIONS" => Ok((None, 0..1)),
            _ => Err(bad("asterisk-form target with a method other than options")),
        };
    }
    let Some(colon) = target.windows(3).position(|w| w == b"://") else {
        return Err(bad("invalid request-target"));
    };
    let scheme = &target[..colon];
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return Err(bad("unsupported scheme in request-target"));
    }
    let start = colon + 3;
    let end = target[start..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(target.len(), |i| start + i);
    let authority = &target[start..end];
    if authority.is_empty() {
        return Err(bad("empty authority in request-target"));
    }
    if authority.contains(&b'@') {
        return Err(bad("userinfo in request-target"));
    }
    if !is_host(authority) {
        return Err(bad("invalid authority in request-target"));
    }
    Ok((Some(start..end), end..target.len()))
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2-3.2.3): an IPv6 (or IPvFuture)
/// literal in brackets or a reg-name (unreserved, sub-delims, percent-encoding), then an
/// optional port of at most 65535. Only a wholly empty value may leave the host empty (HTTP/1.0
/// and origin-form requests without an authority, RFC 9112 §3.2); `:80` names no host (RFC
/// 9110 §4.2.1). A request whose Host cannot name a server is refused (RFC 9112 §3.2), not
/// forwarded for the backend to read some other way.
fn is_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host_ok, port) = match value.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(close) => (is_ip_literal(&rest[..close]), &rest[close + 1..]),
            None => return false,
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (is_reg_name(&value[..end]), &value[end..])
        }
    };
    host_ok
        && match port {
            [] => true,
            // `port = *DIGIT`: empty is allowed, and so are leading zeros.
            [b':', digits @ ..] => digits
                .iter()
                .try_fold(0u32, |n, &d| {
                    let n = n * 10 + u32::from(d.wrapping_sub(b'0'));
                    (d.is_ascii_digit() && n <= 65535).then_some(n)
                })
                .is_some(),
            _ => false,
        }
}

/// What RFC 3986 §3.2.2 allows inside brackets: an IPv6 address, or IPvFuture
/// (`v` 1*HEXDIG `.` 1*( unreserved / sub-delims / `:` )). No zone identifier.
fn is_ip_literal(literal: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = literal {
        let dot = rest.iter().position(|&b| b == b'.');
        return dot.is_some_and(|dot| {
            let (version, tail) = (&rest[..dot], &rest[dot + 1..]);
            !version.is_empty()
                && version.iter().all(u8::is_ascii_hexdigit)
                && !tail.is_empty()
                && tail.iter().all(|&b| is_reg_name_byte(b) || b == b':')
        });
    }
    std::str::from_utf8(literal).is_ok_and(|text| text.parse::<std::net::Ipv6Addr>().is_ok())
}

/// A non-empty `reg-name`: unreserved and sub-delims bytes, and `%` only as the start of a
/// percent-encoded byte (two hex digits).
fn is_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if is_reg_name_byte(b) => i += 1,
            _ => return false,
        }
    }
    !name.is_empty()
}

/// unreserved / sub-delims (RFC 3986 §2).
fn is_reg_name_byte(b: u8) -> bool {
    // A match, not a slice search: this runs for every byte of every Host.
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// Maps an httparse error on a request to its `HttpError`.
fn request_error(e: httparse::Error, window: &[u8]) -> HttpError {
    match e {
        httparse::Error::HeaderName if has_obs_fold(window) => bad("obsolete line folding"),
        httparse::Error::HeaderName => bad("invalid header name"),
        httparse::Error::HeaderValue => bad("invalid header value"),
        httparse::Error::NewLine => bad("invalid line ending"),
        httparse::Error::Token | httparse::Error::Status => bad("invalid request line"),
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        httparse::Error::Version if names_http_version(window) => HttpError::VersionNotSupported,
        httparse::Error::Version => bad("invalid http version"),
    }
}

/// True when the head (up to its end, if any) has a line starting with whitespace.
fn has_obs_fold(window: &[u8]) -> bool {
    let end = window
        .windows(3)
        .position(|w| w == b"\n\r\n" || w.starts_with(b"\n\n"))
        .unwrap_or(window.len());
    window[..end]
        .windows(2)
        .any(|w| w == b"\n " || w == b"\n\t")
}

/// True when the request line is three words and the last looks like "HTTP/<digit>[.<digit>]"
/// (505, not 400). A line with more words is malformed whatever it ends with.
fn names_http_version(window: &[u8]) -> bool {
    let Some(line) = window
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|l| !l.is_empty())
    else {
        return false;
    };
    let mut words = line.split(|&b| b == b' ');
    let (Some(_method), Some(_target), Some(word), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    match word.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

/// What the framing-relevant fields of one head say, gathered in one pass.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    te: Option<TransferCodings>,
    hosts: usize,
    host: Option<Range<usize>>,
    close: bool,
    keep_alive: bool,
    conn_upgrade: bool,
    websocket: bool,
    expect_continue: bool,
    authorization: bool,
}

#[derive(Default, Clone, Copy)]
struct TransferCodings {
    codings: usize,
    chunked: usize,
    last_chunked: bool,
}

impl Fields {
    fn scan(
        buf: &[u8],
        headers: &[HeaderRange],
        fail: fn(&'static str) -> HttpError,
    ) -> Result<Fields, HttpError> {
        let mut f = Fields::default();
        for h in headers {
            let value = &buf[h.value.clone()];
            match h.field {
                Field::ContentLength => {
                    for item in value.split(|&b| b == b',').map(trim) {
                        let n = parse_length(item).ok_or_else(|| fail("invalid content-length"))?;
                        if f.content_length.is_some_and(|m| m != n) {
                            return Err(fail("differing content-length values"));
                        }
                        f.content_length = Some(n);
                    }
                }
                Field::TransferEncoding => {
                    // Field lines combine into one list (RFC 9110 §5.3), so an empty line
                    // next to "chunked" leaves chunked final; only an empty list is refused.
                    let te = f.te.get_or_insert_with(TransferCodings::default);
                    te.scan(value)
                        .ok_or_else(|| fail("invalid transfer-encoding"))?;
                }
                Field::Connection => {
                    for token in list(value) {
                        f.close |= token.eq_ignore_ascii_case(b"close");
                        f.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                        f.conn_upgrade |= token.eq_ignore_ascii_case(b"upgrade");
                    }
                }
                Field::Upgrade => {
                    f.websocket |= list(value).any(|p| {
                        let name = p.split(|&b| b == b'/').next().unwrap_or(p);
                        name.eq_ignore_ascii_case(b"websocket")
                    });
                }
                Field::Host => {
                    f.hosts += 1;
                    f.host.get_or_insert(h.value.clone());
                }
                Field::Expect => f.expect_continue |= value.eq_ignore_ascii_case(b"100-continue"),
                Field::Authorization => f.authorization = true,
                _ => {}
            }
        }
        if f.te.is_some_and(|te| te.codings == 0) {
            return Err(fail("empty transfer-encoding"));
        }
        Ok(f)
    }
}

impl TransferCodings {
    /// Adds the codings of one field value, `#transfer-coding` (RFC 9112 §7, RFC 9110
    /// §5.6.1): `token *( OWS ";" OWS token BWS "=" BWS ( token / quoted-string ) )`, empty
    /// list elements ignored. `None` when it does not parse: a coding that is not a token
    /// could hide a "chunked" the backend reads differently, and a comma inside a quoted
    /// parameter does not separate codings.
    fn scan(&mut self, value: &[u8]) -> Option<()> {
        let mut rest = value;
        loop {
            rest = skip_ows(rest);
            match rest.split_first() {
                None => return Some(()),
                Some((b',', tail)) => {
                    rest = tail;
                    continue;
                }
                Some(_) => {}
            }
            let (name, tail) = split_token(rest)?;
            rest = skip_ows(tail);
            let mut parameters = false;
            while let Some(tail) = rest.strip_prefix(b";") {
                let (_, tail) = split_token(skip_ows(tail))?;
                let tail = skip_ows(tail).strip_prefix(b"=")?;
                let tail = skip_ows(tail);
                let (_, tail) = match tail.first() {
                    Some(b'"') => split_quoted(tail)?,
                    _ => split_token(tail)?,
                };
                rest = skip_ows(tail);
                parameters = true;
            }
            if !matches!(rest.first(), None | Some(b',')) {
                return None;
            }
            // chunked takes no parameters: "chunked;x=1" is not a coding the proxy can
            // decode, yet it is chunked applied once more (RFC 9112 §6.1).
            let chunked = name.eq_ignore_ascii_case(b"chunked");
            self.chunked += usize::from(chunked);
            self.last_chunked = chunked && !parameters;
            self.codings += 1;
        }
    }
}

fn skip_ows(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// Splits a non-empty token (RFC 9110 §5.6.2) off the front of `s`.
fn split_token(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = s.iter().take_while(|&&b| is_tchar(b)).count();
    (n > 0).then(|| s.split_at(n))
}

/// Splits a quoted-string (RFC 9110 §5.6.4) off the front of `s`, which starts with DQUOTE.
fn split_quoted(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut i = 1;
    loop {
        match *s.get(i)? {
            b'"' => return Some(s.split_at(i + 1)),
            b'\\' => match *s.get(i + 1)? {
                b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => i += 2,
                _ => return None,
            },
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// 1*DIGIT without sign or whitespace, rejecting overflow.
fn parse_length(item: &[u8]) -> Option<u64> {
    if item.is_empty() {
        return None;
    }
    item.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    // httparse hands out sub-slices of `buf`; anything else (its static "" reason) is empty.
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= buf.len() => start..end,
        _ => 0..0,
    }
}

fn fill_headers(buf: &[u8], parsed: &[httparse::Header<'_>], out: &mut Vec<HeaderRange>) {
    out.clear();
    out.extend(parsed.iter().map(|h| HeaderRange {
        name: range_of(buf, h.name.as_bytes()),
        value: range_of(buf, h.value),
        field: Field::of(h.name.as_bytes()),
    }));
}

/// Parses a backend response head at the start of `buf` into `head` (cleared first).
///
/// Returns `Ok(true)` when complete, `Ok(false)` when more bytes are needed.
///
/// # Errors
/// `HttpError::BadResponse` for any malformed or ambiguous head (the caller answers 502).
pub fn parse_response(
    buf: &[u8],
    request_was_head: bool,
    head: &mut ResponseHead,
) -> Result<bool, HttpError> {
    // RFC 9110 §2.5: a later HTTP/1 minor version is read as the highest one known, 1.1.
    // httparse takes only 1.0 and 1.1, so a copy with the digit replaced is parsed: same
    // length, so every range found in it indexes `buf` alike. Rare, so the copy is.
    if later_http1_minor(buf) {
        let mut as_11 = buf[..buf.len().min(MAX_HEAD_BYTES + 1)].to_vec();
        as_11[7] = b'1';
        return parse_response_as_sent(&as_11, request_was_head, head);
    }
    parse_response_as_sent(buf, request_was_head, head)
}

/// `HTTP/1.d` with a digit d of 2 or more, then a space or (not arrived yet) nothing: a minor
/// version later than 1.1.
fn later_http1_minor(buf: &[u8]) -> bool {
    matches!(
        buf.strip_prefix(b"HTTP/1."),
        Some([b'2'..=b'9']) | Some([b'2'..=b'9', b' ', ..])
    )
}

fn parse_response_as_sent(
    buf: &[u8],
    request_was_head: bool,
    head: &mut ResponseHead,
) -> Result<bool, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut res, window, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HttpError::BadResponse("head over 65536 bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(e) => return Err(response_error(e, window)),
    };
    let (Some(minor), Some(status)) = (res.version, res.code) else {
        return Err(HttpError::BadResponse("invalid status line"));
    };
    // RFC 9110 §15: status codes are 100-599; httparse takes any three digits.
    if !(100..=599).contains(&status) {
        return Err(HttpError::BadResponse("status code outside 100-599"));
    }
    head.status = status;
    head.reason = res.reason.map_or(0..0, |r| range_of(buf, r.as_bytes()));
    head.version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    head.head_len = len;
    head.interim = (100..200).contains(&status) && status != 101;
    head.upgraded = status == 101;
    fill_headers(buf, res.headers, &mut head.headers);

    let fields = Fields::scan(buf, &head.headers, HttpError::BadResponse)?;
    if let Some(te) = fields.te {
        if head.version == Version::Http10 {
            return Err(HttpError::BadResponse(
                "transfer-encoding in an http/1.0 response",
            ));
        }
        if te.chunked > 1 {
            return Err(HttpError::BadResponse("chunked applied more than once"));
        }
        // Close-delimited by RFC 9112 §6.3, yet a client that looks for "chunked" in the field
        // would de-chunk the raw bytes: a response no client should be asked to read.
        if te.chunked == 1 && !te.last_chunked {
            return Err(HttpError::BadResponse(
                "chunked not the final transfer coding",
            ));
        }
    }
    head.transfer_coded = fields.te.is_some_and(|te| te.codings > te.chunked);
    let bodiless = request_was_head || status < 200 || status == 204 || status == 304;
    head.framing = match (fields.te, fields.content_length) {
        _ if bodiless => ResponseFraming::None,
        (Some(te), _) if te.last_chunked => ResponseFraming::Chunked,
        (Some(_), _) => ResponseFraming::Close,
        (None, Some(n)) => ResponseFraming::Length(n),
        (None, None) => ResponseFraming::Close,
    };
    // TE+CL may be a smuggling attempt: serve this one, never reuse the connection.
    let ambiguous = fields.te.is_some() && fields.content_length.is_some();
    head.keep_alive = !fields.close
        && (head.version == Version::Http11 || fields.keep_alive)
        && head.framing != ResponseFraming::Close
        && !ambiguous
        && !head.upgraded;
    Ok(true)
}

/// Maps an httparse error on a response to its `HttpError::BadResponse`.
fn response_error(e: httparse::Error, window: &[u8]) -> HttpError {
    HttpError::BadResponse(match e {
        httparse::Error::HeaderName if has_obs_fold(window) => "obsolete line folding",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::Token => "invalid status line",
        httparse::Error::TooManyHeaders => "over 200 header fields",
        httparse::Error::Version => "invalid http version",
    })
}

#[cfg(test)]
mod tests {

    use super::super::tests::{req, res, BROWSER_GET};
    use super::*;

    #[test]
    fn parses_a_typical_browser_get() {
        let head = req(BROWSER_GET).unwrap();
        let buf = BROWSER_GET.as_bytes();
        assert_eq!(head.method(buf), b"GET");
        assert_eq!(&buf[head.target.clone()], b"/static/app.js?v=3");
        assert_eq!(head.path(buf), b"/static/app.js?v=3");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.headers.len(), 8);
        assert_eq!(head.head_len, buf.len());
        assert_eq!(head.framing, RequestFraming::None);
        assert!(head.keep_alive && head.idempotent && !head.is_head);
        assert!(!head.expect_continue && !head.websocket_upgrade && !head.has_authorization);
        assert_eq!(head.host_for_key(buf), b"shop.example.com");
        assert_eq!(head.authority, None);
        assert_eq!(
            head.header(buf, "accept-ENCODING"),
            Some(&b"gzip, deflate, br"[..])
        );
        assert_eq!(head.header(buf, "x-missing"), None);
    }

    #[test]
    fn accepted_request_framing_table() {
        use RequestFraming::*;
        let cases: &[(&str, RequestFraming)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", Length(0)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 42\r\n\r\n", Length(42)),
            ("POST / HTTP/1.1\r\nHost: a\r\ncontent-length:  7 \r\n\r\n", Length(7)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Length(5)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Length(5)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n", Length(u64::MAX)),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Chunked),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n", Chunked),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", Chunked),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n", Chunked),
            ("POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n", Length(3)),
        ];
        for (raw, framing) in cases {
            assert_eq!(req(raw).map(|h| h.framing), Ok(*framing), "{raw:?}");
        }
    }

    #[test]
    fn rejected_request_table() {
        use HttpError::*;
        let long_target = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_TARGET_BYTES)
        );
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS)
        );
        let cases: Vec<(&str, HttpError)> = vec![
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", BadRequest("both content-length and transfer-encoding")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", BadRequest("both content-length and transfer-encoding")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", BadRequest("differing content-length values")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", BadRequest("differing content-length values")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n", BadRequest("invalid content-length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", BadRequest("transfer-encoding does not end in chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", BadRequest("transfer-encoding does not end in chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;x=1\r\n\r\n", BadRequest("transfer-encoding does not end in chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", BadRequest("transfer-encoding does not end in chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", BadRequest("chunked applied more than once")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", BadRequest("chunked applied more than once")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", BadRequest("empty transfer-encoding")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", NotImplemented("transfer coding other than chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n", NotImplemented("transfer coding other than chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xyz, chunked\r\n\r\n", NotImplemented("transfer coding other than chunked")),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", BadRequest("transfer-encoding in an http/1.0 request")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n", BadRequest("obsolete line folding")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n\ttwo\r\n\r\n", BadRequest("obsolete line folding")),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", BadRequest("invalid header name")),
            ("GET / HTTP/1.1\r\nHost: a\r\nBad(Name): x\r\n\r\n", BadRequest("invalid header name")),
            ("GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n", BadRequest("invalid header name")),
            ("GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", BadRequest("invalid header name")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", BadRequest("invalid header value")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", BadRequest("invalid header value")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", BadRequest("invalid header value")),
            ("GET / HTTP/1.1\r\n\r\n", BadRequest("missing host")),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", BadRequest("more than one host")),
            ("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", BadRequest("more than one host")),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: a:80:81\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: :80\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: []\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: [::1]:x\r\n\r\n", BadRequest("invalid host")),
            ("GET / HTTP/1.1\r\nHost: a]\r\n\r\n", BadRequest("invalid host")),
            ("GET http://a:abc/x HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid authority in request-target")),
            ("GET http://:80/x HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid authority in request-target")),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("asterisk-form target with a method other than options")),
            ("GET ftp://a/b HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("unsupported scheme in request-target")),
            ("GET http:///b HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("empty authority in request-target")),
            ("GET http://u:p@a/b HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("userinfo in request-target")),
            ("GET http://a\"b/ HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid authority in request-target")),
            ("GET index.html HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid request-target")),
            ("GET /\r\n\r\n", BadRequest("invalid request line")),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid request line")),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid request line")),
            ("GET / FOO/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid http version")),
            // A space in the target: four words, so no version to be unsupported.
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest("invalid http version")),
            ("GET / x HTTP/2.0\r\nHost: a\r\n\r\n", BadRequest("invalid http version")),
            ("GET / HTTP/1.1\rHost: a\r\n\r\n", BadRequest("invalid line ending")),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", VersionNotSupported),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", VersionNotSupported),
            ("GET / HTTP/3\r\nHost: a\r\n\r\n", VersionNotSupported),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", MethodNotAllowed),
            (&long_target, UriTooLong),
            (&many, TooManyHeaders),
        ];
        for (raw, expected) in cases {
            let mut head = RequestHead::default();
            assert_eq!(
                parse_request(raw.as_bytes(), &mut head),
                Err(expected),
                "{raw:?}"
            );
        }
    }

    /// Found by fuzzing (framing_diff): a Transfer-Encoding whose codings are not tokens, or
    /// whose quoted parameter hides a comma, was read as ending in chunked.
    #[test]
    fn transfer_encoding_must_be_a_list_of_codings() {
        use RequestFraming::Chunked;
        let cases: &[(&str, Result<RequestFraming, HttpError>)] = &[
            ("gz(ip, chunked", Err(bad("invalid transfer-encoding"))),
            ("gzip chunked", Err(bad("invalid transfer-encoding"))),
            ("gzip;q=\"a,chunked", Err(bad("invalid transfer-encoding"))),
            ("gzip;q, chunked", Err(bad("invalid transfer-encoding"))),
            ("gzip;=1, chunked", Err(bad("invalid transfer-encoding"))),
            (
                "gzip;q=\"a\"b, chunked",
                Err(bad("invalid transfer-encoding")),
            ),
            (
                "chunked;x=1, chunked",
                Err(bad("chunked applied more than once")),
            ),
            // Well-formed, but a coding besides chunked: 501 (RFC 9112 §6.1).
            (
                "gzip;q=\"a,b\", chunked",
                Err(HttpError::NotImplemented(
                    "transfer coding other than chunked",
                )),
            ),
            (
                "gzip;q=\"a\\\"b\" , ,chunked",
                Err(HttpError::NotImplemented(
                    "transfer coding other than chunked",
                )),
            ),
            (
                "gzip ; q = 1,chunked",
                Err(HttpError::NotImplemented(
                    "transfer coding other than chunked",
                )),
            ),
            // Found by fuzzing (framing_diff): an empty line beside chunked adds nothing.
            ("chunked\r\nTransfer-Encoding:", Ok(Chunked)),
            (
                "gzip\r\nTransfer-Encoding: , \r\nTransfer-Encoding: chunked",
                Err(HttpError::NotImplemented(
                    "transfer coding other than chunked",
                )),
            ),
            (", \r\nTransfer-Encoding: chunked ,", Ok(Chunked)),
            ("\r\nTransfer-Encoding: chunked", Ok(Chunked)),
            (" , ", Err(bad("empty transfer-encoding"))),
            (
                "\r\nTransfer-Encoding: ,",
                Err(bad("empty transfer-encoding")),
            ),
        ];
        for (te, expected) in cases {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(req(&raw).map(|h| h.framing), *expected, "{te:?}");
        }
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gz(ip, chunked\r\n\r\n";
        let mut head = ResponseHead::default();
        assert_eq!(
            parse_response(raw.as_bytes(), false, &mut head),
            Err(HttpError::BadResponse("invalid transfer-encoding"))
        );
    }

    #[test]
    fn limits_are_exact_at_their_boundaries() {
        let target = format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1));
        assert!(req(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n")).is_ok());
        let fields = "X: y\r\n".repeat(MAX_HEADERS - 1);
        let head = req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n")).unwrap();
        assert_eq!(head.headers.len(), MAX_HEADERS);

        let prefix = "GET / HTTP/1.1\r\nHost: a\r\nX: ";
        let filler = MAX_HEAD_BYTES - prefix.len() - 4;
        let exact = format!("{prefix}{}\r\n\r\n", "v".repeat(filler));
        assert_eq!(exact.len(), MAX_HEAD_BYTES);
        assert_eq!(req(&exact).map(|h| h.head_len), Ok(MAX_HEAD_BYTES));
        let over = format!("{prefix}{}\r\n\r\n", "v".repeat(filler + 1));
        let mut head = RequestHead::default();
        assert_eq!(
            parse_request(over.as_bytes(), &mut head),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn limits_apply_to_partial_heads() {
        let mut head = RequestHead::default();
        let endless = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}",
            "v".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(
            parse_request(endless.as_bytes(), &mut head),
            Err(HttpError::HeadTooLarge)
        );
        let below = &endless.as_bytes()[..MAX_HEAD_BYTES];
        assert_eq!(parse_request(below, &mut head), Ok(false));

        let line = format!("GET /{}", "a".repeat(MAX_TARGET_BYTES + REQUEST_LINE_SLACK));
        assert_eq!(
            parse_request(line.as_bytes(), &mut head),
            Err(HttpError::UriTooLong)
        );
        assert_eq!(
            parse_request(&line.as_bytes()[..MAX_TARGET_BYTES], &mut head),
            Ok(false)
        );
        let known = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_TARGET_BYTES));
        assert_eq!(
            parse_request(known.as_bytes(), &mut head),
            Err(HttpError::UriTooLong)
        );
        let many = format!("GET / HTTP/1.1\r\n{}", "X: y\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(
            parse_request(many.as_bytes(), &mut head),
            Err(HttpError::TooManyHeaders)
        );
        assert_eq!(
            parse_request(b"CONNECT a:4", &mut head),
            Err(HttpError::MethodNotAllowed)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/2", &mut head),
            Err(HttpError::VersionNotSupported)
        );
    }

    #[test]
    fn partial_request_at_every_split_point_then_complete() {
        let heads = [
            BROWSER_GET,
            "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
            "GET http://a.b:8/x?y HTTP/1.0\r\n\r\n",
            "\r\nOPTIONS * HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n",
        ];
        for raw in heads {
            let mut head = RequestHead::default();
            for split in 0..raw.len() {
                let part = &raw.as_bytes()[..split];
                assert_eq!(
                    parse_request(part, &mut head),
                    Ok(false),
                    "{raw:?} at {split}"
                );
            }
            assert_eq!(
                parse_request(raw.as_bytes(), &mut head),
                Ok(true),
                "{raw:?}"
            );
            assert_eq!(head.head_len, raw.len());
        }
    }

    #[test]
    fn pipelined_requests_start_at_head_len() {
        let raw = "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
                   GET /b HTTP/1.1\r\nHost: h\r\n\r\n\
                   GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        let buf = raw.as_bytes();
        let mut head = RequestHead::default();
        let mut at = 0;
        let mut seen = Vec::new();
        while at < buf.len() {
            let rest = &buf[at..];
            assert_eq!(parse_request(rest, &mut head), Ok(true));
            seen.push((head.path(rest).to_vec(), head.keep_alive));
            let body = match head.framing {
                RequestFraming::Length(n) => n as usize,
                _ => 0,
            };
            at += head.head_len + body;
        }
        let expected = [
            (b"/a".to_vec(), true),
            (b"/b".to_vec(), true),
            (b"/c".to_vec(), false),
        ];
        assert_eq!(seen, expected);
    }

    #[test]
    fn host_values_follow_the_uri_grammar() {
        let valid = "a a: a:80 a:65535 a:000080 127.0.0.1:8080 [::1] [::1]:8080 [2001:db8::7] \
                     [::ffff:1.2.3.4] [v1.fe] [V1F.a:b] a,b a%41 %41%42 my_host.example xn--p1ai";
        for host in valid.split(' ').chain([""]) {
            assert!(is_host(host.as_bytes()), "{host:?}");
        }
        let invalid = "a:b a:-1 a:1:2 a:65536 a:99999999999 [::1 [] [::1]x a[b] :80 : [,] \
                       [1.2.3.4] [%] [::1%eth0] [v1.] [v.a] [vx.a] a:+80 a% % a%zz a%4 %4:80";
        for host in invalid.split(' ').chain(["a b"]) {
            assert!(!is_host(host.as_bytes()), "{host:?}");
        }
    }

    #[test]
    fn reused_head_is_cleared_between_requests() {
        let first = "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: x\r\nExpect: 100-continue\r\nIf-None-Match: \"v\"\r\n\r\n";
        let second = "GET http://b/ HTTP/1.0\r\n\r\n";
        let mut head = RequestHead::default();
        assert_eq!(parse_request(first.as_bytes(), &mut head), Ok(true));
        assert!(head.has_authorization && head.expect_continue && head.host.is_some());
        assert!(head.is_conditional());
        assert_eq!(parse_request(second.as_bytes(), &mut head), Ok(true));
        assert!(!head.has_authorization && !head.expect_continue && head.host.is_none());
        assert!(!head.is_conditional());
        assert_eq!(head.headers.len(), 0);
        assert_eq!(head.host_for_key(second.as_bytes()), b"b");
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let cases = [
            ("1.1", "", true),
            ("1.1", "Connection: close\r\n", false),
            ("1.1", "Connection: Keep-Alive, CLOSE\r\n", false),
            ("1.1", "Connection: keep-alive\r\n", true),
            ("1.0", "", false),
            ("1.0", "Connection: keep-alive\r\n", true),
            ("1.0", "Connection: Keep-Alive\r\n", true),
            ("1.0", "Connection: close\r\n", false),
            ("1.0", "Connection: foo\r\nConnection: keep-alive\r\n", true),
        ];
        for (version, field, keep) in cases {
            let raw = format!("GET / HTTP/{version}\r\nHost: a\r\n{field}\r\n");
            assert_eq!(req(&raw).unwrap().keep_alive, keep, "{raw:?}");
        }
    }

    #[test]
    fn websocket_upgrade_needs_get_http11_upgrade_and_connection() {
        let cases = [
            (
                "GET",
                "1.1",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
                true,
            ),
            (
                "GET",
                "1.1",
                "Upgrade: WebSocket\r\nConnection: keep-alive, upgrade\r\n",
                true,
            ),
            (
                "GET",
                "1.1",
                "Upgrade: h2c, websocket\r\nConnection: upgrade\r\n",
                true,
            ),
            ("GET", "1.1", "Upgrade: websocket\r\n", false),
            ("GET", "1.1", "Connection: upgrade\r\n", false),
            (
                "GET",
                "1.1",
                "Upgrade: h2c\r\nConnection: upgrade\r\n",
                false,
            ),
            (
                "POST",
                "1.1",
                "Upgrade: websocket\r\nConnection: upgrade\r\n",
                false,
            ),
            (
                "GET",
                "1.0",
                "Upgrade: websocket\r\nConnection: upgrade\r\n",
                false,
            ),
        ];
        for (method, version, fields, ws) in cases {
            let raw = format!("{method} / HTTP/{version}\r\nHost: a\r\n{fields}\r\n");
            assert_eq!(req(&raw).unwrap().websocket_upgrade, ws, "{raw:?}");
        }
    }

    #[test]
    fn method_flags_follow_the_method() {
        let cases = [
            ("GET", true, false),
            ("HEAD", true, true),
            ("OPTIONS", true, false),
            ("PUT", true, false),
            ("DELETE", true, false),
            ("TRACE", true, false),
            ("POST", false, false),
            ("PATCH", false, false),
            ("get", false, false),
        ];
        for (method, idempotent, is_head) in cases {
            let head = req(&format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n")).unwrap();
            assert_eq!(
                (head.idempotent, head.is_head),
                (idempotent, is_head),
                "{method}"
            );
        }
    }

    #[test]
    fn expect_and_authorization_are_detected() {
        let head = req(
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nauthorization: Basic x\r\n\r\n",
        )
        .unwrap();
        assert!(head.expect_continue && head.has_authorization);
        let head = req("PUT / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n").unwrap();
        assert!(!head.expect_continue);
        let head = req("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(!head.expect_continue);
    }

    /// Found by fuzzing (framing_diff): a request-target with UTF-8 in it was accepted and
    /// forwarded; a request-target is ASCII (other bytes over 0x7f httparse refuses itself).
    #[test]
    fn request_target_is_ascii_whatever_its_length() {
        let long = format!("/{}", "a".repeat(100));
        for target in [
            "/\u{e9}",
            "/x\u{e9}",
            &format!("{long}\u{e9}"),
            &format!("http://a{long}\u{e9}"),
            "/page#section",
            "/a.css?v=1#x",
            "http://a/#",
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut head = RequestHead::default();
            let got = parse_request(raw.as_bytes(), &mut head);
            assert_eq!(got, Err(bad("invalid request-target")), "{target:?}");
        }
        for short in [true, false] {
            let mut raw = format!("GET {}", if short { "/" } else { &long }).into_bytes();
            raw.extend_from_slice(b"\xff HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut head = RequestHead::default();
            let got = parse_request(&raw, &mut head);
            assert!(matches!(got, Err(HttpError::BadRequest(_))), "{got:?}");
        }
    }

    #[test]
    fn target_forms_split_into_authority_and_path() {
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            ("/x?y", None, "/x?y", "h"),
            ("*", None, "*", "h"),
            ("http://a.b:8/x?y", Some("a.b:8"), "/x?y", "a.b:8"),
            ("HTTP://a.b/", Some("a.b"), "/", "a.b"),
            (
                "https://[::1]:8443/p",
                Some("[::1]:8443"),
                "/p",
                "[::1]:8443",
            ),
            ("http://a.b", Some("a.b"), "/", "a.b"),
            ("http://a.b?q=1", Some("a.b"), "?q=1", "a.b"),
        ];
        for &(target, authority, path, key) in cases {
            let method = if target == "*" { "OPTIONS" } else { "GET" };
            let raw = format!("{method} {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let buf = raw.as_bytes();
            let head = req(&raw).unwrap();
            let got = head.authority.clone().map(|r| &raw[r]);
            assert_eq!(got, authority, "{target}");
            assert_eq!(head.path(buf), path.as_bytes(), "{target}");
            assert_eq!(head.host_for_key(buf), key.as_bytes(), "{target}");
        }
    }

    #[test]
    fn control_characters_never_reach_a_header_value() {
        // A bare LF ends a line (RFC 9112 §2.2), so the value stops there.
        let raw = "GET / HTTP/1.1\nHost: a\nX: one\nY: two\n\n";
        let head = req(raw).unwrap();
        assert_eq!(head.header(raw.as_bytes(), "x"), Some(&b"one"[..]));
        for bad in ["X: a\rb", "X: a\0b", "X: a\x01b", "X\r: a"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{bad}\r\n\r\n");
            assert!(
                matches!(req(&raw), Err(HttpError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_later_http1_minor_version_is_read_as_1_1() {
        for raw in [
            "HTTP/1.2 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi",
            "HTTP/1.9 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n",
        ] {
            let mut head = ResponseHead::default();
            assert_eq!(
                parse_response(raw.as_bytes(), false, &mut head),
                Ok(true),
                "{raw:?}"
            );
            assert_eq!((head.status, head.version), (200, Version::Http11));
            assert_eq!(head.framing, ResponseFraming::Length(2));
            assert!(head.keep_alive);
            let names: Vec<&str> = head.headers.iter().map(|h| &raw[h.name.clone()]).collect();
            assert_eq!(names, ["Content-Length", "X-A"]);
            assert_eq!(&raw[head.headers[1].value.clone()], "b");
        }
        let mut head = ResponseHead::default();
        assert_eq!(
            parse_response(b"HTTP/1.2 200 OK\r\nContent-Le", false, &mut head),
            Ok(false)
        );
        for bad in [
            "HTTP/1.10 200 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.x 200 OK\r\n\r\n",
        ] {
            let mut head = ResponseHead::default();
            assert_eq!(
                parse_response(bad.as_bytes(), false, &mut head),
                Err(HttpError::BadResponse("invalid http version")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn accepted_response_framing_table() {
        use ResponseFraming::*;
        let cases: &[(&str, bool, ResponseFraming, bool)] = &[
            ("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", false, Length(12), true),
            ("HTTP/1.1 200 OK\r\nContent-Length: 12, 12\r\n\r\n", false, Length(12), true),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, Chunked, true),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false, Chunked, true),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", false, Chunked, false),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, Close, false),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", false, Close, false),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Close, false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", true, None, true),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", true, None, true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, None, true),
            ("HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", false, None, true),
            ("HTTP/1.1 100 Continue\r\n\r\n", false, None, true),
            ("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n", false, None, true),
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", false, None, false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", false, Length(1), false),
            ("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, Length(1), false),
            ("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n", false, Length(1), true),
            ("HTTP/1.0 200 OK\r\n\r\n", false, Close, false),
            ("HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", false, Length(0), true),
            ("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", false, Length(0), true),
        ];
        for &(raw, was_head, framing, keep) in cases {
            let head = res(raw, was_head).unwrap();
            assert_eq!((head.framing, head.keep_alive), (framing, keep), "{raw:?}");
            assert_eq!(head.head_len, raw.len());
        }
    }

    #[test]
    fn response_status_flags() {
        let cases = [
            (100, true, false),
            (101, false, true),
            (103, true, false),
            (200, false, false),
            (204, false, false),
        ];
        for (status, interim, upgraded) in cases {
            let head = res(&format!("HTTP/1.1 {status} X\r\n\r\n"), false).unwrap();
            assert_eq!(
                (head.status, head.interim, head.upgraded),
                (status, interim, upgraded)
            );
        }
    }

    #[test]
    fn rejected_response_table() {
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_RESPONSE_HEADERS + 1)
        );
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "v".repeat(MAX_HEAD_BYTES)
        );
        let cases: Vec<(&str, &str)> = vec![
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "differing content-length values",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                "differing content-length values",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                "chunked applied more than once",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                "chunked not the final transfer coding",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                "chunked not the final transfer coding",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked;x=1\r\n\r\n",
                "chunked not the final transfer coding",
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "transfer-encoding in an http/1.0 response",
            ),
            (
                "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
                "obsolete line folding",
            ),
            ("HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "invalid header name"),
            ("HTTP/1.1 200 OK\r\nX\"y: a\r\n\r\n", "invalid header name"),
            ("HTTP/1.1 200 OK\r\nX: a\0\r\n\r\n", "invalid header value"),
            ("HTTP/1.1 2x0 OK\r\n\r\n", "invalid status line"),
            ("HTTP/1.1 099 Low\r\n\r\n", "status code outside 100-599"),
            ("HTTP/1.1 600 High\r\n\r\n", "status code outside 100-599"),
            ("HTTP/1.1 999 High\r\n\r\n", "status code outside 100-599"),
            ("HTTP/2.0 200 OK\r\n\r\n", "invalid http version"),
            ("ICY 200 OK\r\n\r\n", "invalid http version"),
            (&many, "over 200 header fields"),
            (&huge, "head over 65536 bytes"),
        ];
        for (raw, why) in cases {
            let mut head = ResponseHead::default();
            let got = parse_response(raw.as_bytes(), false, &mut head);
            assert_eq!(got, Err(HttpError::BadResponse(why)), "{raw:?}");
        }
    }

    #[test]
    fn partial_response_at_every_split_point_then_complete() {
        let heads = [
            "HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nContent-Length: 10\r\n\r\n",
            "HTTP/1.0 404 Not Found\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
            // Read as 1.1 however it is cut (a backend writing a byte at a time).
            "HTTP/1.2 200 OK\r\nContent-Length: 10\r\n\r\n",
        ];
        for raw in heads {
            let mut head = ResponseHead::default();
            for split in 0..raw.len() {
                let part = &raw.as_bytes()[..split];
                assert_eq!(
                    parse_response(part, false, &mut head),
                    Ok(false),
                    "{raw:?} at {split}"
                );
            }
            assert_eq!(parse_response(raw.as_bytes(), false, &mut head), Ok(true));
            assert_eq!(head.head_len, raw.len());
        }
    }

    #[test]
    fn interim_response_is_followed_by_the_final_one() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let mut head = ResponseHead::default();
        assert_eq!(parse_response(raw.as_bytes(), false, &mut head), Ok(true));
        assert!(head.interim);
        let rest = &raw.as_bytes()[head.head_len..];
        assert_eq!(parse_response(rest, false, &mut head), Ok(true));
        assert_eq!((head.status, head.interim), (201, false));
    }

    #[test]
    fn response_accessors_read_the_buffer() {
        let raw = "HTTP/1.1 200 Fine\r\nA: 1\r\nb: 2\r\nB: 3\r\n\r\n";
        let head = res(raw, false).unwrap();
        let buf = raw.as_bytes();
        assert_eq!(&buf[head.reason.clone()], b"Fine");
        assert_eq!(head.header(buf, "B"), Some(&b"2"[..]));
        let all: Vec<_> = head.headers(buf).collect();
        assert_eq!(all, [(&b"A"[..], &b"1"[..]), (b"b", b"2"), (b"B", b"3")]);
    }
}
