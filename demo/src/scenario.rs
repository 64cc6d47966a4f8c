//! The six steps of the demo, each printing what it did and checking what it got:
//!
//! 1. Route to the demo address: CONNECTED to the demo identity's softphone;
//! 2. Hangup: ENDED, the softphone is told `remote_hangup`;
//! 3. that softphone stops: presence says offline, Route gives OFFLINE and the `<Say>` after
//!    the Dial runs;
//! 4. the account's `communications` limit set to 1 and held by a second softphone that
//!    never hangs up: Route gives BUSY at once;
//! 5. a staged Dial (`bob`, then the demo identity 8 s later): bob is offline, so she is
//!    rung at once, and the timeline says why;
//! 6. a busy agent (`identity.communications` = 1): while she is on one communication, the
//!    next one does not ring her — her leg ends busy and the `<Say>` runs.
//!
//! The limits the demo changes are put back at the end, pass or fail.

use std::time::Duration;

use proto::router::v1::{Communication, LegEndReason, TimelineEventKind};
use tokio::time::Instant;

use crate::calls::{Calls, PreviousLimit};
use crate::show::{self, outcome_name, state_name};
use crate::softphone::{Softphone, SoftphoneLauncher};
use crate::{Failure, Stack};

/// The `from` of every communication of the demo.
const CALLER: &str = "+15551234";
/// The address of the staged Dial the demo creates.
const STAGED_ADDRESS: &str = "+15550101";
/// How long the first softphone lets an offer ring before it answers (time to answer
/// first from another device).
const ANSWER_AFTER_MS: &str = "2000";
/// The limiter resource of communications in flight per account.
const COMMUNICATIONS: &str = "communications";
/// The limiter resource of connected communications per identity.
const IDENTITY_COMMUNICATIONS: &str = "identity.communications";

/// The demo failed at `step` (0: before the first step).
#[derive(Debug, Clone)]
pub struct Failed {
    /// The step that failed.
    pub step: usize,
    /// What it expected and got.
    pub failure: Failure,
}

/// Runs the demo against `stack`, printing each step, and stops the softphones it
/// started and puts back the limits it changed before returning.
pub async fn run(stack: Stack, launcher: SoftphoneLauncher) -> Result<(), Failed> {
    let calls = Calls::new(&stack).map_err(|failure| Failed { step: 0, failure })?;
    let mut demo = Demo {
        ids: Ids(0),
        stack,
        calls,
        launcher,
        step: 0,
        phones: Vec::new(),
        changed: Vec::new(),
    };
    let outcome = demo.steps().await;
    demo.tidy().await;
    outcome.map_err(|failure| Failed {
        step: demo.step,
        failure,
    })?;
    println!(
        "\ndemo passed: CONNECTED and answered, hung up, OFFLINE with the fallback, BUSY over \
         the limit, a staged Dial, a busy agent not rung"
    );
    Ok(())
}

/// `CM_demo_1`, `CM_demo_2`, …: the ids of the demo's communications, in order.
#[derive(Debug)]
struct Ids(usize);

impl Ids {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("CM_demo_{}", self.0)
    }

    /// The id `ahead` places after the last one handed out (1: the next one).
    fn ahead(&self, ahead: usize) -> String {
        format!("CM_demo_{}", self.0 + ahead)
    }
}

#[derive(Debug)]
struct Demo {
    ids: Ids,
    stack: Stack,
    calls: Calls,
    launcher: SoftphoneLauncher,
    step: usize,
    /// The running softphones: `softphone` (answers after 2 s), later `softphone-desk`.
    phones: Vec<Softphone>,
    /// Limits changed and not yet put back.
    changed: Vec<(&'static str, PreviousLimit)>,
}

impl Demo {
    async fn steps(&mut self) -> Result<(), Failure> {
        self.start_first_softphone().await?;
        let first = self.connected_and_answered().await?;
        self.hung_up(&first).await?;
        self.offline_with_fallback().await?;
        self.busy_over_the_limit().await?;
        let staged = self.staged_dial().await?;
        self.busy_agent(&staged).await
    }

