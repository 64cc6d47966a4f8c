//! The tower layer that authenticates every request before any handler runs.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use http_body::Body;
use tower::{Layer, Service};

use super::{Verifier, unix_now};

/// Paths served without a token: health checks and reflection.
pub const PUBLIC_PATH_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection."];

/// Verifies `authorization: Bearer <JWT>` and leaves a [`super::Caller`] in the request
/// extensions; answers UNAUTHENTICATED (PERMISSION_DENIED, INVALID_ARGUMENT) itself when
/// the token does not verify, once the rest of the request has been read
/// ([`crate::refusal`]): a flood of bad tokens must not cost its connection.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
}

impl AuthLayer {
    /// A layer checking tokens against `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier: Arc::new(verifier),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Error: 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if PUBLIC_PATH_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Either::Left(self.inner.call(request));
        }
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        match self.verifier.verify(header, unix_now()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Left(self.inner.call(request))
            }
            Err(err) => {
                tracing::debug!(%path, error = %err, "request refused by authentication");
                let status = crate::status::from_auth(err);
                Either::Right(Box::pin(async move {
                    Ok(crate::refusal::refuse(request.into_body(), status).await)
                }))
            }
        }
    }
}
