//! The `balancer` binary: configuration, logging, shards, agent and admin threads, signals.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use balancer::admin::{self, Status};
use balancer::config::{help_text, version_text, Config, ConfigError};
use balancer::resolve::resolve;
use balancer::shard::{self, RunningShard, ShardCommand, Update};
use balancer::socket::{self, AgentLink};
use balancer::startup::{self, Listener, StartupError};

/// glommio refuses to start an executor below this memlock limit.
const MIN_MEMLOCK: u64 = 512 * 1024;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--help" | "-h") => {
            print!("{}", help_text());
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("{}", version_text());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("balancer: unknown argument {other:?}; configuration is read from environment variables (see --help)");
            return ExitCode::from(2);
        }
    }
    // First, so that a SIGTERM arriving while the process starts drains it like any other
    // rather than killing it with the default action.
    let signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("balancer: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    env_logger::Builder::new()
        .parse_filters(&config.log_filter)
        .format_timestamp_millis()
        .init();

    // BACKENDS names hosts; resolving them is part of validating the variable (exit 2), so
    // it comes before the startup summary: an invalid value prints one line and nothing else.
    let initial = match &config.backends {
        Some(set) => match resolve(set) {
            Ok(backends) => Update {
                version: 1,
                backends,
            },
            Err(reason) => {
                return config_error(&ConfigError::Invalid {
                    var: "BACKENDS",
                    value: std::env::var("BACKENDS").unwrap_or_default(),
                    reason,
                })
            }
        },
        None => Update {
            version: 0,
            backends: Vec::new(),
        },
    };
    info!(
        "starting balancer {}: {}",
        env!("CARGO_PKG_VERSION"),
        config.summary()
    );
    match run(config, initial, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("balancer: {message}");
            ExitCode::from(1)
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("balancer: {e}");
    ExitCode::from(2)
}

fn run(config: Config, initial: Update, signals: Signals) -> Result<(), String> {
    if let Some(limit) = memlock_limit() {
        if limit < MIN_MEMLOCK {
            return Err(StartupError::MemlockTooLow(limit).to_string());
        }
    }
    startup::check_io_uring().map_err(|e| e.to_string())?;
    // Bound before the shards start: a process that cannot start must never have accepted a
    // connection or logged `listening on`.
    if !config.reuse_port {
        for (ip, port, listener) in [
            (config.bind, Some(config.http_port), Listener::Http),
            (
                IpAddr::from([127, 0, 0, 1]),
                config.admin_port,
                Listener::Admin,
            ),
        ] {
            if let Some(port @ 1..) = port {
                startup::ensure_port_free(SocketAddr::new(ip, port), listener)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let admin_listener = match config.admin_port {
        Some(port) => Some(admin::bind(port).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                StartupError::PortInUse(addr, Listener::Admin).to_string()
            } else {
                format!("cannot listen on 127.0.0.1:{port} (ADMIN_PORT): {e}")
            }
        })?),
        None => None,
    };
    let config = Arc::new(config);
    let initial = Arc::new(initial);
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded();

    // The first shard resolves a port of 0; the others then share that port.
    let mut addr = SocketAddr::new(config.bind, config.http_port);
    let mut shards: Vec<RunningShard> = Vec::with_capacity(config.cpus.len());
    for (id, &cpu) in config.cpus.iter().enumerate() {
        let running = shard::start(
            id,
            cpu,
            addr,
            config.clone(),
            initial.clone(),
            ack_tx.clone(),
        )
        .map_err(|e| e.to_string())
        .inspect_err(|_| stop(&shards))?;
        addr = running.local_addr;
        shards.push(running);
    }
    if config.backends.is_some() {
        info!(
            "applied server set version={} servers={} source=BACKENDS",
            initial.version,
            initial.backends.len()
        );
    }
    info!("listening on {addr}");

    let status = Arc::new(Status::new(
        shards.iter().map(|s| s.metrics.clone()).collect(),
    ));
    status.publish_set(initial.version, config.backends.clone().unwrap_or_default());
    if let Some(listener) = admin_listener {
        let admin_addr = listener
            .local_addr()
            .map_err(|e| e.to_string())
            .inspect_err(|_| stop(&shards))?;
        admin::spawn(listener, status.clone())
            .map_err(|e| e.to_string())
            .inspect_err(|_| stop(&shards))?;
        info!("admin on {admin_addr}");
    }
    if let Some(endpoint) = config.agent.clone() {
        let handles = shards
            .iter()
            .map(|s| s.handle.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        socket::spawn(AgentLink {
            endpoint,
            backoff_max: config.agent_backoff_max,
            target_port: config.target_port,
            shards: handles,
            acks: ack_rx,
            status: status.clone(),
        })
        .map_err(|e| e.to_string())?;
    }

    wait_for_signal(signals, &shards)?;
    info!(
        "shutting down: no new connections, draining in-flight requests (up to {}s)",
        shard::DRAIN_TIMEOUT.as_secs()
    );
    status.shutting_down.store(true, Relaxed);
    stop(&shards);
    for running in shards {
        if running.thread.join().is_err() {
            warn!("a shard thread panicked during shutdown");
        }
    }
    info!("stopped");
    Ok(())
}

fn stop(shards: &[RunningShard]) {
    for s in shards {
        s.handle.send(ShardCommand::Shutdown);
    }
}

/// Blocks until SIGTERM or SIGINT; an error if a shard stops on its own first.
fn wait_for_signal(mut signals: Signals, shards: &[RunningShard]) -> Result<(), String> {
    loop {
        if let Some(signal) = signals.pending().next() {
            info!(
                "received {}",
                if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                }
            );
            return Ok(());
        }
        if let Some(i) = shards.iter().position(|s| s.thread.is_finished()) {
            return Err(format!("shard {i} stopped unexpectedly"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The soft RLIMIT_MEMLOCK in bytes, from /proc (None if unknown or unlimited).
fn memlock_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
