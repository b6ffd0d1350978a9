//! Black-box configuration: `--help`, `--version`, exit statuses and messages for missing and
//! invalid variables, a port in use, and the `listening on` / `admin on` lines (SPEC §3).

mod common;

use std::net::TcpListener;

use common::*;

/// Every variable of SPEC §3.
const VARIABLES: &[&str] = &[
    "HOST_PORT_HTTP_BALANCER",
    "BALANCER_BIND",
    "HOST_PORT_WS_DEPLOYMENT_AGENT",
    "DEPLOYMENT_AGENT_HOST",
    "DEPLOYMENT_AGENT_PATH",
    "TARGET_PORT",
    "BACKENDS",
    "CACHE_CAPACITY",
    "CACHE_TTL",
    "CACHE_MAX_OBJECT_BYTES",
    "REQUEST_TIMEOUT",
    "CLIENT_HEADER_TIMEOUT",
    "CLIENT_IDLE_TIMEOUT",
    "AGENT_BACKOFF_MAX",
    "BALANCER_CPUS",
    "ADMIN_PORT",
    "RUST_LOG",
];

/// A configuration that would start: free ports, one CPU, an empty static server set.
/// `overrides` replace or add variables.
fn env_with<'a>(overrides: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&str, &str)> = vec![
        ("HOST_PORT_HTTP_BALANCER", "0"),
        ("BALANCER_BIND", "127.0.0.1"),
        ("ADMIN_PORT", "0"),
        ("BALANCER_CPUS", "0"),
        ("BACKENDS", "[]"),
        ("RUST_LOG", "info"),
    ];
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k, v));
    }
    env
}

