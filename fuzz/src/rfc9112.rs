//! A reference request-framing decision (RFC 9112 §6.3), written from the RFC text on top of
//! h2o's picohttpparser, so that it shares neither tokenizer nor framing code with the
//! balancer's httparse-based codec.
//!
//! Where the RFC leaves a choice ("MAY reject ... or ..."), this module takes the choice the
//! balancer documents, and says so at that line: a difference there would be a policy, not a
//! bug. Everything the RFC requires (MUST) is decided here independently.

#![allow(unsafe_code)] // one FFI call into picohttpparser

use std::cell::RefCell;
use std::os::raw::{c_char, c_int};
use std::ptr;

use picohttpparser_sys::{phr_header, phr_parse_request};

/// How the body of a request is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Item 6: neither Transfer-Encoding nor Content-Length: no body.
    None,
    /// Item 6: a valid Content-Length.
    Length(u64),
    /// Item 4: chunked is the final transfer coding.
    Chunked,
}

/// What the reference makes of the bytes at the start of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The head is not complete yet.
    Partial,
    /// Not a well-formed request head (RFC 9112 §2-§5); the reason.
    Malformed(&'static str),
    /// Well-formed, but the body length cannot be determined reliably: 400 (§6.3 items 3-5).
    BadFraming(&'static str),
    /// A complete, well-formed head.
    Valid {
        /// Bytes of the head, leading empty lines and the final empty line included.
        head_len: usize,
        /// The minor version digit of HTTP/1.x.
        minor: u8,
        /// The framing of the body that follows.
        framing: Framing,
    },
}

/// More slots than any head the fuzzer can build has lines, so picohttpparser never fails
/// for lack of room (the balancer's own header-count limit is policy, not compared).
const SLOTS: usize = 1 << 15;

thread_local! {
    static HEADERS: RefCell<Vec<phr_header>> = RefCell::new(vec![phr_header::default(); SLOTS]);
}

/// Decides the framing of the request head at the start of `buf`.
pub fn decide_request(buf: &[u8]) -> Verdict {
    // §2.2: a server SHOULD ignore at least one empty line before the request-line.
    let mut skip = 0;
    loop {
        match &buf[skip..] {
            [b'\r', b'\n', ..] => skip += 2,
            [b'\n', ..] => skip += 1,
            _ => break,
        }
    }
    let rest = &buf[skip..];
    let head = match tokenize(rest) {
        Ok(Some(head)) => head,
        Ok(None) => return Verdict::Partial,
        Err(why) => return Verdict::Malformed(why),
    };
    match check_and_frame(rest, &head) {
        Ok(framing) => Verdict::Valid {
            head_len: skip + head.len,
            minor: head.minor,
            framing,
        },
        Err(verdict) => verdict,
    }
}

/// A start..end pair of offsets into the buffer.
type Span = (usize, usize);

/// What picohttpparser found, as offsets into the buffer.
struct Tokens {
    len: usize,
    method: Span,
    target: Span,
    minor: u8,
    /// (name, value) offsets; a name of `None` is an obs-fold continuation line.
    fields: Vec<(Option<Span>, Span)>,
}

fn tokenize(buf: &[u8]) -> Result<Option<Tokens>, &'static str> {
    HEADERS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let mut method: *const c_char = ptr::null();
        let mut method_len = 0;
        let mut path: *const c_char = ptr::null();
        let mut path_len = 0;
        let mut minor: c_int = -1;
        let mut count = slots.len();
        // SAFETY: every pointer is valid for the call: `buf` for `buf.len()` bytes, the out
        // parameters are locals, and `slots` has `count` writable entries. picohttpparser
        // only reads `buf` and writes pointers into it.
        let r = unsafe {
            phr_parse_request(
                buf.as_ptr().cast(),
                buf.len(),
                &mut method,
                &mut method_len,
                &mut path,
                &mut path_len,
                &mut minor,
                slots.as_mut_ptr(),
                &mut count,
                0,
            )
        };
        match r {
            -2 => return Ok(None),
            r if r < 0 => return Err("picohttpparser refused the head"),
            _ => {}
        }
        let offset = |p: *const c_char, len: usize| {
            let start = (p as usize).wrapping_sub(buf.as_ptr() as usize);
            assert!(start <= buf.len() && len <= buf.len() - start, "pico range");
            (start, start + len)
        };
        let fields = slots[..count]
            .iter()
            .map(|h| {
                let name = (!h.name.is_null()).then(|| offset(h.name.cast(), h.name_len));
                (name, offset(h.value.cast(), h.value_len))
            })
            .collect();
        Ok(Some(Tokens {
            len: r as usize,
            method: offset(method, method_len),
            target: offset(path, path_len),
            minor: u8::try_from(minor).unwrap_or(u8::MAX),
            fields,
        }))
    })
}

