//! The reconnect loop: one [`Session`] after another, each on the next presence address,
//! with exponential backoff between attempts, until the user quits, the caller's shutdown
//! future resolves, or the server refuses the device for good.

use std::future::Future;
use std::time::Duration;

use plumbing::client::CallCredentials;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::session::{Ending, Memory, Session};
use crate::{Command, Event, SoftphoneArgs};

/// First wait before reconnecting.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the softphone stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--presence` was empty.
    #[error("no presence address given (--presence / SWITCHBOARD_PRESENCE)")]
    NoAddress,
    /// A `--presence` entry is not an address.
    #[error("presence address `{address}` is not usable: {reason}")]
    Address {
        /// The entry.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS flag or file is unusable (the message names the flag and the file).
    #[error("TLS: {0}")]
    Tls(#[from] plumbing::tls::TlsError),
    /// The token has characters that cannot travel in gRPC metadata.
    #[error("the token cannot be sent: it must be printable ASCII (a JWT)")]
    TokenNotAscii,
    /// The server refused the session in a way retrying cannot fix (bad or expired token,
    /// missing scope, a field rule).
    #[error("{address} refused the session ({code:?}): {message}")]
    Refused {
        /// The presence address.
        address: String,
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// Another Connect took this device over (or it was evicted); reconnecting would take
    /// it back and start a tug of war, so the softphone stops.
    #[error(
        "the session on {address} was taken over: {message} (does another softphone use this device id?)"
    )]
    Displaced {
        /// The presence address.
        address: String,
        /// The server's message.
        message: String,
    },
}

/// Runs the softphone until `shutdown` resolves (Ok), the user quits (Ok), or the device is
/// refused for good (Err). Reports everything on `events`; reads person or script commands
/// from `commands` (its closing only stops command input).
pub async fn run(
    args: SoftphoneArgs,
    commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let result = tokio::select! {
        result = reconnect_loop(&args, commands, &events) => result,
        () = shutdown => Ok(()),
    };
    let _ = events.send(Event::Bye);
    result
}

async fn reconnect_loop(
    args: &SoftphoneArgs,
    commands: mpsc::Receiver<Command>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), Error> {
    if args.presence.is_empty() {
        return Err(Error::NoAddress);
    }
    let tls = plumbing::tls::ClientTls::from_args(&args.tls)?;
    let channels = args
        .presence
        .iter()
        .map(|address| {
            plumbing::client::channel_with(address, &tls).map_err(|err| Error::Address {
                address: address.clone(),
                reason: err.to_string(),
            })
        })
        .collect::<Result<Vec<Channel>, Error>>()?;
    let credentials =
        CallCredentials::bearer(args.token.expose()).map_err(|_| Error::TokenNotAscii)?;
    let mut memory = Memory {
        device_id: args.device_id.clone(),
        status: args.status,
    };
    let mut commands = Some(commands);
    let mut backoff = Backoff::default();
    let mut index = 0;
    loop {
        let address = &args.presence[index];
        let _ = events.send(Event::Connecting {
            address: address.clone(),
        });
        let opened =
            Session::open(channels[index].clone(), &credentials, args, &memory, events).await;
        let status = match opened {
            Ok((session, device)) => {
                backoff.reset();
                memory.device_id = Some(device.device_id.clone());
                let _ = events.send(Event::Registered {
                    address: address.clone(),
                    device,
                });
                match session.run(&mut memory, &mut commands).await {
                    Ending::Quit => return Ok(()),
                    Ending::Broken(status) => refused_in_session(address, status)?,
                }
            }
            Err(status) => refused_at_open(address, status)?,
        };
        index = (index + 1) % args.presence.len();
        let wait = backoff.next_wait();
        let _ = events.send(Event::Disconnected {
            address: address.clone(),
            reason: one_line(&status),
            retry_in: wait,
            next: args.presence[index].clone(),
        });
        if wait_or_quit(wait, &mut commands, events).await {
            return Ok(());
        }
    }
}

/// A status ending an opening attempt: fatal when retrying cannot help, else passed on.
fn refused_at_open(address: &str, status: Status) -> Result<Status, Error> {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
            Err(Error::Refused {
                address: address.to_owned(),
                code: status.code(),
                message: status.message().to_owned(),
            })
        }
        _ => Ok(status),
    }
}

/// A status ending a registered session: ABORTED means the device was taken over.
fn refused_in_session(address: &str, status: Status) -> Result<Status, Error> {
    if status.code() == Code::Aborted {
        return Err(Error::Displaced {
            address: address.to_owned(),
            message: status.message().to_owned(),
        });
    }
    refused_at_open(address, status)
}

/// Sleeps `wait`, answering commands meanwhile; true when the user quit.
async fn wait_or_quit(
    wait: Duration,
    commands: &mut Option<mpsc::Receiver<Command>>,
    events: &mpsc::UnboundedSender<Event>,
) -> bool {
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        let command = async {
            match commands.as_mut() {
                Some(receiver) => receiver.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut sleep => return false,
            command = command => match command {
                Some(Command::Quit) => return true,
                Some(Command::Help) => { let _ = events.send(Event::Help); }
                Some(_) => { let _ = events.send(Event::Note("not connected; reconnecting".into())); }
                None => *commands = None,
            },
        }
    }
}

/// A status as one line: code and message.
fn one_line(status: &Status) -> String {
    let message = status
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

/// Exponential backoff with jitter, reset by a successful registration.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// The wait before the next attempt: 250 ms doubling up to 5 s, each ±20 %.
    fn next_wait(&mut self) -> Duration {
        let base = BACKOFF_START
            .saturating_mul(1 << self.failures.min(10))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(rand::random_range(0.8..1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next_wait();
        assert!(first >= Duration::from_millis(200) && first <= Duration::from_millis(300));
        for _ in 0..10 {
            backoff.next_wait();
        }
        assert!(backoff.next_wait() <= Duration::from_secs(6));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(300));
    }

    #[test]
    fn bad_tokens_are_fatal_and_unavailability_is_not() {
        assert!(refused_at_open("a", Status::unauthenticated("expired")).is_err());
        assert!(refused_at_open("a", Status::permission_denied("scope")).is_err());
        assert!(refused_at_open("a", Status::unavailable("down")).is_ok());
        assert!(refused_in_session("a", Status::aborted("replaced")).is_err());
        assert!(refused_in_session("a", Status::unavailable("stopping")).is_ok());
    }
}
