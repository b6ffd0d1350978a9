//! Request heads: `parse_request` never panics, its ranges stay in the buffer, and the head
//! `write_forward_request` makes from an accepted one parses again with the same framing.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use balancer::http::{
    parse_request, write_forward_request, HttpError, RequestFraming, RequestHead, Version,
    MAX_HEADERS, MAX_HEAD_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    if parse_request(data, &mut head) != Ok(true) {
        return;
    }
    assert!(head.head_len <= data.len());
    let ranges = [&head.method, &head.target, &head.path]
        .into_iter()
        .chain(head.headers.iter().flat_map(|h| [&h.name, &h.value]))
        .chain(head.host.iter())
        .chain(head.authority.iter());
    for r in ranges {
        assert!(r.start <= r.end && r.end <= head.head_len, "{r:?}");
    }

    let ip = match data.first() {
        Some(b) if b & 1 == 1 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
        _ => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    };
    let mut out = Vec::new();
    write_forward_request(&head, data, ip, &mut out);

    let mut again = RequestHead::default();
    match parse_request(&out, &mut again) {
        Ok(true) => {}
        // The proxy adds a few fields; a head at the limits may not fit them.
        Err(HttpError::TooManyHeaders) if head.headers.len() + 4 > MAX_HEADERS => return,
        Err(HttpError::HeadTooLarge) if out.len() > MAX_HEAD_BYTES => return,
        other => panic!(
            "forwarded head does not parse: {other:?}\n  in:  {:?}\n  out: {:?}",
            String::from_utf8_lossy(&data[..head.head_len]),
            String::from_utf8_lossy(&out)
        ),
    }
    let show = || {
        format!(
            "\n  in:  {:?}\n  out: {:?}",
            String::from_utf8_lossy(&data[..head.head_len]),
            String::from_utf8_lossy(&out)
        )
    };
    assert_eq!(again.head_len, out.len(), "one head{}", show());
    assert_eq!(again.framing, head.framing, "framing{}", show());
    assert_eq!(again.version, Version::Http11, "version{}", show());
    assert_eq!(again.method(&out), head.method(data), "method{}", show());
    // "http://h?q" goes out as "/?q", and "OPTIONS http://h" as "OPTIONS *" (RFC 9112 §3.2.4).
    let path = match head.path(data) {
        _ if head.authority.is_some()
            && data[head.path.clone()].is_empty()
            && head.method(data) == b"OPTIONS" =>
        {
            b"*".to_vec()
        }
        p @ [b'/' | b'*', ..] => p.to_vec(),
        p => [b"/", p].concat(),
    };
    assert_eq!(again.path(&out), path, "path{}", show());
    assert_eq!(
        again.host_for_key(&out),
        head.host_for_key(data),
        "host{}",
        show()
    );
    assert_eq!(
        again.websocket_upgrade,
        head.websocket_upgrade,
        "upgrade{}",
        show()
    );
    assert_eq!(
        again.expect_continue,
        head.expect_continue,
        "expect{}",
        show()
    );
    assert_eq!(
        again.has_authorization,
        head.has_authorization,
        "authorization{}",
        show()
    );
    assert!(again.authority.is_none(), "origin-form{}", show());
    // Nothing the client sent can add a field the proxy owns.
    for name in [
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
    ] {
        let count = again
            .headers
            .iter()
            .filter(|h| out[h.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .count();
        let is_length = matches!(again.framing, RequestFraming::Length(_));
        let expected = usize::from(name != "content-length" || is_length);
        assert_eq!(count, expected, "{name}{}", show());
    }
});
