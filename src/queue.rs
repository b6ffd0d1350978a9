//! The deployment agent's wire format: parse and validate one server-set snapshot (SPEC §4).

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value};

/// The most servers one snapshot may list.
pub const MAX_SERVERS: usize = 10_000;

/// Longest offending value quoted in a rejection, so a hostile message cannot flood the log.
const MAX_QUOTED: usize = 80;

/// One validated server of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEntry {
    /// An IP literal (canonical form, IPv6 without brackets) or a DNS name as sent.
    pub host: String,
    pub port: u16,
    /// Finite and `>= 0`; 0 means draining.
    pub score: f64,
}

impl ServerEntry {
    /// `host:port`, with an IPv6 literal in brackets (`[::1]:8080`).
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A validated snapshot: entries in the order sent, no host:port twice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerSet {
    pub servers: Vec<ServerEntry>,
}

/// Why a snapshot was rejected whole. `Display` is the text sent back to the agent and logged.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Not valid JSON; carries serde_json's message.
    NotJson(String),
    /// Valid JSON but neither an array nor an object with a `servers` array.
    NotASnapshot,
    /// More than [`MAX_SERVERS`] entries (checked before any entry is validated).
    TooManyServers(usize),
    /// Entry `index` (0-based) has a bad `field`; `value` is its JSON text or `missing`.
    /// `field` is `"entry"` when the entry itself is not an object.
    BadEntry {
        index: usize,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// Entry `index` repeats `server` (host:port) of an earlier entry.
    DuplicateServer { index: usize, server: String },
    /// A binary WebSocket frame; produced by the socket layer, never by [`parse_snapshot`].
    BinaryFrame,
    /// A text frame whose payload is not UTF-8 (so not JSON either); produced by the socket
    /// layer.
    NotUtf8,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotJson(message) => write!(f, "not valid json: {message}"),
            Rejection::NotASnapshot => f.write_str(
                "not a server snapshot: expected a json array or an object with a \"servers\" array",
            ),
            Rejection::TooManyServers(count) => {
                write!(f, "too many servers: {count} (limit {MAX_SERVERS})")
            }
            Rejection::BadEntry {
                index,
                field: "entry",
                value,
                reason,
            } => write!(f, "entry {index}: value {value}: {reason}"),
            Rejection::BadEntry {
                index,
                field,
                value,
                reason,
            } => write!(f, "entry {index}: field {field}: value {value}: {reason}"),
            Rejection::DuplicateServer { index, server } => {
                write!(f, "entry {index}: duplicate server {server}")
            }
            Rejection::BinaryFrame => f.write_str("binary frames are not accepted"),
            Rejection::NotUtf8 => f.write_str("not valid json: the text message is not UTF-8"),
        }
    }
}

impl std::error::Error for Rejection {}

/// Parse one snapshot: a JSON array of entries, or an object whose `servers` is such an array.
/// Entries without a `port` get `default_port`. Unknown fields are ignored.
///
/// # Errors
/// The first problem found, checking the shape, then the count, then each entry in order
/// (stopping at its first bad field), then duplicates.
pub fn parse_snapshot(text: &str, default_port: u16) -> Result<ServerSet, Rejection> {
    // Valid snapshots (the common case, and the one on the propagation path) are read into
    // typed entries, several times faster than through a generic JSON tree. Anything the fast
    // path does not accept goes through the tree, which alone words the rejections.
    if let Some(set) = parse_typed(text, default_port) {
        return Ok(set);
    }
    parse_tree(text, default_port)
}

/// One entry as the fast path reads it: unknown fields are skipped, and `port` tells a
/// missing field (`None`) from an explicit `null` (`Some(None)`, left to the slow path).
#[derive(serde::Deserialize)]
struct TypedEntry<'a> {
    #[serde(borrow)]
    host: std::borrow::Cow<'a, str>,
    #[serde(default, deserialize_with = "present")]
    port: Option<Option<u64>>,
    score: f64,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

#[derive(serde::Deserialize)]
struct TypedSnapshot<'a> {
    #[serde(borrow)]
    servers: Vec<ObjectOnly<TypedEntry<'a>>>,
}

