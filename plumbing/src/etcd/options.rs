//! How a session reaches etcd: endpoints and prefix, TLS (verifying etcd's certificate,
//! optionally presenting a client certificate) and etcd's user/password authentication.
//!
//! [`EtcdOptions::from_args`] turns the shared flags into these options and refuses
//! half-configured combinations at start-up, naming the flag. The password is read from
//! `SWITCHBOARD_ETCD_PASSWORD` or `--etcd-password-file`, never from a flag, and is kept in
//! an [`EtcdPassword`] whose `Debug` does not show it.

use std::path::Path;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use clap::Args;

/// The environment variable the etcd password is read from.
pub const PASSWORD_ENV: &str = "SWITCHBOARD_ETCD_PASSWORD";

/// A flag (or variable) that is missing, contradicts another, or names an unusable file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct EtcdConfigError {
    /// The flag or environment variable at fault.
    pub flag: &'static str,
    /// What is wrong with it, and what would fix it.
    pub problem: String,
}

impl EtcdConfigError {
    fn new(flag: &'static str, problem: impl Into<String>) -> Self {
        Self {
            flag,
            problem: problem.into(),
        }
    }
}

/// An etcd password: a [`Secret`](crate::flags::Secret), so its `Debug` prints
/// `<redacted>` and it has no `Display`.
pub type EtcdPassword = crate::flags::Secret;

/// The etcd flags of every server (part of [`crate::config::CommonArgs`]).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. `http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(
        long = "etcd",
        env = "SWITCHBOARD_ETCD",
        value_name = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// Key prefix under which all of this deployment's state lives in etcd.
    #[arg(
        long = "etcd-prefix",
        env = "SWITCHBOARD_ETCD_PREFIX",
        value_name = "ETCD_PREFIX",
        default_value = "/switchboard"
    )]
    pub prefix: String,

    /// CA certificate (PEM) that signed etcd's server certificate. Turns TLS on: endpoints
    /// without a scheme become `https://`, `http://` ones are refused.
    #[arg(long = "etcd-ca", env = "SWITCHBOARD_ETCD_CA", value_name = "PEM")]
    pub ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) presented to an etcd running with `--client-cert-auth`;
    /// needs `--etcd-key` and `--etcd-ca`.
    #[arg(long = "etcd-cert", env = "SWITCHBOARD_ETCD_CERT", value_name = "PEM")]
    pub cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long = "etcd-key", env = "SWITCHBOARD_ETCD_KEY", value_name = "PEM")]
    pub key: Option<std::path::PathBuf>,

    /// etcd user name, for an etcd with authentication enabled. Its password comes from
    /// the SWITCHBOARD_ETCD_PASSWORD environment variable or `--etcd-password-file`; there
    /// is deliberately no flag for it (flags show in `ps`).
    #[arg(long = "etcd-user", env = "SWITCHBOARD_ETCD_USER", value_name = "NAME")]
    pub user: Option<String>,

    /// File holding the password of `--etcd-user` (a trailing newline is ignored).
    #[arg(
        long = "etcd-password-file",
        env = "SWITCHBOARD_ETCD_PASSWORD_FILE",
        value_name = "PATH"
    )]
    pub password_file: Option<std::path::PathBuf>,

    /// The password of `--etcd-user` from SWITCHBOARD_ETCD_PASSWORD (never a flag).
    #[arg(skip = password_from_env())]
    pub password: Option<EtcdPassword>,
}

