//! Flags shared by every binary (DESIGN.md §4), each with its `SWITCHBOARD_*` fallback.
//!
//! A service's own `Cli` flattens [`CommonArgs`] and adds `--listen` (whose default differs
//! per service) plus its own flags. OpenTelemetry export is configured through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable, read by [`crate::telemetry`].

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Flags every Switchboard server takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// etcd endpoints, comma-separated (e.g. `http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(
        long = "etcd",
        env = "SWITCHBOARD_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix under which all of this deployment's state lives in etcd.
    #[arg(long, env = "SWITCHBOARD_ETCD_PREFIX", default_value = "/switchboard")]
    pub etcd_prefix: String,

    /// CA certificate (PEM) that signed etcd's server certificate. Turns TLS on: endpoints
    /// without a scheme become `https://`, `http://` ones are refused.
    #[arg(long, env = "SWITCHBOARD_ETCD_CA", value_name = "PEM")]
    pub etcd_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) presented to an etcd running with `--client-cert-auth`;
    /// needs `--etcd-key` and `--etcd-ca`.
    #[arg(long, env = "SWITCHBOARD_ETCD_CERT", value_name = "PEM")]
    pub etcd_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "SWITCHBOARD_ETCD_KEY", value_name = "PEM")]
    pub etcd_key: Option<std::path::PathBuf>,

    /// etcd user name, for an etcd with authentication enabled. Its password comes from
    /// the SWITCHBOARD_ETCD_PASSWORD environment variable or `--etcd-password-file`; there
    /// is deliberately no flag for it (flags show in `ps`).
    #[arg(long, env = "SWITCHBOARD_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,

    /// File holding the password of `--etcd-user` (a trailing newline is ignored).
    #[arg(long, env = "SWITCHBOARD_ETCD_PASSWORD_FILE", value_name = "PATH")]
    pub etcd_password_file: Option<std::path::PathBuf>,

    /// The password of `--etcd-user` from SWITCHBOARD_ETCD_PASSWORD (never a flag).
    #[arg(skip = crate::etcd::options::password_from_env())]
    pub etcd_password: Option<crate::etcd::EtcdPassword>,

    /// Key id (JWT `kid`) of the platform key, which may sign tokens for any account.
    #[arg(long, env = "SWITCHBOARD_PLATFORM_KEY_ID", default_value = "platform")]
    pub platform_key_id: String,

    /// Secret of the platform key (HS256). Without it only account keys stored in etcd
    /// are accepted. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_PLATFORM_SECRET", hide_env_values = true)]
    pub platform_secret: Option<Secret>,

    /// Key id of a second platform key that is accepted but never used to sign: set it
    /// during a platform key rotation so tokens of both keys verify (see OPERATIONS.md).
    #[arg(
        long,
        env = "SWITCHBOARD_PLATFORM_ACCEPT_KEY_ID",
        requires = "platform_accept_secret"
    )]
    pub platform_accept_key_id: Option<String>,

    /// Secret of the `--platform-accept-key-id` key. Prefer the environment variable.
    #[arg(
        long,
        env = "SWITCHBOARD_PLATFORM_ACCEPT_SECRET",
        hide_env_values = true,
        requires = "platform_accept_key_id"
    )]
    pub platform_accept_secret: Option<Secret>,

    /// Log format on stderr: `human` for people, `json` for log collectors.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// How long a stopping server waits for in-flight requests and streams to finish
    /// after SIGTERM/SIGINT before it closes them.
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,

    /// Address to serve Prometheus metrics on, at `/metrics` (off when not given).
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// TTL in seconds of this replica's own etcd lease (the one that owns its sessions and
    /// records); a crashed replica's state disappears within this time.
    #[arg(long, env = "SWITCHBOARD_REPLICA_TTL", default_value_t = 10, value_parser = clap::value_parser!(i64).range(2..=300))]
    pub replica_ttl: i64,

    /// TLS of the gRPC server and of calls to other Switchboard services.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    /// Per-connection and per-request limits: concurrent streams, message size, deadline.
    #[command(flatten)]
    pub limits: crate::limits::ConnectionLimits,
}

/// A secret given on the command line or in the environment: usable as `&str`, but its
/// `Debug` never shows it (so `CommonArgs` can be logged whole).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
}

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(value))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(format!("`{text}`: unit must be ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_reads_as_its_value_and_never_debug_prints_it() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            common: CommonArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "test",
            "--platform-secret",
            "hunter2-platform-secret",
        ]);
        let cli = cli.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            cli.common.platform_secret.as_deref(),
            Some("hunter2-platform-secret")
        );
        let shown = format!("{cli:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
