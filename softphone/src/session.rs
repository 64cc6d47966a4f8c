//! One Connect stream: `hello`, then the device's life on it — offers rung, answered
//! (by itself or on a command), cancelled; communications connected and ended; status
//! changes — until the stream breaks or the user quits.

use std::time::Duration;

use plumbing::client::CallCredentials;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Send;
use proto::presence::v1::connect_response::Kind as Recv;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{AutoMode, Command, DeclineScope, DeviceStatus, Event, SoftphoneArgs};

/// How long opening a stream may take, up to `registered`.
pub const OPEN_WITHIN: Duration = Duration::from_secs(10);

/// What the softphone carries from one session to the next.
#[derive(Debug, Clone)]
pub struct Memory {
    /// The device id: given, or the server's from the first session.
    pub device_id: Option<String>,
    /// The status the user chose last.
    pub status: DeviceStatus,
}

/// How a session ended.
#[derive(Debug)]
pub enum Ending {
    /// The user quit.
    Quit,
    /// The stream broke, or the server ended it (with this status).
    Broken(Status),
}

/// An offer that is ringing here.
#[derive(Debug)]
struct Ringing {
    offer_id: String,
    communication_id: String,
}

/// A communication this device accepted that has not ended.
#[derive(Debug)]
struct Accepted {
    offer_id: String,
    communication_id: String,
    hanging_up: bool,
}

/// A delayed automatic action.
#[derive(Debug)]
enum Timer {
    /// Answer this offer (as `--auto` says) if it still rings.
    Answer(String),
    /// Hang up this communication if it is still connected.
    Hangup(String),
}

/// A live Connect session.
pub struct Session<'a> {
    args: &'a SoftphoneArgs,
    events: &'a mpsc::UnboundedSender<Event>,
    outbound: mpsc::UnboundedSender<pb::ConnectRequest>,
    inbound: Streaming<pb::ConnectResponse>,
    ringing: Vec<Ringing>,
    accepted: Vec<Accepted>,
    timers: mpsc::UnboundedSender<Timer>,
    fired: mpsc::UnboundedReceiver<Timer>,
}

impl<'a> Session<'a> {
    /// Opens a stream on `channel`, sends `hello` and waits for `registered`; the session
    /// and its device.
    pub async fn open(
        channel: Channel,
        credentials: &CallCredentials,
        args: &'a SoftphoneArgs,
        memory: &Memory,
        events: &'a mpsc::UnboundedSender<Event>,
    ) -> Result<(Self, pb::Device), Status> {
        let (outbound, requests) = mpsc::unbounded_channel();
        let hello = pb::ConnectHello {
            device_id: memory.device_id.clone().unwrap_or_default(),
            status: memory.status.to_proto() as i32,
            ..Default::default()
        };
        // The receiver is alive (it is in `requests`): this cannot fail.
        let _ = outbound.send(request(Send::Hello(hello)));
        let request = tonic::Request::new(UnboundedReceiverStream::new(requests));
        let opening = async {
            let mut inbound = PresenceServiceClient::with_interceptor(channel, credentials.clone())
                .connect(request)
                .await?
                .into_inner();
            match inbound.message().await?.and_then(|m| m.kind) {
                Some(Recv::Registered(pb::ConnectRegistered {
                    device: Some(device),
                })) => Ok((inbound, device)),
                Some(_) => Err(Status::internal("the first message was not `registered`")),
                None => Err(Status::unavailable("the server closed the stream at once")),
            }
        };
        let (inbound, device) = tokio::time::timeout(OPEN_WITHIN, opening)
            .await
            .map_err(|_| Status::deadline_exceeded("no `registered` within 10 s"))??;
        let (timers, fired) = mpsc::unbounded_channel();
        let session = Self {
            args,
            events,
            outbound,
            inbound,
            ringing: Vec::new(),
            accepted: Vec::new(),
            timers,
            fired,
        };
        Ok((session, device))
    }

    /// Runs the session until the stream ends or the user quits. `commands` is `None` once
    /// the command source has closed.
    pub async fn run(
        mut self,
        memory: &mut Memory,
        commands: &mut Option<mpsc::Receiver<Command>>,
    ) -> Ending {
        let ending = loop {
            let command = async {
                match commands.as_mut() {
                    Some(receiver) => receiver.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => self.on_message(message),
                    Ok(None) => break Ending::Broken(Status::unavailable("the server closed the stream")),
                    Err(status) => break Ending::Broken(status),
                },
                command = command => match command {
                    Some(Command::Quit) => break Ending::Quit,
                    Some(command) => self.on_command(command, memory),
                    None => *commands = None,
                },
                Some(timer) = self.fired.recv() => self.on_timer(timer),
            }
        };
        if matches!(ending, Ending::Broken(_)) {
            let open = self.ringing.iter().map(|r| &r.communication_id);
            for communication_id in open.chain(self.accepted.iter().map(|a| &a.communication_id)) {
                self.emit(Event::Dropped {
                    communication_id: communication_id.clone(),
                });
            }
        }
        ending
    }

    fn on_message(&mut self, message: pb::ConnectResponse) {
        match message.kind {
            Some(Recv::Registered(registered)) => {
                if let Some(device) = registered.device {
                    self.emit(Event::StatusChanged { device });
                }
            }
            Some(Recv::Offer(offer)) => self.on_offer(offer),
            Some(Recv::Cancel(cancel)) => self.on_cancel(cancel),
            Some(Recv::Ended(ended)) => {
                self.accepted
                    .retain(|a| a.communication_id != ended.communication_id);
                self.emit(Event::Ended {
                    communication_id: ended.communication_id,
                    reason: pb::EndReason::try_from(ended.reason)
                        .unwrap_or(pb::EndReason::Unspecified),
                });
            }
            None => {}
        }
    }

