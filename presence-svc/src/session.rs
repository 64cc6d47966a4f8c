//! Connect: a device's live session. `hello` writes its record under the replica lease;
//! the session task then carries offers in and answers out until the stream ends, when the
//! record is deleted at once (or, if the replica dies, when its lease expires).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use plumbing::auth::{Caller, Scope};
use plumbing::validate::FieldError;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as In;
use proto::presence::v1::connect_response::Kind as Out;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::BoxStream;
use tonic::{Status, Streaming};

use crate::api::requests::{self, Announcement};
use crate::devices::{Admission, DeviceStore};
use crate::error::Error;
use crate::record::{DeviceKey, DeviceRecord, Kind, now_ms};
use crate::table::{Command, Displacement, LegEvent, SessionHandle, SessionTable};

/// How long a new stream may take to send `hello`.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Messages queued for a client that is slow to read.
const OUTBOUND: usize = 8;
/// How long the final status waits for room in a slow client's queue.
const LAST_WORD_WITHIN: Duration = Duration::from_secs(1);

/// What a session queues for its client. Messages are boxed: a queue's first block holds
/// 32 slots, and 32 unboxed messages would cost every idle session 7 KiB.
type Outbound = Result<Box<pb::ConnectResponse>, Status>;

/// Opens and runs this replica's Connect sessions.
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Arc<SessionTable>,
    store: DeviceStore,
    /// This replica's lease in force: stream records are attached to it. It changes when a
    /// lost lease is replaced; live sessions then write their records again under it.
    lease: watch::Receiver<i64>,
    /// This replica's address, written into stream records for the relay.
    address: String,
    shutdown: CancellationToken,
}

impl Sessions {
    /// Sessions writing through `store`, under the replica lease in force (`lease`),
    /// reachable at `address`.
    pub fn new(
        table: Arc<SessionTable>,
        store: DeviceStore,
        lease: watch::Receiver<i64>,
        address: String,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                table,
                store,
                lease,
                address,
                shutdown,
            }),
        }
    }

    /// Reads `hello`, makes the device present and starts the session; the stream of
    /// server messages, starting with `registered`.
    pub async fn open(
        &self,
        caller: &Caller,
        mut inbound: Streaming<pb::ConnectRequest>,
    ) -> Result<BoxStream<pb::ConnectResponse>, Error> {
        caller.require(Scope::PresenceRegister)?;
        let hello = first_hello(&mut inbound).await?;
        let Announcement {
            key,
            status,
            attributes,
        } = requests::connect_hello(caller, &hello)?;
        let id = format!("{:016x}", rand::random::<u64>());
        let lease = *self.inner.lease.borrow();
        let record = DeviceRecord {
            status,
            attributes,
            contact: String::new(),
            kind: Kind::Stream,
            replica: self.inner.address.clone(),
            session: id.clone(),
            lease,
            ttl_seconds: 0,
            register_time_ms: now_ms(),
            expire_time_ms: None,
        };
        let (handle, commands) = SessionHandle::new(id);
        handle.set_lease(lease);
        let written = {
            let _order = self.inner.table.write_lock(&key).lock().await;
            self.inner.table.reserve(key.clone(), handle.clone());
            let admission = Admission {
                key: key.clone(),
                record: record.clone(),
            };
            match self.inner.store.open_stream(admission).await {
                Ok(written) => written,
                Err(err) => {
                    self.inner.table.release(&key, &handle.id);
                    return Err(err);
                }
            }
        };
        handle.establish(written.revision);
        self.recheck(&key, &handle, written.revision);
        let (outbound, stream) = mpsc::channel(OUTBOUND);
        // The channel is new and empty: this cannot fail.
        let _ = outbound.try_send(Ok(Box::new(registered(written.device.clone()))));
        tracing::debug!(identity = %key.identity, device = %key.device_id, "session opened");
        let task = SessionTask {
            sessions: self.clone(),
            key,
            handle,
            device: written.device,
            record,
            legs: HashMap::new(),
            outbound,
        };
        tokio::spawn(task.run(inbound, commands));
        let stream = ReceiverStream::new(stream).map(|item: Outbound| item.map(|message| *message));
        Ok(Box::pin(stream))
    }

    /// A change to the record between the write and [`SessionHandle::establish`] was
    /// ignored by the table: look again now.
    fn recheck(&self, key: &DeviceKey, handle: &SessionHandle, revision: i64) {
        let cache = self.inner.store.cache();
        if cache.revision() >= revision {
            match cache.device(key).map(|d| d.record.session) {
                Some(holder) if *holder == *handle.id => {}
                Some(_) => handle.displace(Displacement::Replaced),
                None => handle.displace(Displacement::Removed),
            }
        }
    }
}