/// A derived struct deserializer also takes a JSON array of its fields in order, so `[[]]`
/// would read as a snapshot with no servers and `[["h", 80, 1]]` as an entry. The protocol's
/// entries and snapshots are objects only: anything else leaves the fast path, and the tree
/// rejects it.
struct ObjectOnly<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// The fast path: `Some` only for a snapshot that is valid in every respect.
fn parse_typed(text: &str, default_port: u16) -> Option<ServerSet> {
    let entries: Vec<ObjectOnly<TypedEntry>> = serde_json::from_str(text)
        .or_else(|_| serde_json::from_str::<ObjectOnly<TypedSnapshot>>(text).map(|s| s.0.servers))
        .ok()?;
    if entries.len() > MAX_SERVERS {
        return None;
    }
    let mut servers = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for ObjectOnly(entry) in entries {
        let host = normalize_host(&entry.host)?;
        let port = match entry.port {
            None => default_port,
            Some(Some(port)) => u16::try_from(port).ok().filter(|p| *p != 0)?,
            Some(None) => return None,
        };
        if !(entry.score.is_finite() && entry.score >= 0.0) {
            return None;
        }
        let server = ServerEntry {
            host,
            port,
            score: entry.score + 0.0,
        };
        if !seen.insert(identity(&server)) {
            return None;
        }
        servers.push(server);
    }
    Some(ServerSet { servers })
}

/// The slow path: a generic JSON tree, so every rejection can name the entry, the field and
/// the offending value as sent.
fn parse_tree(text: &str, default_port: u16) -> Result<ServerSet, Rejection> {
    let document = parse_document(text)?;
    let entries = match &document {
        Value::Array(entries) => entries,
        Value::Object(object) => match object.get("servers") {
            Some(Value::Array(entries)) => entries,
            _ => return Err(Rejection::NotASnapshot),
        },
        _ => return Err(Rejection::NotASnapshot),
    };
    if entries.len() > MAX_SERVERS {
        return Err(Rejection::TooManyServers(entries.len()));
    }
    let mut servers = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let server = parse_entry(entry, default_port).map_err(|(field, value, reason)| {
            Rejection::BadEntry {
                index,
                field,
                value,
                reason,
            }
        })?;
        if !seen.insert(identity(&server)) {
            return Err(Rejection::DuplicateServer {
                index,
                server: server.label(),
            });
        }
        servers.push(server);
    }
    Ok(ServerSet { servers })
}

/// Marks, inside a JSON string, a number serde_json could not hold (see `parse_document`);
/// the number as sent follows it.
const OUT_OF_RANGE: &str = "\u{0}number out of range:";
/// Out-of-range numbers rewritten per document at most; more is not a snapshot worth wording.
const MAX_OUT_OF_RANGE: usize = 16;

/// The JSON tree of `text`. Numbers beyond f64's range (`1e999`) are valid JSON that serde_json
/// refuses; as `score: 1e999` is a bad entry rather than bad JSON, each is rewritten into a
/// marked string so the tree parses and the entry's check names the field and the number.
fn parse_document(text: &str) -> Result<Value, Rejection> {
    let first = match serde_json::from_str(text) {
        Ok(document) => return Ok(document),
        Err(e) => e,
    };
    let first_message = first.to_string();
    let mut rewritten = text.to_owned();
    let mut error = first;
    for _ in 0..MAX_OUT_OF_RANGE {
        if !error.to_string().starts_with("number out of range") {
            break;
        }
        let Some(span) = number_at(&rewritten, error.line(), error.column()) else {
            break;
        };
        let number = rewritten[span.clone()].to_owned();
        // The marker's NUL goes in escaped: a raw control character is not allowed in JSON.
        rewritten.replace_range(span, &format!("\"\\u0000{}{number}\"", &OUT_OF_RANGE[1..]));
        match serde_json::from_str(&rewritten) {
            Ok(document) => return Ok(document),
            Err(e) => error = e,
        }
    }
    // Positions in later errors refer to the rewritten text: report the first one.
    Err(Rejection::NotJson(first_message))
}

