//! The client against fake limiter replicas on loopback: where calls go, and which are
//! sent again after which failures.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_server::{LimiterService, LimiterServiceServer};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::{FORWARDED, Failure, LimiterClient, OUTCOME_UNKNOWN};
use crate::client::{CallCredentials, ClientTls};

/// A replica that records the RPCs it gets and answers as configured.
#[derive(Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Vec<&'static str>>>,
    /// `None`: GetShardMap is UNIMPLEMENTED.
    map: Option<pb::GetShardMapResponse>,
    /// Acquire fails with UNAVAILABLE marked outcome-unknown.
    unknown_outcome: bool,
    /// Answers carry `x-switchboard-forwarded: 1`.
    forwarded: bool,
}

impl Fake {
    fn record(&self, rpc: &'static str) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rpc);
    }

    fn count(&self, rpc: &str) -> usize {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.iter().filter(|c| **c == rpc).count()
    }

    fn answer<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if self.forwarded {
            response
                .metadata_mut()
                .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        }
        response
    }
}

#[tonic::async_trait]
impl LimiterService for Fake {
    async fn acquire(
        &self,
        _: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        self.record("acquire");
        if self.unknown_outcome {
            let mut status = Status::unavailable("etcd txn outcome unknown");
            status.metadata_mut().insert(
                OUTCOME_UNKNOWN,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            return Err(status);
        }
        Ok(self.answer(pb::AcquireResponse {
            decision: pb::Decision::Granted as i32,
            slot_id: "00aaaaaaaaaaaaaaaaaaaaaaaa".into(),
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        _: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.record("release");
        Ok(self.answer(pb::ReleaseResponse { released: true }))
    }

    async fn get_shard_map(
        &self,
        _: Request<pb::GetShardMapRequest>,
    ) -> Result<Response<pb::GetShardMapResponse>, Status> {
        self.record("get_shard_map");
        self.map
            .clone()
            .map(Response::new)
            .ok_or_else(|| Status::unimplemented("no shard map here"))
    }
}

/// A running fake; stops when dropped.
struct Running {
    address: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve(fake: Fake) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LimiterServiceServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    Running {
        address,
        _stop: stop,
    }
}

/// A map of one shard owned by `owner`.
fn owned_by(owner: &str) -> Option<pb::GetShardMapResponse> {
    Some(pb::GetShardMapResponse {
        shard_count: 1,
        owners: vec![pb::ShardOwner {
            shard: 0,
            replica_id: "owner".into(),
            address: owner.to_owned(),
        }],
        members: vec![owner.to_owned()],
    })
}

fn client(seed: SocketAddr) -> LimiterClient {
    let credentials = CallCredentials::platform("k", b"secret", &[]);
    LimiterClient::new([seed.to_string()], &ClientTls::plain(), credentials)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the refresh task and waits for its first map.
async fn with_map(client: &LimiterClient) {
    client.start_refresher();
    for _ in 0..100 {
        if client.map().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no shard map within 2 s");
}

fn acquire(request_id: &str) -> pb::AcquireRequest {
    pb::AcquireRequest {
        account_id: "AC1".into(),
        resource: "communications".into(),
        request_id: request_id.into(),
        hold_seconds: 10,
        wait_timeout_ms: 0,
    }
}

async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"))
}

#[test]
fn failures_are_classified_by_type_and_metadata() {
    let refused = tonic::ConnectError("connection refused".into());
    assert_eq!(
        Failure::of(&Status::from_error(Box::new(refused))),
        Failure::NotSent
    );
    let mut marked = Status::unavailable("maybe applied");
    marked.metadata_mut().insert(
        OUTCOME_UNKNOWN,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    assert_eq!(Failure::of(&marked), Failure::Unknown);
    let broken = Status::from_error(Box::new(std::io::Error::other("reset")));
    assert_eq!(Failure::of(&broken), Failure::Unknown);
    assert_eq!(
        Failure::of(&Status::unavailable("no owner right now")),
        Failure::Answered
    );
}

#[tokio::test]
async fn calls_go_straight_to_the_owner_once_the_map_is_known() {
    let owner = Fake::default();
    let owner_at = serve(owner.clone()).await;
    let seed = Fake {
        map: owned_by(&owner_at.address.to_string()),
        ..Fake::default()
    };
    let seed_at = serve(seed.clone()).await;
    let client = client(seed_at.address);
    with_map(&client).await;
    let granted = client.acquire(acquire("")).await;
    assert!(granted.is_ok(), "{granted:?}");
    let released = client
        .release(pb::ReleaseRequest {
            slot_id: "00aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await;
    assert!(released.is_ok(), "{released:?}");
    assert_eq!((owner.count("acquire"), owner.count("release")), (1, 1));
    assert_eq!((seed.count("acquire"), seed.count("release")), (0, 0));
}

#[tokio::test]
async fn without_a_shard_map_every_call_goes_to_the_seed() {
    let seed = Fake::default();
    let seed_at = serve(seed.clone()).await;
    let client = client(seed_at.address);
    assert!(client.acquire(acquire("")).await.is_ok());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.acquire(acquire("")).await.is_ok());
    assert_eq!(seed.count("acquire"), 2);
    assert!(seed.count("get_shard_map") >= 1);
    assert!(client.map().is_none());
}

#[tokio::test]
async fn an_unreachable_owner_falls_back_to_the_seed() {
    let dead = closed_port().await;
    let seed = Fake {
        map: owned_by(&dead.to_string()),
        ..Fake::default()
    };
    let seed_at = serve(seed.clone()).await;
    let client = client(seed_at.address);
    with_map(&client).await;
    let granted = client.acquire(acquire("")).await;
    assert!(granted.is_ok(), "never sent, so sent again: {granted:?}");
    assert!(client.acquire(acquire("")).await.is_ok());
    assert_eq!(seed.count("acquire"), 2);
}

#[tokio::test]
async fn an_acquire_of_unknown_outcome_is_sent_again_only_with_a_request_id() {
    let owner = Fake {
        unknown_outcome: true,
        ..Fake::default()
    };
    let owner_at = serve(owner.clone()).await;
    let seed = Fake {
        map: owned_by(&owner_at.address.to_string()),
        ..Fake::default()
    };
    let seed_at = serve(seed.clone()).await;
    let client = client(seed_at.address);
    with_map(&client).await;
    let anonymous = client.acquire(acquire("")).await;
    assert_eq!(
        anonymous.map_err(|s| s.code()).err(),
        Some(tonic::Code::Unavailable)
    );
    assert_eq!(seed.count("acquire"), 0, "not retried: it may hold a slot");
    assert!(client.acquire(acquire("call-1")).await.is_ok());
    assert_eq!((owner.count("acquire"), seed.count("acquire")), (2, 1));
}

#[tokio::test]
async fn a_forwarded_answer_refreshes_the_map_early() {
    let owner = Fake {
        forwarded: true,
        ..Fake::default()
    };
    let owner_at = serve(owner.clone()).await;
    let seed = Fake {
        map: owned_by(&owner_at.address.to_string()),
        ..Fake::default()
    };
    let seed_at = serve(seed.clone()).await;
    let client = client(seed_at.address);
    with_map(&client).await;
    assert!(client.acquire(acquire("")).await.is_ok());
    // Unhinted, the next fetch would come 5 s after the first.
    for _ in 0..150 {
        if seed.count("get_shard_map") >= 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the map was not fetched again within 3 s of a forwarded answer");
}
