//! Per-connection and per-request limits every server applies, so that one client cannot
//! hold a replica's resources for everyone (the per-account caps live with each service
//! and in [`crate::quota`]).
//!
//! - `--max-concurrent-streams`: HTTP/2 streams one connection may have open at once. Tonic
//!   leaves it unset, and hyper then advertises no limit; a well-behaved client queues the
//!   streams beyond it, a client that ignores it gets them refused (`REFUSED_STREAM`).
//! - `--max-message-bytes`: the largest request message a server decodes. Each service gives
//!   it to its generated servers (`max_decoding_message_size`); [`RequestLimitsLayer`] also
//!   reads the 5-byte gRPC frame headers as the request body streams in and refuses an
//!   oversized message with RESOURCE_EXHAUSTED (the gRPC convention; tonic's own check
//!   answers OUT_OF_RANGE) before any of it is buffered.
//! - `--request-timeout`: [`RequestLimitsLayer`] answers DEADLINE_EXCEEDED when a call has
//!   not produced its response headers in time, or by the caller's shorter `grpc-timeout`.
//!   A unary call's headers come with its answer, so the whole call is bounded; a stream's
//!   headers come as soon as its handler has set it up, so an established stream (Connect,
//!   WatchPresence, WatchCommunication, relay legs) is never cut. Tonic's `Server::timeout`
//!   bounds the same span, but answers CANCELLED and outside the metrics layer, hence this
//!   layer. Unary calls that wait by contract (a queued Acquire, a Route ringing a device)
//!   are registered as [`LongCall`]s.
//!
//! Both refusals may come before the rest of the request has arrived. The request body is
//! a [`DrainOnDrop`]: when the handler gives it up (answering the oversized message, or
//! dropped at the deadline), what is left is read in the background for a moment, so the
//! refusal does not reset the stream ([`crate::refusal`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tower::{Layer, Service};

use crate::flags::parse_duration;
use crate::refusal::DrainOnDrop;

/// Default of `--max-concurrent-streams`: far above what one client application needs, and
/// room for the relay legs a router replica multiplexes onto one presence connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 4096;
/// Default of `--max-message-bytes`: the largest legitimate requests (a BatchGetPresence of
/// 1000 longest identities, ~260 KB; an application with 64 KiB of inline instructions; an
/// offer with 64 parameters of 1 KiB) fit with room to spare.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 512 * 1024;
/// Default of `--request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams a connection may make the server reset for its own errors (frames for a stream
/// already closed, flow-control violations) before the server closes the connection. h2
/// defaults to this number, but tonic turns the check off unless it is set; without it, a
/// client can make the server reset its streams and still keep their handlers running, past
/// `--max-concurrent-streams` ("MadeYouReset", CVE-2025-8671). Refusals must therefore not
/// cost resets ([`crate::refusal`]), or a flood of them would close a shared connection.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// How much earlier than the caller's `grpc-timeout` this layer answers, so that its
/// DEADLINE_EXCEEDED is sent before tonic's own timer for the same header (which answers
/// CANCELLED) fires.
const HEAD_START: Duration = Duration::from_millis(1);

/// Flags of the per-connection and per-request limits (part of [`crate::config::CommonArgs`]).
#[derive(Debug, Clone, Args)]
pub struct ConnectionLimits {
    /// Most HTTP/2 streams (calls in flight and open streams) one client connection may have
    /// at once; clients queue the ones beyond. Keep it above the relay legs a router replica
    /// holds at once: they share one connection to each presence replica.
    #[arg(long, env = "SWITCHBOARD_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Largest request message the server accepts, in bytes (64 KiB to 64 MiB); a larger one
    /// is refused with RESOURCE_EXHAUSTED before it is buffered.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = clap::value_parser!(u32).range(65_536..=67_108_864))]
    pub max_message_bytes: u32,

    /// Longest a unary call may run on the server (`500ms`, `30s`, `2m`) before it ends with
    /// DEADLINE_EXCEEDED; a shorter `grpc-timeout` of the caller wins. Streams are bounded
    /// only until they are established; calls that wait by contract (Route, a queued
    /// Acquire) are exempt or get their wait on top.
    #[arg(long, env = "SWITCHBOARD_REQUEST_TIMEOUT", value_parser = parse_timeout, default_value = "30s")]
    pub request_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl ConnectionLimits {
    /// `--max-message-bytes` for `max_decoding_message_size`.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes as usize
    }
}