/// Waits for the first message, which must be `hello`.
async fn first_hello(
    inbound: &mut Streaming<pb::ConnectRequest>,
) -> Result<pb::ConnectHello, Error> {
    let first = tokio::time::timeout(HELLO_WITHIN, inbound.message())
        .await
        .map_err(|_| FieldError::new("hello", "must be sent within 10 s of opening the stream"))?
        .map_err(Error::Passthrough)?;
    match first.and_then(|m| m.kind) {
        Some(In::Hello(hello)) => Ok(hello),
        _ => {
            Err(FieldError::new("hello", "the first message on the stream must be `hello`").into())
        }
    }
}

fn registered(device: pb::Device) -> pb::ConnectResponse {
    out(Out::Registered(pb::ConnectRegistered {
        device: Some(device),
    }))
}

fn out(kind: Out) -> pb::ConnectResponse {
    pb::ConnectResponse { kind: Some(kind) }
}

/// One offer in flight on a session.
#[derive(Debug)]
struct Leg {
    communication_id: String,
    events: mpsc::Sender<LegEvent>,
    accepted: bool,
    /// The device said `ringing` already.
    ringing: bool,
}

/// How a session ended.
#[derive(Debug)]
enum Ending {
    /// The client closed or went away.
    Disconnected,
    /// The client broke a rule, or a write failed.
    Failed(Error),
    /// Someone else took the device record.
    Displaced(Displacement),
    /// The replica is stopping.
    ShuttingDown,
}

struct SessionTask {
    sessions: Sessions,
    key: DeviceKey,
    handle: SessionHandle,
    device: pb::Device,
    /// The record as this session last wrote it.
    record: DeviceRecord,
    legs: HashMap<String, Leg>,
    outbound: mpsc::Sender<Outbound>,
}

