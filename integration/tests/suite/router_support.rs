//! Helpers of the router tests: a world of etcd + presence + limiter + router, fake client
//! devices on Connect streams, and a local webhook HTTP server that records what it gets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::certs::CertFiles;
use integration::{Etcd, InProcess, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use plumbing::server::ServeError;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as ppb;
use proto::presence::v1::connect_request::Kind as Say;
use proto::presence::v1::connect_response::Kind as Recv;
use proto::router::v1 as pb;
use proto::router::v1::router_service_client::RouterServiceClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tonic::transport::Channel;

use crate::presence_support::{Session, Tenant, client, presence_of};
use crate::support;

/// The account of the router tests.
pub const ACCOUNT: &str = "AC1";

/// etcd, presence, limiter (limit `limit` for every key) and a router.
pub struct World {
    pub etcd: Etcd,
    pub prefix: String,
    pub presence: InProcess<ServeError>,
    pub limiter: InProcess<ServeError>,
    pub router: InProcess<ServeError>,
    pub tenant: Tenant,
}

impl World {
    /// Starts everything; the router allows private webhooks.
    pub async fn start(limit: u32) -> Self {
        Self::start_with(limit, true).await
    }

    /// Starts everything, the router allowing private webhooks or not.
    pub async fn start_with(limit: u32, allow_private: bool) -> Self {
        Self::start_with_router(limit, allow_private, router_svc::RouterArgs::default()).await
    }

    /// Starts everything, the router with its own flags `router_args`.
    pub async fn start_with_router(
        limit: u32,
        allow_private: bool,
        router_args: router_svc::RouterArgs,
    ) -> Self {
        let etcd = Etcd::start().await;
        let prefix = unique_prefix();
        let presence = support::presence(&etcd, &prefix).await;
        let limiter = support::limiter(&etcd, &prefix, limit).await;
        let router = support::router_with(
            &etcd,
            &prefix,
            presence.addr.to_string(),
            Some(limiter.addr.to_string()),
            allow_private,
            router_args,
        )
        .await;
        let tenant = Tenant::create(&presence, ACCOUNT).await;
        Self {
            etcd,
            prefix,
            presence,
            limiter,
            router,
            tenant,
        }
    }

    /// A second router replica on the same etcd.
    pub async fn another_router(&self) -> InProcess<ServeError> {
        support::router_with(
            &self.etcd,
            &self.prefix,
            self.presence.addr.to_string(),
            Some(self.limiter.addr.to_string()),
            true,
            router_svc::RouterArgs::default(),
        )
        .await
    }

    /// A router client.
    pub fn router(&self) -> Router {
        Router::new(&self.router)
    }

    /// Creates (or replaces) an application of [`ACCOUNT`]; it as returned by Put.
    pub async fn put_app(&self, app: pb::Application) -> pb::Application {
        self.router().put(app).await.unwrap()
    }

    /// An application answering `address` with inline `xml`.
    pub async fn inline(&self, address: &str, xml: &str) -> pb::Application {
        self.put_app(pb::Application {
            address: address.into(),
            instructions: xml.into(),
            ..Default::default()
        })
        .await
    }

    /// A live device of `identity`, known to presence's cache before this returns.
    pub async fn device(&self, identity: &str, device_id: &str) -> Device {
        let token = self.tenant.device(identity);
        let session = Session::hello(support::channel(&self.presence), &token, device_id).await;
        presence_of(
            &client(&self.presence),
            &token,
            identity,
            session.device.revision,
        )
        .await;
        Device { session }
    }

    /// Communications slots in flight for [`ACCOUNT`].
    pub async fn slots_in_flight(&self) -> u32 {
        let mut limiter = LimiterServiceClient::new(support::channel(&self.limiter));
        let request = lpb::GetUsageRequest {
            account_id: ACCOUNT.into(),
            resource: "communications".into(),
        };
        let usage = limiter
            .get_usage(Tokens::request(&admin(), request))
            .await
            .unwrap()
            .into_inner();
        usage.usage.map_or(0, |u| u.in_flight)
    }

    /// Waits until no communications slot is held.
    pub async fn slots_freed(&self, within: Duration) {
        poll_until("communication slots to be released", within, || async {
            (self.slots_in_flight().await == 0).then_some(())
        })
        .await;
    }

    /// Sets the account's limit of concurrent communications.
    pub async fn set_limit(&self, max: u32) {
        self.set_limit_of("communications", max).await;
    }

    /// In-flight slots of [`ACCOUNT`] for `resource`.
    pub async fn in_flight_of(&self, resource: &str) -> u32 {
        let mut limiter = LimiterServiceClient::new(support::channel(&self.limiter));
        let request = lpb::GetUsageRequest {
            account_id: ACCOUNT.into(),
            resource: resource.into(),
        };
        let usage = limiter
            .get_usage(Tokens::request(&admin(), request))
            .await
            .unwrap()
            .into_inner();
        usage.usage.map_or(0, |u| u.in_flight)
    }

    /// Sets the account's limit of `resource`.
    pub async fn set_limit_of(&self, resource: &str, max: u32) {
        let mut limiter = LimiterServiceClient::new(support::channel(&self.limiter));
        let limit = lpb::Limit {
            account_id: ACCOUNT.into(),
            resource: resource.into(),
            max_in_flight: max,
            shadow: false,
        };
        limiter
            .set_limit(Tokens::request(
                &admin(),
                lpb::SetLimitRequest { limit: Some(limit) },
            ))
            .await
            .unwrap();
    }
}

/// A platform token with every scope.
pub fn admin() -> String {
    Tokens::platform("*", &[Scope::Admin])
}

/// A RouterService client acting for [`ACCOUNT`] with a platform token.
#[derive(Clone)]
pub struct Router {
    pub client: RouterServiceClient<Channel>,
    pub token: String,
}

impl Router {
    /// A client of `server`.
    pub fn new(server: &InProcess<ServeError>) -> Self {
        Self {
            client: RouterServiceClient::new(support::channel(server)),
            token: admin(),
        }
    }

    /// PutApplication for [`ACCOUNT`].
    pub async fn put(&self, mut app: pb::Application) -> Result<pb::Application, tonic::Status> {
        if app.account_id.is_empty() {
            app.account_id = ACCOUNT.into();
        }
        let request = pb::PutApplicationRequest {
            application: Some(app),
        };
        let response = self
            .client
            .clone()
            .put_application(Tokens::request(&self.token, request))
            .await?;
        Ok(response.into_inner().application.unwrap())
    }

    /// Route from `+15550100` to `to` with `id`.
    pub async fn route(&self, to: &str, id: &str) -> Result<pb::Communication, tonic::Status> {
        let request = pb::RouteRequest {
            account_id: ACCOUNT.into(),
            from: "+15550100".into(),
            to: to.into(),
            communication_id: id.into(),
            ..Default::default()
        };
        self.route_with(request).await
    }

    /// Route with a full request.
    pub async fn route_with(
        &self,
        request: pb::RouteRequest,
    ) -> Result<pb::Communication, tonic::Status> {
        let response = self
            .client
            .clone()
            .route(Tokens::request(&self.token, request))
            .await?;
        Ok(response.into_inner().communication.unwrap())
    }

    /// GetCommunication.
    pub async fn get(&self, id: &str) -> Result<pb::Communication, tonic::Status> {
        let request = pb::GetCommunicationRequest {
            account_id: ACCOUNT.into(),
            communication_id: id.into(),
        };
        let response = self
            .client
            .clone()
            .get_communication(Tokens::request(&self.token, request))
            .await?;
        Ok(response.into_inner().communication.unwrap())
    }

    /// Hangup.
    pub async fn hangup(&self, id: &str) -> Result<pb::Communication, tonic::Status> {
        let request = pb::HangupRequest {
            account_id: ACCOUNT.into(),
            communication_id: id.into(),
            reason: "test".into(),
        };
        let response = self
            .client
            .clone()
            .hangup(Tokens::request(&self.token, request))
            .await?;
        Ok(response.into_inner().communication.unwrap())
    }

    /// Waits until the communication has ended; it then.
    pub async fn ended(&self, id: &str) -> pb::Communication {
        poll_until(
            &format!("communication {id} to end"),
            Duration::from_secs(15),
            || async {
                self.get(id)
                    .await
                    .ok()
                    .filter(|c| c.state == pb::CommunicationState::Ended as i32)
            },
        )
        .await
    }
}

/// A fake client device on a Connect stream.
pub struct Device {
    pub session: Session,
}

impl Device {
    /// The next offer.
    pub async fn offer(&mut self) -> ppb::ConnectOffer {
        match self.session.next().await {
            Recv::Offer(offer) => offer,
            other => panic!("expected an offer, got {other:?}"),
        }
    }

    /// The next message, which must be a cancel; its reason.
    pub async fn cancelled(&mut self) -> ppb::CancelReason {
        match self.session.next().await {
            Recv::Cancel(cancel) => ppb::CancelReason::try_from(cancel.reason).unwrap(),
            other => panic!("expected a cancel, got {other:?}"),
        }
    }

    /// The next message, which must be `ended`; its reason.
    pub async fn ended(&mut self) -> ppb::EndReason {
        match self.session.next().await {
            Recv::Ended(ended) => ppb::EndReason::try_from(ended.reason).unwrap(),
            other => panic!("expected `ended`, got {other:?}"),
        }
    }

    /// Answers an offer.
    pub async fn answer(&self, offer: &ppb::ConnectOffer, accept: bool, reason: ppb::RejectReason) {
        let answer = ppb::ConnectAnswer {
            offer_id: offer.offer_id.clone(),
            accept,
            reject_reason: reason as i32,
            ..Default::default()
        };
        self.session.send(Say::Answer(answer)).await;
    }

    /// Declines an offer, for this device only or for every device.
    pub async fn decline(&self, offer: &ppb::ConnectOffer, scope: ppb::DeclineScope) {
        let answer = ppb::ConnectAnswer {
            offer_id: offer.offer_id.clone(),
            accept: false,
            reject_reason: ppb::RejectReason::Declined as i32,
            scope: scope as i32,
        };
        self.session.send(Say::Answer(answer)).await;
    }

    /// Says the device is alerting its user about an offer.
    pub async fn ringing(&self, offer: &ppb::ConnectOffer) {
        self.session
            .send(Say::Ringing(ppb::ConnectRinging {
                offer_id: offer.offer_id.clone(),
            }))
            .await;
    }

    /// Hangs up a communication.
    pub async fn hangup(&self, communication_id: &str) {
        self.session
            .send(Say::Hangup(ppb::ConnectHangup {
                communication_id: communication_id.into(),
            }))
            .await;
    }
}

/// One request the webhook server received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: HashMap<String, String>,
    /// Form parameters (body for POST, query for GET).
    pub params: Vec<(String, String)>,
}