/// A duration of at least 1 ms.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_millis(1) {
        return Err(format!("`{text}` must be at least 1ms"));
    }
    Ok(duration)
}

/// How a unary call that waits by contract is bounded instead of by `--request-timeout`
/// alone (the caller's `grpc-timeout` still applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongCall {
    /// Bounded by its own rules (Route: the Dial timeouts and webhook deadlines).
    Unbounded,
    /// May run this much longer than `--request-timeout` (a queued Acquire's wait).
    Extra(Duration),
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RequestLimitsLayer {
    timeout: Duration,
    max_message: usize,
    long_calls: Arc<HashMap<String, LongCall>>,
}

impl RequestLimitsLayer {
    /// The limits of `limits`, with `long_calls` (by path, `/package.Service/Method`).
    pub fn new(limits: &ConnectionLimits, long_calls: &[(&str, LongCall)]) -> Self {
        Self {
            timeout: limits.request_timeout,
            max_message: limits.max_message_bytes(),
            long_calls: Arc::new(
                long_calls
                    .iter()
                    .map(|(path, bound)| ((*path).to_owned(), *bound))
                    .collect(),
            ),
        }
    }

    /// The server's deadline for `path` and, when shorter, the caller's; with why.
    fn deadline(&self, path: &str, headers: &http::HeaderMap) -> Option<(Duration, String)> {
        let server = match self.long_calls.get(path) {
            None => Some(self.timeout),
            Some(LongCall::Unbounded) => None,
            Some(LongCall::Extra(extra)) => Some(self.timeout + *extra),
        };
        let client = headers
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        match (server, client) {
            (Some(server), Some(client)) if client < server => Some(caller(client)),
            (None, Some(client)) => Some(caller(client)),
            (Some(server), _) => Some((
                server,
                format!(
                    "the call ran past the server's request deadline of {server:?} (--request-timeout)"
                ),
            )),
            (None, None) => None,
        }
    }
}

fn caller(client: Duration) -> (Duration, String) {
    (
        client.saturating_sub(HEAD_START),
        format!("the call ran past the caller's deadline (grpc-timeout {client:?})"),
    )
}

impl<S> Layer<S> for RequestLimitsLayer {
    type Service = RequestLimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimitsService {
            inner,
            limits: self.clone(),
        }
    }
}

/// See [`RequestLimitsLayer`].
#[derive(Debug, Clone)]
pub struct RequestLimitsService<S> {
    inner: S,
    limits: RequestLimitsLayer,
}

impl<S, B> Service<http::Request<B>> for RequestLimitsService<S>
where
    S: Service<
            http::Request<SizedBody<DrainOnDrop<B>>>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::take_ready(&mut self.inner);
        let deadline = self
            .limits
            .deadline(request.uri().path(), request.headers());
        let limit = self.limits.max_message;
        let response =
            inner.call(request.map(|body| SizedBody::new(DrainOnDrop::new(body), limit)));
        Box::pin(async move {
            let Some((within, why)) = deadline else {
                return response.await;
            };
            match tokio::time::timeout(within, response).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(why).into_http()),
            }
        })
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Where a request body is in its gRPC framing (a flag byte and a 4-byte length, then the
/// message).
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// `have` bytes of the 5-byte header read so far.
    Header { have: usize, bytes: [u8; 5] },
    /// This many message bytes still to pass.
    Message { remaining: usize },
    /// An oversized message was refused; nothing more is read.
    Refused,
}

/// A request body that refuses a gRPC message over the limit as soon as its header arrives.
pub struct SizedBody<B> {
    inner: B,
    limit: usize,
    framing: Framing,
}

