//! Conditional requests answered from the cache (RFC 9110 §13): whether a stored response's
//! validators satisfy a GET's or HEAD's `If-None-Match` or `If-Modified-Since`, so that the
//! hit is a 304 Not Modified instead of the whole body again.

/// Whether a GET or HEAD for a stored response with these validators gets 304.
///
/// `If-None-Match`, when sent, decides alone (RFC 9110 §13.2.2): `*`, or any listed
/// entity-tag weakly equal to `etag` (§8.8.3.2: the `W/` prefix is ignored). A list that does
/// not parse matches nothing: the client gets the whole response, which is always correct.
/// Otherwise `If-Modified-Since` matches only a `Last-Modified` of the very same value, as
/// NGINX's default (`if_modified_since exact`): a client revalidating echoes the value it was
/// given, and no date arithmetic can then go wrong.
pub fn not_modified(
    if_none_match: Option<&[u8]>,
    if_modified_since: Option<&[u8]>,
    etag: Option<&[u8]>,
    last_modified: Option<&[u8]>,
) -> bool {
    if let Some(list) = if_none_match {
        let list = super::trim(list);
        if list == b"*" {
            return true;
        }
        let Some(stored) = etag.and_then(|v| only_tag(super::trim(v))) else {
            return false;
        };
        return entity_tags(list).is_some_and(|tags| tags.contains(&stored));
    }
    match (
        if_modified_since.map(super::trim),
        last_modified.map(super::trim),
    ) {
        (Some(since), Some(modified)) => !since.is_empty() && since == modified,
        _ => false,
    }
}

/// The opaque tags (quotes included) of a comma-separated list of entity-tags, or `None` if
/// any element is malformed. Commas may occur inside a tag, so the list is scanned, not split.
fn entity_tags(mut rest: &[u8]) -> Option<Vec<&[u8]>> {
    let mut tags = Vec::new();
    loop {
        while let [b' ' | b'\t' | b',', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            return Some(tags);
        }
        let (tag, tail) = entity_tag(rest)?;
        tags.push(tag);
        rest = tail;
        // Elements are separated by a comma (with optional whitespace), never juxtaposed.
        let next = rest.iter().position(|&b| b != b' ' && b != b'\t');
        if next.is_some_and(|i| rest[i] != b',') {
            return None;
        }
    }
}

/// A single entity-tag and nothing else: the value of an `ETag` field.
fn only_tag(value: &[u8]) -> Option<&[u8]> {
    match entity_tag(value)? {
        (tag, []) => Some(tag),
        _ => None,
    }
}

/// `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE` at the start of `s` (RFC 9110 §8.8.3): its
/// opaque tag with the quotes, and what follows it.
fn entity_tag(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = s.strip_prefix(b"W/").unwrap_or(s);
    let body = s.strip_prefix(b"\"")?;
    let close = body.iter().position(|&b| !is_etagc(b))?;
    (body[close] == b'"').then(|| s.split_at(close + 2))
}

/// `etagc = %x21 / %x23-7E / obs-text`
fn is_etagc(b: u8) -> bool {
    b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inm(list: &str, etag: Option<&str>) -> bool {
        not_modified(Some(list.as_bytes()), None, etag.map(str::as_bytes), None)
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison() {
        assert!(inm(r#""v1""#, Some(r#""v1""#)));
        assert!(inm(r#"W/"v1""#, Some(r#""v1""#)));
        assert!(inm(r#""v1""#, Some(r#"W/"v1""#)));
        assert!(inm(r#" "a", W/"v1" "#, Some(r#""v1""#)));
        assert!(inm(r#""a","v1""#, Some(r#" "v1" "#)));
        assert!(!inm(r#""v2""#, Some(r#""v1""#)));
        assert!(!inm(r#""V1""#, Some(r#""v1""#)), "tags are case-sensitive");
        assert!(!inm(r#""v1""#, None), "nothing to compare with");
    }

    #[test]
    fn a_comma_inside_a_tag_is_part_of_it() {
        assert!(inm(r#""a,b""#, Some(r#""a,b""#)));
        assert!(!inm(r#""a,b""#, Some(r#""a""#)));
        assert!(!inm(r#""a,b""#, Some(r#""b""#)));
    }

    #[test]
    fn a_star_matches_any_stored_response() {
        assert!(inm("*", Some(r#""v1""#)));
        assert!(inm(" * ", None));
    }

    #[test]
    fn malformed_lists_and_tags_match_nothing() {
        for list in [
            "v1",
            r#""v1"#,
            r#""v1" "v2""#,
            r#""v1"x"#,
            r#"w/"v1""#,
            r#"W/ "v1""#,
            "\"v\x01\"",
            "*, \"v1\"",
            "",
        ] {
            assert!(!inm(list, Some(r#""v1""#)), "{list:?}");
        }
        for etag in ["v1", r#""v1" "v2""#, r#""v1"#, ""] {
            assert!(!inm(r#""v1""#, Some(etag)), "etag {etag:?}");
        }
    }

    #[test]
    fn if_modified_since_matches_the_exact_last_modified_only() {
        let date = b"Tue, 15 Nov 1994 08:12:31 GMT".as_slice();
        let ims =
            |since: &[u8], modified: Option<&[u8]>| not_modified(None, Some(since), None, modified);
        assert!(ims(date, Some(date)));
        assert!(ims(b" Tue, 15 Nov 1994 08:12:31 GMT ", Some(date)));
        assert!(!ims(b"Tue, 15 Nov 1994 08:12:32 GMT", Some(date)));
        assert!(!ims(date, None));
        assert!(!ims(b"", Some(b"")));
    }

    #[test]
    fn if_none_match_decides_alone_when_sent() {
        let date = b"Tue, 15 Nov 1994 08:12:31 GMT".as_slice();
        let etag = br#""v1""#.as_slice();
        assert!(!not_modified(
            Some(br#""v2""#),
            Some(date),
            Some(etag),
            Some(date)
        ));
        assert!(not_modified(
            Some(br#""v1""#),
            Some(b"x"),
            Some(etag),
            Some(date)
        ));
    }
}
