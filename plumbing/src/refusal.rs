//! Refusing a call before its handler without costing the connection it came on.
//!
//! A layer that answers a call (UNAUTHENTICATED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...)
//! before the request body has arrived makes h2 reset the stream, and the client's DATA
//! frames already on their way then cost a reset each. h2 counts those resets and past its
//! limit (1024) closes the whole connection, taking every caller sharing it (a proxy's,
//! another tenant's) down with the flood being refused. So every early answer first reads
//! what is left of the request, for at most [`DRAIN_WITHIN`]:
//!
//! - a layer that still holds the body refuses with [`refuse`] (drain, then answer);
//! - a body taken away from a handler that gave up early (a deadline, an oversized
//!   message) is wrapped in [`DrainOnDrop`], which drains what is left in the background.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};

/// How long a refusal waits for the rest of the request. A unary request's message follows
/// its headers within a round trip; a client that is still sending after this is dropped
/// (its stream reset) rather than waited for.
pub const DRAIN_WITHIN: Duration = Duration::from_millis(100);

/// Answers `status` to a request refused before its handler, once what is left of its
/// `body` has been read (see the module docs).
pub async fn refuse<B: Body + Unpin>(
    body: B,
    status: tonic::Status,
) -> http::Response<tonic::body::Body> {
    drain(body).await;
    status.into_http()
}

/// Reads and discards what is left of `body`, for at most [`DRAIN_WITHIN`], so that its
/// stream ends cleanly.
pub async fn drain<B: Body + Unpin>(mut body: B) {
    use http_body_util::BodyExt as _;
    let _ = tokio::time::timeout(DRAIN_WITHIN, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// A request body that, dropped before its end (its handler answered early or was
/// dropped at a deadline), leaves what is left to a task that [`drain`]s it.
pub struct DrainOnDrop<B: Body + Unpin + Send + 'static> {
    inner: Option<B>,
}

impl<B: Body + Unpin + Send + 'static> DrainOnDrop<B> {
    /// Wraps `body`.
    pub fn new(body: B) -> Self {
        Self { inner: Some(body) }
    }
}

impl<B: Body + Unpin + Send + 'static> Drop for DrainOnDrop<B> {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        // Outside a runtime (never the case in a server) the body is simply dropped.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

impl<B> Body for DrainOnDrop<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A body of `frames` one-byte frames, counting the ones read.
    struct Counted {
        left: usize,
        read: Arc<AtomicUsize>,
    }

    impl Body for Counted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.read.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }

        fn is_end_stream(&self) -> bool {
            self.left == 0
        }
    }

    #[tokio::test]
    async fn a_refusal_reads_the_rest_of_the_request_before_answering() {
        let read = Arc::new(AtomicUsize::new(0));
        let body = Counted {
            left: 3,
            read: read.clone(),
        };
        let answer = refuse(body, tonic::Status::unauthenticated("no")).await;
        assert_eq!(read.load(Ordering::SeqCst), 3);
        let status = tonic::Status::from_header_map(answer.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_given_up_after_the_drain_time() {
        let started = tokio::time::Instant::now();
        drain(http_body_util::StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >()))
        .await;
        let waited = started.elapsed();
        assert!(
            waited >= DRAIN_WITHIN && waited < DRAIN_WITHIN * 20,
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_drained_in_the_background() {
        let read = Arc::new(AtomicUsize::new(0));
        drop(DrainOnDrop::new(Counted {
            left: 5,
            read: read.clone(),
        }));
        for _ in 0..100 {
            if read.load(Ordering::SeqCst) == 5 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("read {} of 5 frames", read.load(Ordering::SeqCst));
    }
}
