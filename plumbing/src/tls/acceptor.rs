//! The accept loop of a TLS server, and certificate reload.
//!
//! One task owns the listener. It accepts TCP connections (with `TCP_NODELAY`, as the
//! plain-text server does) and hands each to a task of its own that runs the handshake
//! with the config current at accept time, under [`HANDSHAKE_TIMEOUT`]: a slow or silent
//! client costs one small task, never the accept loop. Finished handshakes go to tonic
//! through [`TlsIncoming`].
//!
//! At most `--tls-max-handshakes` handshakes run at once (a semaphore, [`Handshakes`]), so
//! a slowloris of half-open connections costs a bounded number of tasks. The loop takes a
//! slot *before* it accepts: while all are taken it accepts nothing, and new connections
//! wait in the kernel's listen backlog (the ClientHello they send waits with them) until a
//! handshake ends, which is within [`HANDSHAKE_TIMEOUT`]. Nothing is closed for being
//! early, and nothing queues in user space; when the backlog itself is full the kernel
//! stops completing new TCP connections. Reaching the cap is logged as a warning at most
//! once per [`CAP_WARNING_EVERY`], with how often it was reached since.
//!
//! The same task reloads the config on SIGHUP and when the files' contents change (read
//! every `--tls-reload-interval`, by default [`RELOAD_POLL`]). Connections already established keep the config they were
//! handshaken with, so a reload never drops a live session. A new file that cannot be used
//! keeps the old config; the warning names the flag and file, never the contents.
//!
//! Everything stops when tonic drops [`TlsIncoming`] (the server stopped accepting), which
//! also closes the listening socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::ServerTls;
use super::server::Contents;

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--tls-max-handshakes`: far more than legitimate clients start within the
/// few milliseconds a handshake takes, few enough that silent ones cost little.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 256;
/// Least time between two warnings that the handshake cap was reached.
const CAP_WARNING_EVERY: Duration = Duration::from_secs(60);
/// How often the certificate files are read to notice a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);
/// Handshaken connections waiting for tonic to take them.
const READY_QUEUE: usize = 64;
/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Handshaken TLS connections, for `serve_with_incoming_shutdown`.
#[derive(Debug)]
pub struct TlsIncoming {
    ready: ReceiverStream<io::Result<TlsStream<TcpStream>>>,
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.ready).poll_next(cx)
    }
}

impl ServerTls {
    /// Serves TLS on `listener`: starts the accept-and-reload task described in the module
    /// docs and returns its connections.
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        self.incoming_with(listener, HANDSHAKE_TIMEOUT)
    }

    /// [`ServerTls::incoming`] with another handshake timeout (tests).
    fn incoming_with(&self, listener: TcpListener, timeout: Duration) -> TlsIncoming {
        let (ready, taken) = mpsc::channel(READY_QUEUE);
        let handshakes = Handshakes::new(self.max_handshakes, timeout);
        tokio::spawn(accept_loop(self.clone(), listener, ready, handshakes));
        TlsIncoming {
            ready: ReceiverStream::new(taken),
        }
    }
}

/// The slots of handshakes in progress (`--tls-max-handshakes`), and the rate-limited
/// warning when they are all taken.
struct Handshakes {
    slots: Arc<Semaphore>,
    max: usize,
    timeout: Duration,
    /// When the last warning was logged.
    warned: Option<Instant>,
    /// Times the cap was reached since the last warning.
    full: u64,
}

impl Handshakes {
    fn new(max: usize, timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            timeout,
            warned: None,
            full: 0,
        }
    }

    /// A free slot, waiting for one when all are taken.
    async fn slot(&mut self) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return slot;
        }
        if let Some(times) = self.reached(Instant::now()) {
            tracing::warn!(
                max = self.max,
                times,
                "TLS handshakes at their cap (--tls-max-handshakes); new connections wait in the listen backlog"
            );
        }
        match self.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Counts the cap being reached at `now`; how many times since the last warning, when
    /// a warning is due.
    fn reached(&mut self, now: Instant) -> Option<u64> {
        self.full += 1;
        if self
            .warned
            .is_some_and(|warned| now.duration_since(warned) < CAP_WARNING_EVERY)
        {
            return None;
        }
        self.warned = Some(now);
        Some(std::mem::take(&mut self.full))
    }
}

type Ready = mpsc::Sender<io::Result<TlsStream<TcpStream>>>;

async fn accept_loop(
    tls: ServerTls,
    listener: TcpListener,
    ready: Ready,
    mut handshakes: Handshakes,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; certificates reload on file change only");
            None
        }
    };
    let mut poll = tls.reload_interval.map(|every| {
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll
    });
    let mut reloader = Reloader {
        seen: tls.files.read().ok(),
        failing: false,
    };
    let timeout = handshakes.timeout;
    loop {
        // A slot first, then a connection (see the module docs); both are cancel-safe.
        let next = async {
            let slot = handshakes.slot().await;
            (slot, listener.accept().await)
        };
        tokio::select! {
            () = ready.closed() => return,
            Some(()) = recv(&mut hangup) => reloader.run(&tls, Trigger::Signal),
            Some(_) = tick(&mut poll) => reloader.run(&tls, Trigger::Poll),
            (slot, accepted) = next => match accepted {
                Ok((stream, peer)) => handshake(&tls, stream, peer, ready.clone(), (slot, timeout)),
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// The next tick of `poll`; never when there is none.
async fn tick(poll: &mut Option<tokio::time::Interval>) -> Option<tokio::time::Instant> {
    match poll {
        Some(poll) => Some(poll.tick().await),
        None => std::future::pending().await,
    }
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: rebuild even when the files look unchanged, and always report a failure.
    Signal,
    /// The periodic look at the files: rebuild only when they changed.
    Poll,
}

/// The reload state of one server.
struct Reloader {
    /// What the files held at the last look (`None`: rebuild at the next one).
    seen: Option<Contents>,
    /// The last attempt failed: polls do not repeat the warning until one succeeds.
    failing: bool,
}

impl Reloader {
    fn run(&mut self, tls: &ServerTls, trigger: Trigger) {
        if trigger == Trigger::Signal {
            self.seen = None;
        }
        match tls.reload(&mut self.seen) {
            Ok(true) => {
                self.failing = false;
                tracing::info!(?trigger, cert = %tls.files.cert.display(), "TLS certificate reloaded");
            }
            Ok(false) => {}
            Err(err) => {
                if trigger == Trigger::Signal || !self.failing {
                    tracing::warn!(?trigger, error = %err, "TLS reload failed; keeping the current certificate");
                }
                self.failing = true;
            }
        }
    }
}

/// Runs the handshake of `stream` in a task of its own, holding `slot` until it ends or
/// `timeout` passes.
fn handshake(
    tls: &ServerTls,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    ready: Ready,
    (slot, timeout): (OwnedSemaphorePermit, Duration),
) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let acceptor = TlsAcceptor::from(tls.current());
    tokio::spawn(async move {
        let handshaken = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
        drop(slot);
        match handshaken {
            Ok(Ok(stream)) => {
                let _ = ready.send(Ok(stream)).await;
            }
            Ok(Err(err)) => tracing::info!(%peer, error = %err, "TLS handshake failed"),
            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use futures::StreamExt as _;
    use rustls_pki_types::ServerName;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    use super::*;
    use crate::tls::{TlsArgs, provider};

    #[test]
    fn reaching_the_cap_is_warned_at_most_once_a_minute_with_a_count() {
        let mut handshakes = Handshakes::new(2, HANDSHAKE_TIMEOUT);
        let start = Instant::now();
        assert_eq!(handshakes.reached(start), Some(1));
        assert_eq!(handshakes.reached(start + Duration::from_secs(1)), None);
        assert_eq!(handshakes.reached(start + Duration::from_secs(59)), None);
        assert_eq!(handshakes.reached(start + CAP_WARNING_EVERY), Some(3));
        assert_eq!(handshakes.reached(start + CAP_WARNING_EVERY), None);
    }

    /// A server with a self-signed certificate for `localhost` and this cap; a client
    /// trusting it.
    fn pair(dir: &std::path::Path, max: u32) -> (ServerTls, TlsConnector) {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        let args = TlsArgs {
            tls_cert: Some(cert),
            tls_key: Some(key),
            tls_max_handshakes: max,
            ..TlsArgs::default()
        };
        let server = ServerTls::from_args(&args).unwrap().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(issued.cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, TlsConnector::from(Arc::new(client)))
    }

    #[tokio::test]
    async fn a_client_waits_for_a_slot_that_a_silent_connection_frees_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (server, connector) = pair(dir.path(), 1);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_millis(300);
        let mut incoming = server.incoming_with(listener, timeout);
        // Takes the only slot and never says a word.
        let silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = tokio::spawn(async move { connector.connect(name, tcp).await });
        let served = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .expect("the client is served once the silent connection times out");
        served.unwrap().unwrap();
        client.await.unwrap().unwrap();
        assert!(
            started.elapsed() >= timeout / 2,
            "served after {:?}, before the only slot could free",
            started.elapsed()
        );
        drop(silent);
    }
}
