//! Configuration from environment variables: one table drives parsing, defaults and `--help`.
//!
//! Every variable is a row of `VARIABLES`: its name, what it means, and what happens when it
//! is unset. Parsing walks the table in order; each row's parser returns only the reason a
//! value is bad, and the loop turns that into a [`ConfigError`] naming the variable and the
//! value (the shape of ripgrep's `flags/`). Defaults that are values (`8080`) go through the
//! same parser as user input, so `--help` can never advertise a default the parser would not
//! produce. Reading goes through a lookup function so tests pass a map instead of the process
//! environment (linkerd's seam).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

mod cpus;
mod values;

pub use cpus::{allowed_cpus, format_cpu_list, parse_cpu_list};

use crate::queue::{parse_snapshot, ServerSet};
use cpus::cpus_within;
use values::{admin_port, count, host, ip, log_filter, on_off, port, request_path, seconds};
use WhenUnset::{Describe, Parse};

/// Longest excerpt of a bad value quoted in an error message; BACKENDS can be huge.
const MAX_QUOTED_CHARS: usize = 200;

/// Shortest silence tolerated from a backend in the middle of a response body: as long as
/// NGINX's `proxy_read_timeout` default, so streams with pauses (long polls, reports built as
/// they are sent) get through with a short `REQUEST_TIMEOUT`.
const BODY_IDLE_TIMEOUT_FLOOR: Duration = Duration::from_secs(60);

/// Where the deployment agent's WebSocket is.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEndpoint {
    /// IP address (IPv6 without brackets) or host name.
    pub host: String,
    /// 1-65535.
    pub port: u16,
    /// Request path; always starts with `/`.
    pub path: String,
}

impl AgentEndpoint {
    /// The WebSocket URL, e.g. `ws://127.0.0.1:7000/` or `ws://[::1]:7000/agent`.
    pub fn url(&self) -> String {
        let slash = if self.path.starts_with('/') { "" } else { "/" };
        if self.host.parse::<Ipv6Addr>().is_ok() {
            format!("ws://[{}]:{}{slash}{}", self.host, self.port, self.path)
        } else {
            format!("ws://{}:{}{slash}{}", self.host, self.port, self.path)
        }
    }
}

/// The validated configuration of one balancer process.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST_PORT_HTTP_BALANCER`; 0 picks a free port.
    pub http_port: u16,
    /// `BALANCER_BIND`.
    pub bind: IpAddr,
    /// The deployment agent, when `HOST_PORT_WS_DEPLOYMENT_AGENT` is set.
    pub agent: Option<AgentEndpoint>,
    /// `TARGET_PORT`: port of server entries that give none.
    pub target_port: u16,
    /// `BACKENDS`: the static server set used until the agent sends one.
    pub backends: Option<ServerSet>,
    /// `CACHE_CAPACITY`: entries for the whole process; 0 disables the cache.
    pub cache_capacity: usize,
    /// `CACHE_TTL`: lifetime of entries whose response gives no max-age.
    pub cache_ttl: Duration,
    /// `CACHE_MAX_OBJECT_BYTES`: largest body that is cached.
    pub cache_max_object_bytes: usize,
    /// `REQUEST_TIMEOUT`: wait for a backend's response head.
    pub request_timeout: Duration,
    /// `CLIENT_HEADER_TIMEOUT`: time for a client to complete a request head.
    pub client_header_timeout: Duration,
    /// `CLIENT_IDLE_TIMEOUT`: how long an idle client connection is kept.
    pub client_idle_timeout: Duration,
    /// `AGENT_BACKOFF_MAX`: cap of the agent reconnect delay.
    pub agent_backoff_max: Duration,
    /// `BALANCER_CPUS`: one shard per listed CPU; sorted, no duplicates.
    pub cpus: Vec<usize>,
    /// `ADMIN_PORT`; `None` when set to `off`.
    pub admin_port: Option<u16>,
    /// `RUST_LOG`, checked with env_logger's own parser.
    pub log_filter: String,
    /// `BALANCER_REUSE_PORT`: bind the ports even while another process listens on them.
    pub reuse_port: bool,
    /// `BALANCER_DEFER_ACCEPT`: `TCP_DEFER_ACCEPT` on the HTTP listeners.
    pub defer_accept: bool,
}