/// The byte range of the JSON number at serde_json's error position (1-based `line`,
/// `column`).
fn number_at(text: &str, line: usize, column: usize) -> Option<std::ops::Range<usize>> {
    let line_start = if line <= 1 {
        0
    } else {
        text.match_indices('\n').nth(line - 2)?.0 + 1
    };
    let bytes = text.as_bytes();
    let is_number_byte = |b: u8| b.is_ascii_digit() || b"+-.eE".contains(&b);
    let mut end = (line_start + column).min(bytes.len());
    while end < bytes.len() && is_number_byte(bytes[end]) {
        end += 1;
    }
    let mut start = end;
    while start > 0 && is_number_byte(bytes[start - 1]) {
        start -= 1;
    }
    let first = *bytes.get(start)?;
    (start < end && (first == b'-' || first.is_ascii_digit())).then_some(start..end)
}

/// What a bad field looks like before the caller adds the entry's index.
type FieldError = (&'static str, String, &'static str);

fn parse_entry(entry: &Value, default_port: u16) -> Result<ServerEntry, FieldError> {
    let Value::Object(object) = entry else {
        return Err(("entry", quote(entry), "must be an object"));
    };
    let host = parse_host(object)?;
    let port = parse_port(object, default_port)?;
    let score = parse_score(object)?;
    Ok(ServerEntry { host, port, score })
}

fn parse_host(object: &Map<String, Value>) -> Result<String, FieldError> {
    let bad = |value: &Value, reason| Err(("host", quote(value), reason));
    match object.get("host") {
        None => Err(("host", "missing".to_owned(), "is required")),
        Some(value @ Value::String(host)) if host.is_empty() => bad(value, "must not be empty"),
        Some(value @ Value::String(host)) => match normalize_host(host) {
            Some(host) => Ok(host),
            None => bad(value, "must be an ip address or a dns name"),
        },
        Some(value) => bad(value, "must be a string"),
    }
}

fn parse_port(object: &Map<String, Value>, default_port: u16) -> Result<u16, FieldError> {
    let Some(value) = object.get("port") else {
        return Ok(default_port);
    };
    // `as_u64` is `None` for floats (80.5, and also 80.0), strings and null.
    match value.as_u64().map(u16::try_from) {
        Some(Ok(port)) if port != 0 => Ok(port),
        _ => Err(("port", quote(value), "must be an integer from 1 to 65535")),
    }
}

fn parse_score(object: &Map<String, Value>) -> Result<f64, FieldError> {
    let Some(value) = object.get("score") else {
        return Err(("score", "missing".to_owned(), "is required"));
    };
    match value.as_f64() {
        // `+ 0.0` turns -0 into 0, so a draining server never shows up as "-0".
        Some(score) if score.is_finite() && score >= 0.0 => Ok(score + 0.0),
        _ => Err(("score", quote(value), "must be a finite number >= 0")),
    }
}

/// An IP literal in canonical form, or a valid DNS name as sent; `None` for anything else.
fn normalize_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(|ip| ip.to_string());
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(ip.to_string());
    }
    if let Ok(ip) = host.parse::<Ipv6Addr>() {
        return Some(ip.to_string());
    }
    is_host_name(host).then(|| host.to_owned())
}

/// A host name as resolvers take it: dot-separated labels of 1-63 letters, digits, hyphens
/// and underscores (RFC 1123 plus `_`, which container and service names use and resolvers
/// accept), not starting or ending with a hyphen, at most 253 characters without the optional
/// trailing dot. A name whose last label is all digits is refused: it is a malformed IPv4
/// address (`10.0.0.256`, `010.0.0.1`) that a resolver might read in surprising ways.
pub fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let last_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|label| label.bytes().all(|b| b.is_ascii_digit()));
    name.split('.').all(label_ok) && !last_numeric
}

/// The key under which two entries are the same server: host without case or trailing dot,
/// and port.
fn identity(server: &ServerEntry) -> (String, u16) {
    let host = server.host.strip_suffix('.').unwrap_or(&server.host);
    (host.to_ascii_lowercase(), server.port)
}