/// The checks picohttpparser leaves out, then the framing decision.
fn check_and_frame(buf: &[u8], t: &Tokens) -> Result<Framing, Verdict> {
    let malformed = |why| Err(Verdict::Malformed(why));
    // §3: request-line = method SP request-target SP HTTP-version; method = token.
    let method = &buf[t.method.0..t.method.1];
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return malformed("method is not a token");
    }
    // §3.2: the request-target is a URI reference, so ASCII only. RFC 3986 allows fewer
    // characters still ("{", "|", "\\"...); for those §3 says a server SHOULD answer 400, and
    // the balancer, like most servers, passes them through: not a framing matter.
    let target = &buf[t.target.0..t.target.1];
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return malformed("request-target is not visible ascii");
    }
    // §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT; picohttpparser accepts more digits.
    let version = &buf[t.target.1 + 1..];
    if version.len() < 9 || !matches!(version[8], b'\r' | b'\n') || t.minor > 9 {
        return malformed("http-version is not HTTP/DIGIT.DIGIT");
    }
    let mut te: Option<Vec<Coding>> = None;
    let mut lengths: Option<Vec<&[u8]>> = None;
    for &(name, value) in &t.fields {
        // §5.2: obs-fold is rejected (the server MAY instead replace it with SP; the
        // balancer rejects, and so does this reference).
        let Some(name) = name else {
            return malformed("obs-fold");
        };
        let name = &buf[name.0..name.1];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return malformed("field name is not a token");
        }
        // §5.1: OWS around the value is not part of it; picohttpparser keeps trailing OWS.
        let value = trim_ows(&buf[value.0..value.1]);
        if !value
            .iter()
            .all(|&b| is_field_vchar(b) || b == b' ' || b == b'\t')
        {
            return malformed("field value has a control character");
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let codings = parse_codings(value).ok_or(Verdict::BadFraming(
                "transfer-encoding is not a list of codings",
            ))?;
            // RFC 9110 §5.3: field lines with the same name combine into one list.
            te.get_or_insert_with(Vec::new).extend(codings);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths.get_or_insert_with(Vec::new).push(value);
        }
    }
    frame(t.minor, te, lengths).map_err(Verdict::BadFraming)
}

/// One transfer-coding of a Transfer-Encoding list.
struct Coding {
    chunked: bool,
    has_parameters: bool,
}

/// RFC 9112 §6.3 for a request.
fn frame(
    minor: u8,
    te: Option<Vec<Coding>>,
    lengths: Option<Vec<&[u8]>>,
) -> Result<Framing, &'static str> {
    if let Some(codings) = te {
        // §6.1: TE in an HTTP/1.0 message means the framing is faulty.
        if minor == 0 {
            return Err("transfer-encoding in http/1.0");
        }
        // §6.1: a server MAY reject a request with both, or MAY ignore Content-Length; the
        // balancer rejects (SPEC §6), so the reference does too.
        if lengths.is_some() {
            return Err("content-length and transfer-encoding");
        }
        // §6.3 item 4: chunked must be the final coding, else 400. §7: chunked has no
        // parameters, and §6.1: a sender MUST NOT apply chunked more than once.
        let last_is_chunked = codings
            .last()
            .is_some_and(|c| c.chunked && !c.has_parameters);
        if !last_is_chunked {
            return Err("chunked is not the final transfer coding");
        }
        if codings.iter().filter(|c| c.chunked).count() > 1 {
            return Err("chunked applied more than once");
        }
        return Ok(Framing::Chunked);
    }
    let Some(lengths) = lengths else {
        return Ok(Framing::None);
    };
    // RFC 9110 §8.6: Content-Length = 1*DIGIT. The same value repeated (in one field line as
    // a list, or in several) MAY be replaced by one instance; the balancer does, so does this.
    let mut length = None;
    for value in lengths {
        for item in value.split(|&b| b == b',') {
            let n = decimal(trim_ows(item)).ok_or("invalid content-length")?;
            if length.is_some_and(|m| m != n) {
                return Err("differing content-length values");
            }
            length = Some(n);
        }
    }
    length.map(Framing::Length).ok_or("invalid content-length")
}

fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Wider than u64 so that only a value no u64 can hold fails.
    let n = s.iter().try_fold(0u128, |n, &d| {
        n.checked_mul(10)?.checked_add(u128::from(d - b'0'))
    })?;
    u64::try_from(n).ok()
}