    fn step(&mut self, title: &str) {
        self.step += 1;
        println!("\n== {}. {title}", self.step);
    }

    async fn start_first_softphone(&mut self) -> Result<(), Failure> {
        let identity = self.stack.identity.clone();
        eprintln!(
            "[demo] starting a softphone for {identity} (--auto answer after {ANSWER_AFTER_MS} \
             ms; log: {})",
            self.launcher.logs.join("softphone.log").display()
        );
        let flags = ["--auto", "answer", "--answer-after-ms", ANSWER_AFTER_MS];
        let phone = self
            .launcher
            .start("softphone", &identity, "alice-softphone", &flags)
            .await?;
        self.phones.push(phone);
        self.wait_presence("STATUS_AVAILABLE", Duration::from_secs(30))
            .await?;
        eprintln!("[demo] {identity} is available on her softphone");
        Ok(())
    }

    /// Step 1; the communication's id.
    async fn connected_and_answered(&mut self) -> Result<String, Failure> {
        let (identity, address) = (self.stack.identity.clone(), self.stack.address.clone());
        self.step(&format!(
            "Route {CALLER} -> {address}: the application dials client {identity}; her \
             softphone answers"
        ));
        let id = self.ids.next();
        let reply = self.route(&id, &address).await?;
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_CONNECTED",
            "the first Route",
        )?;
        expect(
            &reply.connected_identity,
            "connectedIdentity",
            &identity,
            "the first Route",
        )?;
        self.phone(0)?.saw(&format!("connected {id}")).await?;
        Ok(id)
    }

