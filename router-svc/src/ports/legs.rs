//! One leg of a Dial on the wire: a `SessionRelayService.Offer` stream to the presence
//! replica holding the device's session, run by a task that reports what it hears, and the
//! handle the Dial uses to cancel or end the leg. Dropping the handle half-closes the
//! stream, which presence treats as a failed offer (the device is told).

use proto::presence::v1 as ppb;
use proto::presence::v1::offer_request::Kind as Ask;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::communication::LegNews;
use crate::peers::Peers;

/// How long presence may take to set a leg up: it forwards to the holder (up to 15 s,
/// the holder waiting up to 10 s for the session to take the offer). The leg itself lasts
/// as long as the Dial keeps it.
const OPEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// A ringing or connected leg's stream, as the shell holds it.
pub(crate) struct LegLink {
    requests: mpsc::Sender<ppb::OfferRequest>,
}

impl LegLink {
    pub(crate) fn tell(&self, kind: Ask) {
        let _ = self
            .requests
            .try_send(ppb::OfferRequest { kind: Some(kind) });
    }
}

/// Opens the offer stream of the Dial's leg `slot` to the presence replica at `replica`,
/// on a task that reports what it hears on `events`.
pub(crate) fn open(
    peers: &Peers,
    slot: usize,
    replica: &str,
    start: ppb::OfferStart,
    events: mpsc::Sender<(usize, LegNews)>,
) -> LegLink {
    let (requests, outgoing) = mpsc::channel(4);
    let link = LegLink { requests };
    link.tell(Ask::Start(start));
    let relay = peers.relay(replica);
    // The leg's calls carry the communication's trace context.
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let mut relay = match relay {
                Ok(relay) => relay,
                Err(err) => {
                    let _ = events
                        .send((
                            slot,
                            LegNews::Failed(tonic::Status::unavailable(err.to_string())),
                        ))
                        .await;
                    return;
                }
            };
            let opened =
                tokio::time::timeout(OPEN_WITHIN, relay.offer(ReceiverStream::new(outgoing)));
            let mut stream = match opened.await {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    let _ = events.send((slot, LegNews::Failed(status))).await;
                    return;
                }
                Err(_) => {
                    let status = tonic::Status::unavailable(format!(
                        "presence did not take the offer within {OPEN_WITHIN:?}"
                    ));
                    let _ = events.send((slot, LegNews::Failed(status))).await;
                    return;
                }
            };
            loop {
                let heard = match stream.message().await {
                    Ok(Some(message)) => match message.kind {
                        Some(kind) => LegNews::from(kind),
                        None => continue,
                    },
                    Ok(None) => LegNews::Closed,
                    Err(status) => LegNews::Failed(status),
                };
                let last = matches!(heard, LegNews::Failed(_) | LegNews::Closed);
                if events.send((slot, heard)).await.is_err() || last {
                    return;
                }
            }
        }
        .instrument(span),
    );
    link
}
