//! softphone: a terminal client application of Switchboard.
//!
//! It holds one live presence session (`PresenceService.Connect`) for the identity in its
//! token, prints every offer of an incoming communication, and answers, rejects or hangs
//! up — by itself (`--auto answer|reject|ignore`, for scripts and demos) or on keys typed
//! by a person. It is the device end of the routing flow: a `Route` whose instructions dial
//! `<Client>alice</Client>` rings every softphone of alice.
//!
//! # Layout
//!
//! - [`SoftphoneArgs`]: the flags, each with its `SWITCHBOARD_*` environment fallback;
//! - [`run`] (in [`connection`]): the reconnect loop — a session per connection, backoff
//!   between them, each attempt on the next presence address so a broken stream moves the
//!   device to another replica;
//! - [`session`]: one Connect stream — hello, then offers, answers, timers, status and
//!   hangups;
//! - [`event`]: what the softphone reports, one plain greppable line each
//!   (`offer CM… from=… to=…`, `connected CM…`, `ended CM… reason=…`);
//! - [`keys`]: single-key input from a terminal (or commands piped on stdin).
//!
//! The token is never printed: [`Token`] redacts itself in `Debug`, and errors name the
//! address and the server's message only.
#![forbid(unsafe_code)]

pub mod connection;
pub mod event;
pub mod keys;
pub mod session;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use plumbing::tls::ClientTlsArgs;
use proto::presence::v1 as pb;

pub use connection::{Error, run};
pub use event::Event;

/// The softphone's flags. Every flag has a `SWITCHBOARD_*` environment fallback.
#[derive(Debug, Clone, Args)]
pub struct SoftphoneArgs {
    /// presence-svc addresses (`host:port` or URL), comma-separated. The softphone connects
    /// to the first; when its stream breaks it reconnects to the next one, round-robin, so
    /// it moves to another replica.
    #[arg(
        long = "presence",
        env = "SWITCHBOARD_PRESENCE",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    pub presence: Vec<String>,

    /// The device's token (JWT with scope `presence.register`). The account and identity
    /// come from it. Prefer the environment variable: flags show in `ps`. Never printed.
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: Token,

    /// Device identifier (1 to 128 characters from [A-Za-z0-9._:@+-]). Default: the one
    /// the server generates at the first connection, kept for every reconnection.
    #[arg(long, env = "SWITCHBOARD_DEVICE_ID")]
    pub device_id: Option<String>,

    /// Initial status of the device. Only `available` devices are offered communications.
    #[arg(long, env = "SWITCHBOARD_STATUS", value_enum, default_value_t = DeviceStatus::Available)]
    pub status: DeviceStatus,

    /// Answer offers by itself: `answer` accepts, `reject` rejects, `ignore` lets them ring
    /// until they time out. Without it, a person answers with keys when stdin is a
    /// terminal (a answer, r reject here, e reject everywhere, h hang up, s status, q quit),
    /// or commands are read from stdin (the same letters).
    #[arg(long, env = "SWITCHBOARD_AUTO", value_enum)]
    pub auto: Option<AutoMode>,

    /// With `--auto answer|reject`: how long to let an offer ring before answering it.
    #[arg(long, env = "SWITCHBOARD_ANSWER_AFTER_MS", default_value_t = 0)]
    pub answer_after_ms: u64,

    /// Hang up each accepted communication after this many milliseconds (default: stay
    /// connected until the other side hangs up, or `h`).
    #[arg(long, env = "SWITCHBOARD_HANGUP_AFTER_MS")]
    pub hangup_after_ms: Option<u64>,

    /// The reason given when rejecting (by `--auto reject`, `r` or `e`).
    #[arg(long, env = "SWITCHBOARD_REJECT_REASON", value_enum, default_value_t = RejectAs::Declined)]
    pub reject_reason: RejectAs,

    /// Where `--auto reject` declines: `here` (this device; the others keep ringing) or
    /// `everywhere` (every device of the communication; its outcome is REJECTED).
    #[arg(long, env = "SWITCHBOARD_DECLINE_SCOPE", value_enum, default_value_t = DeclineScope::Here)]
    pub decline_scope: DeclineScope,