/// `#transfer-coding` (RFC 9110 §5.6.1, RFC 9112 §7): empty elements are ignored;
/// transfer-coding = token *( OWS ";" OWS token BWS "=" BWS ( token / quoted-string ) ).
fn parse_codings(value: &[u8]) -> Option<Vec<Coding>> {
    let mut codings = Vec::new();
    let mut i = 0;
    loop {
        i = skip_ows(value, i);
        match value.get(i) {
            None => return Some(codings),
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name_end = token_end(value, i);
        if name_end == i {
            return None;
        }
        let chunked = value[i..name_end].eq_ignore_ascii_case(b"chunked");
        i = name_end;
        let mut has_parameters = false;
        loop {
            i = skip_ows(value, i);
            if value.get(i) != Some(&b';') {
                break;
            }
            i = skip_ows(value, i + 1);
            let end = token_end(value, i);
            if end == i {
                return None;
            }
            i = skip_ows(value, end);
            if value.get(i) != Some(&b'=') {
                return None;
            }
            i = skip_ows(value, i + 1);
            i = if value.get(i) == Some(&b'"') {
                quoted_string_end(value, i)?
            } else {
                let end = token_end(value, i);
                if end == i {
                    return None;
                }
                end
            };
            has_parameters = true;
        }
        match value.get(i) {
            None | Some(b',') => codings.push(Coding {
                chunked,
                has_parameters,
            }),
            Some(_) => return None,
        }
    }
}

/// The index just past the quoted-string starting at `i` (which holds the DQUOTE).
fn quoted_string_end(value: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match *value.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                let next = *value.get(i + 1)?;
                if !(next == b'\t' || next == b' ' || is_field_vchar(next)) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
}

fn token_end(value: &[u8], i: usize) -> usize {
    i + value[i..].iter().take_while(|&&b| is_tchar(b)).count()
}

fn skip_ows(value: &[u8], i: usize) -> usize {
    i + value[i..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let end = s.len()
        - s[start..]
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    &s[start..end]
}

/// tchar (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// field-vchar = VCHAR / obs-text (RFC 9110 §5.5).
fn is_field_vchar(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(fields: &str) -> Verdict {
        decide_request(format!("POST / HTTP/1.1\r\nHost: a\r\n{fields}\r\n").as_bytes())
    }

    fn framing(fields: &str) -> Option<Framing> {
        match req(fields) {
            Verdict::Valid { framing, .. } => Some(framing),
            _ => None,
        }
    }

    #[test]
    fn framing_table() {
        use Framing::*;
        let cases: &[(&str, Option<Framing>)] = &[
            ("", Some(None)),
            ("Content-Length: 0\r\n", Some(Length(0))),
            ("Content-Length: 007 \r\n", Some(Length(7))),
            (
                "Content-Length: 5, 5\r\nContent-Length: 5\r\n",
                Some(Length(5)),
            ),
            ("Content-Length: 5, 6\r\n", Option::None),
            ("Content-Length: 5,\r\n", Option::None),
            ("Content-Length: +5\r\n", Option::None),
            (
                "Content-Length: 18446744073709551615\r\n",
                Some(Length(u64::MAX)),
            ),
            ("Content-Length: 18446744073709551616\r\n", Option::None),
            ("Transfer-Encoding: chunked\r\n", Some(Chunked)),
            ("Transfer-Encoding: gzip , ,CHUNKED\r\n", Some(Chunked)),
            (
                "Transfer-Encoding: gzip;q=\"a,b\", chunked\r\n",
                Some(Chunked),
            ),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Some(Chunked),
            ),
            ("Transfer-Encoding: gzip;q=\",chunked\r\n", Option::None),
            ("Transfer-Encoding: chunked;a=b\r\n", Option::None),
            ("Transfer-Encoding: chunked, gzip\r\n", Option::None),
            ("Transfer-Encoding: chunked, chunked\r\n", Option::None),
            ("Transfer-Encoding: \r\n", Option::None),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n",
                Option::None,
            ),
        ];
        for (fields, expected) in cases {
            assert_eq!(framing(fields), *expected, "{fields:?}");
        }
    }

    #[test]
    fn malformed_heads() {
        for raw in [
            "GET  HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.10\r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            "GET / HTTP/1.1\r\nA : b\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\x01\r\n\r\n",
            "GET /\u{e9} HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(decide_request(raw.as_bytes()), Verdict::Malformed(_)),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn head_length_counts_leading_empty_lines() {
        let raw = b"\r\n\nGET / HTTP/1.0\n\nrest";
        assert_eq!(
            decide_request(raw),
            Verdict::Valid {
                head_len: raw.len() - 4,
                minor: 0,
                framing: Framing::None
            }
        );
        assert_eq!(decide_request(&raw[..10]), Verdict::Partial);
    }
}
