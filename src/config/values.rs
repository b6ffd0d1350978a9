//! Parsers of single configuration values. Each returns the value, or only the reason it is
//! bad: the caller names the variable and quotes the value.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::queue::is_host_name;

/// Longest duration accepted for any seconds variable. Far beyond any sensible timeout or TTL,
/// and small enough that `Instant + duration` can never overflow and panic at runtime.
const MAX_SECONDS: u64 = 365 * 24 * 60 * 60;

/// An IPv4 or IPv6 address, without brackets or port.
pub fn ip(v: &str) -> Result<IpAddr, String> {
    v.parse()
        .map_err(|_| "expected an IP address such as 0.0.0.0 or ::".to_owned())
}

/// An env_logger filter (`info`, `balancer=debug,warn`), refused when env_logger would ignore
/// it with a warning and log nothing at `info`.
pub fn log_filter(v: &str) -> Result<String, String> {
    env_filter::Builder::new()
        .try_parse(v)
        .map(|_| v.to_owned())
        .map_err(|e| {
            format!("{e}; expected a level (error, warn, info, debug, trace) or module=level list")
        })
}

/// `on` or `off` (any case).
pub fn on_off(v: &str) -> Result<bool, String> {
    if v.eq_ignore_ascii_case("on") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("off") {
        Ok(false)
    } else {
        Err("expected on or off".to_owned())
    }
}

/// `off` (any case) or a port number 0-65535.
pub fn admin_port(v: &str) -> Result<Option<u16>, String> {
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    port(v, 0)
        .map(Some)
        .map_err(|reason| format!("{reason} or \"off\""))
}

/// A port number of plain digits, at least `min` (0 or 1).
pub fn port(v: &str, min: u16) -> Result<u16, String> {
    let reason = || format!("expected a port number {min}-65535");
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(reason());
    }
    match v.parse::<u16>() {
        Ok(p) if p >= min => Ok(p),
        _ => Err(reason()),
    }
}

/// A non-negative whole number of `unit`s, plain digits.
pub fn count(v: &str, unit: &str) -> Result<usize, String> {
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected a whole number of {unit}"));
    }
    v.parse()
        .map_err(|_| format!("too large: at most {} {unit}", usize::MAX))
}

/// Seconds as a plain decimal (`10`, `0.5`); no sign, exponent, unit, `inf` or `nan`.
pub fn seconds(v: &str, zero_ok: bool) -> Result<Duration, String> {
    let bound = if zero_ok { ">= 0" } else { "> 0" };
    let digits = v.bytes().filter(u8::is_ascii_digit).count();
    let dots = v.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != v.len() {
        return Err(format!(
            "expected a number of seconds {bound}, such as 10 or 0.5"
        ));
    }
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("expected a number of seconds {bound}, such as 10 or 0.5"))?;
    if secs > MAX_SECONDS as f64 {
        return Err(format!("must be at most {MAX_SECONDS} seconds (one year)"));
    }
    let duration = Duration::from_secs_f64(secs);
    // Checked after conversion: 0.0000000001 rounds to zero and would disable a timeout.
    if duration.is_zero() && !zero_ok {
        return Err("must be greater than 0 seconds".to_owned());
    }
    Ok(duration)
}

/// An IP address (IPv6 with or without brackets) or a DNS host name.
pub fn host(v: &str) -> Result<String, String> {
    let unbracketed = v.strip_prefix('[').and_then(|s| s.strip_suffix(']'));
    if let Some(inner) = unbracketed {
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(inner.to_owned()),
            Err(_) => Err("expected an IPv6 address inside the brackets".to_owned()),
        };
    }
    if v.parse::<IpAddr>().is_ok() || is_host_name(v) {
        return Ok(v.to_owned());
    }
    if v.contains(':') || v.contains('/') {
        // The usual mistake is a URL or host:port; say where the port goes.
        return Err(
            "expected an IP address or a host name only (the port goes in \
                    HOST_PORT_WS_DEPLOYMENT_AGENT, the path in DEPLOYMENT_AGENT_PATH)"
                .to_owned(),
        );
    }
    Err("expected an IP address or a host name".to_owned())
}

/// A request path for the WebSocket handshake: starts with `/`, and has no whitespace or
/// control characters, which would corrupt the request line.
pub fn request_path(v: &str) -> Result<String, String> {
    if !v.starts_with('/') {
        return Err("must start with '/'".to_owned());
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_owned());
    }
    // A request-target is ASCII (RFC 9112 §3.2); other characters go percent-encoded.
    if !v.is_ascii() {
        return Err("must be ASCII (percent-encode other characters)".to_owned());
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn seconds_accept_plain_decimals_only() {
        let good: &[(&str, f64)] = &[
            ("0", 0.0),
            ("10", 10.0),
            ("0.5", 0.5),
            (".5", 0.5),
            ("3.", 3.0),
        ];
        for (text, want) in good {
            assert_eq!(seconds(text, true), Ok(secs(*want)), "{text:?}");
        }
        for text in [
            "", ".", "1s", "-1", "+1", "nan", "inf", "1e3", "1.2.3", "1,5", "31536001",
        ] {
            assert!(seconds(text, true).is_err(), "{text:?} must be rejected");
        }
        assert!(seconds("0.0000000001", false).is_err(), "rounds to zero");
    }
}
