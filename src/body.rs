//! Streaming body state machines: an incremental chunked decoder that hands out zero-copy payload slices and finds where the body ends.

use std::fmt;

/// Longest chunk-size line after the digits (whitespace and extensions), and most digits.
pub const MAX_CHUNK_EXT_BYTES: usize = 4 * 1024;
/// Largest trailer section, final CRLF included.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// The last chunk and an empty trailer section: ends a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Chunk size empty, not hex, over 64 bits, or its line not ended by CRLF.
    BadChunkSize,
    /// Chunk data not followed by CRLF, or the body not ended by CRLF.
    BadChunkTerminator,
    /// Chunk extensions over `MAX_CHUNK_EXT_BYTES`.
    LineTooLong,
    /// Trailer section over `MAX_TRAILER_BYTES`.
    TrailersTooLarge,
    /// A trailer line that is not `name: value` CRLF.
    BadTrailer,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::BadChunkSize => "invalid chunk size line",
            BodyError::BadChunkTerminator => "chunk data not followed by crlf",
            BodyError::LineTooLong => "chunk extensions over 4096 bytes",
            BodyError::TrailersTooLarge => "trailer section over 16384 bytes",
            BodyError::BadTrailer => "invalid trailer field",
        })
    }
}

impl std::error::Error for BodyError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size { digits: u16, size: u64 },
    /// After the digits or a quoted extension value: optional whitespace, then `;` or CR.
    SizeWs { size: u64, line: usize },
    /// Inside a chunk extension, at `at`.
    Ext { size: u64, line: usize, at: ExtAt },
    /// Inside a quoted extension value (`escaped`: after a backslash), which must close
    /// before the line ends: a backend reading it as going on past the CRLF would take the
    /// chunk's data for more extension.
    ExtQuoted {
        size: u64,
        line: usize,
        escaped: bool,
    },
    /// Size line's CR seen; LF must follow.
    SizeLf { size: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Chunk data done; CR must follow.
    DataCr,
    /// Chunk data's CR seen; LF must follow.
    DataLf,
    /// At the start of a trailer line or of the final CRLF.
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// A trailer line's CR seen; LF must follow.
    TrailerLf,
    /// The final CR seen; LF ends the body.
    EndLf,
    /// The body is complete.
    Done,
}

/// Where in a chunk extension (RFC 9112 §7.1.1): `;` BWS name [ BWS `=` BWS value ], the
/// value a token or a quoted string. Checked strictly: a quote or a space where the grammar
/// has none is where two parsers can split an extension differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtAt {
    /// After `;`.
    NameStart,
    Name,
    /// Whitespace after the name.
    AfterName,
    /// After `=`.
    ValueStart,
    /// Inside a token value.
    Token,
}

/// What a byte of a chunk extension leads to.
enum ExtStep {
    At(ExtAt),
    /// A quoted value opens.
    Quoted,
    /// Whitespace after a token value: only `;` or the line's end may follow.
    Gap,
    /// The size line's CR.
    LineEnd,
}

fn ext_step(at: ExtAt, b: u8) -> Option<ExtStep> {
    use ExtAt::{AfterName, Name, NameStart, Token, ValueStart};
    let ws = b == b' ' || b == b'\t';
    Some(match (at, b) {
        (NameStart | ValueStart, _) if ws => ExtStep::At(at),
        (NameStart, _) if is_token(b) => ExtStep::At(Name),
        (Name | Token, _) if is_token(b) => ExtStep::At(at),
        (Name | AfterName, _) if ws => ExtStep::At(AfterName),
        (Name | AfterName, b'=') => ExtStep::At(ValueStart),
        (ValueStart, b'"') => ExtStep::Quoted,
        (ValueStart, _) if is_token(b) => ExtStep::At(Token),
        (Token, _) if ws => ExtStep::Gap,
        (Name | AfterName | Token, b';') => ExtStep::At(NameStart),
        (Name | AfterName | Token, b'\r') => ExtStep::LineEnd,
        _ => return None,
    })
}

