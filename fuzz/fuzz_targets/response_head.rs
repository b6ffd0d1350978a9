//! Response heads: `parse_response` never panics, and the head `write_response_head` makes
//! for the client from an accepted one parses again with the same status and framing.
#![no_main]

use balancer::http::{
    parse_response, write_response_head, HttpError, ResponseFraming, ResponseHead, ResponseOptions,
    Version, MAX_HEAD_BYTES, MAX_RESPONSE_HEADERS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the request method and the client side's options.
    let Some((&flags, data)) = input.split_first() else {
        return;
    };
    let was_head = flags & 1 != 0;
    let mut head = ResponseHead::default();
    if parse_response(data, was_head, &mut head) != Ok(true) {
        return;
    }
    assert!(head.head_len <= data.len());
    assert!((100..=599).contains(&head.status));
    for h in &head.headers {
        assert!(h.name.end <= head.head_len && h.value.end <= head.head_len);
    }
    let client_version = if flags & 4 != 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    // As the relay: an HTTP/1.0 client's chunked body is always de-chunked (and one with
    // another transfer coding is refused before a head is written for it).
    if client_version == Version::Http10 && head.transfer_coded {
        return;
    }
    let opts = ResponseOptions {
        keep_alive: flags & 2 != 0,
        client_version,
        dechunk: (flags & 8 != 0 || client_version == Version::Http10)
            && head.framing == ResponseFraming::Chunked,
        extra: if flags & 16 != 0 {
            &[("X-Cache", "HIT"), ("Age", "3")]
        } else {
            &[]
        },
    };
    let mut out = Vec::new();
    write_response_head(&head, data, &opts, &mut out);

    let mut again = ResponseHead::default();
    let show = |out: &[u8]| {
        format!(
            "\n  in:  {:?}\n  out: {:?}",
            String::from_utf8_lossy(&data[..head.head_len]),
            String::from_utf8_lossy(out)
        )
    };
    match parse_response(&out, was_head, &mut again) {
        Ok(true) => {}
        Err(HttpError::BadResponse(_))
            if head.headers.len() + 4 > MAX_RESPONSE_HEADERS || out.len() > MAX_HEAD_BYTES =>
        {
            return
        }
        other => panic!("client head does not parse: {other:?}{}", show(&out)),
    }
    assert_eq!(again.head_len, out.len(), "one head{}", show(&out));
    assert_eq!(again.status, head.status, "status{}", show(&out));
    assert_eq!(again.version, Version::Http11, "version{}", show(&out));
    assert_eq!(again.interim, head.interim, "interim{}", show(&out));
    assert_eq!(again.upgraded, head.upgraded, "upgraded{}", show(&out));
    let expected = if opts.dechunk {
        ResponseFraming::Close
    } else {
        head.framing
    };
    assert_eq!(again.framing, expected, "framing{}", show(&out));
    if !head.interim && !head.upgraded {
        let keep = opts.keep_alive && !opts.dechunk && again.framing != ResponseFraming::Close;
        assert!(again.keep_alive || !keep, "keep-alive{}", show(&out));
    }
});
