//! Signed HTTP requests to application URLs (docs/CONTRACT.md §4): form or query parameters, the
//! `X-Switchboard-Signature` header, a 5 s connect and 15 s total deadline, a bounded
//! response, and the SSRF guard applied to the *resolved* address — the connection goes to
//! the very address that was checked, so a DNS answer cannot change between check and use.
//!
//! HTTP/1.1 over hyper, for `https` URLs over TLS ([`tls`]: the host as SNI
//! and verified name, the system's roots plus `--webhook-ca`). Idle connections are kept per
//! origin — scheme, checked address and host name, so a TLS connection verified for one name
//! never carries a request for another — for reuse (the webhook of a busy application is
//! asked many times a second), at most [`IDLE_PER_ORIGIN`] each, for at most [`IDLE_FOR`].

pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::stats::WebhookStats;
use crate::url::{Scheme, WebhookUrl, is_public, refusal};
use crate::xml::Method;
use tls::{TlsFailure, WebhookTls};

/// Connect deadline (DNS, TCP, and the TLS handshake of https).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a whole request, connect included.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response body read.
pub const MAX_RESPONSE: usize = 64 * 1024;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";
const IDLE_PER_ORIGIN: usize = 32;
const IDLE_FOR: Duration = Duration::from_secs(30);

/// Why a webhook request failed; `Display` is the timeline's explanation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WebhookError {
    /// The target is refused by the SSRF guard.
    #[error("{0}")]
    Refused(String),
    /// The host did not resolve.
    #[error("cannot resolve `{host}`: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// No connection within the connect timeout, or refused.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// The total deadline passed.
    #[error("no complete answer within {}s", TOTAL_TIMEOUT.as_secs())]
    Timeout,
    /// HTTP-level failure.
    #[error("HTTP error: {0}")]
    Http(String),
    /// The answer's status is not 2xx.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// The body exceeded [`MAX_RESPONSE`].
    #[error("response body exceeds {MAX_RESPONSE} bytes")]
    TooLarge,
    /// The TLS handshake of an https webhook failed (untrusted or wrong certificate, ...).
    #[error("TLS handshake with `{host}` failed: {reason}")]
    Tls {
        /// The host of the URL.
        host: String,
        /// Why.
        reason: TlsFailure,
    },
}

impl WebhookError {
    /// The `result` label of a request that failed with this error.
    pub fn label(&self) -> &'static str {
        match self {
            WebhookError::Refused(_) => "refused",
            WebhookError::Resolve { .. } => "resolve",
            WebhookError::Connect { .. } => "connect",
            WebhookError::Timeout => "timeout",
            WebhookError::Http(_) => "http",
            WebhookError::Status(_) => "status",
            WebhookError::TooLarge => "too_large",
            WebhookError::Tls { .. } => "tls",
        }
    }
}

/// A webhook answer.
#[derive(Debug, Clone)]
pub struct WebhookResponse {
    /// HTTP status (2xx).
    pub status: u16,
    /// The body, at most [`MAX_RESPONSE`] bytes.
    pub body: Bytes,
}

/// One request to make (no `Debug`: it holds the signing secret).
#[derive(Clone)]
pub struct WebhookRequest<'a> {
    /// Where.
    pub url: &'a WebhookUrl,
    /// How.
    pub method: Method,
    /// Parameters (any order; signing sorts them).
    pub params: &'a [(String, String)],
    /// The application's signing secret.
    pub secret: &'a str,
}

/// What a kept connection may be reused for: the same scheme, checked address and host
/// name (an https connection's certificate was verified for that name only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: Scheme,
    address: SocketAddr,
    host: String,
}

/// Idle connections by origin, with when they became idle.
type IdlePool = HashMap<Origin, Vec<(SendRequest<Full<Bytes>>, Instant)>>;

/// The HTTP client of the router.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    allow_private: bool,
    tls: WebhookTls,
    idle: Arc<Mutex<IdlePool>>,
    stats: WebhookStats,
}

impl WebhookClient {
    /// A client; `allow_private` lifts the SSRF guard (local development and tests), `tls`
    /// is what https webhooks trust, every request is counted in `stats`.
    pub fn new(allow_private: bool, tls: WebhookTls, stats: WebhookStats) -> Self {
        Self {
            allow_private,
            tls,
            idle: Arc::default(),
            stats,
        }
    }

    /// Whether private targets are allowed.
    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// Sends `request` and returns a 2xx answer's body.
    pub async fn send(
        &self,
        request: &WebhookRequest<'_>,
    ) -> Result<WebhookResponse, WebhookError> {
        let started = Instant::now();
        let answer = tokio::time::timeout(TOTAL_TIMEOUT, self.exchange(request))
            .await
            .unwrap_or(Err(WebhookError::Timeout));
        let result = answer.as_ref().map_or_else(WebhookError::label, |_| "ok");
        self.stats.record(result, started.elapsed());
        answer
    }

