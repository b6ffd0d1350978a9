//! Chunked bodies: feeding the input whole, split at a fuzzer-chosen point, or one byte at a
//! time gives the same consumed count, payload, end and error.
#![no_main]

use balancer::body::{BodyError, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

/// Feeds `pieces` in order, stopping at an error or at the end of the body.
fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Result<usize, BodyError>, Vec<u8>, bool) {
    let mut decoder = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        match decoder.feed(piece, |d| payload.extend_from_slice(d)) {
            Ok(n) => {
                assert!(n <= piece.len());
                assert!(
                    n == piece.len() || decoder.is_done(),
                    "stopped early, not done"
                );
                consumed += n;
                if n < piece.len() {
                    break;
                }
            }
            Err(e) => return (Err(e), payload, decoder.is_done()),
        }
    }
    (Ok(consumed), payload, decoder.is_done())
}

fuzz_target!(|input: &[u8]| {
    let Some((split, body)) = input.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (body.len() + 1);
    let whole = decode(std::iter::once(body));
    let (a, b) = body.split_at(at);
    let split = decode([a, b].into_iter());
    assert_eq!(whole, split, "split at {at}");
    let bytes = decode(body.chunks(1));
    assert_eq!(whole, bytes, "byte by byte");
    if let (Ok(consumed), payload, true) = &whole {
        assert!(*consumed <= body.len() && payload.len() < *consumed);
    }
});