impl Captured {
    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// What the webhook server answers.
pub type Handler = Arc<dyn Fn(&Captured) -> (u16, String) + Send + Sync>;

/// A local HTTP/1.1 server that records requests and answers through a handler; plain
/// ([`WebhookServer::start`]) or over TLS ([`WebhookServer::start_tls`]).
pub struct WebhookServer {
    pub addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    seen: Arc<Mutex<Vec<Captured>>>,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    arrivals: tokio::sync::Mutex<mpsc::UnboundedReceiver<Captured>>,
}

/// One completed TLS handshake of a [`WebhookServer`] serving https.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The SNI the client sent (none for an IP address).
    pub server_name: Option<String>,
    /// The ALPN protocol agreed on.
    pub alpn: Option<String>,
}

impl WebhookServer {
    /// Starts a plain HTTP server on 127.0.0.1 answering with `handler`.
    pub async fn start(
        handler: impl Fn(&Captured) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        Self::serve(Ipv4Addr::LOCALHOST, None, Arc::new(handler)).await
    }

    /// Starts an https server on 127.0.0.1 presenting `cert`, answering with `handler`.
    pub async fn start_tls(
        cert: &CertFiles,
        handler: impl Fn(&Captured) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        Self::start_tls_on(Ipv4Addr::LOCALHOST, cert, handler).await
    }

