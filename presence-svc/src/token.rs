//! `presence-svc token`: mints one JWT for developers and operators (docs/CONTRACT.md §4).

use clap::Args;
use plumbing::auth::jwt::{self, TokenRequest};
use plumbing::auth::{Scope, unix_now};

/// Flags of `presence-svc token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Key id to sign with (the `kid` header): the platform key id or an account key id.
    #[arg(long)]
    pub key_id: String,
    /// The key's secret. Prefer the environment: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_TOKEN_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Account the token acts for (`sub`); `*` only with the platform key.
    #[arg(long)]
    pub account: String,
    /// Client identity the token speaks for (needed to register presence).
    #[arg(long)]
    pub identity: Option<String>,
    /// Scope to grant; repeat for several: presence.register, presence.read,
    /// limiter.acquire, limiter.admin, router.route, router.admin, admin.
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<Scope>,
    /// Lifetime in seconds (at most 86400).
    #[arg(long, default_value_t = 3600)]
    pub ttl: i64,
}

/// Mints the token described by `args`.
pub fn mint(args: &TokenArgs) -> Result<String, plumbing::auth::AuthError> {
    jwt::mint(
        &TokenRequest {
            key_id: &args.key_id,
            secret: args.secret.as_bytes(),
            account: &args.account,
            identity: args.identity.as_deref(),
            scopes: &args.scopes,
            ttl_secs: args.ttl,
        },
        unix_now(),
    )
}
