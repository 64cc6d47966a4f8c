//! Certificates generated at test time: a throw-away CA and the leaf certificates it signs,
//! written as PEM files into a temporary folder that lives as long as the [`TestCa`].
//!
//! Every leaf is valid for `localhost` and `127.0.0.1` and for both server and client
//! authentication, so the same pair can serve TLS and present itself for mutual TLS.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    ca_path: PathBuf,
    issued: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `ca.pem` in a fresh folder.
    pub fn new(name: &str) -> Self {
        let mut params = must(
            CertificateParams::new(Vec::<String>::new()),
            "CA parameters",
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = must(KeyPair::generate(), "CA key");
        let issuer = must(CertifiedIssuer::self_signed(params, key), "self-signed CA");
        let dir = must(tempfile::tempdir(), "certificate folder");
        let ca_path = dir.path().join("ca.pem");
        must(
            std::fs::write(&ca_path, issuer.pem()),
            "write CA certificate",
        );
        Self {
            issuer,
            dir,
            ca_path,
            issued: Default::default(),
        }
    }

    /// The CA certificate (PEM file), to trust.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_path
    }

    /// The folder the files live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate with common name `name` for `localhost` and `127.0.0.1`,
    /// usable as server and as client certificate.
    pub fn issue(&self, name: &str) -> CertFiles {
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}-{n}.pem")),
            key: self.dir.path().join(format!("{name}-{n}-key.pem")),
        };
        self.issue_to(name, &files);
        files
    }

    /// Issues a new certificate for `name` and writes it over `files` (for reload tests).
    pub fn issue_to(&self, name: &str, files: &CertFiles) {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = must(CertificateParams::new(names), "leaf parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = must(KeyPair::generate(), "leaf key");
        let cert = must(params.signed_by(&key, &self.issuer), "signed leaf");
        // Key first, then certificate: a reader that sees the new certificate also finds
        // its key.
        write_atomically(&files.key, key.serialize_pem().as_bytes());
        write_atomically(&files.cert, cert.pem().as_bytes());
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, contents: &[u8]) {
    let partial = path.with_extension("partial");
    must(std::fs::write(&partial, contents), "write certificate file");
    must(
        std::fs::rename(&partial, path),
        "move certificate file into place",
    );
}

/// The value, or a panic naming what failed (the harness's way to fail a test's setup).
fn must<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err}"))
}
