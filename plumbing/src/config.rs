//! Flags shared by every binary (docs/CONTRACT.md §4), each with its `SWITCHBOARD_*` fallback.
//!
//! A service's own `Cli` flattens [`CommonArgs`] and adds `--listen` (whose default differs
//! per service) plus its own flags. OpenTelemetry export is configured through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable, read by [`crate::telemetry`].

use std::time::Duration;

use clap::{Args, ValueEnum};

pub use crate::flags::{Secret, parse_duration};

/// Flags every Switchboard server takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// How to reach etcd: endpoints, prefix, TLS and login.
    #[command(flatten)]
    pub etcd: crate::etcd::EtcdArgs,

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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
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
}
