//! TLS (rustls, ALPN `h2`) for Switchboard's gRPC servers and for the calls between them.
//!
//! - [`TlsArgs`]: the servers' flags (`--tls-cert`, `--tls-key`, `--tls-client-ca`,
//!   `--tls-ca`, `--tls-max-handshakes`), flattened into [`crate::config::CommonArgs`]; [`ClientTlsArgs`]: the
//!   flags of clients that only call (softphone, benchmark).
//! - [`ServerTls`]: the server side. The rustls `ServerConfig` lives in a swappable holder;
//!   [`ServerTls::incoming`] handshakes every new TCP connection with the config current at
//!   that moment, so replacing the config (on SIGHUP, or when the files change) affects new
//!   connections only and never drops a live one. At most `--tls-max-handshakes`
//!   handshakes run at once (see [`acceptor`](TlsIncoming)).
//! - [`ClientTls`]: the client side, a `tonic` TLS config with the CA to trust and the
//!   optional client certificate, used by [`crate::client::channel_with`].
//!
//! Errors name the flag and the file, never the contents (a key is a secret).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, RootCertStore};

mod acceptor;
mod client;
mod server;

pub use acceptor::{DEFAULT_MAX_HANDSHAKES, HANDSHAKE_TIMEOUT, RELOAD_POLL, TlsIncoming};
pub use client::ClientTls;
pub use server::ServerTls;

pub(crate) const CERT_FLAG: &str = "--tls-cert";
pub(crate) const KEY_FLAG: &str = "--tls-key";
pub(crate) const CLIENT_CA_FLAG: &str = "--tls-client-ca";
pub(crate) const CA_FLAG: &str = "--tls-ca";

/// TLS flags of every Switchboard server.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Certificate chain (PEM) to serve gRPC with over TLS; needs `--tls-key`. Also the
    /// client certificate presented to other Switchboard services when `--tls-ca` is given.
    /// Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--tls-cert`. Reloaded with it.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that signs client certificates: when given, the server refuses
    /// clients without a certificate signed by it (mutual TLS between services).
    #[arg(long, env = "SWITCHBOARD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// CA bundle (PEM) trusted when calling other Switchboard services: when given, those
    /// calls use TLS (and present `--tls-cert` as client certificate when it is set).
    #[arg(long, env = "SWITCHBOARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Most TLS handshakes in progress at once. When they are all taken (by slow or silent
    /// clients, each for at most 10 s), new connections wait in the listen backlog, not
    /// accepted, until one ends; a warning says so at most once a minute.
    #[arg(long, env = "SWITCHBOARD_TLS_MAX_HANDSHAKES", default_value_t = DEFAULT_MAX_HANDSHAKES, value_parser = clap::value_parser!(u32).range(1..))]
    pub tls_max_handshakes: u32,

    /// How often the certificate files are checked for changes (`0s`: never; they are then
    /// reloaded on SIGHUP only).
    #[arg(long, env = "SWITCHBOARD_TLS_RELOAD_INTERVAL", value_parser = crate::flags::parse_duration, default_value = "1s")]
    pub tls_reload_interval: std::time::Duration,
}

impl Default for TlsArgs {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
            tls_max_handshakes: DEFAULT_MAX_HANDSHAKES,
            tls_reload_interval: RELOAD_POLL,
        }
    }
}

/// TLS flags of a program that only calls Switchboard services.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// CA bundle (PEM) to trust: when given, calls use TLS.
    #[arg(long, env = "SWITCHBOARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present, for servers that require one (mutual TLS);
    /// needs `--tls-key` and `--tls-ca`.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Why TLS files or flags are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of a pair of flags was given without the other.
    #[error("{given} is given without {missing}: TLS needs both")]
    Incomplete {
        /// The flag given.
        given: &'static str,
        /// The flag missing.
        missing: &'static str,
    },
    /// A flag that only makes sense with another one.
    #[error("{flag} needs {needs}")]
    Needs {
        /// The flag given.
        flag: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// A file could not be read.
    #[error("{flag} {}: cannot read the file: {source}", path.display())]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file was read but is not what the flag needs.
    #[error("{flag} {}: {reason}", path.display())]
    Invalid {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the contents).
        reason: String,
    },
}

/// The crypto provider, named explicitly rather than relying on a process default.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn incomplete(given: &'static str, missing: &'static str) -> TlsError {
    TlsError::Incomplete { given, missing }
}

pub(crate) fn invalid(flag: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file; at least one.
pub(crate) fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(flag, path, format!("not a PEM certificate file: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The error never quotes it.
pub(crate) fn private_key(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        invalid(
            flag,
            path,
            "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file",
        )
    })
}

/// A root store of every certificate of a CA bundle.
pub(crate) fn roots(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(flag, path, pem)? {
        roots
            .add(cert)
            .map_err(|err| invalid(flag, path, format!("not a usable CA certificate: {err}")))?;
    }
    Ok(roots)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(cert: Option<&str>, key: Option<&str>, client_ca: Option<&str>) -> TlsArgs {
        TlsArgs {
            tls_cert: cert.map(PathBuf::from),
            tls_key: key.map(PathBuf::from),
            tls_client_ca: client_ca.map(PathBuf::from),
            ..TlsArgs::default()
        }
    }

    fn message(result: Result<Option<ServerTls>, TlsError>) -> String {
        match result {
            Err(err) => err.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn plain_text_without_certificate() {
        assert!(matches!(
            ServerTls::from_args(&TlsArgs::default()),
            Ok(None)
        ));
        assert!(
            !ClientTls::from_server_args(&TlsArgs::default())
                .unwrap()
                .is_enabled()
        );
    }

    #[test]
    fn one_of_the_pair_names_the_missing_flag() {
        let text = message(ServerTls::from_args(&args(Some("c.pem"), None, None)));
        assert!(
            text.contains("--tls-cert") && text.contains("--tls-key"),
            "{text}"
        );
        let text = message(ServerTls::from_args(&args(None, Some("k.pem"), None)));
        assert!(text.starts_with("--tls-key"), "{text}");
        let text = message(ServerTls::from_args(&args(None, None, Some("ca.pem"))));
        assert!(text.starts_with("--tls-client-ca"), "{text}");
    }

    #[test]
    fn unreadable_file_names_flag_and_file() {
        let text = message(ServerTls::from_args(&args(
            Some("/nonexistent/cert.pem"),
            Some("/nonexistent/key.pem"),
            None,
        )));
        assert!(text.contains("--tls-cert /nonexistent/cert.pem"), "{text}");
    }

    #[test]
    fn garbage_key_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        std::fs::write(&key, "SECRET-KEY-MATERIAL").unwrap();
        let text = message(ServerTls::from_args(&TlsArgs {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..TlsArgs::default()
        }));
        assert!(text.starts_with("--tls-key"), "{text}");
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[test]
    fn client_certificate_needs_a_ca() {
        let args = ClientTlsArgs {
            tls_ca: None,
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
        };
        let text = ClientTls::from_args(&args).unwrap_err().to_string();
        assert!(text.contains("--tls-ca"), "{text}");
    }
}