    /// Starts an https server on `ip` (a loopback address) presenting `cert`.
    pub async fn start_tls_on(
        ip: Ipv4Addr,
        cert: &CertFiles,
        handler: impl Fn(&Captured) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        Self::serve(ip, Some(tls_acceptor(cert)), Arc::new(handler)).await
    }

    async fn serve(ip: Ipv4Addr, tls: Option<tokio_rustls::TlsAcceptor>, handler: Handler) -> Self {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let handshakes: Arc<Mutex<Vec<Handshake>>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (recorded, shaken) = (seen.clone(), handshakes.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, recorded, tx) = (handler.clone(), recorded.clone(), tx.clone());
                let Some(acceptor) = tls.clone() else {
                    tokio::spawn(serve_connection(stream, handler, recorded, tx));
                    continue;
                };
                let shaken = shaken.clone();
                tokio::spawn(async move {
                    // A handshake the client aborts (it distrusts the certificate) ends here.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (_, session) = stream.get_ref();
                    shaken.lock().unwrap().push(Handshake {
                        server_name: session.server_name().map(str::to_owned),
                        alpn: session
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned()),
                    });
                    serve_connection(stream, handler, recorded, tx).await;
                });
            }
        });
        Self {
            addr,
            scheme,
            seen,
            handshakes,
            arrivals: tokio::sync::Mutex::new(rx),
        }
    }

    /// `http://IP:PORT{path}` (`https://` when serving TLS).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The same server by host name: `https://localhost:PORT{path}`.
    pub fn localhost_url(&self, path: &str) -> String {
        format!("{}://localhost:{}{path}", self.scheme, self.addr.port())
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Captured> {
        self.seen.lock().unwrap().clone()
    }

    /// Every completed TLS handshake so far, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }

    /// The next request to arrive (in arrival order).
    pub async fn next(&self) -> Captured {
        let mut arrivals = self.arrivals.lock().await;
        tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
            .await
            .expect("no webhook request in time")
            .unwrap()
    }
}

