//! The client side of TLS: what calls to Switchboard services trust and present.

use std::path::Path;

use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::{
    CA_FLAG, CERT_FLAG, ClientTlsArgs, KEY_FLAG, TlsArgs, TlsError, certificates, incomplete,
    invalid, private_key, provider, read, roots,
};

/// The client side: what calls to Switchboard services trust and present. The default is
/// plain text.
#[derive(Clone, Default)]
pub struct ClientTls {
    config: Option<ClientTlsConfig>,
}

impl std::fmt::Debug for ClientTls {
    // The config holds the client key: show only whether TLS is on.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl ClientTls {
    /// Plain text (no TLS).
    pub fn plain() -> Self {
        Self::default()
    }

    /// What a server calling its peers uses: TLS when `--tls-ca` is given, presenting
    /// `--tls-cert`/`--tls-key` when those are set too.
    pub fn from_server_args(args: &TlsArgs) -> Result<Self, TlsError> {
        match (&args.tls_cert, &args.tls_key) {
            (Some(_), None) => return Err(incomplete(CERT_FLAG, KEY_FLAG)),
            (None, Some(_)) => return Err(incomplete(KEY_FLAG, CERT_FLAG)),
            _ => {}
        }
        let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        args.tls_ca
            .as_deref()
            .map_or_else(|| Ok(Self::plain()), |ca| Self::from_files(ca, identity))
    }

    /// What a calling program's `--tls-ca`, `--tls-cert`, `--tls-key` configure.
    pub fn from_args(args: &ClientTlsArgs) -> Result<Self, TlsError> {
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(_), None) => return Err(incomplete(CERT_FLAG, KEY_FLAG)),
            (None, Some(_)) => return Err(incomplete(KEY_FLAG, CERT_FLAG)),
            (cert, key) => cert.as_deref().zip(key.as_deref()),
        };
        match (&args.tls_ca, identity) {
            (Some(ca), identity) => Self::from_files(ca, identity),
            (None, Some(_)) => Err(TlsError::Needs {
                flag: CERT_FLAG,
                needs: "--tls-ca (the CA that signs the servers' certificates)",
            }),
            (None, None) => Ok(Self::plain()),
        }
    }

    /// TLS trusting the CA bundle `ca`, presenting `identity` (certificate, key) when given.
    /// The files are checked now; the error names the flag (`--tls-ca`, `--tls-cert`,
    /// `--tls-key`) and the file.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca_pem = read(CA_FLAG, ca)?;
        let roots = roots(CA_FLAG, ca, &ca_pem)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
        if let Some((cert, key)) = identity {
            let (cert_pem, key_pem) = (read(CERT_FLAG, cert)?, read(KEY_FLAG, key)?);
            // Build the rustls config tonic will build, so that a bad pair fails here,
            // naming the flag, rather than at the first call.
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|err| invalid(CERT_FLAG, cert, err))?
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    certificates(CERT_FLAG, cert, &cert_pem)?,
                    private_key(KEY_FLAG, key, &key_pem)?,
                )
                .map_err(|err| {
                    invalid(KEY_FLAG, key, format!("not usable with {CERT_FLAG}: {err}"))
                })?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        Ok(Self {
            config: Some(config),
        })
    }

    /// Whether calls use TLS.
    pub fn is_enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The tonic config, when TLS is on.
    pub fn config(&self) -> Option<&ClientTlsConfig> {
        self.config.as_ref()
    }
}