/// Incremental decoder of a chunked body (RFC 9112 §7.1); input may be split anywhere.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0, size: 0 },
            trailer_bytes: 0,
        }
    }

    /// Consumes raw chunked bytes, calling `on_data` with each payload slice of `input`.
    ///
    /// Returns how many bytes were consumed: all of `input`, unless the body ended inside
    /// it; then exactly up to the end of the final CRLF, so what follows (a pipelined
    /// message) is left to the caller. Extensions and trailers are checked and skipped, but
    /// count as consumed so pass-through forwarding keeps them. Once done, consumes nothing.
    ///
    /// # Errors
    /// A `BodyError` for malformed framing; the decoder must not be fed again after one.
    pub fn feed<'a>(
        &mut self,
        input: &'a [u8],
        mut on_data: impl FnMut(&'a [u8]),
    ) -> Result<usize, BodyError> {
        // The state lives in a local so it stays in registers across the byte loop.
        let mut state = self.state;
        let mut i = 0;
        let result = loop {
            let Some(&b) = input.get(i) else {
                break Ok(i);
            };
            match state {
                State::Done => break Ok(i),
                State::Data { remaining } => {
                    let available = input.len() - i;
                    let n = usize::try_from(remaining).map_or(available, |r| r.min(available));
                    on_data(&input[i..i + n]);
                    i += n;
                    let remaining = remaining - n as u64;
                    state = if remaining == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining }
                    };
                }
                _ => match step(state, b, &mut self.trailer_bytes) {
                    Ok(next) => {
                        state = next;
                        i += 1;
                    }
                    Err(e) => break Err(e),
                },
            }
        };
        self.state = state;
        result
    }

    /// True once the final CRLF after the trailer section was consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// Advances the framing states by one byte (every state except `Data` and `Done`).
#[inline(always)]
fn step(state: State, b: u8, trailer_bytes: &mut usize) -> Result<State, BodyError> {
    Ok(match state {
        State::Size { digits, size } => match (hex(b), b) {
            // Leading zeros are allowed (chunk-size = 1*HEXDIG), as long as the line is bounded.
            (Some(_), _) if size >> (64 - 4) != 0 => return Err(BodyError::BadChunkSize),
            (Some(_), _) if usize::from(digits) >= MAX_CHUNK_EXT_BYTES => {
                return Err(BodyError::LineTooLong)
            }
            (Some(d), _) => State::Size {
                digits: digits + 1,
                size: size << 4 | u64::from(d),
            },
            _ if digits == 0 => return Err(BodyError::BadChunkSize),
            (None, b' ' | b'\t') => State::SizeWs { size, line: 1 },
            (None, b';') => State::Ext {
                size,
                line: 1,
                at: ExtAt::NameStart,
            },
            (None, b'\r') => State::SizeLf { size },
            _ => return Err(BodyError::BadChunkSize),
        },
        State::SizeWs { size, line } => match b {
            b' ' | b'\t' => State::SizeWs {
                size,
                line: bounded(line)?,
            },
            b';' => State::Ext {
                size,
                line: bounded(line)?,
                at: ExtAt::NameStart,
            },
            b'\r' => State::SizeLf { size },
            _ => return Err(BodyError::BadChunkSize),
        },
        State::Ext { size, line, at } => match ext_step(at, b).ok_or(BodyError::BadChunkSize)? {
            ExtStep::At(at) => State::Ext {
                size,
                line: bounded(line)?,
                at,
            },
            ExtStep::Quoted => State::ExtQuoted {
                size,
                line: bounded(line)?,
                escaped: false,
            },
            ExtStep::Gap => State::SizeWs {
                size,
                line: bounded(line)?,
            },
            ExtStep::LineEnd => State::SizeLf { size },
        },
        State::ExtQuoted {
            size,
            line,
            escaped,
        } => match b {
            _ if is_ctl(b) => return Err(BodyError::BadChunkSize),
            // Only whitespace, `;` or the line's end may follow, as after the size: `a="b"c`
            // must not be read one way here and another by the backend.
            b'"' if !escaped => State::SizeWs {
                size,
                line: bounded(line)?,
            },
            _ => State::ExtQuoted {
                size,
                line: bounded(line)?,
                escaped: !escaped && b == b'\\',
            },
        },
        State::SizeLf { size } => match (b, size) {
            (b'\n', 0) => State::TrailerStart,
            (b'\n', remaining) => State::Data { remaining },
            _ => return Err(BodyError::BadChunkSize),
        },
        State::DataCr if b == b'\r' => State::DataLf,
        State::DataLf if b == b'\n' => State::Size { digits: 0, size: 0 },
        State::DataCr | State::DataLf => return Err(BodyError::BadChunkTerminator),
        trailer => step_trailer(trailer, b, trailer_bytes)?,
    })
}