impl<B> SizedBody<B> {
    fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            limit,
            framing: Framing::Header {
                have: 0,
                bytes: [0; 5],
            },
        }
    }

    /// Follows the framing through `data`; the size of a message over the limit.
    fn track(&mut self, mut data: &[u8]) -> Option<usize> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Header { have, bytes } => {
                    let take = (5 - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have == 5 {
                        let length =
                            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                        if length > self.limit {
                            self.framing = Framing::Refused;
                            return Some(length);
                        }
                        self.framing = Framing::Message { remaining: length };
                    }
                }
                Framing::Message { remaining } => {
                    let take = (*remaining).min(data.len());
                    *remaining -= take;
                    data = &data[take..];
                    if *remaining == 0 {
                        self.framing = Framing::Header {
                            have: 0,
                            bytes: [0; 5],
                        };
                    }
                }
                Framing::Refused => return None,
            }
        }
        if let Framing::Message { remaining: 0 } = self.framing {
            self.framing = Framing::Header {
                have: 0,
                bytes: [0; 5],
            };
        }
        None
    }
}

impl<B> Body for SizedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if matches!(self.framing, Framing::Refused) {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(tonic::Status::from_error(err.into())))),
            None => return Poll::Ready(None),
        };
        let limit = self.limit;
        if let Some(data) = frame.data_ref()
            && let Some(size) = self.track(data)
        {
            return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                "request message of {size} bytes exceeds the {limit}-byte limit (--max-message-bytes)"
            )))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Refused) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn grpc_timeouts_parse_with_every_unit() {
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout(b"9n"), Some(Duration::from_nanos(9)));
        for bad in [&b""[..], b"S", b"123456789S", b"5s", b"-5S", b"5"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn framing_is_followed_across_chunks_and_refuses_only_oversized_messages() {
        let mut body = SizedBody::new((), 10);
        // A 10-byte message split across chunks, then a header split in two.
        assert_eq!(body.track(&[0, 0, 0]), None);
        assert_eq!(body.track(&[0, 10, 1, 2, 3]), None);
        assert_eq!(body.track(&[4, 5, 6, 7, 8, 9, 10, 0, 0]), None);
        assert_eq!(body.track(&[0, 0, 11]), Some(11));
        // An empty message is a header alone.
        let mut body = SizedBody::new((), 10);
        assert_eq!(body.track(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3]), None);
    }

    #[test]
    fn the_shorter_of_the_server_and_caller_deadlines_applies() {
        let limits = ConnectionLimits {
            request_timeout: Duration::from_secs(2),
            ..ConnectionLimits::default()
        };
        let layer = RequestLimitsLayer::new(
            &limits,
            &[
                ("/s/Long", LongCall::Unbounded),
                ("/s/Wait", LongCall::Extra(Duration::from_secs(60))),
            ],
        );
        let mut headers = http::HeaderMap::new();
        let deadline = |path, headers: &http::HeaderMap| layer.deadline(path, headers).map(|d| d.0);
        assert_eq!(deadline("/s/M", &headers), Some(Duration::from_secs(2)));
        assert_eq!(deadline("/s/Long", &headers), None);
        assert_eq!(deadline("/s/Wait", &headers), Some(Duration::from_secs(62)));
        headers.insert("grpc-timeout", http::HeaderValue::from_static("500m"));
        assert_eq!(deadline("/s/M", &headers), Some(Duration::from_millis(499)));
        assert_eq!(
            deadline("/s/Long", &headers),
            Some(Duration::from_millis(499))
        );
        headers.insert("grpc-timeout", http::HeaderValue::from_static("10S"));
        assert_eq!(deadline("/s/M", &headers), Some(Duration::from_secs(2)));
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_answered_deadline_exceeded() {
        let limits = ConnectionLimits {
            request_timeout: Duration::from_secs(30),
            ..ConnectionLimits::default()
        };
        let never = tower::service_fn(|_: http::Request<SizedBody<DrainOnDrop<String>>>| async {
            std::future::pending::<Result<http::Response<tonic::body::Body>, Infallible>>().await
        });
        let mut service = RequestLimitsLayer::new(&limits, &[]).layer(never);
        let request = http::Request::builder()
            .uri("/s/M")
            .header("grpc-timeout", "50m")
            .body(String::new())
            .unwrap();
        let started = std::time::Instant::now();
        let response = service.call(request).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("grpc-timeout"), "{status:?}");
    }
}