    fn on_offer(&mut self, offer: pb::ConnectOffer) {
        let offer_id = offer.offer_id.clone();
        self.ringing.push(Ringing {
            offer_id: offer_id.clone(),
            communication_id: offer.communication_id.clone(),
        });
        self.emit(Event::Offer(offer));
        // The offer is shown: tell the caller this device is alerting its user.
        self.send(Send::Ringing(pb::ConnectRinging {
            offer_id: offer_id.clone(),
        }));
        if matches!(self.args.auto, Some(AutoMode::Answer | AutoMode::Reject)) {
            let delay = self.args.answer_after();
            if delay.is_zero() {
                self.on_timer(Timer::Answer(offer_id));
            } else {
                self.after(delay, Timer::Answer(offer_id));
            }
        }
    }

    fn on_cancel(&mut self, cancel: pb::ConnectCancel) {
        let reason =
            pb::CancelReason::try_from(cancel.reason).unwrap_or(pb::CancelReason::Unspecified);
        let (communication_id, after_accept) = if let Some(at) = self
            .ringing
            .iter()
            .position(|r| r.offer_id == cancel.offer_id)
        {
            (self.ringing.remove(at).communication_id, false)
        } else if let Some(at) = self
            .accepted
            .iter()
            .position(|a| a.offer_id == cancel.offer_id)
        {
            (self.accepted.remove(at).communication_id, true)
        } else {
            (String::new(), false)
        };
        self.emit(Event::Cancelled {
            communication_id,
            offer_id: cancel.offer_id,
            reason,
            after_accept,
        });
    }

    fn on_command(&mut self, command: Command, memory: &mut Memory) {
        match command {
            Command::Answer | Command::Reject | Command::RejectEverywhere => {
                let Some(first) = self.ringing.first() else {
                    self.emit(Event::Note("nothing is ringing".into()));
                    return;
                };
                let offer_id = first.offer_id.clone();
                let scope = if command == Command::RejectEverywhere {
                    DeclineScope::Everywhere
                } else {
                    DeclineScope::Here
                };
                self.answer(&offer_id, command == Command::Answer, scope);
            }
            Command::Hangup => {
                let newest = self.accepted.iter().rev().find(|a| !a.hanging_up);
                let Some(communication_id) = newest.map(|a| a.communication_id.clone()) else {
                    self.emit(Event::Note("no connected communication to hang up".into()));
                    return;
                };
                self.hangup(&communication_id);
            }
            Command::CycleStatus => {
                memory.status = memory.status.next();
                let status = pb::ConnectStatus {
                    status: memory.status.to_proto() as i32,
                    ..Default::default()
                };
                self.send(Send::Status(status));
            }
            Command::Help => self.emit(Event::Help),
            // Handled by the loop.
            Command::Quit => {}
        }
    }

    fn on_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Answer(offer_id) => {
                let accept = self.args.auto == Some(AutoMode::Answer);
                self.answer(&offer_id, accept, self.args.decline_scope);
            }
            Timer::Hangup(communication_id) => self.hangup(&communication_id),
        }
    }

    /// Accepts or rejects (here or everywhere) `offer_id` if it still rings.
    fn answer(&mut self, offer_id: &str, accept: bool, scope: DeclineScope) {
        let Some(at) = self.ringing.iter().position(|r| r.offer_id == offer_id) else {
            return;
        };
        let Ringing {
            offer_id,
            communication_id,
        } = self.ringing.remove(at);
        let reason = self.args.reject_reason.to_proto();
        self.send(Send::Answer(pb::ConnectAnswer {
            offer_id: offer_id.clone(),
            accept,
            reject_reason: if accept { 0 } else { reason as i32 },
            scope: if accept { 0 } else { scope.to_proto() as i32 },
        }));
        if !accept {
            self.emit(Event::Rejected {
                communication_id,
                offer_id,
                reason,
                everywhere: scope == DeclineScope::Everywhere,
            });
            return;
        }
        if let Some(delay) = self.args.hangup_after() {
            self.after(delay, Timer::Hangup(communication_id.clone()));
        }
        self.accepted.push(Accepted {
            offer_id: offer_id.clone(),
            communication_id: communication_id.clone(),
            hanging_up: false,
        });
        self.emit(Event::Connected {
            communication_id,
            offer_id,
        });
    }

    /// Asks to end `communication_id` if it is connected here and not already ending.
    fn hangup(&mut self, communication_id: &str) {
        let Some(call) = self
            .accepted
            .iter_mut()
            .find(|a| a.communication_id == communication_id && !a.hanging_up)
        else {
            return;
        };
        call.hanging_up = true;
        self.send(Send::Hangup(pb::ConnectHangup {
            communication_id: communication_id.to_owned(),
        }));
        self.emit(Event::HangingUp {
            communication_id: communication_id.to_owned(),
        });
    }

    /// Fires `timer` after `delay` (unless the session has ended by then).
    fn after(&self, delay: Duration, timer: Timer) {
        let timers = self.timers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = timers.send(timer);
        });
    }

    /// Sends on the stream. A failure means the stream is gone; the loop hears why.
    fn send(&self, kind: Send) {
        let _ = self.outbound.send(request(kind));
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

fn request(kind: Send) -> pb::ConnectRequest {
    pb::ConnectRequest { kind: Some(kind) }
}