    async fn exchange(
        &self,
        request: &WebhookRequest<'_>,
    ) -> Result<WebhookResponse, WebhookError> {
        let url = request.url;
        url.check_host(self.allow_private)
            .map_err(WebhookError::Refused)?;
        let (target, signed) = match request.method {
            Method::Get => {
                let query = form_encode(request.params);
                let separator = if url.path_and_query.contains('?') {
                    '&'
                } else {
                    '?'
                };
                let path = if query.is_empty() {
                    url.path_and_query.clone()
                } else {
                    format!("{}{separator}{query}", url.path_and_query)
                };
                let full = if query.is_empty() {
                    url.as_str().to_owned()
                } else {
                    format!("{url}{separator}{query}")
                };
                (path, signature(request.secret, &full, &[]))
            }
            Method::Post => (
                url.path_and_query.clone(),
                signature(request.secret, url.as_str(), request.params),
            ),
        };
        let body = match request.method {
            Method::Get => Bytes::new(),
            Method::Post => Bytes::from(form_encode(request.params)),
        };
        let default_port = match url.scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let host_header = if url.port == default_port {
            url.host.clone()
        } else if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let mut builder = http::Request::builder()
            .method(request.method.as_str())
            .uri(target)
            .header(http::header::HOST, host_header)
            .header(http::header::USER_AGENT, "switchboard-router/1")
            .header(http::header::ACCEPT, "application/xml, text/xml")
            .header(SIGNATURE_HEADER, signed);
        if request.method == Method::Post {
            builder = builder.header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(|e| WebhookError::Http(e.to_string()))?;
        let (origin, mut sender) = self.connection(url).await?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| WebhookError::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    WebhookError::TooLarge
                } else {
                    WebhookError::Http(e.to_string())
                }
            })?
            .to_bytes();
        self.keep(origin, sender);
        if !(200..300).contains(&status) {
            return Err(WebhookError::Status(status));
        }
        Ok(WebhookResponse { status, body })
    }

    /// An idle connection to `url`'s origin, or a new one to a checked address.
    async fn connection(
        &self,
        url: &WebhookUrl,
    ) -> Result<(Origin, SendRequest<Full<Bytes>>), WebhookError> {
        let addresses = tokio::time::timeout(CONNECT_TIMEOUT, resolve(url))
            .await
            .map_err(|_| WebhookError::Resolve {
                host: url.host.clone(),
                reason: "no answer in time".into(),
            })??;
        let mut allowed = Vec::new();
        for address in addresses {
            if self.allow_private || is_public(address.ip()) {
                allowed.push(address);
            } else if allowed.is_empty() {
                // Every address must pass; one private answer is enough to refuse.
                return Err(WebhookError::Refused(refusal(&url.host, address.ip())));
            }
        }
        let Some(&address) = allowed.first() else {
            return Err(WebhookError::Resolve {
                host: url.host.clone(),
                reason: "no addresses".into(),
            });
        };
        let origin = Origin {
            scheme: url.scheme,
            address,
            host: url.host.clone(),
        };
        if let Some(sender) = self.reuse(&origin) {
            return Ok((origin, sender));
        }
        // The connection goes to the address just checked; TLS runs over that very stream.
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| WebhookError::Connect {
                address: address.to_string(),
                reason: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            })?
            .map_err(|e| WebhookError::Connect {
                address: address.to_string(),
                reason: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let sender = match url.scheme {
            Scheme::Http => http1(stream).await?,
            Scheme::Https => {
                let tls = self.tls.connect(&url.host, stream, CONNECT_TIMEOUT).await;
                let tls = tls.map_err(|reason| WebhookError::Tls {
                    host: url.host.clone(),
                    reason,
                })?;
                http1(tls).await?
            }
        };
        Ok((origin, sender))
    }

    fn reuse(&self, origin: &Origin) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = idle.get_mut(origin)?;
        while let Some((sender, since)) = pool.pop() {
            if since.elapsed() < IDLE_FOR && !sender.is_closed() && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn keep(&self, origin: Origin, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = idle.entry(origin).or_default();
        if pool.len() < IDLE_PER_ORIGIN {
            pool.push((sender, Instant::now()));
        }
    }
}

/// An HTTP/1.1 client connection over `io` (TCP, or TLS over TCP), driven by its own task.
async fn http1<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, WebhookError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| WebhookError::Http(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "webhook connection closed");
        }
    });
    Ok(sender)
}

async fn resolve(url: &WebhookUrl) -> Result<Vec<SocketAddr>, WebhookError> {
    if let Some(ip) = url.literal_ip() {
        return Ok(vec![SocketAddr::new(ip, url.port)]);
    }
    tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map(Iterator::collect)
        .map_err(|e| WebhookError::Resolve {
            host: url.host.clone(),
            reason: e.to_string(),
        })
}

/// `X-Switchboard-Signature`: base64 HMAC-SHA256 keyed with `secret` over `url` followed by
/// each parameter's name and value, sorted by name (then value).
pub fn signature(secret: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    // HMAC accepts keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `application/x-www-form-urlencoded` encoding of `params`, in the given order.
pub fn form_encode(params: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_component(name, &mut out);
        out.push('=');
        encode_component(value, &mut out);
    }
    out
}

fn encode_component(text: &str, out: &mut String) {
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(byte as char);
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_url_and_sorted_parameters() {
        let params = vec![
            ("To".to_owned(), "support".to_owned()),
            ("From".to_owned(), "+1555".to_owned()),
        ];
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap_or_else(|_| panic!());
        mac.update(b"http://h/xFrom+1555Tosupport");
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let a = signature("secret", "http://h/x", &params);
        assert_eq!(a, expected);
        let mut reversed = params.clone();
        reversed.reverse();
        assert_eq!(a, signature("secret", "http://h/x", &reversed));
        assert_ne!(a, signature("other", "http://h/x", &params));
        assert_ne!(a, signature("secret", "http://h/y", &params));
    }

    #[test]
    fn form_encodes_reserved_characters() {
        let params = vec![
            ("From".to_owned(), "+1 555".to_owned()),
            ("x".to_owned(), "a&b=c/é".to_owned()),
        ];
        assert_eq!(form_encode(&params), "From=%2B1+555&x=a%26b%3Dc%2F%C3%A9");
    }
}