impl SessionTask {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::ConnectRequest>,
        mut commands: mpsc::Receiver<Box<Command>>,
    ) {
        let shutdown = self.sessions.inner.shutdown.clone();
        let displaced = self.handle.displaced();
        let orphaned = self.handle.clone();
        let ending = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ending::ShuttingDown,
                _ = displaced.cancelled() => break Ending::Displaced(self.handle.displacement()),
                _ = self.outbound.closed() => break Ending::Disconnected,
                // The handlers are boxed: their etcd calls would otherwise make every idle
                // session's task as large as the largest of them.
                Some(command) = commands.recv() => Box::pin(self.on_command(*command)).await,
                () = orphaned.orphaned() => {
                    if let Err(ending) = Box::pin(self.reregister()).await {
                        break ending;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Err(err) = Box::pin(self.on_message(message)).await {
                            break Ending::Failed(err);
                        }
                    }
                    Ok(None) | Err(_) => break Ending::Disconnected,
                },
            }
        };
        Box::pin(self.finish(ending)).await;
    }

    async fn on_message(&mut self, message: pb::ConnectRequest) -> Result<(), Error> {
        match message.kind {
            Some(In::Hello(_)) => {
                Err(FieldError::new("hello", "may only be sent once, as the first message").into())
            }
            Some(In::Answer(answer)) => self.on_answer(answer),
            Some(In::Status(status)) => self.on_status(status).await,
            Some(In::Hangup(hangup)) => self.on_hangup(hangup).await,
            Some(In::Ringing(ringing)) => self.on_ringing(&ringing),
            None => Err(FieldError::new(
                "kind",
                "exactly one of hello, answer, status, hangup or ringing must be set",
            )
            .into()),
        }
    }

    fn on_ringing(&mut self, ringing: &pb::ConnectRinging) -> Result<(), Error> {
        let offer_id = requests::connect_ringing(ringing)?;
        // Ignored for unknown, cancelled or answered offers, and when said twice.
        if let Some(leg) = self.legs.get_mut(offer_id)
            && !leg.accepted
            && !leg.ringing
        {
            leg.ringing = true;
            let _ = leg.events.try_send(LegEvent::Ringing);
        }
        Ok(())
    }

    fn on_answer(&mut self, answer: pb::ConnectAnswer) -> Result<(), Error> {
        let (reason, scope) = requests::connect_answer(&answer)?;
        // Answers to unknown, cancelled or already answered offers are ignored.
        let Some(leg) = self.legs.get_mut(&answer.offer_id) else {
            return Ok(());
        };
        if leg.accepted {
            return Ok(());
        }
        let event = LegEvent::Answered {
            accept: answer.accept,
            reason,
            scope,
        };
        if answer.accept {
            leg.accepted = true;
            let _ = leg.events.try_send(event);
        } else if let Some(leg) = self.legs.remove(&answer.offer_id) {
            let _ = leg.events.try_send(event);
        }
        Ok(())
    }

    async fn on_status(&mut self, status: pb::ConnectStatus) -> Result<(), Error> {
        let change = requests::connect_status(&status)?;
        let (status, attributes) = (change.status, change.attributes.clone());
        let written = self
            .sessions
            .inner
            .store
            .update(
                &self.key,
                change.status,
                change.attributes,
                Some(&self.handle.id),
            )
            .await?;
        if let Some(status) = status {
            self.record.status = status;
        }
        if let Some(attributes) = attributes {
            self.record.attributes = attributes;
        }
        self.device = written.device.clone();
        self.push(registered(written.device)).await;
        Ok(())
    }

    async fn on_hangup(&mut self, hangup: pb::ConnectHangup) -> Result<(), Error> {
        requests::connect_hangup(&hangup)?;
        let offer_id = self
            .legs
            .iter()
            .find(|(_, leg)| leg.accepted && leg.communication_id == hangup.communication_id)
            .map(|(id, _)| id.clone());
        if let Some(leg) = offer_id.and_then(|id| self.legs.remove(&id)) {
            let _ = leg.events.try_send(LegEvent::Hangup);
            self.push(out(Out::Ended(pb::ConnectEnded {
                communication_id: leg.communication_id,
                reason: pb::EndReason::DeviceHangup as i32,
            })))
            .await;
        }
        Ok(())
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Offer { offer, events } => {
                if self.legs.contains_key(&offer.offer_id) {
                    let _ = events.try_send(LegEvent::Duplicate);
                    return;
                }
                let leg = Leg {
                    communication_id: offer.communication_id.clone(),
                    events: events.clone(),
                    accepted: false,
                    ringing: false,
                };
                self.legs.insert(offer.offer_id.clone(), leg);
                self.push(out(Out::Offer(*offer))).await;
                let _ = events.try_send(LegEvent::Delivered(Box::new(self.device.clone())));
            }
            Command::Cancel { offer_id, reason } => {
                if self.legs.remove(&offer_id).is_some() {
                    self.push(cancel(offer_id, reason)).await;
                }
            }
            Command::End { offer_id, reason } => {
                let Some(leg) = self.legs.remove(&offer_id) else {
                    return;
                };
                if leg.accepted {
                    self.push(out(Out::Ended(pb::ConnectEnded {
                        communication_id: leg.communication_id,
                        reason: reason as i32,
                    })))
                    .await;
                } else {
                    let reason = match reason {
                        pb::EndReason::RemoteHangup => pb::CancelReason::CallerCanceled,
                        pb::EndReason::TimeLimit => pb::CancelReason::Timeout,
                        _ => pb::CancelReason::Failed,
                    };
                    self.push(cancel(offer_id, reason)).await;
                }
            }
        }
    }

    /// The session's record vanished with its lease. If the lease is in fact alive, someone
    /// removed the record: the session ends as removed. Otherwise the replica's lease was
    /// lost (expired or revoked behind its back): wait for the replacement lease and write
    /// the record again under it — watchers see the device leave and come back, the
    /// client keeps its stream and is told its new record (`registered`).
    async fn reregister(&mut self) -> Result<(), Ending> {
        let removed = || Ending::Displaced(Displacement::Removed);
        let old = self.handle.lease();
        let store = self.sessions.inner.store.clone();
        if store.lease_alive(old).await {
            return Err(removed());
        }
        let mut leases = self.sessions.inner.lease.clone();
        let new =
            match tokio::time::timeout(REREGISTER_WITHIN, leases.wait_for(|id| *id != old)).await {
                Ok(Ok(id)) => *id,
                _ => return Err(removed()),
            };
        let table = &self.sessions.inner.table;
        let mut record = self.record.clone();
        record.lease = new;
        let written = {
            let _order = table.write_lock(&self.key).lock().await;
            let admission = Admission {
                key: self.key.clone(),
                record: record.clone(),
            };
            store.open_stream(admission).await.map_err(Ending::Failed)?
        };
        self.handle.set_lease(new);
        self.handle.establish(written.revision);
        self.sessions
            .recheck(&self.key, &self.handle, written.revision);
        self.record = record;
        self.device = written.device.clone();
        tracing::warn!(identity = %self.key.identity, device = %self.key.device_id, lease = new, "session record written again under the replica's new lease");
        self.push(registered(written.device)).await;
        Ok(())
    }

    /// Sends to the client; a client that has gone is noticed by the loop.
    async fn push(&self, message: pb::ConnectResponse) {
        let _ = self.outbound.send(Ok(Box::new(message))).await;
    }

    async fn finish(mut self, ending: Ending) {
        let inner = &self.sessions.inner;
        let gone = match &ending {
            Ending::ShuttingDown => pb::LeaveReason::Expired,
            Ending::Displaced(why) => why.leave_reason(),
            Ending::Disconnected | Ending::Failed(_) => pb::LeaveReason::Disconnected,
        };
        for (_, leg) in self.legs.drain() {
            let _ = leg.events.try_send(LegEvent::Gone(gone));
        }
        let last_word = match ending {
            Ending::Disconnected => None,
            Ending::Failed(err) => Some(Status::from(err)),
            Ending::Displaced(why) => Some(Status::from(Error::Displaced(why.message()))),
            Ending::ShuttingDown => Some(Status::from(Error::ShuttingDown(
                "reconnect (to another replica)",
            ))),
        };
        // The record goes before the stream ends, so that a client seeing the end can count
        // on its presence being gone. At shutdown the replica lease revoke removes every
        // record in one write, and a displaced session's record is no longer its own.
        {
            let _order = inner.table.write_lock(&self.key).lock().await;
            if inner.table.release(&self.key, &self.handle.id)
                && gone == pb::LeaveReason::Disconnected
                && let Err(err) = inner
                    .store
                    .close_stream(&self.key, self.handle.lease())
                    .await
            {
                tracing::warn!(identity = %self.key.identity, device = %self.key.device_id, error = %err, "could not remove a closed session's record; it goes with the replica lease");
            }
        }
        if let Some(status) = last_word {
            let _ = tokio::time::timeout(LAST_WORD_WITHIN, self.outbound.send(Err(status))).await;
        }
        tracing::debug!(identity = %self.key.identity, device = %self.key.device_id, "session closed");
    }
}

/// How long a session whose record vanished with the replica lease waits for the next
/// lease (the keeper notices a lost lease within a TTL and grants another at once).
const REREGISTER_WITHIN: Duration = Duration::from_secs(30);

fn cancel(offer_id: String, reason: pb::CancelReason) -> pb::ConnectResponse {
    out(Out::Cancel(pb::ConnectCancel {
        offer_id,
        reason: reason as i32,
    }))
}
