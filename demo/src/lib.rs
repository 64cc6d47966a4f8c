//! The demo scenario of Switchboard (`scripts/stack demo`), as a program that calls a
//! running stack over gRPC and checks every answer.
//!
//! `scripts/stack` only starts and stops processes: etcd, the three services, and for a
//! demo nothing more. It seeds the demo account and writes where everything is and the
//! tokens to its environment file (`.stack/env`); this crate reads that file
//! ([`StackEnv`]), starts the softphones the scenario needs itself (real `softphone`
//! processes for the demo identity, [`softphone`]), runs the six steps ([`run`]: a
//! communication answered, hung up, routed while offline, refused over a limit, a staged
//! Dial, a busy agent not rung), prints each communication ([`show`]) and fails at the
//! first answer that is not the expected one. Nothing here calls back into the scripts.
//!
//! - [`env`]: the environment file (then the process environment), and [`Stack`] from it.
//! - [`calls`]: the gRPC calls, with the workspace's generated clients (crate `proto`).
//! - [`scenario`]: the steps and their checks.
#![forbid(unsafe_code)]

pub mod calls;
pub mod env;
pub mod scenario;
pub mod show;
pub mod softphone;

pub use env::StackEnv;
pub use scenario::{Failed, run};

/// The stack the demo runs against: addresses, tokens and the seeded demo account.
#[derive(Debug, Clone)]
pub struct Stack {
    /// presence-svc, `host:port`.
    pub presence: String,
    /// limiter-svc, `host:port`.
    pub limiter: String,
    /// router-svc, `host:port`.
    pub router: String,
    /// Platform token (scope admin): limits and applications.
    pub platform_token: String,
    /// The demo identity's token (Route, Hangup, GetPresence).
    pub demo_token: String,
    /// The demo identity's device token (scope `presence.register`), for softphones.
    pub alice_token: String,
    /// The demo account (`AC_demo`).
    pub account: String,
    /// The identity the demo application dials (`alice`).
    pub identity: String,
    /// The demo application's address (`+15550100`): it dials `identity`, then says
    /// something when that Dial did not connect.
    pub address: String,
}

impl Stack {
    /// Reads the stack from `env`: `PRESENCE_ADDR`, `LIMITER_ADDR`, `ROUTER_ADDR`,
    /// `PLATFORM_TOKEN`, `DEMO_TOKEN`, `ALICE_TOKEN`, and `DEMO_ACCOUNT`,
    /// `DEMO_IDENTITY`, `DEMO_ADDRESS` (defaults: the stack's `AC_demo`, `alice`,
    /// `+15550100`).
    pub fn from_env(env: &StackEnv) -> Result<Self, Failure> {
        let or = |name: &str, default: &str| env.get(name).unwrap_or_else(|| default.to_owned());
        Ok(Self {
            presence: or("PRESENCE_ADDR", "127.0.0.1:50051"),
            limiter: or("LIMITER_ADDR", "127.0.0.1:50052"),
            router: or("ROUTER_ADDR", "127.0.0.1:50053"),
            platform_token: env.require("PLATFORM_TOKEN")?,
            demo_token: env.require("DEMO_TOKEN")?,
            alice_token: env.require("ALICE_TOKEN")?,
            account: or("DEMO_ACCOUNT", "AC_demo"),
            identity: or("DEMO_IDENTITY", "alice"),
            address: or("DEMO_ADDRESS", "+15550100"),
        })
    }
}

/// Why the demo cannot go on: what was expected and what came instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(String);

impl Failure {
    /// A failure saying `what`.
    pub fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}
