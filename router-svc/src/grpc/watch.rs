//! WatchCommunication: a communication's timeline as a stream — every event so far, then
//! each new one as it happens, ending after ENDED. A producer task feeds the stream, so a
//! client that goes away is noticed.

use std::pin::Pin;
use std::sync::Arc;

use plumbing::quota::QuotaPermit;
use proto::router::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

use crate::live::LiveComm;
use crate::model::is_ended;

/// The stream of WatchCommunication.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchCommunicationResponse, Status>> + Send>>;

/// Events queued for a slow reader.
const BUFFER: usize = 32;

/// `stream`, keeping `permit` (the account's watch quota) until the stream is dropped: when
/// it ends or its client goes away.
pub fn holding(stream: WatchStream, permit: Option<QuotaPermit>) -> WatchStream {
    Box::pin(stream.map(move |item| {
        let _held = &permit;
        item
    }))
}

/// The timeline of an ended (stored) communication, then the end of the stream.
pub fn replay(comm: pb::Communication) -> WatchStream {
    let events: Vec<Result<pb::WatchCommunicationResponse, Status>> = comm
        .timeline
        .iter()
        .map(|event| {
            Ok(pb::WatchCommunicationResponse {
                event: Some(event.clone()),
                communication: Some(comm.clone()),
            })
        })
        .collect();
    Box::pin(tokio_stream::iter(events))
}

/// The timeline of a communication running here, live.
///
/// When the replica stops, its communications end (and with them this stream) before the
/// server closes.
pub fn live(comm: Arc<LiveComm>) -> WatchStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut changes = comm.subscribe();
        let mut sent = 0usize;
        loop {
            let (fresh, snapshot) =
                comm.read(|c| (c.timeline[sent.min(c.timeline.len())..].to_vec(), c.clone()));
            for event in fresh {
                sent += 1;
                let message = pb::WatchCommunicationResponse {
                    event: Some(event),
                    communication: Some(snapshot.clone()),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            if is_ended(&snapshot) && sent >= snapshot.timeline.len() {
                return;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
