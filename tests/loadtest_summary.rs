//! `scripts/loadtest.sh --summarize`: the summary the README's performance table is copied
//! from, computed from recorded per-run lines (nothing is started).

use std::path::PathBuf;
use std::process::Command;

/// One recorded run line, as `scripts/loadtest.sh` writes them (the fields the summary reads).
fn run_line(proxy: &str, scenario: &str, rep: u32, rps: u32, p99: f64, cpu: f64) -> String {
    format!(
        "proxy={proxy} scenario={scenario} rep={rep} rps={rps} p50_ms=0.5 p99_ms={p99} \
         cpu_us_per_req={cpu} sys_pct=80 rss_mib=6.0 noisy=0 valid=1\n"
    )
}

/// The summary of `lines`; `name` keeps concurrent tests' files apart.
fn summarize(name: &str, lines: &str) -> String {
    let dir = std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let file = dir.join("runs.txt");
    std::fs::write(&file, format!("# loadtest header line\n{lines}")).expect("the run lines");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/loadtest.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--summarize")
        .arg(&file)
        .output()
        .expect("bash runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "--summarize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The ratios row of one scenario: its cells after the scenario name.
fn ratios(summary: &str, scenario: &str) -> Vec<String> {
    let row = summary
        .lines()
        .rfind(|l| l.starts_with(&format!("| {scenario} |")))
        .unwrap_or_else(|| panic!("no row for {scenario} in:\n{summary}"));
    row.split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .skip(1)
        .map(String::from)
        .collect()
}

/// "vs best peer" divides by the lower of the two peers' CPU per request in each rep. It once
/// compared them as text, so a peer at 13.06 µs beat one at 9.03 µs.
#[test]
fn the_best_peer_is_the_one_with_the_least_cpu_even_across_digit_counts() {
    let mut lines = String::new();
    for rep in 1..=3 {
        lines += &run_line("balancer", "css", rep, 130_000, 2.0, 6.0);
        lines += &run_line("haproxy", "css", rep, 100_000, 2.0, 9.0);
        lines += &run_line("nginx", "css", rep, 70_000, 4.0, 12.0);
    }
    let summary = summarize("best-peer", &lines);
    let row = ratios(&summary, "css");
    // best, then per peer: CPU, req/s, p99.
    assert_eq!(
        row,
        ["0.67x", "0.67x", "1.30x", "1.00x", "0.50x", "1.86x", "0.50x"],
        "{summary}"
    );
}

/// Ratios are paired per rep and then the median is taken; an invalid run drops its rep from
/// the pairs with that peer only.
#[test]
fn ratios_are_medians_of_per_rep_pairs_and_skip_invalid_runs() {
    let mut lines = String::new();
    for (rep, bal, peer) in [(1, 10.0, 20.0), (2, 10.0, 10.0), (3, 30.0, 20.0)] {
        lines += &run_line("balancer", "small", rep, 50_000, 1.0, bal);
        lines += &run_line("haproxy", "small", rep, 50_000, 1.0, peer);
    }
    lines += &run_line("balancer", "small", 4, 50_000, 1.0, 1.0).replace("valid=1", "valid=0");
    lines += &run_line("haproxy", "small", 4, 50_000, 1.0, 100.0);
    let summary = summarize("medians", &lines);
    // Pairs 0.5, 1.0, 1.5 (rep 4's balancer run is invalid): median 1.0.
    assert_eq!(
        ratios(&summary, "small")[..2],
        ["1.00x", "1.00x"],
        "{summary}"
    );
}
