//! TLS of `https` webhooks: which certificates the router trusts and the client handshake.
//!
//! Trust is the operating system's roots (read once at start-up through
//! `rustls-native-certs`: `/etc/ssl/certs` on Debian, where the image installs
//! `ca-certificates`; `SSL_CERT_FILE`/`SSL_CERT_DIR` override) plus the CAs of
//! `--webhook-ca`, which are added to the roots, never instead of them. The handshake
//! verifies the chain and that the certificate names the URL's host (also sent as SNI), and
//! offers ALPN `http/1.1`, the only protocol the webhook client speaks.
//!
//! A failed handshake is a `WebhookError::Tls`: like any webhook failure it is recorded in
//! the communication's timeline and sends the fetch to the fallback URL.

use std::path::Path;
use std::sync::Arc;

use plumbing::server::ServeError;
use plumbing::tls::TlsError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, CertificateError, RootCertStore};

/// The flag naming extra CAs to trust.
pub const WEBHOOK_CA_FLAG: &str = "--webhook-ca";

/// Why a TLS handshake with a webhook failed; `Display` is the timeline's explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The chain does not lead to a trusted root.
    #[error(
        "the certificate is not signed by a trusted CA (unknown issuer; a private CA needs {WEBHOOK_CA_FLAG})"
    )]
    UnknownIssuer,
    /// The certificate is valid, but not for the URL's host.
    #[error("the certificate is not valid for this host name")]
    WrongName,
    /// The certificate has expired or is not valid yet.
    #[error("the certificate has expired or is not yet valid")]
    Expired,
    /// The host cannot be a TLS server name.
    #[error("the host is not a valid TLS server name")]
    BadServerName,
    /// No handshake within the connect deadline (seconds).
    #[error("no TLS handshake within {0}s")]
    Timeout(u64),
    /// Any other handshake failure (an alert, no common protocol version or cipher, a
    /// peer that is not speaking TLS).
    #[error("handshake failed: {0}")]
    Handshake(String),
}

/// What https webhooks trust, ready to connect.
#[derive(Clone)]
pub struct WebhookTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for WebhookTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTls").finish_non_exhaustive()
    }
}

impl WebhookTls {
    /// The operating system's roots plus the certificates of `extra_ca` (`--webhook-ca`).
    /// An unreadable or invalid `extra_ca` is an error naming the flag and the file.
    pub fn load(extra_ca: Option<&Path>) -> Result<Self, ServeError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "reading the system's trusted certificates");
        }
        let (system, unusable) = roots.add_parsable_certificates(native.certs);
        if unusable > 0 {
            tracing::debug!(unusable, "system certificates skipped");
        }
        let extra = match extra_ca {
            Some(path) => add_extra_ca(&mut roots, path)?,
            None => 0,
        };
        if roots.is_empty() {
            tracing::warn!(
                "no trusted roots for https webhooks (no system certificates, no {WEBHOOK_CA_FLAG}): every https webhook will fail"
            );
        } else {
            tracing::info!(system, extra, "https webhooks trust these roots");
        }
        Self::with_roots(roots).map_err(ServeError::from)
    }

    /// A connector trusting exactly `roots`.
    pub fn with_roots(roots: RootCertStore) -> Result<Self, std::io::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| std::io::Error::other(format!("webhook TLS configuration: {err}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Handshakes over `stream` (already connected to the checked address) with `host` as
    /// the server name to send and verify, within `within`.
    pub async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
        within: std::time::Duration,
    ) -> Result<TlsStream<TcpStream>, TlsFailure> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsFailure::BadServerName)?;
        tokio::time::timeout(within, self.connector.connect(name, stream))
            .await
            .map_err(|_| TlsFailure::Timeout(within.as_secs()))?
            .map_err(|err| classify(&err))
    }
}

/// Adds every certificate of the PEM file at `path`; how many.
fn add_extra_ca(roots: &mut RootCertStore, path: &Path) -> Result<usize, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        flag: WEBHOOK_CA_FLAG,
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        flag: WEBHOOK_CA_FLAG,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("not a PEM certificate bundle: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into(),
        ));
    }
    let count = certs.len();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|err| invalid(format!("certificate {} is not usable: {err}", i + 1)))?;
    }
    Ok(count)
}

/// What a failed handshake means, by the rustls error inside the I/O error.
fn classify(err: &std::io::Error) -> TlsFailure {
    let tls = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(tls) = tls else {
        return TlsFailure::Handshake(err.to_string());
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            TlsFailure::UnknownIssuer
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsFailure::WrongName,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => TlsFailure::Expired,
        other => TlsFailure::Handshake(other.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("router-webhook-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn an_unreadable_or_invalid_webhook_ca_names_the_flag() {
        let missing = std::env::temp_dir().join("router-webhook-tls-missing/ca.pem");
        let err = WebhookTls::load(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("--webhook-ca"), "{err}");
        assert!(err.contains("cannot read"), "{err}");

        let key = temp_file(
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n",
        );
        let err = WebhookTls::load(Some(&key)).unwrap_err().to_string();
        assert!(err.contains("--webhook-ca"), "{err}");
        assert!(err.contains("no certificate"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "never the contents: {err}");

        let garbage = temp_file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        );
        let err = WebhookTls::load(Some(&garbage)).unwrap_err().to_string();
        assert!(err.contains("--webhook-ca"), "{err}");
        let _ = std::fs::remove_file(key);
        let _ = std::fs::remove_file(garbage);
    }

    #[test]
    fn loads_without_an_extra_ca() {
        assert!(WebhookTls::load(None).is_ok());
    }

    #[test]
    fn failures_are_classified_by_the_rustls_error() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            classify(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            TlsFailure::UnknownIssuer
        );
        assert_eq!(
            classify(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            ))),
            TlsFailure::WrongName
        );
        assert!(matches!(
            classify(&std::io::Error::other("reset")),
            TlsFailure::Handshake(_)
        ));
    }
}
