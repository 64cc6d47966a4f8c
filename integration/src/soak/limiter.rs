//! Limiter load and the leak check: Acquire/Release pairs on a few resources, a fifth of the
//! callers "crashing" (they never release; their hold is 5 s), every outcome written in the
//! callers' own [`Ledger`]; after the load, [`drain`] waits until the limiter and the ledger
//! both say nothing is held.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use plumbing::auth::Scope;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use super::fleet::{Fleet, REPLICA_TTL};
use super::pace::{self, Tally};
use super::{ACCOUNT, READY_TIMEOUT, Result, call, status_text, token};

/// Acquires started per second.
const ACQUIRES_PER_S: f64 = 20.0;
/// Resources `soak0` … the acquires rotate over, each limited to [`LIMIT`].
const RESOURCES: u64 = 8;
const LIMIT: u32 = 50;
/// The router's resource (a slot per communication) and its limit for the soak account.
pub const COMMUNICATIONS: &str = "communications";
const COMMUNICATIONS_LIMIT: u32 = 1_000;
/// Hold of a caller that releases, and of one that crashes, seconds.
const HOLD: u32 = 10;
const CRASH_HOLD: u32 = 5;
/// Attempts of one Acquire (same request id: idempotent) or Release before giving up.
const ATTEMPTS: usize = 4;
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// The callers' own account of their slots.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<Book>);

#[derive(Debug, Default)]
struct Book {
    /// Slots granted and not released, with their expiry.
    held: HashMap<String, SystemTime>,
    granted: u64,
    rejected: u64,
    released: u64,
    crashed: u64,
    /// Releases answered "not held" at the first attempt, for a slot granted and unexpired.
    refused: u64,
    /// Releases that failed every attempt (the slot expires by itself).
    abandoned: u64,
    /// Acquires that failed every attempt: granted or not, nobody knows.
    unknown: u64,
    /// The latest a slot granted to any acquire sent so far can expire.
    latest_expiry: Option<SystemTime>,
}

impl Ledger {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots granted, not released, and not yet expired at `now`.
    fn outstanding(&self, now: SystemTime) -> u64 {
        self.book().held.values().filter(|e| **e > now).count() as u64
    }
}

/// The leak check's figures.
#[derive(Debug, Clone, Default)]
pub struct SlotFigures {
    /// Slots granted, rejected, released, and held by callers that crashed.
    pub granted: u64,
    pub rejected: u64,
    pub released: u64,
    pub crashed: u64,
    /// Releases answered "not held" at their first attempt; releases and acquires that
    /// failed every attempt.
    pub refused: u64,
    pub abandoned: u64,
    pub unknown: u64,
    /// Right after the load: slots in flight as the limiter counts them (every soak
    /// resource and `communications`), and as the ledger does.
    pub server_at_load_end: Option<u64>,
    pub client_at_load_end: u64,
    /// After the drain: slots the limiter still counts (None: it could not be asked), and
    /// those the ledger still holds unexpired.
    pub leaked: Option<u64>,
    pub client_outstanding: u64,
    /// How long after the load both reached 0 (None: not before the deadline).
    pub drained_after: Option<Duration>,
    /// `resource in_flight` of what was left, for the report.
    pub left: Vec<String>,
}

/// Every resource the soak takes slots of.
fn resources() -> Vec<String> {
    let mut all: Vec<String> = (0..RESOURCES).map(|i| format!("soak{i}")).collect();
    all.push(COMMUNICATIONS.to_owned());
    all
}

fn client(addr: SocketAddr) -> std::result::Result<LimiterServiceClient<Channel>, String> {
    plumbing::client::channel(&addr.to_string())
        .map(LimiterServiceClient::new)
        .map_err(|err| format!("channel: {err}"))
}