fn step_trailer(state: State, b: u8, trailer_bytes: &mut usize) -> Result<State, BodyError> {
    *trailer_bytes += 1;
    if *trailer_bytes > MAX_TRAILER_BYTES {
        return Err(BodyError::TrailersTooLarge);
    }
    Ok(match state {
        State::TrailerStart if b == b'\r' => State::EndLf,
        State::TrailerStart if is_token(b) => State::TrailerName,
        State::TrailerName if is_token(b) => State::TrailerName,
        State::TrailerName if b == b':' => State::TrailerValue,
        State::TrailerValue if b == b'\r' => State::TrailerLf,
        State::TrailerValue if b != b'\n' && b != 0 => State::TrailerValue,
        State::TrailerLf if b == b'\n' => State::TrailerStart,
        State::EndLf if b == b'\n' => State::Done,
        State::EndLf => return Err(BodyError::BadChunkTerminator),
        _ => return Err(BodyError::BadTrailer),
    })
}

/// A control character other than HTAB (CR and LF included).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

fn bounded(line: usize) -> Result<usize, BodyError> {
    if line >= MAX_CHUNK_EXT_BYTES {
        return Err(BodyError::LineTooLong);
    }
    Ok(line + 1)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// tchar (RFC 9110 §5.6.2).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends a chunk-size line: `{len:x}\r\n`.
pub fn write_chunk_header(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns (payload, consumed, done).
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut decoder = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(step.max(1)) {
            let n = decoder.feed(piece, |data| payload.extend_from_slice(data))?;
            consumed += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((payload, consumed, decoder.is_done()))
    }

    fn decode(input: &[u8]) -> Result<(Vec<u8>, usize, bool), BodyError> {
        decode_in_steps(input, input.len())
    }

    /// Feeds `input` split into two parts at `split`; returns (payload, consumed, done).
    fn decode_split(input: &[u8], split: usize) -> Result<(Vec<u8>, usize, bool), BodyError> {
        let mut decoder = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let (a, b) = input.split_at(split);
        let mut consumed = decoder.feed(a, |d| payload.extend_from_slice(d))?;
        if consumed == a.len() {
            consumed += decoder.feed(b, |d| payload.extend_from_slice(d))?;
        }
        Ok((payload, consumed, decoder.is_done()))
    }

    fn chunk(payload: &[u8], sizes: &mut dyn FnMut() -> usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = payload;
        while !rest.is_empty() {
            let n = sizes().clamp(1, rest.len());
            write_chunk_header(n, &mut out);
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(LAST_CHUNK);
        out
    }

    #[test]
    fn accepted_bodies_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
            (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5 ;a=\"b;c\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"q\\\"uote\\\\\";b\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"\t\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"b\" ; c=\"d\"\t\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5 ; a = b ;c;d=\"\" \r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"\\\"x\\\"\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\t \r\nhello\r\n0\r\n\r\n", b"hello"),
            (
                b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum: abc\r\n\r\n",
                b"hello",
            ),
            (b"5\r\nhe\r\nl\r\n0\r\nX:\r\n\r\n", b"he\r\nl"),
        ];
        for &(input, payload) in cases {
            let got = decode(input);
            assert_eq!(got, Ok((payload.to_vec(), input.len(), true)), "{input:?}");
        }
    }

    #[test]
    fn rejected_bodies_table() {
        let long_ext = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_EXT_BYTES)
        );
        let big_trailer = format!("0\r\nX: {}\r\n\r\n", "v".repeat(MAX_TRAILER_BYTES));
        let cases: Vec<(&[u8], BodyError)> = vec![
            (b"\r\n", BodyError::BadChunkSize),
            (b";ext\r\n", BodyError::BadChunkSize),
            (b" 5\r\nhello\r\n0\r\n\r\n", BodyError::BadChunkSize),
            (b"+5\r\nhello\r\n", BodyError::BadChunkSize),
            (b"-1\r\n", BodyError::BadChunkSize),
            (b"0x5\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5g\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5 5\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5\nhello\r\n0\r\n\r\n", BodyError::BadChunkSize),
            (b"5\rxhello\r\n", BodyError::BadChunkSize),
            (b"5;a\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a\x01\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a\x7f\r\nhello\r\n", BodyError::BadChunkSize),
            // A quoted value must close on its line (a backend reading it on past the CRLF
            // would take the data for extension).
            (b"5;x=\"open\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;x=\"esc\\\"\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;x=\"a\x01\"\r\nhello\r\n", BodyError::BadChunkSize),
            // After the closing quote only whitespace, `;` or the line's end may come.
            (b"5;a=\"b\"x\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a=\"b\" \"c\"\r\nhello\r\n", BodyError::BadChunkSize),
            // A quote, `=` or a space where the grammar has none: two parsers could split it
            // differently.
            (b"5;a=b\"c\"\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a=b \"c\"\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a \"c\"\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;\"a\"\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;=x\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a=b c\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;a=\r\nhello\r\n", BodyError::BadChunkSize),
            (b"5;\r\nhello\r\n", BodyError::BadChunkSize),
            (b"10000000000000000\r\n", BodyError::BadChunkSize),
            (b"5\r\nhelloX\r\n0\r\n\r\n", BodyError::BadChunkTerminator),
            (b"5\r\nhello\n0\r\n\r\n", BodyError::BadChunkTerminator),
            (b"5\r\nhello\r0\r\n\r\n", BodyError::BadChunkTerminator),
            (b"0\r\n\rX", BodyError::BadChunkTerminator),
            (long_ext.as_bytes(), BodyError::LineTooLong),
            (big_trailer.as_bytes(), BodyError::TrailersTooLarge),
            (b"0\r\nNo colon\r\n\r\n", BodyError::BadTrailer),
            (b"0\r\n: v\r\n\r\n", BodyError::BadTrailer),
            (b"0\r\nX: a\nb\r\n\r\n", BodyError::BadTrailer),
            (b"0\r\nX: a\rb\r\n\r\n", BodyError::BadTrailer),
            (b"0\r\n\n", BodyError::BadTrailer),
        ];
        for (input, error) in cases {
            assert_eq!(decode(input), Err(error.clone()), "{input:?}");
            assert_eq!(
                decode_in_steps(input, 1),
                Err(error),
                "{input:?} byte by byte"
            );
        }
    }

    #[test]
    fn sixteen_hex_digits_are_the_most_a_size_may_have() {
        let mut decoder = ChunkedDecoder::new();
        let input = b"ffffffffffffffff\r\nabc";
        let mut payload = Vec::new();
        assert_eq!(
            decoder.feed(input, |d| payload.extend_from_slice(d)),
            Ok(input.len())
        );
        assert_eq!(payload, b"abc");
        assert!(!decoder.is_done());
    }

    #[test]
    fn a_size_may_have_leading_zeros_but_not_more_than_64_bits() {
        let padded = b"000000000000000000000005\r\nhello\r\n0\r\n\r\n";
        assert_eq!(decode(padded).map(|r| r.2), Ok(true));
        assert_eq!(
            decode(b"10000000000000000\r\n"),
            Err(BodyError::BadChunkSize),
            "2^64 overflows"
        );
        let endless_zeros = "0".repeat(MAX_CHUNK_EXT_BYTES + 1);
        assert_eq!(
            decode(endless_zeros.as_bytes()),
            Err(BodyError::LineTooLong)
        );
    }

    #[test]
    fn extension_limit_is_exact() {
        let ok = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_EXT_BYTES - 1)
        );
        assert_eq!(decode(ok.as_bytes()).map(|r| r.2), Ok(true));
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let input: &[u8] =
            b"4;x=y\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n";
        let expected = (b"Wikipedia in\r\n\r\nchunks.".to_vec(), input.len(), true);
        for split in 0..=input.len() {
            assert_eq!(
                decode_split(input, split),
                Ok(expected.clone()),
                "split at {split}"
            );
        }
        assert_eq!(decode_in_steps(input, 1), Ok(expected));
    }

    #[test]
    fn consumed_stops_at_the_end_of_the_first_body() {
        let first: &[u8] = b"3\r\nabc\r\n0\r\nX: y\r\n\r\n";
        let second: &[u8] = b"2\r\nde\r\n0\r\n\r\n";
        let both = [first, second].concat();
        for split in 0..=both.len() {
            let (payload, consumed, done) = decode_split(&both, split).unwrap();
            assert_eq!(
                (payload.as_slice(), consumed, done),
                (&b"abc"[..], first.len(), true)
            );
        }
        let mut decoder = ChunkedDecoder::new();
        let consumed = decoder.feed(&both, |_| {}).unwrap();
        let mut next = ChunkedDecoder::new();
        let mut payload = Vec::new();
        let rest = &both[consumed..];
        assert_eq!(
            next.feed(rest, |d| payload.extend_from_slice(d)),
            Ok(second.len())
        );
        assert_eq!(payload, b"de");
        assert_eq!(
            decoder.feed(b"more", |_| panic!("no data after the end")),
            Ok(0)
        );
    }

    #[test]
    fn data_slices_borrow_the_input() {
        let input: &[u8] = b"5\r\nhello\r\n0\r\n\r\n";
        let mut slices: Vec<&[u8]> = Vec::new();
        ChunkedDecoder::new()
            .feed(input, |d| slices.push(d))
            .unwrap();
        assert_eq!(slices, [&input[3..8]]);
    }

    #[test]
    fn unfinished_body_is_not_done() {
        for input in [
            &b"5\r\nhel"[..],
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\nX: y\r\n",
            b"0\r\n\r",
        ] {
            let (_, consumed, done) = decode(input).unwrap();
            assert_eq!((consumed, done), (input.len(), false), "{input:?}");
        }
    }

    #[test]
    fn chunk_headers_are_lower_hex() {
        let cases = [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (4096, "1000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ];
        for (len, expected) in cases {
            let mut out = Vec::new();
            write_chunk_header(len, &mut out);
            assert_eq!(out, expected.as_bytes());
        }
    }

    #[test]
    fn errors_display_in_lower_case() {
        for e in [
            BodyError::BadChunkSize,
            BodyError::BadChunkTerminator,
            BodyError::LineTooLong,
            BodyError::TrailersTooLarge,
            BodyError::BadTrailer,
        ] {
            let text = e.to_string();
            assert_eq!(text, text.to_lowercase());
        }
    }

    #[test]
    fn random_payloads_survive_random_chunking_and_splits() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..300 {
            let len = rng.usize(0..3000);
            let payload: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let max_chunk = rng.usize(1..600);
            let mut encoded = chunk(&payload, &mut || rng.usize(1..=max_chunk));
            let body_len = encoded.len();
            encoded.extend_from_slice(b"GET / HTTP/1.1\r\n"); // a pipelined request follows
            let mut decoder = ChunkedDecoder::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            while !decoder.is_done() {
                let end = (at + rng.usize(1..200)).min(encoded.len());
                let n = decoder
                    .feed(&encoded[at..end], |d| decoded.extend_from_slice(d))
                    .unwrap();
                at += n;
            }
            assert_eq!(decoded, payload);
            assert_eq!(at, body_len);
        }
    }

    #[test]
    fn random_bytes_never_panic_and_consumed_is_in_bounds() {
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = b"0123456789abcdefABCDEFxX;= \t\r\n:";
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut decoder = ChunkedDecoder::new();
            let mut seen = 0;
            if let Ok(n) = decoder.feed(&input, |d| seen += d.len()) {
                assert!(n <= input.len() && seen <= n);
                assert!(decoder.is_done() || n == input.len());
            }
        }
    }
}
