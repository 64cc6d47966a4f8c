//! The async shell around one communication's [`Machine`], on the replica that accepted
//! it. The shell owns what the machine must not touch: the clock, the work in flight
//! (limiter, webhook and presence calls), the legs' relay streams, the slots held, and the
//! hangup signal. It feeds every answer, leg news, timer and hangup to the machine, then
//! performs the effects the machine returns. Once the machine has ended, the shell
//! releases the slots and writes the final record under the retention lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::apps::AppRecord;
use crate::callbacks::StatusCallbacks;
use crate::communication::{
    Answer, ClientPresence, Decision, Effect, Event, FetchFailure, Fetched, LegNews, Machine, Work,
};
use crate::context::Engine;
use crate::live::LiveComm;
use crate::model::now_ms;
use crate::ports::legs::{self, LegLink};
use crate::ports::presence;
use crate::ports::slot::{self, Admission, Slot};
use crate::webhook::{WebhookError, WebhookRequest};

/// How long a runner keeps trying to write its communication's final record.
const FINAL_WRITE_FOR: Duration = Duration::from_secs(300);
/// News queued from a Dial's legs.
const LEG_NEWS: usize = 64;

/// What a piece of work brought back, with the slot it took, if any.
enum Reply {
    Slot(Admission),
    Fetched(Fetched),
    Presence(Result<Vec<ClientPresence>, String>),
    IdentitySlot(Admission),
}

/// Runs one communication.
pub struct Runner {
    engine: Arc<Engine>,
    comm: Arc<LiveComm>,
    app: Arc<AppRecord>,
    callbacks: Option<StatusCallbacks>,
    machine: Machine,
    began: tokio::time::Instant,
    /// The communications slot, once granted.
    slot: Option<Slot>,
    /// The connected identity's slot, while its Dial lasts.
    identity_slot: Option<Slot>,
    /// The current Dial's legs, by their place in it.
    legs: Vec<LegLink>,
    news_tx: mpsc::Sender<(usize, LegNews)>,
    news: mpsc::Receiver<(usize, LegNews)>,
    work: FuturesUnordered<BoxFuture<'static, (u64, Reply)>>,
}

impl Runner {
    /// A runner for `comm` under `app`.
    pub fn new(engine: Arc<Engine>, comm: Arc<LiveComm>, app: Arc<AppRecord>) -> Self {
        let callbacks = StatusCallbacks::start(&app, &engine.webhooks);
        let machine = Machine::new(app.clone(), engine.fail_closed, now_ms());
        let (news_tx, news) = mpsc::channel(LEG_NEWS);
        Self {
            engine,
            comm,
            app,
            callbacks,
            machine,
            began: tokio::time::Instant::now(),
            slot: None,
            identity_slot: None,
            legs: Vec::new(),
            news_tx,
            news,
            work: FuturesUnordered::new(),
        }
    }

    /// Runs the communication to its end.
    #[tracing::instrument(skip_all, fields(communication = %self.comm.id))]
    pub async fn run(mut self) {
        let comm = self.comm.clone();
        let hangup = comm.hangup_requested();
        tokio::pin!(hangup);
        let mut hung_up = false;
        self.step(self.now(), Event::Start).await;
        while !self.machine.is_ended() {
            let wake = self.comm.read(|rec| self.machine.wake_at(rec));
            let far = self.began + Duration::from_secs(86_400 * 365);
            let wake_instant = wake.map_or(far, |ms| self.began + Duration::from_millis(ms));
            tokio::select! {
                Some((ticket, reply)) = self.work.next(), if !self.work.is_empty() => {
                    self.answer(ticket, reply).await;
                }
                Some((link, news)) = self.news.recv() => {
                    self.step(self.now(), Event::Leg { link, news }).await;
                }
                _ = tokio::time::sleep_until(wake_instant), if wake.is_some() => {
                    // Never earlier than asked, whatever the rounding of the clock.
                    let now = self.now().max(wake.unwrap_or(0));
                    self.step(now, Event::Tick).await;
                }
                source = &mut hangup, if !hung_up => {
                    hung_up = true;
                    self.step(self.now(), Event::Hangup(source)).await;
                }
            }
        }
        self.work = FuturesUnordered::new();
        self.close_legs().await;
        self.engine.stats.ended(self.comm.read(|c| c.outcome));
        if let Some(slot) = self.slot.take() {
            slot.release().await;
        }
        write_final(&self.engine, &self.comm).await;
        self.engine.live.remove(&self.comm);
    }

    fn now(&self) -> u64 {
        self.began.elapsed().as_millis() as u64
    }

    /// Moves the machine on `event` and performs what it says.
    async fn step(&mut self, now: u64, event: Event) {
        let effects = self.comm.update(|rec| self.machine.handle(rec, now, event));
        for effect in effects {
            match effect {
                Effect::Work { ticket, work } => self.start(ticket, work),
                Effect::OpenLeg {
                    link,
                    replica,
                    start,
                } => {
                    self.engine.stats.offers.inc();
                    debug_assert_eq!(link, self.legs.len());
                    let leg = legs::open(
                        &self.engine.peers,
                        link,
                        &replica,
                        start,
                        self.news_tx.clone(),
                    );
                    self.legs.push(leg);
                }
                Effect::Tell { link, kind } => {
                    if let Some(leg) = self.legs.get(link) {
                        leg.tell(kind);
                    }
                }
                Effect::CloseLegs => self.close_legs().await,
                Effect::Save => self.engine.store.save(&self.comm),
                Effect::Callback(params) => {
                    if let Some(callbacks) = &self.callbacks {
                        callbacks.send(params);
                    }
                }
            }
        }
    }