impl EtcdArgs {
    /// Plain-text, unauthenticated access to `endpoints` under `prefix` (tests, tools).
    pub fn plain(endpoints: Vec<String>, prefix: &str) -> Self {
        Self {
            endpoints,
            prefix: prefix.to_owned(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            password: None,
        }
    }
}

/// The password from [`PASSWORD_ENV`], if set and not empty.
pub fn password_from_env() -> Option<EtcdPassword> {
    std::env::var(PASSWORD_ENV)
        .ok()
        .filter(|password| !password.is_empty())
        .map(EtcdPassword::new)
}

/// Reads a password file, ignoring a trailing newline (what `echo` and editors leave).
fn password_from_file(path: &Path) -> Result<EtcdPassword, EtcdConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        EtcdConfigError::new(
            "--etcd-password-file",
            format!("cannot read {}: {err}", path.display()),
        )
    })?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(EtcdConfigError::new(
            "--etcd-password-file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(EtcdPassword::new(password))
}

/// The etcd user a session logs in as.
#[derive(Debug, Clone)]
pub struct EtcdCredentials {
    /// The etcd user name.
    pub user: String,
    /// Its password.
    pub password: EtcdPassword,
}

/// TLS towards etcd, with the PEM files already read (so a missing file fails at start-up).
#[derive(Clone)]
pub struct EtcdTls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdTls {
    /// Reads the CA (`--etcd-ca`) and optionally a client certificate and key.
    pub fn from_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, EtcdConfigError> {
        let identity = match identity {
            Some((cert, key)) => Some((
                read_pem("--etcd-cert", cert, "CERTIFICATE")?,
                read_pem("--etcd-key", key, "PRIVATE KEY")?,
            )),
            None => None,
        };
        Ok(Self {
            ca: read_pem("--etcd-ca", ca, "CERTIFICATE")?,
            identity,
        })
    }

    fn options(&self) -> TlsOptions {
        let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca));
        match &self.identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

/// Everything [`super::EtcdSession::connect`] needs.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Endpoints, each `http://` or `https://` (`https://` exactly when `tls` is set).
    pub endpoints: Vec<String>,
    /// The deployment's key prefix.
    pub prefix: String,
    /// TLS, when etcd serves it.
    pub tls: Option<EtcdTls>,
    /// The user to log in as, when etcd has authentication enabled.
    pub credentials: Option<EtcdCredentials>,
}

impl EtcdOptions {
    /// Plain-text, unauthenticated access (development and tests).
    pub fn plain(endpoints: Vec<String>, prefix: &str) -> Self {
        Self {
            endpoints,
            prefix: prefix.to_owned(),
            tls: None,
            credentials: None,
        }
    }

    /// The options the shared flags ask for; half-configured combinations are errors.
    pub fn from_args(args: &EtcdArgs) -> Result<Self, EtcdConfigError> {
        let tls = match (&args.ca, &args.cert, &args.key) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(EtcdConfigError::new(
                    "--etcd-cert",
                    "a client certificate needs TLS: give --etcd-ca too",
                ));
            }
            (Some(_), Some(_), None) => {
                return Err(EtcdConfigError::new(
                    "--etcd-cert",
                    "needs --etcd-key (the certificate's private key)",
                ));
            }
            (Some(_), None, Some(_)) => {
                return Err(EtcdConfigError::new(
                    "--etcd-key",
                    "needs --etcd-cert (the certificate it belongs to)",
                ));
            }
            (Some(ca), cert, key) => Some(EtcdTls::from_files(
                ca,
                cert.as_deref().zip(key.as_deref()),
            )?),
        };
        let endpoints = args
            .endpoints
            .iter()
            .map(|endpoint| endpoint_url(endpoint, tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            endpoints,
            prefix: args.prefix.clone(),
            tls,
            credentials: credentials(args)?,
        })
    }

    /// etcd-client's options for these: TLS, the user, and refreshing its token when etcd
    /// says it expired.
    pub(crate) fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new();
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.options());
        }
        if let Some(credentials) = &self.credentials {
            options = options
                .with_user(credentials.user.clone(), credentials.password.to_string())
                .with_auto_token_refresh(true);
        }
        options
    }
}

fn credentials(args: &EtcdArgs) -> Result<Option<EtcdCredentials>, EtcdConfigError> {
    let password = match (&args.password, &args.password_file) {
        (Some(_), Some(_)) => {
            return Err(EtcdConfigError::new(
                "--etcd-password-file",
                format!("{PASSWORD_ENV} is set too: give the password one way only"),
            ));
        }
        (Some(password), None) => Some(password.clone()),
        (None, Some(path)) => Some(password_from_file(path)?),
        (None, None) => None,
    };
    match (args.user.as_deref().filter(|u| !u.is_empty()), password) {
        (Some(user), Some(password)) => Ok(Some(EtcdCredentials {
            user: user.to_owned(),
            password,
        })),
        (Some(_), None) => Err(EtcdConfigError::new(
            "--etcd-user",
            format!("needs a password: set {PASSWORD_ENV} or give --etcd-password-file"),
        )),
        (None, Some(_)) => Err(EtcdConfigError::new(
            "--etcd-user",
            format!(
                "an etcd password is configured ({PASSWORD_ENV} or --etcd-password-file) but no user to log in as"
            ),
        )),
        (None, None) => Ok(None),
    }
}