/// A TLS acceptor presenting `cert`, with ALPN `http/1.1`.
fn tls_acceptor(cert: &CertFiles) -> tokio_rustls::TlsAcceptor {
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve_connection<S>(
    stream: S,
    handler: Handler,
    seen: Arc<Mutex<Vec<Captured>>>,
    arrivals: mpsc::UnboundedSender<Captured>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let form = if method == "GET" {
            target
                .split_once('?')
                .map(|(_, q)| q.to_owned())
                .unwrap_or_default()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        };
        let captured = Captured {
            method,
            target,
            headers,
            params: form_decode(&form),
        };
        seen.lock().unwrap().push(captured.clone());
        let _ = arrivals.send(captured.clone());
        let (status, reply) = handler(&captured);
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        );
        if write.write_all(head.as_bytes()).await.is_err()
            || write.write_all(reply.as_bytes()).await.is_err()
        {
            return;
        }
    }
}

/// Decodes `application/x-www-form-urlencoded`.
pub fn form_decode(form: &str) -> Vec<(String, String)> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    };
    form.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// The kinds of a communication's timeline, in order.
pub fn kinds(comm: &pb::Communication) -> Vec<pb::TimelineEventKind> {
    comm.timeline
        .iter()
        .map(|e| pb::TimelineEventKind::try_from(e.kind).unwrap())
        .collect()
}

/// The outcome of a communication.
pub fn outcome(comm: &pb::Communication) -> pb::Outcome {
    pb::Outcome::try_from(comm.outcome).unwrap()
}

/// The end reasons of a communication's legs, in order.
pub fn leg_reasons(comm: &pb::Communication) -> Vec<pb::LegEndReason> {
    comm.legs
        .iter()
        .map(|l| pb::LegEndReason::try_from(l.end_reason).unwrap())
        .collect()
}

/// Every timeline message joined, for assertions on explanations.
pub fn story(comm: &pb::Communication) -> String {
    comm.timeline
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Waits until `server` has received a request whose `name` parameter is `value`.
pub async fn poll_for(server: &WebhookServer, name: &str, value: &str) -> Captured {
    poll_until(
        &format!("a webhook request with {name}={value}"),
        Duration::from_secs(10),
        || async {
            server
                .requests()
                .into_iter()
                .find(|r| r.param(name) == Some(value))
        },
    )
    .await
}

/// Repeats `call` until it fails with something other than UNAUTHENTICATED (a new account
/// key reaches every replica through its key mirror); that status.
pub async fn until_known<F, Fut>(mut call: F) -> tonic::Status
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tonic::Status>,
{
    poll_until(
        "the account key to reach the router",
        Duration::from_secs(5),
        || {
            let status = call();
            async move { Some(status.await).filter(|s| s.code() != tonic::Code::Unauthenticated) }
        },
    )
    .await
}

/// Opens a device of `identity` that accepts every offer at once, until the test ends.
pub async fn auto_answering_device(world: &World, identity: &str) {
    let token = world.tenant.device(identity);
    let (sender, requests) = mpsc::channel(64);
    let hello = ppb::ConnectHello {
        device_id: "auto".into(),
        ..Default::default()
    };
    sender
        .send(ppb::ConnectRequest {
            kind: Some(Say::Hello(hello)),
        })
        .await
        .unwrap();
    let mut presence = proto::presence::v1::presence_service_client::PresenceServiceClient::new(
        support::channel(&world.presence),
    );
    let mut inbound = presence
        .connect(Tokens::request(
            &token,
            tokio_stream::wrappers::ReceiverStream::new(requests),
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(Recv::Registered(registered)) = inbound.message().await.unwrap().and_then(|m| m.kind)
    else {
        panic!("expected `registered`");
    };
    presence_of(
        &client(&world.presence),
        &token,
        identity,
        registered.device.unwrap().revision,
    )
    .await;
    tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if let Some(Recv::Offer(offer)) = message.kind {
                let answer = ppb::ConnectAnswer {
                    offer_id: offer.offer_id,
                    accept: true,
                    reject_reason: 0,
                    ..Default::default()
                };
                if sender
                    .send(ppb::ConnectRequest {
                        kind: Some(Say::Answer(answer)),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
}