    /// Step 2.
    async fn hung_up(&mut self, id: &str) -> Result<(), Failure> {
        self.step(&format!(
            "Hangup {id} (RouterService/Hangup): the softphone is told, the slot is freed"
        ));
        let reply = self.calls.hangup(id, "demo: caller hung up").await?;
        print!("{}", show::communication(&reply));
        let state = state_name(reply.state);
        expect(state, "state", "COMMUNICATION_STATE_ENDED", "Hangup")?;
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_CONNECTED",
            "Hangup",
        )?;
        let ended = format!("ended {id} reason=remote_hangup");
        self.phone(0)?.saw(&ended).await
    }

    /// Step 3.
    async fn offline_with_fallback(&mut self) -> Result<(), Failure> {
        let identity = self.stack.identity.clone();
        self.step(&format!(
            "{identity}'s softphone stops (her presence goes with its stream); Route again: \
             OFFLINE, then the Say after the Dial"
        ));
        if !self.phones.is_empty() {
            self.phones.remove(0).stop().await;
        }
        self.wait_presence("STATUS_OFFLINE", Duration::from_secs(10))
            .await?;
        println!("    GetPresence {identity}: STATUS_OFFLINE");
        let id = self.ids.next();
        let reply = self.route(&id, &self.stack.address.clone()).await?;
        let outcome = outcome_name(reply.outcome);
        expect(
            outcome,
            "outcome",
            "OUTCOME_OFFLINE",
            &format!("Route with {identity} offline"),
        )?;
        let said = reply
            .timeline
            .iter()
            .any(|event| event.details.get("verb").is_some_and(|verb| verb == "Say"));
        if !said {
            return Err(Failure::new(format!(
                "the timeline of {id} does not show the <Say> after the Dial"
            )));
        }
        println!("    ok: the timeline shows the <Say> after the Dial");
        Ok(())
    }

    /// Step 4.
    async fn busy_over_the_limit(&mut self) -> Result<(), Failure> {
        let account = self.stack.account.clone();
        self.step(&format!(
            "SetLimit {account}/{COMMUNICATIONS} = 1; a softphone that never hangs up holds \
             the one slot; Route again: BUSY"
        ));
        self.set_limit(COMMUNICATIONS, 1).await?;
        self.wait_usage_limit(1).await?;
        println!("    SetLimit done; GetUsage shows limit 1");
        let identity = self.stack.identity.clone();
        let desk = ["--auto", "answer"];
        let phone = self
            .launcher
            .start("softphone-desk", &identity, "alice-desk", &desk)
            .await?;
        self.phones.push(phone);
        self.wait_presence("STATUS_AVAILABLE", Duration::from_secs(30))
            .await?;
        println!(
            "    a second softphone for {identity} (device alice-desk, --auto answer, no \
             hangup) is up"
        );
        let held = self.ids.next();
        let reply = self.route(&held, &self.stack.address.clone()).await?;
        let what = "Route holding the only slot";
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_CONNECTED",
            what,
        )?;
        self.phone(0)?.saw(&format!("connected {held}")).await?;
        let usage = self.calls.usage(COMMUNICATIONS).await?;
        if usage.in_flight != 1 {
            return Err(Failure::new(format!(
                "GetUsage should show 1 in flight, not {} (limit {})",
                usage.in_flight, usage.limit
            )));
        }
        println!("    GetUsage {account}/{COMMUNICATIONS}: 1 in flight, limit 1");
        let id = self.ids.next();
        let reply = self.route(&id, &self.stack.address.clone()).await?;
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_BUSY",
            "Route over the limit",
        )?;
        self.hang_up_quietly(&held).await
    }

    /// Step 5; the id of the communication it leaves connected.
    async fn staged_dial(&mut self) -> Result<String, Failure> {
        let identity = self.stack.identity.clone();
        self.step(&format!(
            "A staged Dial on {STAGED_ADDRESS}: bob first, {identity} 8 s later — bob is \
             offline, so {identity} is rung at once"
        ));
        self.restore_limit(COMMUNICATIONS).await?;
        let instructions = format!(
            "<Response><Dial timeout=\"10\"><Client>bob</Client><Client delay=\"8\">{identity}\
             </Client></Dial></Response>"
        );
        self.calls
            .put_application(STAGED_ADDRESS, &instructions)
            .await?;
        println!("    {STAGED_ADDRESS}: {instructions}");
        let id = self.ids.next();
        let reply = self.route(&id, STAGED_ADDRESS).await?;
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_CONNECTED",
            "the staged Dial",
        )?;
        let why = format!("offered to {identity}/alice-desk (every earlier leg had ended)");
        if !reply
            .timeline
            .iter()
            .any(|event| event.message.contains(&why))
        {
            return Err(Failure::new(format!(
                "the timeline of {id} does not say {identity} was rung because bob's turn had \
                 ended (no \"{why}\")"
            )));
        }
        println!("    ok: the timeline says why {identity} was rung before her delay");
        self.phone(0)?.saw(&format!("connected {id}")).await?;
        Ok(id)
    }

    /// Step 6: `staged` is still connected, from before the limit existed.
    async fn busy_agent(&mut self, staged: &str) -> Result<(), Failure> {
        let (account, identity) = (self.stack.account.clone(), self.stack.identity.clone());
        let (on, next) = (self.ids.ahead(1), self.ids.ahead(2));
        self.step(&format!(
            "A busy agent: SetLimit {account}/{IDENTITY_COMMUNICATIONS} = 1 (one communication \
             per identity); while {identity} is on {on}, {next} does not ring her"
        ));
        self.set_limit(IDENTITY_COMMUNICATIONS, 1).await?;
        // The staged communication was answered before the limit existed: it holds no
        // identity slot. A new one does: hang it up and connect another first.
        self.hang_up_quietly(staged).await?;
        let on = self.ids.next();
        let reply = self.calls.route(&on, CALLER, &self.stack.address).await?;
        let what = format!("{identity}'s first communication under the limit");
        expect(
            outcome_name(reply.outcome),
            "outcome",
            "OUTCOME_CONNECTED",
            &what,
        )?;
        self.phone(0)?.saw(&format!("connected {on}")).await?;
        println!("    {identity} is on {on}");
        let id = self.ids.next();
        let reply = self.route(&id, &self.stack.address.clone()).await?;
        let busy = LegEndReason::Busy as i32;
        if !reply.legs.iter().any(|leg| leg.end_reason == busy) {
            return Err(Failure::new(format!(
                "{id}'s leg to {identity} did not end busy"
            )));
        }
        let started = TimelineEventKind::LegStarted as i32;
        if reply.timeline.iter().any(|event| event.kind == started) {
            return Err(Failure::new(format!(
                "{id} rang {identity} while she was on {on}"
            )));
        }
        println!(
            "    ok: {identity}'s leg ended busy without ringing; the <Say> after the Dial ran"
        );
        self.hang_up_quietly(&on).await
    }

    /// Route `id` from the demo caller to `to`, printing the communication.
    async fn route(&self, id: &str, to: &str) -> Result<Communication, Failure> {
        let reply = self.calls.route(id, CALLER, to).await?;
        print!("{}", show::communication(&reply));
        Ok(reply)
    }

    /// Hangup `id` (no output but the softphone's lines about it).
    async fn hang_up_quietly(&mut self, id: &str) -> Result<(), Failure> {
        self.calls.hangup(id, "").await?;
        let ended = format!("ended {id} reason=remote_hangup");
        self.phone(0)?.saw(&ended).await
    }

    /// The `index`th running softphone.
    fn phone(&mut self, index: usize) -> Result<&mut Softphone, Failure> {
        self.phones
            .get_mut(index)
            .ok_or_else(|| Failure::new("no softphone is running"))
    }

    /// SetLimit, remembering the account's own limit to put it back later.
    async fn set_limit(&mut self, resource: &'static str, max: u32) -> Result<(), Failure> {
        if !self.changed.iter().any(|(changed, _)| *changed == resource) {
            let previous = self.calls.limit(resource).await?;
            self.changed.push((resource, previous));
        }
        self.calls.set_limit(resource, max).await
    }

    async fn restore_limit(&mut self, resource: &str) -> Result<(), Failure> {
        let Some(at) = self.changed.iter().position(|(r, _)| *r == resource) else {
            return Ok(());
        };
        let (resource, previous) = self.changed.remove(at);
        self.calls.restore_limit(resource, previous).await
    }

    /// Polls GetUsage until it shows the new limit (the limiter applies it from its watch).
    async fn wait_usage_limit(&self, limit: u32) -> Result<(), Failure> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.calls.usage(COMMUNICATIONS).await?.limit != limit {
            if Instant::now() >= deadline {
                return Err(Failure::new(format!(
                    "GetUsage does not show the new limit {limit} after 5 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Polls GetPresence of the demo identity until it says `status`.
    async fn wait_presence(&self, status: &str, timeout: Duration) -> Result<(), Failure> {
        let identity = &self.stack.identity;
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.calls.presence_status(identity).await?;
            if now == status {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(format!(
                    "GetPresence says {identity} is {now}, not {status}, after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the softphones and puts back the limits, whatever happened (best effort: the
    /// first failure is what the demo reports).
    async fn tidy(&mut self) {
        for phone in self.phones.drain(..) {
            phone.stop().await;
        }
        while let Some((resource, previous)) = self.changed.pop() {
            if let Err(failure) = self.calls.restore_limit(resource, previous).await {
                eprintln!("[demo] could not put back the limit {resource}: {failure}");
            }
        }
    }
}

/// `got` is `want`, or the demo fails; prints `    ok: FIELD is WANT`.
fn expect(got: &str, field: &str, want: &str, what: &str) -> Result<(), Failure> {
    if got != want {
        let got = if got.is_empty() { "nothing" } else { got };
        return Err(Failure::new(format!(
            "{what}: expected {field} {want}, got {got}"
        )));
    }
    println!("    ok: {field} is {want}");
    Ok(())
}