/// Sets the soak's limits and waits until both replicas apply them.
pub async fn set_limits(fleet: &Fleet) -> Result<()> {
    let admin = token(&[Scope::Admin]);
    let addrs = fleet.addrs("limiter-svc");
    let deadline = Instant::now() + READY_TIMEOUT;
    for resource in resources() {
        let max_in_flight = if resource == COMMUNICATIONS {
            COMMUNICATIONS_LIMIT
        } else {
            LIMIT
        };
        let limit = lpb::Limit {
            account_id: ACCOUNT.to_owned(),
            resource: resource.clone(),
            max_in_flight,
            shadow: false,
        };
        let mut set = false;
        while !set || !applied(&addrs, &admin, &resource, max_in_flight).await {
            if Instant::now() >= deadline {
                return Err(format!("the limit of {resource} is not applied").into());
            }
            if !set {
                let request = lpb::SetLimitRequest {
                    limit: Some(limit.clone()),
                };
                set = client(addrs[0])?
                    .set_limit(call(&admin, request))
                    .await
                    .is_ok();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn applied(addrs: &[SocketAddr], admin: &str, resource: &str, limit: u32) -> bool {
    for addr in addrs {
        match usage(*addr, admin, resource).await {
            Some(usage) if usage.limit == limit => {}
            _ => return false,
        }
    }
    true
}

async fn usage(addr: SocketAddr, admin: &str, resource: &str) -> Option<lpb::Usage> {
    let request = lpb::GetUsageRequest {
        account_id: ACCOUNT.to_owned(),
        resource: resource.to_owned(),
    };
    let answer = client(addr)
        .ok()?
        .get_usage(call(admin, request))
        .await
        .ok()?;
    answer.into_inner().usage
}

/// Acquires through one replica and, unless the caller "crashes", releases through the
/// other after up to 300 ms; a failed attempt is repeated on the other replica.
pub fn acquires(fleet: &Fleet, ledger: Arc<Ledger>, end: Instant) -> JoinHandle<Tally> {
    let addrs = fleet.addrs("limiter-svc");
    let admin = Arc::new(token(&[Scope::Admin]));
    pace::every("acquire_release", ACQUIRES_PER_S, end, move |n| {
        let (addrs, admin, ledger) = (addrs.clone(), admin.clone(), ledger.clone());
        async move { acquire_once(&addrs, &admin, &ledger, n).await }
    })
}

async fn acquire_once(
    addrs: &[SocketAddr],
    admin: &str,
    ledger: &Ledger,
    n: u64,
) -> std::result::Result<(), String> {
    let crash = n.is_multiple_of(5);
    let hold = if crash { CRASH_HOLD } else { HOLD };
    let request = lpb::AcquireRequest {
        account_id: ACCOUNT.to_owned(),
        resource: format!("soak{}", n % RESOURCES),
        request_id: format!("soak-{n}"),
        hold_seconds: hold,
        wait_timeout_ms: 0,
    };
    {
        let latest = SystemTime::now() + Duration::from_secs(u64::from(hold) + 1);
        let mut book = ledger.book();
        book.latest_expiry = Some(book.latest_expiry.map_or(latest, |e| e.max(latest)));
    }
    let mut failure = String::new();
    let mut answer = None;
    // Each attempt goes to the next replica, as a client fails over from a dead one; the
    // request id makes a repeated grant the same slot.
    for attempt in 0..ATTEMPTS {
        let mut limiter = client(addrs[(n as usize + attempt) % addrs.len()])?;
        match limiter.acquire(call(admin, request.clone())).await {
            Ok(granted) => {
                answer = Some(granted.into_inner());
                break;
            }
            Err(status) if retryable(status.code()) => failure = status_text("Acquire", &status),
            Err(status) => return Err(status_text("Acquire", &status)),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    let Some(answer) = answer else {
        ledger.book().unknown += 1;
        return Err(failure);
    };
    if answer.decision != lpb::Decision::Granted as i32 {
        ledger.book().rejected += 1;
        return Ok(());
    }
    let expiry = answer.expire_time.map_or_else(
        || SystemTime::now() + Duration::from_secs(hold.into()),
        |t| SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32),
    );
    {
        let mut book = ledger.book();
        book.granted += 1;
        book.held.insert(answer.slot_id.clone(), expiry);
        if crash {
            // The caller dies holding its slot: it must free itself at its hold.
            book.crashed += 1;
            return Ok(());
        }
    }
    tokio::time::sleep(Duration::from_millis(n % 4 * 100)).await;
    release(addrs, n as usize + 1, admin, ledger, &answer.slot_id).await
}

/// Releases `slot_id` through `addrs[first]`, retrying failed attempts on the next
/// replicas, and books the outcome.
async fn release(
    addrs: &[SocketAddr],
    first: usize,
    admin: &str,
    ledger: &Ledger,
    slot_id: &str,
) -> std::result::Result<(), String> {
    let mut failure = None;
    for attempt in 0..ATTEMPTS {
        let mut limiter = client(addrs[(first + attempt) % addrs.len()])?;
        let request = lpb::ReleaseRequest {
            slot_id: slot_id.to_owned(),
        };
        match limiter.release(call(admin, request)).await {
            Ok(answer) => {
                let mut book = ledger.book();
                let expiry = book.held.remove(slot_id);
                // "Not held" after a failed attempt: that attempt released it.
                let refused = !answer.get_ref().released
                    && failure.is_none()
                    && expiry.is_some_and(|e| e > SystemTime::now());
                if refused {
                    book.refused += 1;
                    return Err("Release: answered not held".to_owned());
                }
                book.released += 1;
                return Ok(());
            }
            Err(status) if retryable(status.code()) => {
                failure = Some(status_text("Release", &status));
            }
            Err(status) => return Err(status_text("Release", &status)),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    ledger.book().abandoned += 1;
    Err(failure.unwrap_or_default())
}

/// Codes after which the outcome is unknown and the same request may be sent again.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// Waits until the limiter counts no slot of any soak resource and the ledger holds none
/// unexpired — at the latest until every slot ever granted has expired, plus the replica
/// TTL and 5 s — and answers both counts.
pub async fn drain(fleet: &Fleet, ledger: &Ledger, load_end: Instant) -> SlotFigures {
    let addrs = fleet.addrs("limiter-svc");
    let admin = token(&[Scope::Admin]);
    let latest = ledger.book().latest_expiry.unwrap_or_else(SystemTime::now);
    let wait = latest.duration_since(SystemTime::now()).unwrap_or_default();
    let deadline = Instant::now() + wait + Duration::from_secs(REPLICA_TTL + 5);
    let mut figures = SlotFigures {
        client_at_load_end: ledger.outstanding(SystemTime::now()),
        ..SlotFigures::default()
    };
    figures.server_at_load_end = in_flight(&addrs, &admin).await.map(|(n, _)| n);
    loop {
        let counted = in_flight(&addrs, &admin).await;
        figures.client_outstanding = ledger.outstanding(SystemTime::now());
        if let Some((n, left)) = counted {
            figures.leaked = Some(n);
            figures.left = left;
        }
        if figures.leaked == Some(0) && figures.client_outstanding == 0 {
            figures.drained_after = Some(load_end.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let book = ledger.book();
    SlotFigures {
        granted: book.granted,
        rejected: book.rejected,
        released: book.released,
        crashed: book.crashed,
        refused: book.refused,
        abandoned: book.abandoned,
        unknown: book.unknown,
        ..figures
    }
}

/// Slots in flight over every soak resource, and `resource n` for those not at 0; None
/// when a resource's usage could not be read from either replica.
async fn in_flight(addrs: &[SocketAddr], admin: &str) -> Option<(u64, Vec<String>)> {
    let mut total = 0;
    let mut left = Vec::new();
    for resource in resources() {
        let mut answer = None;
        for addr in addrs {
            answer = usage(*addr, admin, &resource).await;
            if answer.is_some() {
                break;
            }
        }
        let in_flight = answer?.in_flight;
        if in_flight > 0 {
            left.push(format!("{resource} {in_flight}"));
        }
        total += u64::from(in_flight);
    }
    Some((total, left))
}