/// The JSON text of an offending value, shortened so a rejection stays one readable line.
fn quote(value: &Value) -> String {
    let mut text = match value {
        Value::String(s) if s.starts_with(OUT_OF_RANGE) => s[OUT_OF_RANGE.len()..].to_owned(),
        _ => value.to_string(),
    };
    if text.chars().count() > MAX_QUOTED {
        text = text.chars().take(MAX_QUOTED).collect();
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, port: u16, score: f64) -> ServerEntry {
        ServerEntry {
            host: host.to_owned(),
            port,
            score,
        }
    }

    fn servers(count: usize) -> String {
        let entries: Vec<String> = (0..count)
            .map(|i| {
                format!(
                    r#"{{"host":"10.{}.{}.{}","score":1}}"#,
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                )
            })
            .collect();
        format!("[{}]", entries.join(","))
    }

    #[test]
    fn accepts_valid_snapshots() {
        let cases: &[(&str, &str, Vec<ServerEntry>)] = &[
            (
                "array form",
                r#"[{"host":"10.0.0.7","port":8080,"score":3.5}]"#,
                vec![entry("10.0.0.7", 8080, 3.5)],
            ),
            (
                "object form",
                r#"{"servers":[{"host":"10.0.0.7","port":8080,"score":3.5},{"host":"10.0.0.8","score":1}]}"#,
                vec![entry("10.0.0.7", 8080, 3.5), entry("10.0.0.8", 80, 1.0)],
            ),
            (
                "default port",
                r#"[{"host":"10.0.0.8","score":1}]"#,
                vec![entry("10.0.0.8", 80, 1.0)],
            ),
            (
                "unknown fields everywhere",
                r#"{"version":7,"servers":[{"host":"a.example","score":2,"zone":"eu","weight":9}]}"#,
                vec![entry("a.example", 80, 2.0)],
            ),
            ("empty array", "[]", vec![]),
            ("empty object form", r#"{"servers":[]}"#, vec![]),
            (
                "ipv6 literal",
                r#"[{"host":"::1","port":8080,"score":1}]"#,
                vec![entry("::1", 8080, 1.0)],
            ),
            (
                "bracketed ipv6 stored without brackets",
                r#"[{"host":"[2001:DB8::1]","score":1}]"#,
                vec![entry("2001:db8::1", 80, 1.0)],
            ),
            (
                "host names",
                r#"[{"host":"backend-1.internal","score":1},{"host":"localhost","score":1},{"host":"Example.COM.","score":1},{"host":"3com.net","score":1}]"#,
                vec![
                    entry("backend-1.internal", 80, 1.0),
                    entry("localhost", 80, 1.0),
                    entry("Example.COM.", 80, 1.0),
                    entry("3com.net", 80, 1.0),
                ],
            ),
            (
                "container names with underscores",
                r#"[{"host":"app_web_1","score":1},{"host":"_srv.a_b.example","score":1}]"#,
                vec![
                    entry("app_web_1", 80, 1.0),
                    entry("_srv.a_b.example", 80, 1.0),
                ],
            ),
            (
                "score zero, integer, exponent; port bounds",
                r#"[{"host":"10.0.0.1","port":1,"score":0},{"host":"10.0.0.2","port":65535,"score":1e3},{"host":"10.0.0.3","score":-0.0}]"#,
                vec![
                    entry("10.0.0.1", 1, 0.0),
                    entry("10.0.0.2", 65535, 1000.0),
                    entry("10.0.0.3", 80, 0.0),
                ],
            ),
        ];
        for (name, text, expected) in cases {
            let set = parse_snapshot(text, 80).unwrap_or_else(|e| panic!("{name}: rejected: {e}"));
            assert_eq!(&set.servers, expected, "{name}");
        }
    }

    #[test]
    fn rejects_every_kind_of_bad_snapshot() {
        // (name, text, expected Display text)
        let cases: &[(&str, &str, &str)] = &[
            ("empty text", "", "not valid json: EOF while parsing a value at line 1 column 0"),
            ("garbage", "nope", "not valid json: expected ident at line 1 column 2"),
            ("truncated", r#"[{"host":"#, "not valid json: EOF while parsing a value at line 1 column 9"),
            ("a number", "42", "not a server snapshot: expected a json array or an object with a \"servers\" array"),
            ("object without servers", r#"{"backends":[]}"#, "not a server snapshot: expected a json array or an object with a \"servers\" array"),
            ("servers not an array", r#"{"servers":{}}"#, "not a server snapshot: expected a json array or an object with a \"servers\" array"),
            ("entry not an object", r#"[{"host":"a","score":1},42]"#, "entry 1: value 42: must be an object"),
            ("entry is a string", r#"["10.0.0.1:80"]"#, "entry 0: value \"10.0.0.1:80\": must be an object"),
            // serde's derived structs also read arrays of their fields: neither form may pass.
            ("entry is an empty array", "[[]]", "entry 0: value []: must be an object"),
            ("entry is an array of fields", r#"[["10.0.0.1",80,1]]"#, "entry 0: value [\"10.0.0.1\",80,1]: must be an object"),
            ("snapshot entry is an array of fields", r#"{"servers":[["10.0.0.1",80,1]]}"#, "entry 0: value [\"10.0.0.1\",80,1]: must be an object"),
            ("entry is an array holding an entry", r#"[[{"host":"a","score":1}]]"#, "entry 0: value [{\"host\":\"a\",\"score\":1}]: must be an object"),
            ("missing host", r#"[{"score":1}]"#, "entry 0: field host: value missing: is required"),
            ("empty host", r#"[{"host":"","score":1}]"#, "entry 0: field host: value \"\": must not be empty"),
            ("numeric host", r#"[{"host":10,"score":1}]"#, "entry 0: field host: value 10: must be a string"),
            ("null host", r#"[{"host":null,"score":1}]"#, "entry 0: field host: value null: must be a string"),
            ("host with port", r#"[{"host":"10.0.0.1:80","score":1}]"#, "entry 0: field host: value \"10.0.0.1:80\": must be an ip address or a dns name"),
            ("host with space", r#"[{"host":"a b","score":1}]"#, "entry 0: field host: value \"a b\": must be an ip address or a dns name"),
            ("label starts with hyphen", r#"[{"host":"-a.example","score":1}]"#, "entry 0: field host: value \"-a.example\": must be an ip address or a dns name"),
            ("label ends with hyphen", r#"[{"host":"a-.example","score":1}]"#, "entry 0: field host: value \"a-.example\": must be an ip address or a dns name"),
            ("empty label", r#"[{"host":"a..example","score":1}]"#, "entry 0: field host: value \"a..example\": must be an ip address or a dns name"),
            ("only a dot", r#"[{"host":".","score":1}]"#, "entry 0: field host: value \".\": must be an ip address or a dns name"),
            ("ipv4 octet too big", r#"[{"host":"10.0.0.256","score":1}]"#, "entry 0: field host: value \"10.0.0.256\": must be an ip address or a dns name"),
            ("bad bracketed ipv6", r#"[{"host":"[10.0.0.1]","score":1}]"#, "entry 0: field host: value \"[10.0.0.1]\": must be an ip address or a dns name"),
            ("ipv6 with zone", r#"[{"host":"fe80::1%eth0","score":1}]"#, "entry 0: field host: value \"fe80::1%eth0\": must be an ip address or a dns name"),
            ("url as host", r#"[{"host":"http://a.example/","score":1}]"#, "entry 0: field host: value \"http://a.example/\": must be an ip address or a dns name"),
            ("port zero", r#"[{"host":"a","port":0,"score":1}]"#, "entry 0: field port: value 0: must be an integer from 1 to 65535"),
            ("port too big", r#"[{"host":"a","port":70000,"score":1}]"#, "entry 0: field port: value 70000: must be an integer from 1 to 65535"),
            ("negative port", r#"[{"host":"a","port":-80,"score":1}]"#, "entry 0: field port: value -80: must be an integer from 1 to 65535"),
            ("fractional port", r#"[{"host":"a","port":80.5,"score":1}]"#, "entry 0: field port: value 80.5: must be an integer from 1 to 65535"),
            ("float port", r#"[{"host":"a","port":80.0,"score":1}]"#, "entry 0: field port: value 80.0: must be an integer from 1 to 65535"),
            ("string port", r#"[{"host":"a","port":"80","score":1}]"#, "entry 0: field port: value \"80\": must be an integer from 1 to 65535"),
            ("null port", r#"[{"host":"a","port":null,"score":1}]"#, "entry 0: field port: value null: must be an integer from 1 to 65535"),
            ("missing score", r#"[{"host":"a"}]"#, "entry 0: field score: value missing: is required"),
            ("negative score later", r#"[{"host":"a","score":1},{"host":"b","score":1},{"host":"c","score":-1}]"#, "entry 2: field score: value -1: must be a finite number >= 0"),
            ("string score", r#"[{"host":"a","score":"3"}]"#, "entry 0: field score: value \"3\": must be a finite number >= 0"),
            ("null score", r#"[{"host":"a","score":null}]"#, "entry 0: field score: value null: must be a finite number >= 0"),
            ("boolean score", r#"[{"host":"a","score":true}]"#, "entry 0: field score: value true: must be a finite number >= 0"),
            ("first bad field wins", r#"[{"host":"","port":0}]"#, "entry 0: field host: value \"\": must not be empty"),
            ("duplicate", r#"[{"host":"10.0.0.1","score":1},{"host":"10.0.0.2","score":1},{"host":"10.0.0.3","score":1},{"host":"10.0.0.1","port":80,"score":2}]"#, "entry 3: duplicate server 10.0.0.1:80"),
            ("duplicate by default port", r#"[{"host":"10.0.0.1","port":80,"score":1},{"host":"10.0.0.1","score":1}]"#, "entry 1: duplicate server 10.0.0.1:80"),
            ("duplicate ignoring case", r#"[{"host":"api.example","score":1},{"host":"API.Example","score":1}]"#, "entry 1: duplicate server API.Example:80"),
            ("duplicate ignoring trailing dot", r#"[{"host":"api.example","score":1},{"host":"api.example.","score":1}]"#, "entry 1: duplicate server api.example.:80"),
            ("duplicate ipv6 spellings", r#"[{"host":"::1","port":8080,"score":1},{"host":"[0:0:0:0:0:0:0:1]","port":8080,"score":1}]"#, "entry 1: duplicate server [::1]:8080"),
            ("bad entry before duplicate", r#"[{"host":"a","score":1},{"host":"a","score":1},{"host":"b"}]"#, "entry 1: duplicate server a:80"),
        ];
        for (name, text, expected) in cases {
            match parse_snapshot(text, 80) {
                Ok(set) => panic!("{name}: accepted {set:?}"),
                Err(rejection) => assert_eq!(rejection.to_string(), *expected, "{name}"),
            }
        }
    }

    #[test]
    fn bad_entry_carries_index_field_and_value() {
        let rejection = parse_snapshot(
            r#"[{"host":"a","score":1},{"host":"b","port":70000,"score":1}]"#,
            80,
        );
        assert_eq!(
            rejection,
            Err(Rejection::BadEntry {
                index: 1,
                field: "port",
                value: "70000".to_owned(),
                reason: "must be an integer from 1 to 65535",
            })
        );
    }

    #[test]
    fn rejects_host_name_longer_than_253() {
        let label = "a".repeat(63);
        let ok = [label.as_str(); 4].join(".")[..253].to_owned();
        let ok_dot = format!("{ok}.");
        let too_long = format!("{ok}a");
        let long_label = format!("{}.example", "a".repeat(64));
        for (host, accepted) in [
            (&ok, true),
            (&ok_dot, true),
            (&too_long, false),
            (&long_label, false),
        ] {
            let text = format!(r#"[{{"host":"{host}","score":1}}]"#);
            assert_eq!(parse_snapshot(&text, 80).is_ok(), accepted, "{host}");
        }
    }

    /// Valid JSON, but beyond f64: a bad field, named with the number as sent, wherever it is.
    #[test]
    fn numbers_out_of_range_are_bad_fields_not_bad_json() {
        let cases = [
            (
                r#"[{"host":"127.0.0.1","score":1e400}]"#,
                "entry 0: field score: value 1e400: must be a finite number >= 0",
            ),
            (
                r#"{"servers":[{"host":"a.b","score":1},{"host":"c.d","score":-1E+999}]}"#,
                "entry 1: field score: value -1E+999: must be a finite number >= 0",
            ),
            (
                "[\n {\"host\": \"a.b\",\n  \"score\": 1.5e309 }\n]",
                "entry 0: field score: value 1.5e309: must be a finite number >= 0",
            ),
            (
                r#"[{"host":"a.b","port":1e999,"score":1}]"#,
                "entry 0: field port: value 1e999: must be an integer from 1 to 65535",
            ),
            (
                r#"[{"host":"a.b","score":1,"extra":[1e999,2e999]},{"host":"c.d","score":9e999}]"#,
                "entry 1: field score: value 9e999: must be a finite number >= 0",
            ),
        ];
        for (text, expected) in cases {
            let message = parse_snapshot(text, 80).expect_err(text).to_string();
            assert_eq!(message, expected, "{text}");
        }
        let digits = format!(r#"[{{"host":"a.b","score":{}}}]"#, "9".repeat(400));
        let message = parse_snapshot(&digits, 80)
            .expect_err("400 digits")
            .to_string();
        assert!(
            message.starts_with("entry 0: field score: value 999"),
            "{message}"
        );
        // An out-of-range number does not hide a syntax error behind it; the first error is
        // reported as serde_json worded it.
        let broken = r#"[{"host":"a.b","score":1e400} oops]"#;
        let message = parse_snapshot(broken, 80).expect_err("broken").to_string();
        assert!(
            message.starts_with("not valid json: number out of range at line 1 column"),
            "{message}"
        );
    }

    #[test]
    fn quoted_value_is_shortened() {
        let host = "x".repeat(500);
        let text = format!(r#"[{{"host":"{host}!","score":1}}]"#);
        let message = parse_snapshot(&text, 80).expect_err("bad host").to_string();
        assert!(
            message.len() < 200 && message.contains("xxx...: must be"),
            "{message}"
        );
    }

    #[test]
    fn accepts_exactly_max_servers() {
        let set = parse_snapshot(&servers(MAX_SERVERS), 80).expect("10,000 servers are allowed");
        assert_eq!(set.servers.len(), MAX_SERVERS);
    }

    #[test]
    fn rejects_one_server_over_max_before_validating_entries() {
        let mut text = servers(MAX_SERVERS);
        // One more entry, and a bad one: the count is what gets reported.
        text.insert_str(1, r#"{"host":""},"#);
        let rejection = parse_snapshot(&text, 80).expect_err("too many");
        assert_eq!(rejection, Rejection::TooManyServers(10_001));
        assert_eq!(
            rejection.to_string(),
            "too many servers: 10001 (limit 10000)"
        );
    }

    #[test]
    fn uses_the_given_default_port() {
        let set = parse_snapshot(r#"[{"host":"a","score":1}]"#, 9000).expect("valid");
        assert_eq!(set.servers[0].port, 9000);
    }

    #[test]
    fn label_brackets_ipv6_only() {
        assert_eq!(entry("10.0.0.1", 80, 1.0).label(), "10.0.0.1:80");
        assert_eq!(entry("::1", 8080, 1.0).label(), "[::1]:8080");
        assert_eq!(entry("a.example", 443, 1.0).label(), "a.example:443");
    }

    #[test]
    fn binary_frame_message() {
        assert_eq!(
            Rejection::BinaryFrame.to_string(),
            "binary frames are not accepted"
        );
    }

    #[test]
    fn fast_and_slow_paths_agree_on_valid_snapshots() {
        let cases = [
            r#"[{"host":"10.0.0.1","port":8080,"score":3.5},{"host":"Example.com.","score":1}]"#,
            r#"{"version":7,"servers":[{"host":"[::1]","port":1,"score":0,"zone":"a"}]}"#,
            r#"[{"host":"a.b","score":-0.0},{"host":"a.b","port":81,"score":1e300}]"#,
            r#"{"servers":[]}"#,
        ];
        for text in cases {
            let fast = parse_typed(text, 80).expect("valid snapshot takes the fast path");
            assert_eq!(Ok(fast), parse_tree(text, 80), "{text}");
        }
    }

    #[test]
    fn fast_path_leaves_every_doubtful_snapshot_to_the_slow_path() {
        let cases = [
            r#"[{"host":"10.0.0.1","port":null,"score":1}]"#,
            r#"[{"host":"10.0.0.1","port":80.0,"score":1}]"#,
            r#"[{"host":"10.0.0.1","port":0,"score":1}]"#,
            r#"[{"host":"10.0.0.1","score":"1"}]"#,
            r#"[{"host":"bad host","score":1}]"#,
            r#"[{"host":"a","score":1},{"host":"A.","score":2}]"#,
            r#"[7]"#,
        ];
        for text in cases {
            assert!(parse_typed(text, 80).is_none(), "{text}");
            assert!(parse_tree(text, 80).is_err(), "{text}");
        }
        // A repeated field is refused by the typed reader; the tree keeps the last value.
        let repeated = r#"[{"host":"a","score":1,"score":2}]"#;
        assert!(parse_typed(repeated, 80).is_none());
        assert_eq!(parse_snapshot(repeated, 80), parse_tree(repeated, 80));
    }
}