    /// Closes the Dial's legs (their streams half-close after what was told them) and
    /// releases its identity slot; news still queued from them is dropped.
    async fn close_legs(&mut self) {
        self.legs.clear();
        let (news_tx, news) = mpsc::channel(LEG_NEWS);
        (self.news_tx, self.news) = (news_tx, news);
        if let Some(slot) = self.identity_slot.take() {
            slot.release().await;
        }
    }

    /// Feeds an answer to the machine, keeping the slot it granted; a stale one is
    /// dropped (a slot in it is released in the background).
    async fn answer(&mut self, ticket: u64, reply: Reply) {
        if !self.machine.awaits(ticket) {
            return;
        }
        let answer = match reply {
            Reply::Slot(admission) => {
                let (decision, slot) = decide(admission);
                if let Some(slot) = slot {
                    // Written with the next record, so a replica settling it can release it.
                    self.comm.set_slot(slot.id());
                    self.slot = Some(slot);
                }
                Answer::Slot(decision)
            }
            Reply::IdentitySlot(admission) => {
                let (decision, slot) = decide(admission);
                if slot.is_some() {
                    self.identity_slot = slot;
                }
                Answer::IdentitySlot(decision)
            }
            Reply::Fetched(fetched) => Answer::Fetched(fetched),
            Reply::Presence(presence) => Answer::Presence(presence),
        };
        self.step(self.now(), Event::Done { ticket, answer }).await;
    }

    /// Starts `work`; its answer comes back with `ticket`.
    fn start(&mut self, ticket: u64, work: Work) {
        let engine = self.engine.clone();
        let account = self.comm.account.clone();
        let work: BoxFuture<'static, Reply> = match work {
            Work::AcquireSlot => {
                let id = self.comm.id.clone();
                async move {
                    let hold = engine.slot_hold;
                    Reply::Slot(slot::acquire(&engine.peers, &account, &id, hold).await)
                }
                .boxed()
            }
            Work::AcquireIdentitySlot { identity } => async move {
                let resource = slot::identity_resource(&identity);
                let hold = engine.slot_hold;
                let admission = slot::acquire_for(&engine.peers, &account, &resource, "", hold);
                Reply::IdentitySlot(admission.await)
            }
            .boxed(),
            Work::ReadPresence { identities } => async move {
                Reply::Presence(presence::read(&engine.peers, &account, identities).await)
            }
            .boxed(),
            Work::Fetch {
                url,
                method,
                params,
            } => {
                let secret = self.app.signing_secret.clone();
                async move {
                    let request = WebhookRequest {
                        url: &url,
                        method,
                        params: &params,
                        secret: &secret,
                    };
                    let started = Instant::now();
                    let result = engine.webhooks.send(&request).await;
                    let duration_ms = started.elapsed().as_millis();
                    let result = result
                        .map(|response| (response.status, response.body))
                        .map_err(|err| FetchFailure {
                            http_status: match err {
                                WebhookError::Status(code) => Some(code),
                                _ => None,
                            },
                            error: err.to_string(),
                        });
                    Reply::Fetched(Fetched {
                        duration_ms,
                        result,
                    })
                }
                .boxed()
            }
        };
        // The work's calls carry the communication's trace context.
        let span = tracing::Span::current();
        self.work.push(
            work.map(move |reply| (ticket, reply))
                .instrument(span)
                .boxed(),
        );
    }
}

/// Writes the final record, again and again while etcd refuses it (a leader change, a
/// member down), pausing 250 ms doubling to 5 s, for up to [`FINAL_WRITE_FOR`]: a final
/// record left unwritten would keep the communication running in etcd, indexed under a
/// lease that is still alive, so no other replica would settle it. After that the
/// record stays until this replica's lease ends and another settles it (router_lost),
/// or this replica's sweep settles it as an orphan.
async fn write_final(engine: &Engine, comm: &Arc<LiveComm>) {
    let until = tokio::time::Instant::now() + FINAL_WRITE_FOR;
    let mut pause = Duration::from_millis(250);
    loop {
        match engine.store.flush(comm).await {
            Ok(()) => return,
            Err(err) if tokio::time::Instant::now() + pause < until => {
                tracing::warn!(error = %err, retry_in = ?pause, "the final record of a communication was not written; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                tracing::error!(error = %err, "the final record of a communication was not written; giving up (another replica settles it once this one's lease ends)");
                return;
            }
        }
    }
}

/// The machine's word for an admission, and the slot to keep.
fn decide(admission: Admission) -> (Decision, Option<Slot>) {
    match admission {
        Admission::Granted(slot) => (Decision::Granted, Some(*slot)),
        Admission::Unlimited => (Decision::Unlimited, None),
        Admission::Busy { in_flight, limit } => (Decision::Busy { in_flight, limit }, None),
        Admission::Unreachable(why) => (Decision::Unreachable(why), None),
    }
}
