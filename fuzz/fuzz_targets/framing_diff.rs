//! Differential: the balancer's request framing decision (body length, chunked, or reject)
//! against an independent RFC 9112 §6.3 reference built on picohttpparser (`rfc9112`), both
//! on what the client sent and on the head the balancer forwards to the backend.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use balancer::http::{
    parse_request, write_forward_request, HttpError, RequestFraming, RequestHead, MAX_HEAD_BYTES,
};
use balancer_fuzz::rfc9112::{decide_request, Framing, Verdict};
use libfuzzer_sys::fuzz_target;

/// What the balancer made of the bytes, in the reference's terms.
#[allow(dead_code)] // the reasons are read through Debug, in the failure message
#[derive(Debug)]
enum Ours {
    Partial,
    Valid(usize, Framing),
    /// Refused for the message framing (the reference must refuse too).
    BadFraming(&'static str),
    /// Refused for the head's syntax (the reference must refuse too).
    Malformed(&'static str),
    /// Refused by a policy the RFC leaves to the server (Host, target form, CONNECT,
    /// versions other than 1.0 and 1.1, size limits): not compared.
    Policy(HttpError),
}

fn ours(buf: &[u8]) -> Ours {
    let mut head = RequestHead::default();
    match parse_request(buf, &mut head) {
        Ok(false) => Ours::Partial,
        Ok(true) => Ours::Valid(
            head.head_len,
            match head.framing {
                RequestFraming::None => Framing::None,
                RequestFraming::Length(n) => Framing::Length(n),
                RequestFraming::Chunked => Framing::Chunked,
            },
        ),
        Err(HttpError::BadRequest(why)) => match why {
            "both content-length and transfer-encoding"
            | "transfer-encoding in an http/1.0 request"
            | "chunked applied more than once"
            | "transfer-encoding does not end in chunked"
            | "empty transfer-encoding"
            | "invalid transfer-encoding"
            | "invalid content-length"
            | "differing content-length values" => Ours::BadFraming(why),
            "invalid header name"
            | "invalid header value"
            | "invalid line ending"
            | "invalid request line"
            | "obsolete line folding"
            | "invalid http version" => Ours::Malformed(why),
            _ => Ours::Policy(HttpError::BadRequest(why)),
        },
        Err(e) => Ours::Policy(e),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_HEAD_BYTES {
        return; // past the limit the balancer refuses by policy
    }
    let ours = ours(data);
    let reference = decide_request(data);
    let agree = match (&ours, &reference) {
        (Ours::Policy(_), _) => true,
        (
            Ours::Valid(len, framing),
            Verdict::Valid {
                head_len,
                framing: f,
                ..
            },
        ) => len == head_len && framing == f,
        // Accepting what the RFC calls malformed or unframeable, or seeing a complete head
        // where the reference does not, is the disagreement that smuggling is made of.
        (Ours::Valid(..), _) => false,
        // Refusing what the RFC accepts.
        (Ours::BadFraming(_) | Ours::Malformed(_), Verdict::Valid { .. }) => false,
        (Ours::BadFraming(_) | Ours::Malformed(_), _) => true,
        // Waiting for more where the reference has a complete, valid head.
        (Ours::Partial, Verdict::Valid { .. }) => false,
        (Ours::Partial, _) => true,
    };
    assert!(
        agree,
        "framing disagreement\n  ours:      {ours:?}\n  reference: {reference:?}\n  input:     {:?}",
        String::from_utf8_lossy(data)
    );
    // What the backend is sent must frame the same way for an RFC 9112 reader too.
    if let Ours::Valid(_, framing) = ours {
        let mut head = RequestHead::default();
        assert_eq!(parse_request(data, &mut head), Ok(true));
        let mut out = Vec::new();
        write_forward_request(&head, data, IpAddr::V4(Ipv4Addr::LOCALHOST), &mut out);
        let forwarded = decide_request(&out);
        let expected = Verdict::Valid {
            head_len: out.len(),
            minor: 1,
            framing,
        };
        assert_eq!(
            forwarded,
            expected,
            "forwarded head frames differently\n  input: {:?}\n  out:   {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&out)
        );
    }
});
