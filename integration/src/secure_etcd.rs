//! A test etcd with its security on: TLS on the client URL (optionally requiring client
//! certificates), and etcd's user/password authentication.
//!
//! [`Etcd::start_secure`] makes a throw-away CA, serves TLS with a certificate it issued,
//! and gives the harness a client certificate of its own. [`Etcd::enable_auth`] creates
//! `root`, turns authentication on, and from then on the harness's [`Etcd::client`] logs
//! in as root; [`Etcd::add_user`] creates users whose role may read and write one prefix
//! only. [`secure_common_args`] and [`Etcd::tls_flags`] point services at such an etcd.

use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};
use plumbing::config::CommonArgs;
use plumbing::etcd::EtcdPassword;
use tokio::process::Command;

use crate::certs::{CertFiles, TestCa};
use crate::{Etcd, PLATFORM_KEY_ID, PLATFORM_SECRET, ServiceProcess, common_args, free_port};

/// How a secured test etcd is set up.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdSecurity {
    /// Require a client certificate signed by the test CA (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// etcd's `--auth-token-ttl` in seconds (etcd's default is 300).
    pub auth_token_ttl: Option<u32>,
}

/// An etcd user and its password, as a test hands them to a service.
#[derive(Debug, Clone)]
pub struct EtcdLogin {
    /// The user name.
    pub user: String,
    /// Its password (test-generated; tests check it never shows up in errors or logs).
    pub password: String,
}

/// The TLS files and credentials of a secured [`Etcd`].
#[derive(Debug)]
pub(crate) struct ServerSecurity {
    ca: TestCa,
    server: CertFiles,
    client: CertFiles,
    settings: EtcdSecurity,
    root_password: Option<String>,
}

impl Etcd {
    /// Starts a single-member etcd serving TLS (`https://` client URL) with a certificate
    /// from a fresh test CA, as `security` asks. Authentication is still off: see
    /// [`Etcd::enable_auth`].
    pub async fn start_secure(security: EtcdSecurity) -> Self {
        let ca = TestCa::new("switchboard-test-etcd-ca");
        let server = ca.issue("etcd-server");
        let client = ca.issue("harness-client");
        Self::start_configured(
            false,
            Some(ServerSecurity {
                ca,
                server,
                client,
                settings: security,
                root_password: None,
            }),
        )
        .await
    }

    /// The CA that signed this etcd's certificate (to issue more client certificates).
    /// Panics for a plain etcd.
    pub fn ca(&self) -> &TestCa {
        &self.secured().ca
    }

    /// `--etcd-ca`, `--etcd-cert`, `--etcd-key` for a service binary against this etcd.
    pub fn tls_flags(&self) -> Vec<String> {
        let security = self.secured();
        [
            ("--etcd-ca", security.ca.ca_pem()),
            ("--etcd-cert", security.client.cert.as_path()),
            ("--etcd-key", security.client.key.as_path()),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
        .collect()
    }

    /// Creates `root`, turns authentication on, and makes [`Etcd::client`] log in as root.
    pub async fn enable_auth(&mut self) {
        let root_password = random_password();
        let mut client = self.client().await;
        must(
            client.user_add("root", root_password.as_str(), None).await,
            "add root",
        );
        must(client.user_grant_role("root", "root").await, "grant root");
        must(client.auth_enable().await, "auth enable");
        self.secured_mut().root_password = Some(root_password);
    }

    /// Creates `user` with a random password and a role of the same name that may read and
    /// write every key under `prefix`, and nothing else.
    pub async fn add_user(&self, user: &str, prefix: &str) -> EtcdLogin {
        let password = random_password();
        let mut client = self.client().await;
        must(client.role_add(user).await, "add role");
        must(
            client
                .role_grant_permission(user, Permission::read_write(prefix).with_prefix())
                .await,
            "grant readwrite on the prefix",
        );
        must(
            client.user_add(user, password.as_str(), None).await,
            "add user",
        );
        must(client.user_grant_role(user, user).await, "grant role");
        EtcdLogin {
            user: user.to_owned(),
            password,
        }
    }

    /// The etcd arguments this etcd's security asks for.
    pub(crate) fn security_args(&self, command: &mut Command) {
        let Some(security) = &self.security else {
            return;
        };
        command
            .arg("--cert-file")
            .arg(&security.server.cert)
            .arg("--key-file")
            .arg(&security.server.key);
        if security.settings.client_cert_auth {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(security.ca.ca_pem());
        }
        if let Some(ttl) = security.settings.auth_token_ttl {
            command.arg("--auth-token-ttl").arg(ttl.to_string());
        }
    }

    /// How the harness's own clients connect: TLS with its client certificate, and as root
    /// once authentication is on. `None` for a plain etcd.
    pub(crate) fn client_options(&self) -> Option<ConnectOptions> {
        let security = self.security.as_ref()?;
        let read = |path: &std::path::Path| {
            std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
        };
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(security.ca.ca_pem())))
            .identity(Identity::from_pem(
                read(&security.client.cert),
                read(&security.client.key),
            ));
        let options = ConnectOptions::new().with_tls(tls);
        Some(match &security.root_password {
            Some(password) => options.with_user("root", password.as_str()),
            None => options,
        })
    }

    fn secured(&self) -> &ServerSecurity {
        self.security
            .as_ref()
            .unwrap_or_else(|| panic!("this etcd was not started with Etcd::start_secure"))
    }

    fn secured_mut(&mut self) -> &mut ServerSecurity {
        self.security
            .as_mut()
            .unwrap_or_else(|| panic!("this etcd was not started with Etcd::start_secure"))
    }
}

impl ServiceProcess {
    /// Runs `name` against `etcd` under `prefix` as [`ServiceProcess::start_with_env`]
    /// would, for a start-up that must fail: waits (at most 30 s) for it to exit, and
    /// returns its exit status and everything it logged.
    pub async fn run_until_exit(
        name: &str,
        etcd: &Etcd,
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String) {
        let run = Command::new(Self::binary(name))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--etcd")
            .arg(&etcd.endpoint)
            .arg("--etcd-prefix")
            .arg(prefix)
            .arg("--platform-key-id")
            .arg(PLATFORM_KEY_ID)
            .args(args)
            .env("SWITCHBOARD_PLATFORM_SECRET", PLATFORM_SECRET)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(std::time::Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within 30 s"))
            .unwrap_or_else(|err| panic!("cannot run {name}: {err}"));
        let mut logs = String::from_utf8_lossy(&output.stdout).into_owned();
        logs.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status, logs)
    }
}

/// The shared flags for a test server against a secured `etcd` under `prefix`: its CA,
/// the harness's client certificate, and `login` if given.
pub fn secure_common_args(etcd: &Etcd, prefix: &str, login: Option<&EtcdLogin>) -> CommonArgs {
    let security = etcd.secured();
    let mut args = common_args(etcd, prefix);
    args.etcd.ca = Some(security.ca.ca_pem().to_owned());
    args.etcd.cert = Some(security.client.cert.clone());
    args.etcd.key = Some(security.client.key.clone());
    if let Some(login) = login {
        args.etcd.user = Some(login.user.clone());
        args.etcd.password = Some(EtcdPassword::new(login.password.clone()));
    }
    args
}

/// A password no test can guess: 24 random hex digits behind a recognisable marker.
fn random_password() -> String {
    format!(
        "pw-{:016x}{:08x}",
        crate::rand_u64(),
        crate::rand_u64() as u32
    )
}

fn must<T>(result: Result<T, etcd_client::Error>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("etcd {what}: {err}"))
}