    /// TLS to presence-svc: `--tls-ca` turns it on, `--tls-cert`/`--tls-key` present a
    /// client certificate. Plain text by default.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl SoftphoneArgs {
    /// Arguments for `token` against `presence`, with every other flag at its default.
    pub fn new(presence: Vec<String>, token: &str) -> Self {
        Self {
            presence,
            token: Token(token.to_owned()),
            device_id: None,
            status: DeviceStatus::Available,
            auto: None,
            answer_after_ms: 0,
            hangup_after_ms: None,
            reject_reason: RejectAs::Declined,
            decline_scope: DeclineScope::Here,
            tls: ClientTlsArgs::default(),
        }
    }

    /// The delay before an automatic answer.
    pub fn answer_after(&self) -> Duration {
        Duration::from_millis(self.answer_after_ms)
    }

    /// The delay before an automatic hangup, if any.
    pub fn hangup_after(&self) -> Option<Duration> {
        self.hangup_after_ms.map(Duration::from_millis)
    }
}

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token itself, for the `authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Token {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the token is empty".into());
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A status a device can set itself to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceStatus {
    /// Takes communications.
    Available,
    /// Engaged; not offered communications.
    Busy,
    /// Away from the device; not offered communications.
    Away,
    /// Do not disturb; not offered communications.
    Dnd,
}

impl DeviceStatus {
    /// The wire value.
    pub fn to_proto(self) -> pb::Status {
        match self {
            Self::Available => pb::Status::Available,
            Self::Busy => pb::Status::Busy,
            Self::Away => pb::Status::Away,
            Self::Dnd => pb::Status::DoNotDisturb,
        }
    }

    /// The next status for the `s` key: available → busy → away → dnd → available.
    pub fn next(self) -> Self {
        match self {
            Self::Available => Self::Busy,
            Self::Busy => Self::Away,
            Self::Away => Self::Dnd,
            Self::Dnd => Self::Available,
        }
    }
}

/// What the softphone does with offers by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoMode {
    /// Accept every offer.
    Answer,
    /// Reject every offer.
    Reject,
    /// Let every offer ring until it is cancelled.
    Ignore,
}

/// Where a rejection applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeclineScope {
    /// Only this device's leg ends.
    Here,
    /// Every device's leg ends.
    Everywhere,
}

impl DeclineScope {
    /// The wire value.
    pub fn to_proto(self) -> pb::DeclineScope {
        match self {
            Self::Here => pb::DeclineScope::Here,
            Self::Everywhere => pb::DeclineScope::Everywhere,
        }
    }
}

/// The reason a rejection gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RejectAs {
    /// The user declined.
    Declined,
    /// The device is busy (the router's outcome becomes BUSY when every device says so).
    Busy,
}

impl RejectAs {
    /// The wire value.
    pub fn to_proto(self) -> pb::RejectReason {
        match self {
            Self::Declined => pb::RejectReason::Declined,
            Self::Busy => pb::RejectReason::Busy,
        }
    }
}

/// What a person (or a script on stdin) asks the softphone to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Accept the oldest ringing offer.
    Answer,
    /// Reject the oldest ringing offer on this device only (the others keep ringing).
    Reject,
    /// Reject the oldest ringing offer for every device of the communication.
    RejectEverywhere,
    /// Hang up the most recently connected communication.
    Hangup,
    /// Move to the next status.
    CycleStatus,
    /// Print the keys.
    Help,
    /// Close the session and exit.
    Quit,
}

impl Command {
    /// The command for a typed character, if it is one.
    pub fn from_key(key: char) -> Option<Self> {
        match key.to_ascii_lowercase() {
            'a' => Some(Self::Answer),
            'r' => Some(Self::Reject),
            'e' => Some(Self::RejectEverywhere),
            'h' => Some(Self::Hangup),
            's' => Some(Self::CycleStatus),
            'q' => Some(Self::Quit),
            '?' => Some(Self::Help),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_shows_in_debug() {
        let args = SoftphoneArgs::new(vec!["127.0.0.1:1".into()], "eyJsecret.payload.sig");
        assert!(!format!("{args:?}").contains("eyJsecret"));
    }

    #[test]
    fn status_key_cycles_through_every_settable_status() {
        let mut status = DeviceStatus::Available;
        let mut seen = vec![];
        for _ in 0..4 {
            status = status.next();
            seen.push(status);
        }
        use DeviceStatus::*;
        assert_eq!(seen, [Busy, Away, Dnd, Available]);
    }

    #[test]
    fn keys_map_to_commands_in_either_case() {
        assert_eq!(Command::from_key('A'), Some(Command::Answer));
        assert_eq!(Command::from_key('q'), Some(Command::Quit));
        assert_eq!(Command::from_key('x'), None);
    }
}