fn non_empty_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Splits on everything but ASCII letters and digits, so `entry 2` and `[2]` both give `2`.
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn help_lists_every_variable_and_exits_zero() {
    let (code, out, err) = run_to_exit::<&str>(&[], &["--help"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    for var in VARIABLES {
        assert!(out.contains(var), "--help does not mention {var}:\n{out}");
    }
}

#[test]
fn version_prints_the_crate_version_and_exits_zero() {
    let (code, out, err) = run_to_exit::<&str>(&[], &["--version"]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {out:?}"
    );
}

#[test]
fn no_agent_and_no_backends_exits_2_naming_both_variables() {
    let mut env = env_with(&[]);
    env.retain(|(k, _)| *k != "BACKENDS");
    let (code, _, err) = run_to_exit(&env, &[]);
    assert_eq!(code, Some(2), "stderr: {err}");
    let lines = non_empty_lines(&err);
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    assert!(
        lines[0].contains("HOST_PORT_WS_DEPLOYMENT_AGENT") && lines[0].contains("BACKENDS"),
        "the line names both variables: {err:?}"
    );
}

#[test]
fn each_invalid_value_exits_2_naming_the_variable_and_the_value() {
    let cases: &[(&str, &str)] = &[
        ("HOST_PORT_HTTP_BALANCER", "70000"),
        ("HOST_PORT_HTTP_BALANCER", "http"),
        ("BALANCER_BIND", "not-an-ip"),
        ("BALANCER_BIND", "300.1.2.3"),
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", "99999"),
        ("TARGET_PORT", "0"),
        ("BACKENDS", "not json"),
        ("CACHE_CAPACITY", "-1"),
        ("CACHE_TTL", "abc"),
        ("CACHE_MAX_OBJECT_BYTES", "lots"),
        ("REQUEST_TIMEOUT", "0"),
        ("CLIENT_HEADER_TIMEOUT", "-5"),
        ("CLIENT_IDLE_TIMEOUT", "soon"),
        ("AGENT_BACKOFF_MAX", "forever"),
        ("BALANCER_CPUS", "999"),
        ("BALANCER_CPUS", "3-1"),
        ("ADMIN_PORT", "x"),
        ("ADMIN_PORT", "65536"),
    ];
    let mut failures = Vec::new();
    for &(var, value) in cases {
        let (code, _, err) = run_to_exit(&env_with(&[(var, value)]), &[]);
        let named = err.lines().any(|l| l.contains(var) && l.contains(value));
        if code != Some(2) || !named {
            failures.push(format!("{var}={value:?}: exit {code:?}, stderr {err:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "bad handling of invalid values:\n{}",
        failures.join("\n")
    );
}

/// Starts the balancer with `backends`; asserts exit status 2 and one stderr line naming
/// BACKENDS, the entry's 0-based `index`, the `field` and the bad `value`.
fn assert_bad_backends_entry(backends: &str, index: &str, field: &str, value: &str) {
    let (code, _, err) = run_to_exit(&env_with(&[("BACKENDS", backends)]), &[]);
    assert_eq!(code, Some(2), "stderr: {err}");
    let lines = non_empty_lines(&err);
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    let line = lines[0];
    assert!(line.contains("BACKENDS"), "names the variable: {line}");
    assert!(line.contains(field), "names the field {field}: {line}");
    assert!(line.contains(value), "quotes the value {value}: {line}");
    assert!(
        words(line).contains(&index),
        "gives the 0-based index {index}: {line}"
    );
}

#[test]
fn a_bad_backends_entry_is_reported_with_its_index_field_and_value() {
    let backends = r#"[{"host":"127.0.0.1","port":8001,"score":1},
                       {"host":"127.0.0.1","port":8002,"score":1},
                       {"host":"127.0.0.1","port":8003,"score":"heavy"}]"#;
    assert_bad_backends_entry(backends, "2", "score", "heavy");
}

#[test]
fn a_negative_backends_score_is_reported_with_its_index_field_and_value() {
    let backends = r#"[{"host":"127.0.0.1","port":8001,"score":-3}]"#;
    assert_bad_backends_entry(backends, "0", "score", "-3");
}

/// JSON has no infinity; a score too large for a double is how one is written, and it is a bad
/// entry like any other, not unreadable JSON.
#[test]
fn an_infinite_backends_score_is_reported_with_its_index_field_and_value() {
    let backends = r#"[{"host":"127.0.0.1","port":8001,"score":1},{"host":"127.0.0.1","port":8002,"score":1e999}]"#;
    assert_bad_backends_entry(backends, "1", "score", "1e999");
}

/// Starts the balancer with `var` set to a port another socket holds; asserts exit status 1
/// and a line saying the port is in use, and returns stderr.
fn run_with_port_taken(var: &str) -> String {
    // A plain listener without SO_REUSEPORT, so the balancer cannot share the port.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let port = holder.local_addr().unwrap().port().to_string();
    let (code, _, err) = run_to_exit(&env_with(&[(var, &port)]), &[]);
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(
        err.lines()
            .any(|l| l.to_ascii_lowercase().contains("in use") && l.contains(&port)),
        "a line says port {port} is in use: {err}"
    );
    drop(holder);
    err
}

#[test]
fn an_http_port_in_use_exits_1_saying_so() {
    let err = run_with_port_taken("HOST_PORT_HTTP_BALANCER");
    assert!(
        err.contains("HOST_PORT_HTTP_BALANCER"),
        "names the variable: {err}"
    );
}

#[test]
fn an_unresolvable_backends_host_prints_only_the_error_line() {
    // Resolving the hosts is part of validating BACKENDS, so it must come before anything
    // else is logged (the startup summary included), as for every other invalid value.
    let backends = r#"[{"host":"nosuchhost.invalid","port":80,"score":1}]"#;
    let (code, _, err) = run_to_exit(&env_with(&[("BACKENDS", backends)]), &[]);
    assert_eq!(code, Some(2), "stderr: {err}");
    let lines = non_empty_lines(&err);
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    assert!(
        lines[0].contains("BACKENDS") && lines[0].contains("nosuchhost.invalid"),
        "names the variable and the value: {}",
        lines[0]
    );
}

#[test]
fn an_admin_port_in_use_exits_1_without_ever_listening() {
    let err = run_with_port_taken("ADMIN_PORT");
    // The message is about the admin port: it says so, and names its variable, not the HTTP
    // port's.
    assert!(
        err.contains("admin") && err.contains("ADMIN_PORT"),
        "says which listener: {err}"
    );
    assert!(!err.contains("HOST_PORT_HTTP_BALANCER"), "stderr: {err}");
    // `listening on` means every shard accepts (SPEC §3): a process that then fails to start
    // must not have said it.
    assert!(!err.contains("listening on"), "stderr: {err}");
}

#[test]
fn admin_port_off_starts_without_an_admin_listener_and_still_serves() {
    let a = Backend::named("a");
    let lb = Balancer::start(&[
        ("ADMIN_PORT", "off"),
        ("BACKENDS", &server_set(&[(a.addr, 1.0)])),
    ]);
    assert!(lb.admin.is_none());
    let resp = get(lb.addr, "/");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "a");
    assert!(
        !lb.log_text().contains("admin on"),
        "no admin line when ADMIN_PORT=off:\n{}",
        lb.log_text()
    );
}

#[test]
fn the_listening_line_shows_the_real_port_when_zero_is_asked() {
    let a = Backend::named("a");
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(a.addr, 1.0)]))]);
    assert_ne!(lb.addr.port(), 0, "port 0 is resolved in the log line");
    assert_eq!(get(lb.addr, "/").status, 200, "the logged address serves");
    let admin = lb.admin.expect("admin line");
    assert_ne!(admin.port(), 0);
    assert_eq!(
        lb.admin_get("/healthz").0,
        200,
        "the logged admin address serves"
    );
}

