//! Linux CPU lists (`0-3,6`): parsing, formatting, and the CPUs this process may run on.

/// Largest CPU number accepted; Linux caps `NR_CPUS` at 8192, and a bound keeps a typo such as
/// `0-99999999` from allocating a huge list.
const MAX_CPU: usize = 8191;

/// A CPU list every member of which is in `allowed`.
pub fn cpus_within(v: &str, allowed: &[usize]) -> Result<Vec<usize>, String> {
    let cpus = parse_cpu_list(v)?;
    match cpus.iter().find(|cpu| !allowed.contains(cpu)) {
        Some(cpu) => Err(format!(
            "cpu {cpu} is not available to this process (allowed: {})",
            format_cpu_list(allowed)
        )),
        None => Ok(cpus),
    }
}

/// Parses a Linux CPU list such as `0-3,6` into sorted, distinct CPU numbers. Spaces around
/// items are allowed.
///
/// # Errors
/// The reason, for an empty list or item, a reversed range, a non-number or a CPU above 8191.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    if s.trim().is_empty() {
        return Err("empty cpu list".to_owned());
    }
    let mut cpus = Vec::new();
    for item in s.split(',').map(str::trim) {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (cpu_number(a.trim(), item)?, cpu_number(b.trim(), item)?),
            None => {
                let cpu = cpu_number(item, item)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(format!("range \"{item}\" runs backwards"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// One CPU number of plain digits, at most [`MAX_CPU`]; `item` is quoted in the reason.
fn cpu_number(s: &str, item: &str) -> Result<usize, String> {
    if item.is_empty() {
        return Err("empty item in cpu list".to_owned());
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "\"{item}\" is not a cpu number or range such as 0-3"
        ));
    }
    match s.parse::<usize>() {
        Ok(cpu) if cpu <= MAX_CPU => Ok(cpu),
        _ => Err(format!("cpu {s} is out of range (at most {MAX_CPU})")),
    }
}

/// Formats CPU numbers as a Linux CPU list, collapsing runs: `[0,1,2,3,6]` gives `0-3,6`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// The CPUs this process may run on, from `Cpus_allowed_list` in `/proc/self/status` (it
/// reflects both `taskset` and cgroup cpusets).
///
/// # Errors
/// When the file cannot be read or has no parsable `Cpus_allowed_list` line.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    use std::io::{Error, ErrorKind};
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "no Cpus_allowed_list"))?;
    parse_cpu_list(list).map_err(|reason| {
        Error::new(
            ErrorKind::InvalidData,
            format!("Cpus_allowed_list: {reason}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        let cases: &[(&str, &[usize])] = &[
            ("0", &[0]),
            ("0-3,6", &[0, 1, 2, 3, 6]),
            ("6,0-1", &[0, 1, 6]),
            ("0-2,1-3", &[0, 1, 2, 3]),
            (" 0 - 1 , 4 ", &[0, 1, 4]),
            ("5-5", &[5]),
            ("0-1\n", &[0, 1]),
        ];
        for (text, want) in cases {
            assert_eq!(parse_cpu_list(text).as_deref(), Ok(*want), "{text:?}");
        }
    }

    #[test]
    fn cpu_lists_reject_malformed_input() {
        let cases: &[(&str, &str)] = &[
            ("", "empty cpu list"),
            ("   ", "empty cpu list"),
            ("3-1", "runs backwards"),
            ("0,", "empty item"),
            (",0", "empty item"),
            ("0,,1", "empty item"),
            ("a", "not a cpu number"),
            ("0-", "not a cpu number"),
            ("-1", "not a cpu number"),
            ("1-2-3", "not a cpu number"),
            ("0x1", "not a cpu number"),
            ("0-99999999999", "out of range"),
            ("8192", "out of range"),
        ];
        for (text, reason) in cases {
            let err = parse_cpu_list(text).expect_err(text);
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn cpu_lists_format_with_runs_collapsed() {
        let cases: &[(&[usize], &str)] = &[
            (&[], ""),
            (&[0], "0"),
            (&[0, 1, 2, 3, 6], "0-3,6"),
            (&[6, 0, 1, 1], "0-1,6"),
            (&[1, 3, 5], "1,3,5"),
        ];
        for (cpus, want) in cases {
            assert_eq!(format_cpu_list(cpus), *want, "{cpus:?}");
        }
    }

    #[test]
    fn cpu_list_formatting_round_trips() {
        for text in ["0", "0-3,6", "1,3,5-9,12"] {
            let cpus = parse_cpu_list(text).expect("valid");
            assert_eq!(format_cpu_list(&cpus), text);
        }
    }

    #[test]
    fn allowed_cpus_reads_this_process_affinity() {
        let cpus = allowed_cpus().expect("/proc/self/status is readable on linux");
        assert!(!cpus.is_empty());
    }
}