/// A configuration value the balancer cannot start with.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    /// A variable holds a bad value; `reason` says what was expected.
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// Neither an agent nor a static server set: nothing to route to, ever.
    NoBackendSource,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid { var, value, reason } => {
                write!(f, "invalid {var}=\"{}\": {reason}", quote(value))
            }
            ConfigError::NoBackendSource => f.write_str(
                "no backends configured: set HOST_PORT_WS_DEPLOYMENT_AGENT (deployment agent) \
                 or BACKENDS (static server set)",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Shortens a value to [`MAX_QUOTED_CHARS`] and escapes control characters, so the message
/// stays one line even for a multi-line BACKENDS document.
fn quote(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars().take(MAX_QUOTED_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if value.chars().nth(MAX_QUOTED_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// What happens when a variable is unset (or empty).
#[derive(Debug, Clone, Copy)]
enum WhenUnset {
    /// This text is parsed exactly like a user's value.
    Parse(&'static str),
    /// No value is parsed; the text tells `--help` readers what happens instead.
    Describe(&'static str),
}

/// Stores one parsed value into the draft, or says why the value is bad.
type Apply = fn(&mut Draft<'_>, &str) -> Result<(), String>;

/// One configuration variable: a row of the SPEC §3 table plus its parser.
struct Variable {
    name: &'static str,
    meaning: &'static str,
    unset: WhenUnset,
    apply: Apply,
}

/// Configuration under construction. Fields start neutral; every `WhenUnset::Parse` row
/// overwrites its field on every run, so the neutral values are never observed.
struct Draft<'a> {
    config: Config,
    agent_port: Option<u16>,
    agent_host: String,
    agent_path: String,
    allowed_cpus: &'a [usize],
}

/// Every variable, in the order of SPEC §3; also the order errors are reported in.
/// `BACKENDS` follows `TARGET_PORT` because it parses with that port as the default.
static VARIABLES: &[Variable] = &[
    Variable {
        name: "HOST_PORT_HTTP_BALANCER",
        meaning: "TCP port of the HTTP listener; 0 picks a free port",
        unset: Parse("8080"),
        apply: |d, v| set(&mut d.config.http_port, port(v, 0)),
    },
    Variable {
        name: "BALANCER_BIND",
        meaning: "IP address of the HTTP listener",
        unset: Parse("0.0.0.0"),
        apply: |d, v| set(&mut d.config.bind, ip(v)),
    },
    Variable {
        name: "HOST_PORT_WS_DEPLOYMENT_AGENT",
        meaning: "port of the deployment agent's WebSocket; unset = no agent",
        unset: Describe("unset"),
        apply: |d, v| set(&mut d.agent_port, port(v, 1).map(Some)),
    },
    Variable {
        name: "DEPLOYMENT_AGENT_HOST",
        meaning: "host of the deployment agent",
        unset: Parse("127.0.0.1"),
        apply: |d, v| set(&mut d.agent_host, host(v)),
    },
    Variable {
        name: "DEPLOYMENT_AGENT_PATH",
        meaning: "request path of the WebSocket",
        unset: Parse("/"),
        apply: |d, v| set(&mut d.agent_path, request_path(v)),
    },
    Variable {
        name: "TARGET_PORT",
        meaning: "backend port used when a server entry has no port",
        unset: Parse("80"),
        apply: |d, v| set(&mut d.config.target_port, port(v, 1)),
    },
    Variable {
        name: "BACKENDS",
        meaning: "a server set in the agent's JSON format, used until the agent sends one \
                  (and alone when there is no agent)",
        unset: Describe("unset"),
        apply: |d, v| {
            let set_or_reason = parse_snapshot(v, d.config.target_port);
            set(
                &mut d.config.backends,
                set_or_reason.map(Some).map_err(|r| r.to_string()),
            )
        },
    },
    Variable {
        name: "CACHE_CAPACITY",
        meaning: "most cached entries, whole process (split evenly over shards); \
                  0 disables the cache",
        unset: Parse("1024"),
        apply: |d, v| set(&mut d.config.cache_capacity, count(v, "entries")),
    },
    Variable {
        name: "CACHE_TTL",
        meaning: "seconds a static resource stays cached when the backend gives no max-age",
        unset: Parse("60"),
        apply: |d, v| set(&mut d.config.cache_ttl, seconds(v, true)),
    },
    Variable {
        name: "CACHE_MAX_OBJECT_BYTES",
        meaning: "largest body that is cached",
        unset: Parse("1048576"),
        apply: |d, v| set(&mut d.config.cache_max_object_bytes, count(v, "bytes")),
    },
    Variable {
        name: "REQUEST_TIMEOUT",
        meaning: "seconds to wait for a backend's response head",
        unset: Parse("30"),
        apply: |d, v| set(&mut d.config.request_timeout, seconds(v, false)),
    },
    Variable {
        name: "CLIENT_HEADER_TIMEOUT",
        meaning: "seconds a client has to complete a request head, from its first byte",
        unset: Parse("10"),
        apply: |d, v| set(&mut d.config.client_header_timeout, seconds(v, false)),
    },
    Variable {
        name: "CLIENT_IDLE_TIMEOUT",
        meaning: "seconds an idle client connection is kept between requests",
        unset: Parse("60"),
        apply: |d, v| set(&mut d.config.client_idle_timeout, seconds(v, false)),
    },
    Variable {
        name: "AGENT_BACKOFF_MAX",
        meaning: "cap of the agent reconnect delay, in seconds (fractions allowed)",
        unset: Parse("30"),
        apply: |d, v| set(&mut d.config.agent_backoff_max, seconds(v, false)),
    },
    Variable {
        name: "BALANCER_CPUS",
        meaning: "CPUs to run shards on, e.g. 0-3,6",
        unset: Describe("every CPU the process may use"),
        apply: |d, v| set(&mut d.config.cpus, cpus_within(v, d.allowed_cpus)),
    },
    Variable {
        name: "ADMIN_PORT",
        meaning: "port of the admin listener (metrics, status), always bound to 127.0.0.1; \
                  0 picks a free port, off disables it",
        unset: Parse("9901"),
        apply: |d, v| set(&mut d.config.admin_port, admin_port(v)),
    },
    Variable {
        name: "RUST_LOG",
        meaning: "log filter (env_logger)",
        unset: Parse("info"),
        apply: |d, v| set(&mut d.config.log_filter, log_filter(v)),
    },
    Variable {
        name: "BALANCER_REUSE_PORT",
        meaning: "on: listen even while another process listens on the same ports, as a new \
                  process beside a draining one in a seamless restart; off: exit 1 when a port \
                  is in use",
        unset: Parse("off"),
        apply: |d, v| set(&mut d.config.reuse_port, on_off(v)),
    },
    Variable {
        name: "BALANCER_DEFER_ACCEPT",
        meaning: "on: the kernel hands a new connection over once its first bytes arrive \
                  (TCP_DEFER_ACCEPT, as NGINX's `deferred`), which saves a wake-up and a poll \
                  per connection; one that sends nothing is handed over after about 1 s, and \
                  one still silent at shutdown is dropped without a FIN; off: as soon as it is \
                  established",
        unset: Parse("off"),
        apply: |d, v| set(&mut d.config.defer_accept, on_off(v)),
    },
];

impl Config {
    /// Reads every variable through `lookup` (tests pass a map). `allowed_cpus` is the set of
    /// CPUs the process may run on: the default for `BALANCER_CPUS` and the bound for its
    /// values. Values are trimmed; an empty value counts as unset.
    ///
    /// # Errors
    /// The first invalid variable in table order; then [`ConfigError::NoBackendSource`] when
    /// neither `HOST_PORT_WS_DEPLOYMENT_AGENT` nor `BACKENDS` is set.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        allowed_cpus: &[usize],
    ) -> Result<Config, ConfigError> {
        let mut draft = Draft::new(allowed_cpus);
        for var in VARIABLES {
            let given = lookup(var.name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty());
            let value = match (given, var.unset) {
                (Some(value), _) => value,
                (None, Parse(default)) => default.to_owned(),
                (None, Describe(_)) => continue,
            };
            if let Err(reason) = (var.apply)(&mut draft, &value) {
                return Err(ConfigError::Invalid {
                    var: var.name,
                    value,
                    reason,
                });
            }
        }
        draft.finish()
    }

    /// How long a backend may stay silent in the middle of a response body, once its head
    /// has arrived. `REQUEST_TIMEOUT` bounds only the wait for the head (SPEC §3); a body may
    /// take as long as it needs, but a backend that stops sending altogether must not hold
    /// the client and the connection forever.
    pub fn body_idle_timeout(&self) -> Duration {
        self.request_timeout.max(BODY_IDLE_TIMEOUT_FLOOR)
    }

    /// Reads the process environment; CPUs default to those in this process's affinity mask,
    /// or to `0..available_parallelism` when `/proc` cannot tell.
    ///
    /// # Errors
    /// As [`Config::from_lookup`].
    pub fn from_env() -> Result<Config, ConfigError> {
        let allowed = allowed_cpus().unwrap_or_else(|_| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        });
        // A value that is not UTF-8 is refused rather than read lossily: most would fail
        // validation anyway, but a lossy RUST_LOG parses as a module name and silences the log.
        for var in VARIABLES {
            if let Some(value) = std::env::var_os(var.name) {
                if value.to_str().is_none() {
                    return Err(ConfigError::Invalid {
                        var: var.name,
                        value: value.to_string_lossy().into_owned(),
                        reason: "not valid UTF-8".to_owned(),
                    });
                }
            }
        }
        let lookup = |name: &str| std::env::var(name).ok();
        Config::from_lookup(lookup, &allowed)
    }

    /// One line for the startup log: CPUs, listeners, agent, backends source and limits.
    pub fn summary(&self) -> String {
        let admin = match self.admin_port {
            Some(port) => format!("127.0.0.1:{port}"),
            None => "off".to_owned(),
        };
        let agent = self
            .agent
            .as_ref()
            .map_or("none".to_owned(), AgentEndpoint::url);
        let backends = match &self.backends {
            Some(set) if set.servers.len() == 1 => "BACKENDS(1 server)".to_owned(),
            Some(set) => format!("BACKENDS({} servers)", set.servers.len()),
            None => "agent".to_owned(),
        };
        format!(
            "cpus={} http={} admin={admin} agent={agent} backends={backends} target_port={} \
             cache_capacity={} cache_ttl={:?} cache_max_object_bytes={} request_timeout={:?} \
             client_header_timeout={:?} client_idle_timeout={:?} agent_backoff_max={:?} \
             log={}{}{}",
            format_cpu_list(&self.cpus),
            SocketAddr::new(self.bind, self.http_port),
            self.target_port,
            self.cache_capacity,
            self.cache_ttl,
            self.cache_max_object_bytes,
            self.request_timeout,
            self.client_header_timeout,
            self.client_idle_timeout,
            self.agent_backoff_max,
            self.log_filter,
            // The two switches away from the defaults are named only when on.
            if self.reuse_port {
                " reuse_port=on"
            } else {
                ""
            },
            if self.defer_accept {
                " defer_accept=on"
            } else {
                ""
            },
        )
    }
}

impl<'a> Draft<'a> {
    fn new(allowed_cpus: &'a [usize]) -> Self {
        Draft {
            config: Config {
                http_port: 0,
                bind: IpAddr::from([0, 0, 0, 0]),
                agent: None,
                target_port: 0,
                backends: None,
                cache_capacity: 0,
                cache_ttl: Duration::ZERO,
                cache_max_object_bytes: 0,
                request_timeout: Duration::ZERO,
                client_header_timeout: Duration::ZERO,
                client_idle_timeout: Duration::ZERO,
                agent_backoff_max: Duration::ZERO,
                cpus: allowed_cpus.to_vec(),
                admin_port: None,
                log_filter: String::new(),
                reuse_port: false,
                defer_accept: false,
            },
            agent_port: None,
            agent_host: String::new(),
            agent_path: String::new(),
            allowed_cpus,
        }
    }

    /// Checks what no single variable can: a CPU to run on and a source of backends.
    fn finish(self) -> Result<Config, ConfigError> {
        let mut config = self.config;
        config.cpus.sort_unstable();
        config.cpus.dedup();
        if config.cpus.is_empty() {
            return Err(ConfigError::Invalid {
                var: "BALANCER_CPUS",
                value: String::new(),
                reason: "no cpu is available to this process".to_owned(),
            });
        }
        config.agent = self.agent_port.map(|port| AgentEndpoint {
            host: self.agent_host,
            port,
            path: self.agent_path,
        });
        if config.agent.is_none() && config.backends.is_none() {
            return Err(ConfigError::NoBackendSource);
        }
        // The admin listener is on 127.0.0.1: an HTTP listener on every address takes that
        // one too, and so does `::ffff:127.0.0.1` (the kernel delivers 127.0.0.1 to it);
        // `::1` or 127.0.0.2 is another address.
        let bind = config.bind.to_canonical();
        let meets_admin = bind.is_unspecified() || bind == Ipv4Addr::LOCALHOST;
        if let Some(port) = config.admin_port {
            if port != 0 && port == config.http_port && meets_admin {
                return Err(ConfigError::Invalid {
                    var: "ADMIN_PORT",
                    value: port.to_string(),
                    reason: "is also HOST_PORT_HTTP_BALANCER: the admin and HTTP listeners need \
                             ports of their own"
                        .to_owned(),
                });
            }
        }
        Ok(config)
    }
}

/// Stores a parsed value, or passes its reason on; keeps each table row to one expression.
fn set<T>(slot: &mut T, parsed: Result<T, String>) -> Result<(), String> {
    *slot = parsed?;
    Ok(())
}

/// `--help`: usage, every variable of `VARIABLES` with its meaning and default, and the
/// exit statuses.
pub fn help_text() -> String {
    let mut out = String::from(
        "usage: balancer [--help | --version]\n\n\
         Thread-per-core HTTP/1.1 load balancer. Configured by environment variables:\n\n",
    );
    for var in VARIABLES {
        let default = match var.unset {
            Parse(text) | Describe(text) => text,
        };
        out.push_str(&format!("  {}  (default: {default})\n", var.name));
        for line in wrap(var.meaning, 72) {
            out.push_str(&format!("      {line}\n"));
        }
    }
    out.push_str("\nexit status: 0 ok, 1 runtime or startup failure, 2 bad configuration\n");
    out
}

/// Splits text into lines of at most `width` characters at spaces (longer words stay whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `--version`: `balancer 0.1.0`.
pub fn version_text() -> String {
    format!("balancer {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const BACKENDS: &str = r#"[{"host": "10.0.0.1", "score": 1}]"#;
    const ALLOWED: &[usize] = &[0, 1];

    /// Parses a configuration from `vars` alone, with CPUs 0-1 allowed.
    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned(), ALLOWED)
    }

    /// Parses `BACKENDS` plus one more variable.
    fn parse_with(var: &str, value: &str) -> Result<Config, ConfigError> {
        parse(&[("BACKENDS", BACKENDS), (var, value)])
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn defaults_apply_when_only_backends_is_set() {
        let c = parse(&[("BACKENDS", BACKENDS)]).expect("valid");
        assert_eq!(c.http_port, 8080);
        assert_eq!(c.bind, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.agent, None);
        assert_eq!(c.target_port, 80);
        let set = c.backends.as_ref().expect("BACKENDS was set");
        assert_eq!(set.servers.len(), 1);
        assert_eq!(set.servers[0].port, 80);
        assert_eq!(c.cache_capacity, 1024);
        assert_eq!(c.cache_ttl, secs(60.0));
        assert_eq!(c.cache_max_object_bytes, 1_048_576);
        assert_eq!(c.request_timeout, secs(30.0));
        assert_eq!(c.body_idle_timeout(), BODY_IDLE_TIMEOUT_FLOOR);
        assert_eq!(c.client_header_timeout, secs(10.0));
        assert_eq!(c.client_idle_timeout, secs(60.0));
        assert_eq!(c.agent_backoff_max, secs(30.0));
        assert_eq!(c.cpus, vec![0, 1]);
        assert_eq!(c.admin_port, Some(9901));
        assert_eq!(c.log_filter, "info");
    }

    #[test]
    fn every_variable_accepts_a_good_value() {
        type Check = fn(&Config) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("HOST_PORT_HTTP_BALANCER", "9000", |c| c.http_port == 9000),
            ("HOST_PORT_HTTP_BALANCER", "0", |c| c.http_port == 0),
            ("HOST_PORT_HTTP_BALANCER", "08080", |c| c.http_port == 8080),
            ("HOST_PORT_HTTP_BALANCER", "65535", |c| c.http_port == 65535),
            ("BALANCER_BIND", "127.0.0.1", |c| {
                c.bind == IpAddr::from([127, 0, 0, 1])
            }),
            ("BALANCER_BIND", "::", |c| {
                c.bind == IpAddr::from(Ipv6Addr::UNSPECIFIED)
            }),
            ("HOST_PORT_WS_DEPLOYMENT_AGENT", "7000", |c| {
                c.agent.as_ref().map(AgentEndpoint::url).as_deref() == Some("ws://127.0.0.1:7000/")
            }),
            ("DEPLOYMENT_AGENT_HOST", "agent.internal", |c| {
                c.agent.is_none()
            }),
            ("DEPLOYMENT_AGENT_PATH", "/ws", |c| c.agent.is_none()),
            ("TARGET_PORT", "8081", |c| c.target_port == 8081),
            ("BACKENDS", r#"{"servers": []}"#, |c| {
                c.backends.as_ref().is_some_and(|s| s.servers.is_empty())
            }),
            ("CACHE_CAPACITY", "0", |c| c.cache_capacity == 0),
            ("CACHE_CAPACITY", "50000", |c| c.cache_capacity == 50_000),
            ("CACHE_TTL", "0", |c| c.cache_ttl.is_zero()),
            ("CACHE_TTL", "2.5", |c| c.cache_ttl == secs(2.5)),
            ("CACHE_MAX_OBJECT_BYTES", "4096", |c| {
                c.cache_max_object_bytes == 4096
            }),
            ("REQUEST_TIMEOUT", "0.5", |c| {
                c.request_timeout == secs(0.5) && c.body_idle_timeout() == secs(60.0)
            }),
            ("REQUEST_TIMEOUT", "300", |c| {
                c.body_idle_timeout() == secs(300.0)
            }),
            ("CLIENT_HEADER_TIMEOUT", "3", |c| {
                c.client_header_timeout == secs(3.0)
            }),
            ("CLIENT_IDLE_TIMEOUT", "120", |c| {
                c.client_idle_timeout == secs(120.0)
            }),
            ("AGENT_BACKOFF_MAX", "1.25", |c| {
                c.agent_backoff_max == secs(1.25)
            }),
            ("BALANCER_CPUS", "1", |c| c.cpus == [1]),
            ("BALANCER_CPUS", "1,0-1", |c| c.cpus == [0, 1]),
            ("ADMIN_PORT", "0", |c| c.admin_port == Some(0)),
            ("ADMIN_PORT", "9999", |c| c.admin_port == Some(9999)),
            ("ADMIN_PORT", "off", |c| c.admin_port.is_none()),
            ("ADMIN_PORT", "OFF", |c| c.admin_port.is_none()),
            ("RUST_LOG", "balancer=debug,warn", |c| {
                c.log_filter == "balancer=debug,warn"
            }),
            ("RUST_LOG", "off", |c| c.log_filter == "off"),
            ("RUST_LOG", "WARN", |c| c.log_filter == "WARN"),
            ("RUST_LOG", "info,", |c| c.log_filter == "info,"),
            ("RUST_LOG", "balancer::proxy=trace", |c| {
                c.log_filter == "balancer::proxy=trace"
            }),
            ("RUST_LOG", "info/agent", |c| c.log_filter == "info/agent"),
            ("BALANCER_REUSE_PORT", "on", |c| c.reuse_port),
            ("BALANCER_REUSE_PORT", "OFF", |c| !c.reuse_port),
            ("BALANCER_DEFER_ACCEPT", "on", |c| c.defer_accept),
            ("BALANCER_DEFER_ACCEPT", "off", |c| !c.defer_accept),
            ("DEPLOYMENT_AGENT_PATH", "/ws%C3%A9?v=1", |c| {
                c.agent.is_none()
            }),
        ];
        for (var, value, check) in cases {
            let config = parse_with(var, value)
                .unwrap_or_else(|e| panic!("{var}={value:?} should be accepted: {e}"));
            assert!(check(&config), "{var}={value:?} parsed wrongly: {config:?}");
        }
    }

    #[test]
    fn every_variable_rejects_a_bad_value_naming_variable_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "HOST_PORT_HTTP_BALANCER",
                "http",
                "expected a port number 0-65535",
            ),
            (
                "HOST_PORT_HTTP_BALANCER",
                "65536",
                "expected a port number 0-65535",
            ),
            (
                "HOST_PORT_HTTP_BALANCER",
                "-1",
                "expected a port number 0-65535",
            ),
            (
                "HOST_PORT_HTTP_BALANCER",
                "+80",
                "expected a port number 0-65535",
            ),
            ("BALANCER_BIND", "localhost", "expected an IP address"),
            ("BALANCER_BIND", "0.0.0.0:80", "expected an IP address"),
            (
                "HOST_PORT_WS_DEPLOYMENT_AGENT",
                "0",
                "expected a port number 1-65535",
            ),
            (
                "HOST_PORT_WS_DEPLOYMENT_AGENT",
                "ws",
                "expected a port number 1-65535",
            ),
            ("DEPLOYMENT_AGENT_HOST", "agent:7000", "the port goes in"),
            (
                "DEPLOYMENT_AGENT_HOST",
                "10.0.0.256",
                "expected an IP address or a host name",
            ),
            ("DEPLOYMENT_AGENT_HOST", "ws://agent", "the port goes in"),
            (
                "DEPLOYMENT_AGENT_HOST",
                "bad host",
                "expected an IP address or a host name",
            ),
            (
                "DEPLOYMENT_AGENT_HOST",
                "a..b",
                "expected an IP address or a host name",
            ),
            (
                "DEPLOYMENT_AGENT_HOST",
                "[nope]",
                "IPv6 address inside the brackets",
            ),
            ("DEPLOYMENT_AGENT_PATH", "ws", "must start with '/'"),
            ("DEPLOYMENT_AGENT_PATH", "/a b", "must not contain spaces"),
            ("TARGET_PORT", "0", "expected a port number 1-65535"),
            ("TARGET_PORT", "99999", "expected a port number 1-65535"),
            ("BACKENDS", "not json", "not valid json"),
            ("CACHE_CAPACITY", "-1", "expected a whole number of entries"),
            ("CACHE_CAPACITY", "1k", "expected a whole number of entries"),
            ("CACHE_TTL", "1s", "expected a number of seconds >= 0"),
            ("CACHE_TTL", "-1", "expected a number of seconds >= 0"),
            (
                "CACHE_MAX_OBJECT_BYTES",
                "1MB",
                "expected a whole number of bytes",
            ),
            ("REQUEST_TIMEOUT", "0", "must be greater than 0"),
            ("REQUEST_TIMEOUT", "inf", "expected a number of seconds > 0"),
            (
                "CLIENT_HEADER_TIMEOUT",
                "nan",
                "expected a number of seconds > 0",
            ),
            ("CLIENT_IDLE_TIMEOUT", "0.0", "must be greater than 0"),
            (
                "AGENT_BACKOFF_MAX",
                "1e3",
                "expected a number of seconds > 0",
            ),
            (
                "BALANCER_CPUS",
                "0-7",
                "cpu 2 is not available to this process (allowed: 0-1)",
            ),
            ("BALANCER_CPUS", "all", "not a cpu number"),
            (
                "ADMIN_PORT",
                "on",
                "expected a port number 0-65535 or \"off\"",
            ),
            ("RUST_LOG", "garbage====", "invalid logging spec"),
            ("RUST_LOG", "a=b=c", "invalid logging spec"),
            ("BALANCER_REUSE_PORT", "yes", "expected on or off"),
            ("DEPLOYMENT_AGENT_PATH", "/\u{e9}", "must be ASCII"),
        ];
        for (var, value, reason) in cases {
            let err = parse_with(var, value).expect_err(&format!("{var}={value:?} must fail"));
            let ConfigError::Invalid { var: named, .. } = &err else {
                panic!("{var}={value:?} gave {err:?}");
            };
            assert_eq!(named, var);
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("invalid {var}=\"{value}\": ")),
                "{message}"
            );
            assert!(message.contains(reason), "{var}={value:?}: {message}");
        }
    }

    #[test]
    fn the_admin_port_may_not_be_the_http_port_where_their_addresses_meet() {
        for bind in [
            "0.0.0.0",
            "127.0.0.1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
        ] {
            let err = parse(&[
                ("BACKENDS", BACKENDS),
                ("BALANCER_BIND", bind),
                ("HOST_PORT_HTTP_BALANCER", "9000"),
                ("ADMIN_PORT", "9000"),
            ])
            .expect_err(bind)
            .to_string();
            assert!(
                err.starts_with("invalid ADMIN_PORT=\"9000\": is also HOST_PORT_HTTP_BALANCER"),
                "{err}"
            );
        }
        let apart = |bind, port| {
            parse(&[
                ("BACKENDS", BACKENDS),
                ("BALANCER_BIND", bind),
                ("HOST_PORT_HTTP_BALANCER", port),
                ("ADMIN_PORT", port),
            ])
        };
        for bind in ["10.0.0.5", "::1", "127.0.0.2", "::ffff:127.0.0.2"] {
            assert!(apart(bind, "9000").is_ok(), "{bind} is another address");
        }
        assert!(apart("127.0.0.1", "0").is_ok(), "0 picks two free ports");
    }

    #[test]
    fn error_message_matches_the_documented_shape() {
        let err = parse_with("HOST_PORT_HTTP_BALANCER", "http").expect_err("bad port");
        assert_eq!(
            err.to_string(),
            "invalid HOST_PORT_HTTP_BALANCER=\"http\": expected a port number 0-65535"
        );
    }

    #[test]
    fn backends_error_names_entry_index_field_and_value() {
        let bad = r#"[{"host": "a", "score": 1}, {"host": "b", "port": 70000, "score": 1}]"#;
        let message = parse(&[("BACKENDS", bad)])
            .expect_err("bad port")
            .to_string();
        assert!(message.starts_with("invalid BACKENDS=\"[{"), "{message}");
        assert!(
            message.contains("entry 1: field port: value 70000"),
            "{message}"
        );
    }

    #[test]
    fn backends_without_port_use_target_port() {
        let c = parse(&[("TARGET_PORT", "8000"), ("BACKENDS", BACKENDS)]).expect("valid");
        assert_eq!(c.backends.expect("set").servers[0].port, 8000);
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        let long = format!("[{}]", "x".repeat(5000));
        let message = parse(&[("BACKENDS", &long)]).expect_err("junk").to_string();
        assert!(
            message.contains(&format!("\"[{}...\"", "x".repeat(199))),
            "{message}"
        );
        assert!(message.len() < 500, "{message}");
    }

    #[test]
    fn multi_line_values_keep_the_message_on_one_line() {
        let message = parse(&[("BACKENDS", "[\n  {\"host\": 1}\n]")]).expect_err("bad host");
        assert!(!message.to_string().contains('\n'), "{message}");
        assert!(
            message.to_string().contains(r#"[\n  {"host": 1}\n]"#),
            "{message}"
        );
    }

    #[test]
    fn empty_value_counts_as_unset() {
        let c = parse(&[("BACKENDS", BACKENDS), ("HOST_PORT_HTTP_BALANCER", "  ")]).expect("ok");
        assert_eq!(c.http_port, 8080);
        let err = parse(&[("BACKENDS", ""), ("HOST_PORT_WS_DEPLOYMENT_AGENT", "")]);
        assert_eq!(err.expect_err("no source"), ConfigError::NoBackendSource);
    }

    #[test]
    fn values_are_trimmed() {
        let c = parse(&[
            ("BACKENDS", BACKENDS),
            ("ADMIN_PORT", " Off\n"),
            ("CACHE_TTL", " 5 "),
        ])
        .expect("valid");
        assert_eq!(c.admin_port, None);
        assert_eq!(c.cache_ttl, secs(5.0));
    }

    #[test]
    fn missing_agent_and_backends_is_reported_naming_both() {
        let err = parse(&[]).expect_err("no source");
        assert_eq!(err, ConfigError::NoBackendSource);
        let message = err.to_string();
        assert!(
            message.contains("HOST_PORT_WS_DEPLOYMENT_AGENT"),
            "{message}"
        );
        assert!(message.contains("BACKENDS"), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn invalid_value_is_reported_before_missing_backend_source() {
        let err = parse(&[("CACHE_TTL", "soon")]).expect_err("bad ttl");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    var: "CACHE_TTL",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn first_invalid_variable_in_table_order_wins() {
        let err = parse(&[
            ("ADMIN_PORT", "x"),
            ("TARGET_PORT", "x"),
            ("CACHE_TTL", "x"),
        ])
        .expect_err("three bad values");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    var: "TARGET_PORT",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn agent_alone_is_a_backend_source() {
        let c = parse(&[
            ("HOST_PORT_WS_DEPLOYMENT_AGENT", "7000"),
            ("DEPLOYMENT_AGENT_HOST", "deploy_agent.local"),
            ("DEPLOYMENT_AGENT_PATH", "/v1/servers"),
        ])
        .expect("valid");
        assert_eq!(c.backends, None);
        let agent = c.agent.expect("agent set");
        assert_eq!(
            (agent.host.as_str(), agent.port),
            ("deploy_agent.local", 7000)
        );
        assert_eq!(agent.url(), "ws://deploy_agent.local:7000/v1/servers");
    }

    #[test]
    fn agent_url_brackets_ipv6_hosts() {
        for host in ["::1", "[::1]"] {
            let c = parse(&[
                ("HOST_PORT_WS_DEPLOYMENT_AGENT", "7000"),
                ("DEPLOYMENT_AGENT_HOST", host),
            ])
            .expect("valid");
            let agent = c.agent.expect("agent set");
            assert_eq!(agent.host, "::1");
            assert_eq!(agent.url(), "ws://[::1]:7000/");
        }
    }

    #[test]
    fn cpu_outside_the_allowed_set_is_rejected() {
        let err = parse_with("BALANCER_CPUS", "0-7").expect_err("cpu 2 not allowed");
        assert_eq!(
            err.to_string(),
            "invalid BALANCER_CPUS=\"0-7\": cpu 2 is not available to this process (allowed: 0-1)"
        );
    }

    #[test]
    fn cpus_default_to_every_allowed_cpu() {
        let c = Config::from_lookup(
            |name| (name == "BACKENDS").then(|| BACKENDS.to_owned()),
            &[3, 1, 2],
        )
        .expect("valid");
        assert_eq!(c.cpus, vec![1, 2, 3]);
    }

    #[test]
    fn no_allowed_cpu_is_a_configuration_error() {
        let err = Config::from_lookup(
            |name| (name == "BACKENDS").then(|| BACKENDS.to_owned()),
            &[],
        )
        .expect_err("nothing to run on");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    var: "BALANCER_CPUS",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn table_lists_the_spec_variables_in_order() {
        let names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        assert_eq!(
            names,
            [
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
                // Beyond the SPEC's table, after it.
                "BALANCER_REUSE_PORT",
                "BALANCER_DEFER_ACCEPT",
            ]
        );
    }

    #[test]
    fn every_default_in_the_table_passes_its_own_parser() {
        let mut draft = Draft::new(ALLOWED);
        for var in VARIABLES {
            if let Parse(default) = var.unset {
                assert_eq!((var.apply)(&mut draft, default), Ok(()), "{}", var.name);
            }
        }
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = help_text();
        assert!(help.starts_with("usage: balancer"), "{help}");
        for var in VARIABLES {
            assert!(
                help.contains(&format!("  {}  (default: ", var.name)),
                "{}",
                var.name
            );
        }
        assert!(help.contains("(default: 8080)"));
        assert!(help.contains("(default: every CPU the process may use)"));
        let last = help.lines().last().expect("non-empty");
        assert!(last.starts_with("exit status: 0"), "{last}");
        assert!(last.contains("2 bad configuration"), "{last}");
        assert!(help.lines().all(|l| l.len() <= 80), "{help}");
    }

    #[test]
    fn version_names_the_crate_version() {
        assert_eq!(
            version_text(),
            format!("balancer {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn summary_names_cpus_listeners_agent_and_backend_source() {
        let c = parse(&[
            ("BACKENDS", r#"[{"host": "a", "score": 1}, {"host": "b", "score": 1}, {"host": "c", "score": 2}]"#),
            ("HOST_PORT_WS_DEPLOYMENT_AGENT", "7000"),
        ])
        .expect("valid");
        let summary = c.summary();
        assert!(
            summary.starts_with(
                "cpus=0-1 http=0.0.0.0:8080 admin=127.0.0.1:9901 agent=ws://127.0.0.1:7000/ \
                 backends=BACKENDS(3 servers) "
            ),
            "{summary}"
        );
        assert!(summary.contains("request_timeout=30s"), "{summary}");
        assert!(!summary.contains("defer_accept"), "{summary}");
        let deferred =
            parse(&[("BACKENDS", "[]"), ("BALANCER_DEFER_ACCEPT", "on")]).expect("valid");
        assert!(
            deferred.summary().ends_with(" log=info defer_accept=on"),
            "{}",
            deferred.summary()
        );
    }

    #[test]
    fn summary_shows_disabled_admin_and_agent_as_backend_source() {
        let c = parse(&[
            ("HOST_PORT_WS_DEPLOYMENT_AGENT", "7000"),
            ("ADMIN_PORT", "off"),
            ("BALANCER_BIND", "::1"),
        ])
        .expect("valid");
        let summary = c.summary();
        assert!(summary.contains("http=[::1]:8080 admin=off "), "{summary}");
        assert!(summary.contains("backends=agent "), "{summary}");
    }
}
