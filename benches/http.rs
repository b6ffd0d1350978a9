//! Benchmarks of the HTTP head codec and chunked decoder, each against a naive baseline.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use balancer::body::{write_chunk_header, ChunkedDecoder, LAST_CHUNK};
use balancer::http::{
    parse_request, parse_response, write_forward_request, write_response_head, RequestHead,
    ResponseHead, ResponseOptions, Version,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BROWSER_GET: &[u8] = b"GET /static/js/app.3f9c2b.js?v=1712345678 HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://shop.example.com/products/42\r\n\
Connection: keep-alive\r\n\
Cookie: session=7d1f0c2e9a8b4c3d; theme=dark; consent=1\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\
Sec-Fetch-Site: same-origin\r\n\
X-Forwarded-For: 203.0.113.9\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Tue, 15 Oct 2024 10:00:00 GMT\r\n\
Server: nginx\r\n\
Content-Type: application/javascript\r\n\
Content-Length: 48213\r\n\
Last-Modified: Mon, 14 Oct 2024 09:00:00 GMT\r\n\
ETag: \"66ff1a2b-bc55\"\r\n\
Cache-Control: public, max-age=3600\r\n\
Vary: Accept-Encoding\r\n\
Connection: keep-alive\r\n\
Keep-Alive: timeout=5\r\n\
Accept-Ranges: bytes\r\n\r\n";

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// The obvious first attempt: strings, splits and owned headers.
fn naive_forward(raw: &[u8], client: IpAddr) -> Vec<u8> {
    let text = String::from_utf8(raw.to_vec()).expect("ascii bench input");
    let head = text.split("\r\n\r\n").next().expect("a head");
    let mut lines = head.split("\r\n");
    let request_line = lines.next().expect("a request line");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_lowercase(), v.trim().to_string()))
        .collect();
    let hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    let mut out = format!("{} {} HTTP/1.1\r\n", parts[0], parts[1]);
    let mut xff = Vec::new();
    for (name, value) in &headers {
        if name == "x-forwarded-for" {
            xff.push(value.clone());
        } else if !hop.contains(&name.as_str()) && name != "x-forwarded-proto" {
            out += &format!("{name}: {value}\r\n");
        }
    }
    xff.push(client.to_string());
    out += &format!(
        "X-Forwarded-For: {}\r\nX-Forwarded-Proto: http\r\n\r\n",
        xff.join(", ")
    );
    out.into_bytes()
}

fn naive_response(raw: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(raw.to_vec()).expect("ascii bench input");
    let head = text.split("\r\n\r\n").next().expect("a head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line").to_string();
    let hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    let mut out = status_line + "\r\n";
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        if !hop.contains(&name.to_lowercase().as_str()) {
            out += &format!("{name}: {}\r\n", value.trim());
        }
    }
    out += "\r\n";
    out.into_bytes()
}

/// Decodes a whole chunked body at once, copying the payload.
fn naive_dechunk(mut input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = input
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("size line");
        let line = std::str::from_utf8(&input[..eol]).expect("ascii size");
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex size");
        input = &input[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&input[..size]);
        input = &input[size + 2..];
    }
}

fn request(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_head");
    group.throughput(Throughput::Bytes(BROWSER_GET.len() as u64));
    let mut head = RequestHead::default();
    let mut out = Vec::with_capacity(1024);
    group.bench_function("codec", |b| {
        b.iter(|| {
            out.clear();
            let complete = parse_request(black_box(BROWSER_GET), &mut head);
            assert_eq!(complete, Ok(true));
            write_forward_request(&head, BROWSER_GET, CLIENT, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("naive", |b| {
        b.iter(|| black_box(naive_forward(black_box(BROWSER_GET), CLIENT)).len())
    });
    group.finish();
}

fn response(c: &mut Criterion) {
    let mut group = c.benchmark_group("response_head");
    group.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    let mut head = ResponseHead::default();
    let mut out = Vec::with_capacity(1024);
    let opts = ResponseOptions {
        keep_alive: true,
        client_version: Version::Http11,
        dechunk: false,
        extra: &[("X-Cache", "MISS")],
    };
    group.bench_function("codec", |b| {
        b.iter(|| {
            out.clear();
            let complete = parse_response(black_box(RESPONSE), false, &mut head);
            assert_eq!(complete, Ok(true));
            write_response_head(&head, RESPONSE, &opts, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("naive", |b| {
        b.iter(|| black_box(naive_response(black_box(RESPONSE))).len())
    });
    group.finish();
}

fn chunked(c: &mut Criterion) {
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut body = Vec::new();
    for piece in payload.chunks(4096) {
        write_chunk_header(piece.len(), &mut body);
        body.extend_from_slice(piece);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(LAST_CHUNK);

    let mut group = c.benchmark_group("chunked_64k_in_4k_chunks");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("decoder", |b| {
        b.iter(|| {
            let mut decoder = ChunkedDecoder::new();
            let mut total = 0;
            let consumed = decoder.feed(black_box(&body), |d| total += d.len());
            assert_eq!(consumed, Ok(body.len()));
            black_box(total)
        })
    });
    group.bench_function("naive", |b| {
        b.iter(|| black_box(naive_dechunk(black_box(&body))).len())
    });
    group.finish();
}

criterion_group!(benches, request, response, chunked);
criterion_main!(benches);
