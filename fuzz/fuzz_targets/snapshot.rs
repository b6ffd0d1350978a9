//! Agent snapshots: `parse_snapshot` never panics on any UTF-8 text, an accepted set keeps its
//! invariants and survives a round trip through JSON, and a rejection stays one short line.
#![no_main]

use balancer::queue::{parse_snapshot, MAX_SERVERS};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let set = match parse_snapshot(text, 8080) {
        Ok(set) => set,
        Err(rejection) => {
            let line = rejection.to_string();
            assert!(!line.contains('\n'), "{line:?}");
            // The quoted value is capped; serde_json's own message is short.
            assert!(line.chars().count() < 400, "{line:?}");
            return;
        }
    };
    assert!(set.servers.len() <= MAX_SERVERS);
    let mut seen = std::collections::HashSet::new();
    for s in &set.servers {
        assert!(
            s.port != 0 && s.score.is_finite() && s.score >= 0.0,
            "{s:?}"
        );
        assert!(!s.host.is_empty(), "{s:?}");
        let host = s.host.trim_end_matches('.').to_ascii_lowercase();
        assert!(seen.insert((host, s.port)), "duplicate {s:?}");
    }
    let again: Vec<_> = set
        .servers
        .iter()
        .map(|s| json!({"host": s.host, "port": s.port, "score": s.score}))
        .collect();
    let text = json!({ "servers": again }).to_string();
    let again = parse_snapshot(&text, 1).expect("a parsed set is a valid snapshot");
    assert_eq!(again.servers.len(), set.servers.len());
    for (a, b) in set.servers.iter().zip(&again.servers) {
        assert_eq!((&a.host, a.port), (&b.host, b.port));
        // serde_json parses floats to within one unit in the last place (subnormals too).
        let tolerance = a.score.max(f64::MIN_POSITIVE) * 4.0 * f64::EPSILON;
        assert!((a.score - b.score).abs() <= tolerance, "{a:?} {b:?}");
    }
});
