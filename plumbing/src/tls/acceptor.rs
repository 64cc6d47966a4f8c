//! The accept loop of a TLS server, and certificate reload.
//!
//! One task owns the listener. It accepts TCP connections (with `TCP_NODELAY`, as the
//! plain-text server does) and hands each to a task of its own that runs the handshake
//! with the config current at accept time, under [`HANDSHAKE_TIMEOUT`]: a slow or silent
//! client costs one small task, never the accept loop. Finished handshakes go to tonic
//! through [`TlsIncoming`].
//!
//! The same task reloads the config on SIGHUP and when the files' contents change (read
//! every [`RELOAD_POLL`]). Connections already established keep the config they were
//! handshaken with, so a reload never drops a live session. A new file that cannot be used
//! keeps the old config; the warning names the flag and file, never the contents.
//!
//! Everything stops when tonic drops [`TlsIncoming`] (the server stopped accepting), which
//! also closes the listening socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::ServerTls;
use super::server::Contents;

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
        let (ready, taken) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(self.clone(), listener, ready));
        TlsIncoming {
            ready: ReceiverStream::new(taken),
        }
    }
}

type Ready = mpsc::Sender<io::Result<TlsStream<TcpStream>>>;

async fn accept_loop(tls: ServerTls, listener: TcpListener, ready: Ready) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; certificates reload on file change only");
            None
        }
    };
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reloader = Reloader {
        seen: tls.files.read().ok(),
        failing: false,
    };
    loop {
        tokio::select! {
            () = ready.closed() => return,
            Some(()) = recv(&mut hangup) => reloader.run(&tls, Trigger::Signal),
            _ = poll.tick() => reloader.run(&tls, Trigger::Poll),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => handshake(&tls, stream, peer, ready.clone()),
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
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

fn handshake(tls: &ServerTls, stream: TcpStream, peer: std::net::SocketAddr, ready: Ready) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let acceptor = TlsAcceptor::from(tls.current());
    tokio::spawn(async move {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let _ = ready.send(Ok(stream)).await;
            }
            Ok(Err(err)) => tracing::info!(%peer, error = %err, "TLS handshake failed"),
            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
        }
    });
}