/// `endpoint` with the scheme TLS asks for: a bare `host:port` gets it, a contradicting
/// one is refused rather than silently rewritten.
fn endpoint_url(endpoint: &str, tls: bool) -> Result<String, EtcdConfigError> {
    let (plain, secure) = (
        endpoint.starts_with("http://"),
        endpoint.starts_with("https://"),
    );
    match (tls, plain, secure) {
        (true, true, _) => Err(EtcdConfigError::new(
            "--etcd",
            format!("{endpoint} is plain http but --etcd-ca turns TLS on: use https://"),
        )),
        (false, _, true) => Err(EtcdConfigError::new(
            "--etcd",
            format!("{endpoint} is https: give --etcd-ca, the CA that signed etcd's certificate"),
        )),
        (true, false, false) => Ok(format!("https://{endpoint}")),
        (false, false, false) => Ok(format!("http://{endpoint}")),
        _ => Ok(endpoint.to_owned()),
    }
}

/// Reads a PEM file, checking it holds a `label` block so a swapped file fails here.
fn read_pem(flag: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, EtcdConfigError> {
    let bytes = std::fs::read(path).map_err(|err| {
        EtcdConfigError::new(flag, format!("cannot read {}: {err}", path.display()))
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let holds_label = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(label));
    if !holds_label {
        return Err(EtcdConfigError::new(
            flag,
            format!("{} holds no PEM {label}", path.display()),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn args(flags: &[&str]) -> EtcdArgs {
        Cli::try_parse_from(std::iter::once("test").chain(flags.iter().copied()))
            .unwrap()
            .etcd
    }

    fn refusal(args: &EtcdArgs) -> EtcdConfigError {
        EtcdOptions::from_args(args).unwrap_err()
    }

    #[test]
    fn plain_flags_give_plain_options() {
        let options = EtcdOptions::from_args(&args(&["--etcd", "10.0.0.1:2379"])).unwrap();
        assert_eq!(options.endpoints, ["http://10.0.0.1:2379"]);
        assert!(options.tls.is_none() && options.credentials.is_none());
    }

    #[test]
    fn half_configured_tls_is_refused_naming_the_flag() {
        assert_eq!(
            refusal(&args(&["--etcd-ca", "/ca", "--etcd-cert", "/c"])).flag,
            "--etcd-cert"
        );
        assert_eq!(
            refusal(&args(&["--etcd-ca", "/ca", "--etcd-key", "/k"])).flag,
            "--etcd-key"
        );
        assert_eq!(
            refusal(&args(&["--etcd-cert", "/c", "--etcd-key", "/k"])).flag,
            "--etcd-cert"
        );
        assert_eq!(
            refusal(&args(&["--etcd-ca", "/nonexistent/ca.pem"])).flag,
            "--etcd-ca"
        );
        assert_eq!(refusal(&args(&["--etcd", "https://e:2379"])).flag, "--etcd");
    }

    #[test]
    fn a_user_needs_exactly_one_password_source() {
        assert_eq!(refusal(&args(&["--etcd-user", "sb"])).flag, "--etcd-user");
        let mut with_env = args(&["--etcd-password-file", "/p"]);
        with_env.password = Some(EtcdPassword::new("from-env"));
        assert_eq!(refusal(&with_env).flag, "--etcd-password-file");
        let missing = refusal(&args(&[
            "--etcd-user",
            "sb",
            "--etcd-password-file",
            "/nonexistent",
        ]));
        assert_eq!(missing.flag, "--etcd-password-file");
        let mut env_only = args(&[]);
        env_only.password = Some(EtcdPassword::new("from-env"));
        assert_eq!(refusal(&env_only).flag, "--etcd-user");
    }

    #[test]
    fn a_password_file_loses_its_trailing_newline_and_never_shows() {
        let dir = std::env::temp_dir().join(format!("sb-etcd-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("password");
        std::fs::write(&path, "s3cret-value\n").unwrap();
        let path_text = path.to_str().unwrap();
        let options = EtcdOptions::from_args(&args(&[
            "--etcd-user",
            "sb",
            "--etcd-password-file",
            path_text,
        ]))
        .unwrap();
        let credentials = options.credentials.clone().unwrap();
        assert_eq!(credentials.password, EtcdPassword::new("s3cret-value"));
        assert!(!format!("{options:?}").contains("s3cret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn there_is_no_password_flag() {
        let parsed = Cli::try_parse_from(["test", "--etcd-password", "x"]);
        assert!(parsed.is_err());
    }
}
