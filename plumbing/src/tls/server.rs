//! The server side of TLS: the files, and the current rustls config swapped on reload.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use tokio_rustls::rustls::{self, ServerConfig};

use super::{
    CERT_FLAG, CLIENT_CA_FLAG, KEY_FLAG, TlsArgs, TlsError, certificates, incomplete, invalid,
    private_key, provider, read, roots,
};

/// The PEM files a server is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerFiles {
    pub(super) cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// The contents of [`ServerFiles`] at one moment, to notice changes. Holds the key: never
/// logged, no `Debug`.
#[derive(PartialEq, Eq)]
pub(super) struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The server side: the current rustls config, swapped on reload.
#[derive(Clone)]
pub struct ServerTls {
    pub(super) files: Arc<ServerFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    /// `--tls-max-handshakes`.
    pub(super) max_handshakes: usize,
    /// `--tls-reload-interval`; `None`: on SIGHUP only.
    pub(super) reload_interval: Option<std::time::Duration>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("max_handshakes", &self.max_handshakes)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The TLS server `args` configure: `None` without `--tls-cert`/`--tls-key` (plain
    /// text), an error naming the flag and file when one is missing or unusable.
    pub fn from_args(args: &TlsArgs) -> Result<Option<Self>, TlsError> {
        let (cert, key) = match (&args.tls_cert, &args.tls_key) {
            (None, None) if args.tls_client_ca.is_some() => {
                return Err(TlsError::Needs {
                    flag: CLIENT_CA_FLAG,
                    needs: "--tls-cert and --tls-key (clients are checked during the TLS handshake)",
                });
            }
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(incomplete(CERT_FLAG, KEY_FLAG)),
            (None, Some(_)) => return Err(incomplete(KEY_FLAG, CERT_FLAG)),
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        };
        let files = ServerFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone(),
        };
        let config = files.read()?.server_config(&files)?;
        Ok(Some(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(config)),
            max_handshakes: args.tls_max_handshakes.max(1) as usize,
            reload_interval: Some(args.tls_reload_interval).filter(|d| !d.is_zero()),
        }))
    }

    /// Whether clients must present a certificate (`--tls-client-ca`).
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The config new connections are handshaken with.
    pub(super) fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the files and swaps the config in when `contents` differ from `seen` (always
    /// when `seen` is `None`); `seen` becomes what was read. A file that cannot be read or
    /// used keeps the current config. Ok(true) when a new config is in place.
    pub(super) fn reload(&self, seen: &mut Option<Contents>) -> Result<bool, TlsError> {
        let contents = self.files.read()?;
        if seen.as_ref() == Some(&contents) {
            return Ok(false);
        }
        let built = contents.server_config(&self.files);
        *seen = Some(contents);
        let config = built?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(true)
    }
}

impl ServerFiles {
    pub(super) fn read(&self) -> Result<Contents, TlsError> {
        Ok(Contents {
            cert: read(CERT_FLAG, &self.cert)?,
            key: read(KEY_FLAG, &self.key)?,
            client_ca: self
                .client_ca
                .as_deref()
                .map(|path| read(CLIENT_CA_FLAG, path))
                .transpose()?,
        })
    }
}

impl Contents {
    /// A rustls server config with ALPN `h2`, requiring client certificates signed by the
    /// client CA when there is one.
    fn server_config(&self, files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certificates(CERT_FLAG, &files.cert, &self.cert)?;
        let key = private_key(KEY_FLAG, &files.key, &self.key)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| invalid(CERT_FLAG, &files.cert, err))?;
        let builder = match (&files.client_ca, &self.client_ca) {
            (Some(path), Some(pem)) => {
                let roots = Arc::new(roots(CLIENT_CA_FLAG, path, pem)?);
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|err| invalid(CLIENT_CA_FLAG, path, err))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|err| {
            invalid(
                KEY_FLAG,
                &files.key,
                format!("not usable with {CERT_FLAG}: {err}"),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Writes a fresh self-signed certificate and its key over `cert` and `key`.
    fn write_pair(cert: &std::path::Path, key: &std::path::Path) {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(key, issued.signing_key.serialize_pem()).unwrap();
        std::fs::write(cert, issued.cert.pem()).unwrap();
    }

    #[test]
    fn reload_swaps_on_change_and_keeps_the_config_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        write_pair(&cert, &key);
        let args = TlsArgs {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..TlsArgs::default()
        };
        let tls = ServerTls::from_args(&args).unwrap().unwrap();
        assert_eq!(tls.current().alpn_protocols, vec![b"h2".to_vec()]);
        let mut seen = Some(tls.files.read().unwrap());
        let first = tls.current();

        assert!(!tls.reload(&mut seen).unwrap(), "unchanged files");
        assert!(Arc::ptr_eq(&first, &tls.current()));

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
        let err = tls.reload(&mut seen).unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert"), "{err}");
        assert!(
            Arc::ptr_eq(&first, &tls.current()),
            "a bad file keeps the config"
        );
        assert!(
            !tls.reload(&mut seen).unwrap(),
            "the same bad file is not retried"
        );

        write_pair(&cert, &key);
        assert!(tls.reload(&mut seen).unwrap());
        assert!(
            !Arc::ptr_eq(&first, &tls.current()),
            "new connections get the new config"
        );

        // Another key than the certificate's: refused, naming the key flag.
        let (other_cert, other_key) = (dir.path().join("o.pem"), dir.path().join("ok.pem"));
        write_pair(&other_cert, &other_key);
        std::fs::copy(&other_key, &key).unwrap();
        let err = tls.reload(&mut seen).unwrap_err().to_string();
        assert!(
            err.starts_with("--tls-key") && err.contains("--tls-cert"),
            "{err}"
        );
    }
}
