//! The two baselines of docs/CONTRACT.md §6, measured in the same run as the service they judge:
//! the RPC ceiling (`grpc.health.v1.Health/Check`, no auth, no work) and the naive etcd
//! semaphore (one txn put-if-absent to acquire, one delete to release).

use std::net::SocketAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use integration::{PLATFORM_KEY_ID, PLATFORM_SECRET, Tokens};
use plumbing::auth::Scope;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::load::{self, Plan, Sample, Worker};
use super::stack::{Stack, WindowFacts};
use super::{OP_TIMEOUT, Options, Result};

/// Lifetime of the benchmark's tokens (the contract's maximum is 24 h).
const TOKEN_TTL: i64 = 23 * 3_600;

/// An `authorization: Bearer …` value, minted once (a platform token, HS256, verified by
/// the services on every call as in production).
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Auth {
    /// A platform token for every account (`*`) with `scopes`.
    pub fn platform(scopes: &[Scope]) -> Result<Self> {
        Self::platform_for("*", scopes)
    }

    /// A platform token naming `account` with `scopes`.
    pub fn platform_for(account: &str, scopes: &[Scope]) -> Result<Self> {
        let token = Tokens::signed(
            PLATFORM_KEY_ID,
            PLATFORM_SECRET,
            account,
            None,
            scopes,
            TOKEN_TTL,
        );
        Ok(Self(format!("Bearer {token}").parse()?))
    }

    /// `message` with the token and the operation deadline ([`OP_TIMEOUT`]).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.stream_request(message);
        request.set_timeout(OP_TIMEOUT);
        request
    }

    /// `message` with the token and no deadline (for streams that stay open: a
    /// `grpc-timeout` would end them).
    pub fn stream_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        request
    }
}

/// `code: message` of a failed call, bounded in length.
pub fn status_text(status: &tonic::Status) -> String {
    let text = format!("{:?}: {}", status.code(), status.message());
    text.chars().take(160).collect()
}

struct HealthWorker(HealthClient<Channel>);

impl Worker for HealthWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(OP_TIMEOUT);
        let answer = self.0.check(request).await.map_err(|s| status_text(&s))?;
        if answer.get_ref().status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(format!("health status {}", answer.get_ref().status))
        }
    }
}

/// Health/Check on `addr` from every caller.
pub async fn rpc_ceiling(
    options: &Options,
    stack: &Stack,
    addr: SocketAddr,
) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, 1, |_| async move {
        Ok(HealthClient::new(stack.channel(addr)?))
    })
    .await?;
    let workers = clients
        .into_iter()
        .map(|(_, client)| HealthWorker(client))
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

struct NaiveWorker {
    client: etcd_client::Client,
    prefix: String,
    sequence: u64,
}

impl Worker for NaiveWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        self.sequence += 1;
        let key = format!("{}{}", self.prefix, self.sequence);
        // Acquire: create the slot key only if it does not exist.
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), "held", None)]);
        let answer = self
            .client
            .txn(txn)
            .await
            .map_err(|err| format!("etcd txn: {err}"))?;
        if !answer.succeeded() {
            return Err("naive acquire: slot key already existed".to_owned());
        }
        // Release: delete it.
        self.client
            .delete(key.as_str(), None)
            .await
            .map_err(|err| format!("etcd delete: {err}"))?;
        Ok(())
    }
}

/// Acquire+release pairs of the naive semaphore, directly on etcd. Returns the sample and
/// what etcd and the processes did during the measured window.
pub async fn naive_etcd(options: &Options, stack: &Stack) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, 1, |_| stack.etcd_client()).await?;
    let run = format!("{:08x}", std::process::id());
    let workers: Vec<NaiveWorker> = clients
        .into_iter()
        .enumerate()
        .map(|(caller, (_, client))| NaiveWorker {
            client,
            prefix: format!("/bench-naive/slots/{run}-{caller}-"),
            sequence: 0,
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    let facts = window.finish().await?;
    Ok((sample, facts))
}