#[test]
fn the_listening_line_shows_a_configured_port() {
    let a = Backend::named("a");
    // Held (with SO_REUSEPORT, which the balancer's listener sets too) until the balancer has
    // bound it, so that nobody else takes the port in between.
    let hold = HeldPort::shared(0);
    let port = hold.port();
    let port_text = port.to_string();
    let lb = Balancer::start(&[
        ("HOST_PORT_HTTP_BALANCER", &port_text),
        ("BALANCER_REUSE_PORT", "on"),
        ("BACKENDS", &server_set(&[(a.addr, 1.0)])),
    ]);
    assert_eq!(lb.addr.port(), port);
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn a_second_balancer_on_a_port_in_use_exits_1_unless_told_to_share_it() {
    let a = Backend::named("a");
    let backends = server_set(&[(a.addr, 1.0)]);
    let first = Balancer::start(&[("BACKENDS", &backends)]);
    let http = first.addr.port().to_string();
    let admin = first.admin.expect("admin on").port().to_string();
    // Its listeners set SO_REUSEPORT, which a second process setting it too would share:
    // refused, so a balancer started twice by mistake never takes a share of the traffic.
    for (var, port) in [("HOST_PORT_HTTP_BALANCER", &http), ("ADMIN_PORT", &admin)] {
        let (code, _, err) = run_to_exit(&env_with(&[(var, port), ("BACKENDS", &backends)]), &[]);
        assert_eq!(code, Some(1), "{var}: {err}");
        assert!(
            err.lines()
                .any(|l| l.contains("in use") && l.contains(port.as_str())),
            "{var}: {err}"
        );
    }
    let second = Balancer::start(&[
        ("HOST_PORT_HTTP_BALANCER", &http),
        ("ADMIN_PORT", &admin),
        ("BALANCER_REUSE_PORT", "on"),
        ("BACKENDS", &backends),
    ]);
    assert_eq!(second.addr, first.addr);
}

/// Runs with `overrides`; asserts exit status 2 and one stderr line, the one saying
/// `var`'s `value` is invalid.
fn assert_invalid(overrides: &[(&str, &str)], var: &str, value: &str) {
    let (code, _, err) = run_to_exit(&env_with(overrides), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(non_empty_lines(&err).len(), 1, "{err}");
    assert!(
        err.starts_with(&format!("balancer: invalid {var}=\"{value}\"")),
        "{err}"
    );
}

#[test]
fn the_admin_port_equal_to_the_http_port_exits_2_naming_it() {
    let same_port = [
        ("HOST_PORT_HTTP_BALANCER", "19077"),
        ("ADMIN_PORT", "19077"),
    ];
    assert_invalid(&same_port, "ADMIN_PORT", "19077");
}

#[test]
fn an_invalid_rust_log_exits_2_naming_it() {
    assert_invalid(&[("RUST_LOG", "garbage====")], "RUST_LOG", "garbage====");
}

#[test]
fn a_value_that_is_not_utf8_exits_2_naming_the_variable() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    // Read lossily, `info\xff` would parse as a module name and silence every log line.
    let mut env: Vec<(&str, &OsStr)> = env_with(&[])
        .into_iter()
        .filter(|(name, _)| *name != "RUST_LOG")
        .map(|(name, value)| (name, OsStr::new(value)))
        .collect();
    env.push(("RUST_LOG", OsStr::from_bytes(b"info\xff")));
    let (code, _, err) = run_to_exit(&env, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(non_empty_lines(&err).len(), 1, "{err}");
    assert!(err.starts_with("balancer: invalid RUST_LOG="), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
}

#[test]
fn an_address_this_host_does_not_have_exits_1_saying_what_to_do() {
    // TEST-NET-3 (RFC 5737): never assigned to a host.
    let (code, _, err) = run_to_exit(&env_with(&[("BALANCER_BIND", "203.0.113.7")]), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("set BALANCER_BIND to one of its addresses"),
        "{err}"
    );
}

/// Runs the binary with the default test environment and `prepare` applied in the child just
/// before exec; returns (exit code, stderr). Killed after WAIT if it does not exit.
fn run_to_exit_after(prepare: fn() -> std::io::Result<()>) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_balancer"));
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env_with(&[]) {
        cmd.env(k, v);
    }
    // SAFETY: `prepare` makes system calls on stack data only: nothing between fork and exec
    // allocates or takes a lock.
    unsafe { cmd.pre_exec(prepare) };
    let mut child = cmd.spawn().expect("binary starts");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A seccomp filter that fails io_uring_setup(2) with EPERM, as Docker's default profile and
/// `sysctl kernel.io_uring_disabled=2` do (the sysctl would hit every test running at once).
fn deny_io_uring() -> std::io::Result<()> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        // seccomp_data.nr: the system call number, at offset 0.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl(2) with the documented arguments; `program` and `filter` outlive the call.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn io_uring_refused_by_the_kernel_is_exit_status_1_and_a_sentence_saying_what_to_do() {
    let (code, err) = run_to_exit_after(deny_io_uring);
    assert_eq!(code, Some(1), "stderr: {err}");
    let lines = non_empty_lines(&err);
    let line = lines
        .iter()
        .find(|l| l.contains("io_uring"))
        .unwrap_or_else(|| panic!("a line about io_uring: {err:?}"));
    assert!(line.contains("unavailable"), "says which: {line}");
    assert!(
        line.contains("kernel.io_uring_disabled") && line.contains("seccomp"),
        "says what to do: {line}"
    );
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert!(!err.contains("listening on"), "never listened: {err}");
}

/// glommio cannot start an executor under 512 KiB of lockable memory.
fn low_memlock() -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: 64 * 1024,
        rlim_max: 64 * 1024,
    };
    // SAFETY: setrlimit(2) reads `limit`, which outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn a_memlock_limit_too_low_is_exit_status_1_and_a_sentence_saying_what_to_do() {
    let (code, err) = run_to_exit_after(low_memlock);
    assert_eq!(code, Some(1), "stderr: {err}");
    let line = non_empty_lines(&err)
        .into_iter()
        .find(|l| l.contains("memlock"))
        .unwrap_or_else(|| panic!("a line about memlock: {err:?}"));
    assert!(line.contains("65536"), "gives the limit: {line}");
    assert!(line.contains("ulimit -l"), "says what to do: {line}");
    assert!(!err.contains("panicked"), "no panic: {err}");
}
