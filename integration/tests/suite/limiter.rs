//! limiter-svc against real etcd: admission, queues, idempotency, expiry, limits, isolation,
//! validation, the over-admission hunt through replica crashes, joins and leaves (exact and
//! with escrow blocks), even shard ownership, planned handoff, the shard map and fencing
//! tokens.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use integration::{Etcd, ServiceProcess, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1::CreateKeyRequest;
use proto::presence::v1::key_service_client::KeyServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support;

type Client = LimiterServiceClient<Channel>;

fn admin() -> String {
    Tokens::platform("*", &[Scope::Admin])
}

fn client(addr: std::net::SocketAddr) -> Client {
    LimiterServiceClient::new(plumbing::client::channel(&addr.to_string()).unwrap())
}

async fn set_limit(client: &mut Client, account: &str, resource: &str, max: u32, shadow: bool) {
    let limit = pb::Limit {
        account_id: account.into(),
        resource: resource.into(),
        max_in_flight: max,
        shadow,
    };
    client
        .set_limit(Tokens::request(
            &admin(),
            pb::SetLimitRequest { limit: Some(limit) },
        ))
        .await
        .unwrap();
}

fn acquire_req(
    account: &str,
    resource: &str,
    request_id: &str,
    hold: u32,
    wait: u32,
) -> pb::AcquireRequest {
    pb::AcquireRequest {
        account_id: account.into(),
        resource: resource.into(),
        request_id: request_id.into(),
        hold_seconds: hold,
        wait_timeout_ms: wait,
    }
}

async fn acquire(
    client: &mut Client,
    account: &str,
    resource: &str,
    hold: u32,
) -> pb::AcquireResponse {
    client
        .acquire(Tokens::request(
            &admin(),
            acquire_req(account, resource, "", hold, 0),
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The usage of AC1's `calls` as the platform sees it.
async fn calls_usage(client: &mut Client) -> Result<pb::Usage, tonic::Status> {
    let request = pb::GetUsageRequest {
        account_id: "AC1".into(),
        resource: "calls".into(),
    };
    let usage = client.get_usage(Tokens::request(&admin(), request)).await?;
    usage
        .into_inner()
        .usage
        .ok_or_else(|| tonic::Status::internal("GetUsage answered without usage"))
}

fn granted(response: &pb::AcquireResponse) -> bool {
    response.decision == pb::Decision::Granted as i32
}

async fn release(client: &mut Client, slot: &str) -> bool {
    client
        .release(Tokens::request(
            &admin(),
            pb::ReleaseRequest {
                slot_id: slot.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .released
}

/// Polls until `client` grants for (account, resource): the key's shard has an owner.
async fn ready(client: &Client, account: &str, resource: &str) {
    poll_until(
        "the key's shard to be served",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            let (account, resource) = (account.to_owned(), resource.to_owned());
            async move {
                let answer = client
                    .acquire(Tokens::request(
                        &admin(),
                        acquire_req(&account, &resource, "", 1, 0),
                    ))
                    .await
                    .ok()?;
                let answer = answer.into_inner();
                if granted(&answer) {
                    release(&mut client, &answer.slot_id).await;
                }
                Some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn rejects_when_limit_reached_across_replicas() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let replicas = [
        support::limiter(&etcd, &prefix, 100).await,
        support::limiter(&etcd, &prefix, 100).await,
        support::limiter(&etcd, &prefix, 100).await,
    ];
    let mut clients: Vec<Client> = replicas.iter().map(|r| client(r.addr)).collect();
    set_limit(&mut clients[0], "AC1", "calls", 3, false).await;
    for c in &clients {
        ready(c, "AC1", "calls").await;
    }
    let mut slots = Vec::new();
    for i in 0..3 {
        let answer = acquire(&mut clients[i % 3], "AC1", "calls", 30).await;
        assert!(granted(&answer), "{answer:?}");
        assert_eq!((answer.in_flight, answer.limit), (i as u32 + 1, 3));
        slots.push(answer.slot_id);
    }
    for c in clients.iter_mut() {
        let answer = acquire(c, "AC1", "calls", 30).await;
        assert_eq!(answer.decision, pb::Decision::Rejected as i32);
        assert_eq!((answer.in_flight, answer.limit), (3, 3));
        assert!(answer.retry_after_ms > 0);
        assert!(answer.slot_id.is_empty());
    }
    // Release through a replica that is not (necessarily) the owner; then one more fits.
    assert!(release(&mut clients[2], &slots[0]).await);
    assert!(
        !release(&mut clients[1], &slots[0]).await,
        "a second release frees nothing"
    );
    assert!(granted(&acquire(&mut clients[1], "AC1", "calls", 30).await));
    let usage = calls_usage(&mut clients[0]).await.unwrap();
    assert_eq!((usage.in_flight, usage.limit), (3, 3));
    assert!(usage.rejected_total >= 3);
    let listed = clients[1]
        .list_usage(Tokens::request(
            &admin(),
            pb::ListUsageRequest {
                account_id: "AC1".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        listed
            .into_inner()
            .usages
            .iter()
            .map(|u| u.in_flight)
            .sum::<u32>(),
        3
    );
    for r in replicas {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_retried_request_id_gets_the_same_slot_and_release_is_idempotent() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 5).await;
    let mut c = client(server.addr);
    ready(&c, "AC1", "calls").await;
    let first = c
        .acquire(Tokens::request(
            &admin(),
            acquire_req("AC1", "calls", "req-1", 30, 0),
        ))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .acquire(Tokens::request(
            &admin(),
            acquire_req("AC1", "calls", "req-1", 30, 0),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(granted(&first));
    assert_eq!(first.slot_id, again.slot_id);
    assert_eq!(first.expire_time, again.expire_time);
    assert_eq!(again.in_flight, 1, "a retry does not take a second slot");
    assert!(release(&mut c, &first.slot_id).await);
    assert!(!release(&mut c, &first.slot_id).await);
    let renewed = c
        .renew(Tokens::request(
            &admin(),
            pb::RenewRequest {
                slot_id: first.slot_id.clone(),
                hold_seconds: 10,
            },
        ))
        .await;
    assert_eq!(renewed.unwrap_err().code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn queued_callers_are_granted_in_fifo_order_and_time_out_at_their_deadline() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 1).await;
    let mut c = client(server.addr);
    ready(&c, "AC1", "calls").await;
    let holder = acquire(&mut c, "AC1", "calls", 30).await;
    assert!(granted(&holder));
    let order = Arc::new(AtomicU64::new(0));
    let mut waiters = Vec::new();
    for i in 0..3u64 {
        let (mut waiter, order) = (c.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let c = &mut waiter;
            let answer = c
                .acquire(Tokens::request(
                    &admin(),
                    acquire_req("AC1", "calls", "", 30, 20_000),
                ))
                .await
                .unwrap()
                .into_inner();
            let position = order.fetch_add(1, Ordering::SeqCst);
            if granted(&answer) {
                release(c, &answer.slot_id).await;
            }
            (i, position, granted(&answer))
        }));
        // Enqueue in a known order: wait until this caller is counted as queued.
        poll_until("caller to be queued", Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                let usage = calls_usage(&mut c).await.ok()?;
                (usage.queued == i as u32 + 1).then_some(())
            }
        })
        .await;
    }
    assert!(release(&mut c, &holder.slot_id).await);
    let mut results = Vec::new();
    for w in waiters {
        results.push(w.await.unwrap());
    }
    for (i, position, was_granted) in results {
        assert!(was_granted);
        assert_eq!(i, position, "waiter {i} was served out of order");
    }
    // A waiter whose deadline passes is rejected, not left hanging.
    let holder = acquire(&mut c, "AC1", "calls", 30).await;
    let started = std::time::Instant::now();
    let late = c
        .acquire(Tokens::request(
            &admin(),
            acquire_req("AC1", "calls", "", 30, 300),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.decision, pb::Decision::Rejected as i32);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(release(&mut c, &holder.slot_id).await);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crashed_holders_slot_expires_after_its_hold() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 1).await;
    let mut c = client(server.addr);
    ready(&c, "AC1", "calls").await;
    // The holder takes the only slot for 2 s and never releases it.
    let held = acquire(&mut c, "AC1", "calls", 2).await;
    assert!(granted(&held));
    assert!(!granted(&acquire(&mut c, "AC1", "calls", 2).await));
    let expiry = limiter_svc::convert::millis(held.expire_time.as_ref());
    poll_until(
        "the abandoned slot to expire",
        Duration::from_secs(5),
        || {
            let mut c = c.clone();
            async move { granted(&acquire(&mut c, "AC1", "calls", 2).await).then_some(()) }
        },
    )
    .await;
    assert!(
        limiter_svc::model::now_ms() >= expiry,
        "granted before the abandoned slot expired"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn limit_changes_reach_every_replica_within_a_second() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let a = support::limiter(&etcd, &prefix, 100).await;
    let b = support::limiter(&etcd, &prefix, 100).await;
    let (mut ca, cb) = (client(a.addr), client(b.addr));
    set_limit(&mut ca, "AC1", "calls", 7, false).await;
    let get = |c: &Client| {
        let mut c = c.clone();
        async move {
            c.get_limit(Tokens::request(
                &admin(),
                pb::GetLimitRequest {
                    account_id: "AC1".into(),
                    resource: "calls".into(),
                },
            ))
            .await
            .ok()
            .map(|r| r.into_inner())
        }
    };
    poll_until("limit 7 on replica B", Duration::from_secs(1), || async {
        get(&cb)
            .await
            .filter(|r| r.limit.as_ref().is_some_and(|l| l.max_in_flight == 7))
    })
    .await;
    // The * default applies to accounts without their own limit; the server default after that.
    set_limit(&mut ca, "*", "calls", 4, false).await;
    let other = poll_until("default on B", Duration::from_secs(1), || {
        let mut cb = cb.clone();
        async move {
            let r = cb
                .get_limit(Tokens::request(
                    &admin(),
                    pb::GetLimitRequest {
                        account_id: "AC2".into(),
                        resource: "calls".into(),
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (r.limit.as_ref()?.max_in_flight == 4).then_some(r)
        }
    })
    .await;
    drop(other);
    assert_eq!(
        get(&cb).await.unwrap().source,
        pb::LimitSource::Account as i32
    );
    let deleted = ca
        .delete_limit(Tokens::request(
            &admin(),
            pb::DeleteLimitRequest {
                account_id: "AC1".into(),
                resource: "calls".into(),
            },
        ))
        .await
        .unwrap();
    assert!(deleted.into_inner().deleted);
    poll_until(
        "fallback to the * default on B",
        Duration::from_secs(1),
        || async {
            get(&cb)
                .await
                .filter(|r| r.source == pb::LimitSource::Default as i32)
        },
    )
    .await;
    let server_default = get(&cb).await;
    assert!(server_default.is_some());
    let listed = ca
        .list_limits(Tokens::request(
            &admin(),
            pb::ListLimitsRequest {
                account_id: "*".into(),
                page_size: 0,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().limits.len(), 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn lowering_a_limit_below_in_flight_grants_nothing_until_usage_falls_under_it() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 100).await;
    let mut c = client(server.addr);
    set_limit(&mut c, "AC1", "calls", 3, false).await;
    ready(&c, "AC1", "calls").await;
    let mut slots = Vec::new();
    for _ in 0..3 {
        slots.push(acquire(&mut c, "AC1", "calls", 30).await.slot_id);
    }
    set_limit(&mut c, "AC1", "calls", 1, false).await;
    assert!(!granted(&acquire(&mut c, "AC1", "calls", 30).await));
    release(&mut c, &slots[0]).await;
    release(&mut c, &slots[1]).await;
    assert!(
        !granted(&acquire(&mut c, "AC1", "calls", 30).await),
        "1 in flight is not under a limit of 1"
    );
    release(&mut c, &slots[2]).await;
    assert!(granted(&acquire(&mut c, "AC1", "calls", 30).await));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shadow_mode_grants_over_the_limit_and_counts_would_be_rejections() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 100).await;
    let mut c = client(server.addr);
    set_limit(&mut c, "AC1", "calls", 1, true).await;
    ready(&c, "AC1", "calls").await;
    let first = acquire(&mut c, "AC1", "calls", 30).await;
    let second = acquire(&mut c, "AC1", "calls", 30).await;
    assert!(granted(&first) && !first.shadow);
    assert!(granted(&second) && second.shadow);
    let usage = calls_usage(&mut c).await.unwrap();
    assert_eq!(
        (usage.in_flight, usage.shadow_rejected_total, usage.shadow),
        (2, 1, true)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_changes_nothing() {
    let etcd = Etcd::start().await;
    let server = support::limiter(&etcd, &unique_prefix(), 100).await;
    let mut c = client(server.addr);
    ready(&c, "AC1", "calls").await;
    let cases = [
        (acquire_req("AC1", "", "", 1, 0), "resource"),
        (acquire_req("AC1", &"r".repeat(301), "", 1, 0), "resource"),
        (acquire_req("AC1", "a b", "", 1, 0), "resource"),
        (acquire_req("A C", "calls", "", 1, 0), "account_id"),
        (acquire_req("AC1", "calls", "bad id", 1, 0), "request_id"),
        (acquire_req("AC1", "calls", "", 86_401, 0), "hold_seconds"),
        (
            acquire_req("AC1", "calls", "", 1, 60_001),
            "wait_timeout_ms",
        ),
    ];
    for (request, field) in cases {
        let status = c
            .acquire(Tokens::request(&admin(), request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            status.message()
        );
    }
    let bad_slot = c
        .release(Tokens::request(
            &admin(),
            pb::ReleaseRequest {
                slot_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert!(bad_slot.code() == Code::InvalidArgument && bad_slot.message().starts_with("slot_id:"));
    let bad_renew = c
        .renew(Tokens::request(
            &admin(),
            pb::RenewRequest {
                slot_id: "00000000000000000000000000".into(),
                hold_seconds: 90_000,
            },
        ))
        .await
        .unwrap_err();
    assert!(
        bad_renew.message().starts_with("hold_seconds:"),
        "{bad_renew:?}"
    );
    for (max, field) in [
        (0, "limit.max_in_flight"),
        (1_000_001, "limit.max_in_flight"),
    ] {
        let limit = pb::Limit {
            account_id: "AC1".into(),
            resource: "calls".into(),
            max_in_flight: max,
            shadow: false,
        };
        let status = c
            .set_limit(Tokens::request(
                &admin(),
                pb::SetLimitRequest { limit: Some(limit) },
            ))
            .await
            .unwrap_err();
        assert!(
            status.code() == Code::InvalidArgument && status.message().starts_with(field),
            "{status:?}"
        );
    }
    let missing = c
        .set_limit(Tokens::request(
            &admin(),
            pb::SetLimitRequest { limit: None },
        ))
        .await
        .unwrap_err();
    assert!(missing.message().starts_with("limit:"));
    // Nothing was stored by any of it.
    let limits = c
        .list_limits(Tokens::request(
            &admin(),
            pb::ListLimitsRequest {
                account_id: "AC1".into(),
                page_size: 10,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap();
    assert!(limits.into_inner().limits.is_empty());
    assert_eq!(calls_usage(&mut c).await.unwrap().in_flight, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn accounts_cannot_touch_each_others_slots_or_limits() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let presence = support::presence(&etcd, &prefix).await;
    let server = support::limiter(&etcd, &prefix, 100).await;
    let mut keys = KeyServiceClient::new(support::channel(&presence));
    let mut token_for = HashMap::new();
    for account in ["AC1", "AC2"] {
        let created = keys
            .create_key(Tokens::request(
                &admin(),
                CreateKeyRequest {
                    account_id: account.into(),
                    description: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let key_id = created.key.unwrap().key_id;
        token_for.insert(
            account,
            Tokens::signed(
                &key_id,
                &created.secret,
                account,
                None,
                &[Scope::LimiterAcquire, Scope::LimiterAdmin],
                300,
            ),
        );
    }
    let mut c = client(server.addr);
    poll_until(
        "account keys to reach the limiter",
        Duration::from_secs(2),
        || {
            let mut c = c.clone();
            let token = token_for["AC1"].clone();
            async move {
                c.acquire(Tokens::request(&token, acquire_req("", "calls", "", 1, 0)))
                    .await
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await;
    let mine = c
        .acquire(Tokens::request(
            &token_for["AC1"],
            acquire_req("", "calls", "", 30, 0),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(granted(&mine));
    let foreign = c
        .acquire(Tokens::request(
            &token_for["AC2"],
            acquire_req("AC1", "calls", "", 30, 0),
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);
    let stolen = c
        .release(Tokens::request(
            &token_for["AC2"],
            pb::ReleaseRequest {
                slot_id: mine.slot_id.clone(),
            },
        ))
        .await
        .unwrap();
    assert!(!stolen.into_inner().released, "AC2 released AC1's slot");
    let renew = c
        .renew(Tokens::request(
            &token_for["AC2"],
            pb::RenewRequest {
                slot_id: mine.slot_id.clone(),
                hold_seconds: 60,
            },
        ))
        .await;
    assert_eq!(renew.unwrap_err().code(), Code::NotFound);
    let usage = c
        .get_usage(Tokens::request(
            &token_for["AC2"],
            pb::GetUsageRequest {
                account_id: "AC1".into(),
                resource: "calls".into(),
            },
        ))
        .await;
    assert_eq!(usage.unwrap_err().code(), Code::PermissionDenied);
    // Accounts may not raise their own limits: SetLimit is for platform tokens.
    let limit = pb::Limit {
        account_id: "AC1".into(),
        resource: "calls".into(),
        max_in_flight: 1000,
        shadow: false,
    };
    let raise = c
        .set_limit(Tokens::request(
            &token_for["AC1"],
            pb::SetLimitRequest { limit: Some(limit) },
        ))
        .await;
    assert_eq!(raise.unwrap_err().code(), Code::PermissionDenied);
    // A token without limiter scopes is denied, naming the scope.
    let reader = Tokens::platform("AC1", &[Scope::PresenceRead]);
    let denied = c
        .acquire(Tokens::request(
            &reader,
            acquire_req("AC1", "calls", "", 30, 0),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("limiter.acquire"));
    assert!(release(&mut c, &mine.slot_id).await);
    server.shutdown().await.unwrap();
    presence.shutdown().await.unwrap();
}

#[tokio::test]
async fn slots_survive_the_crash_of_their_owner_replica() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let a = support::limiter(&etcd, &prefix, 100).await;
    let mut ca = client(a.addr);
    set_limit(&mut ca, "AC1", "calls", 2, false).await;
    ready(&ca, "AC1", "calls").await;
    // A owns every shard (it is alone); two slots are held through it.
    assert!(granted(&acquire(&mut ca, "AC1", "calls", 60).await));
    assert!(granted(&acquire(&mut ca, "AC1", "calls", 60).await));
    let b = support::limiter(&etcd, &prefix, 100).await;
    let mut cb = client(b.addr);
    a.crash();
    // B takes the shards over once A's lease expires, rebuilding the two held slots.
    let answer = poll_until(
        "B to serve the key after A's crash",
        Duration::from_secs(20),
        || {
            let mut cb = cb.clone();
            async move {
                cb.acquire(Tokens::request(
                    &admin(),
                    acquire_req("AC1", "calls", "", 60, 0),
                ))
                .await
                .ok()
                .map(|r| r.into_inner())
            }
        },
    )
    .await;
    assert_eq!(
        answer.decision,
        pb::Decision::Rejected as i32,
        "the crashed owner's slots were forgotten"
    );
    assert_eq!(answer.in_flight, 2);
    let _ = &mut cb;
    b.shutdown().await.unwrap();
}

/// Many clients hammer one key with a small limit through `addrs` while `disturb` runs.
/// Every client counts the slots it holds in one shared counter, incremented when a grant
/// arrives and decremented before a release is sent — so the counter never exceeds what
/// the limiter really holds, and it must never exceed the limit.
async fn hunt_over_admission(
    addrs: &[std::net::SocketAddr],
    run_for: Duration,
    disturb: impl std::future::Future<Output = ()>,
) {
    const LIMIT: i64 = 5;
    let mut c0 = client(addrs[0]);
    set_limit(&mut c0, "AC1", "hunt", LIMIT as u32, false).await;
    for addr in addrs {
        ready(&client(*addr), "AC1", "hunt").await;
    }
    let held = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let grants = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + run_for;
    let mut workers = Vec::new();
    for i in 0..24 {
        let (held, peak, grants) = (held.clone(), peak.clone(), grants.clone());
        let mut c = client(addrs[i % addrs.len()]);
        workers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let Ok(answer) = c
                    .acquire(Tokens::request(
                        &admin(),
                        acquire_req("AC1", "hunt", "", 3, 200),
                    ))
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let answer = answer.into_inner();
                if !granted(&answer) {
                    continue;
                }
                grants.fetch_add(1, Ordering::Relaxed);
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                assert!(
                    now <= LIMIT,
                    "over-admission: {now} slots held with a limit of {LIMIT}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                held.fetch_sub(1, Ordering::SeqCst);
                let _ = c
                    .release(Tokens::request(
                        &admin(),
                        pb::ReleaseRequest {
                            slot_id: answer.slot_id,
                        },
                    ))
                    .await;
            }
        }));
    }
    disturb.await;
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        LIMIT,
        "the hunt never reached the limit, so it proved nothing"
    );
    assert!(
        grants.load(Ordering::Relaxed) > 100,
        "too few grants: {}",
        grants.load(Ordering::Relaxed)
    );
}

async fn hunt_through_replica_kills(args: &[&str]) {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ServiceProcess::start("limiter-svc", &etcd, &prefix, args).await);
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let disturb = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        replicas[1].kill().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        replicas.push(ServiceProcess::start("limiter-svc", &etcd, &prefix, args).await);
    };
    hunt_over_admission(&addrs, Duration::from_secs(12), disturb).await;
    // Converges: once the holders are gone and the dead owner's blocks have expired, the
    // key holds nothing.
    let mut c = client(replicas[0].addr);
    poll_until(
        "the hunted key to hold nothing after the hunt",
        Duration::from_secs(60),
        || {
            let mut c = c.clone();
            async move { (usage(&mut c, "AC1", "hunt").await.ok()?.in_flight == 0).then_some(()) }
        },
    )
    .await;
    let _ = &mut c;
}

#[tokio::test]
async fn no_over_admission_through_replica_kills() {
    hunt_through_replica_kills(&["--escrow-min-limit", "0"]).await;
}

#[tokio::test]
async fn no_over_admission_through_replica_kills_with_escrow_blocks() {
    hunt_through_replica_kills(&["--escrow-min-limit", "1"]).await;
}

#[tokio::test]
async fn no_over_admission_through_an_etcd_leader_kill() {
    hunt_through_an_etcd_leader_kill(limiter_svc::LimiterArgs {
        escrow_min_limit: 0,
        ..Default::default()
    })
    .await;
}

#[tokio::test]
async fn no_over_admission_through_an_etcd_leader_kill_with_escrow_blocks() {
    hunt_through_an_etcd_leader_kill(support::escrow_everywhere()).await;
}

async fn hunt_through_an_etcd_leader_kill(limiter: limiter_svc::LimiterArgs) {
    let mut cluster = integration::EtcdCluster::start(3).await;
    let prefix = unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            support::limiter_on_with(cluster.endpoints(), &prefix, 100, limiter.clone()).await,
        );
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let disturb = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = cluster.leader().await;
        cluster.kill(leader).await;
        let next = cluster.leader().await;
        assert_ne!(next, leader, "no new leader was elected");
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.restart(leader).await;
    };
    hunt_over_admission(&addrs, Duration::from_secs(12), disturb).await;
    for r in replicas {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_replica_registers_its_advertise_address_and_peers_forward_there() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    // B first; A joins and B hands it half the shards: for the other half A has to forward
    // to B's advertised address.
    let args = limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common: integration::common_args(&etcd, &prefix),
    };
    let b = integration::serve_in_process(move |listener, stop| {
        // A name rather than the listen address: peers must use what is advertised.
        let port = listener.local_addr().map_or(0, |a| a.port());
        let limiter = limiter_svc::LimiterArgs {
            advertise_address: Some(format!("localhost:{port}")),
            ..Default::default()
        };
        limiter_svc::run_with(args, limiter, listener, async move {
            let _ = stop.await;
        })
    })
    .await;
    let a = support::limiter(&etcd, &prefix, 10).await;
    let advertised = format!("localhost:{}", b.addr.port());
    let etcd_client = etcd.client().await;
    let registered = |key: &'static str| {
        let (mut etcd_client, prefix, advertised) =
            (etcd_client.clone(), prefix.clone(), advertised.clone());
        async move {
            let options = etcd_client::GetOptions::new().with_prefix();
            let found = etcd_client
                .get(format!("{prefix}/limiter/{key}"), Some(options))
                .await
                .ok()?;
            let values = found.kvs().iter().filter_map(|kv| kv.value_str().ok());
            values
                .into_iter()
                .any(|value| value.contains(&advertised))
                .then_some(())
        }
    };
    poll_until("B's member record", Duration::from_secs(5), || {
        registered("members/")
    })
    .await;
    poll_until(
        "a shard owned by B under its advertised address",
        Duration::from_secs(15),
        || registered("shards/"),
    )
    .await;
    // Every key through A, including those of B's shards (forwarded to `localhost:port`).
    let mut via_a = client(a.addr);
    for n in 0..64 {
        let resource = format!("advertised-{n}");
        ready(&via_a, "AC1", &resource).await;
        let answer = acquire(&mut via_a, "AC1", &resource, 30).await;
        assert!(granted(&answer), "{resource}: {answer:?}");
        assert!(release(&mut via_a, &answer.slot_id).await);
    }
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Usage of one key, as the platform sees it.
async fn usage(
    client: &mut Client,
    account: &str,
    resource: &str,
) -> Result<pb::Usage, tonic::Status> {
    let request = pb::GetUsageRequest {
        account_id: account.into(),
        resource: resource.into(),
    };
    let usage = client.get_usage(Tokens::request(&admin(), request)).await?;
    usage
        .into_inner()
        .usage
        .ok_or_else(|| tonic::Status::internal("GetUsage answered without usage"))
}

async fn shard_map(client: &mut Client) -> Option<pb::GetShardMapResponse> {
    client
        .get_shard_map(Tokens::request(&admin(), pb::GetShardMapRequest {}))
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Shards owned per replica address, once every shard has an owner and every replica in
/// `addrs` owns its even share (and no other replica owns any).
async fn split_evenly(
    via: std::net::SocketAddr,
    addrs: Vec<std::net::SocketAddr>,
) -> Option<HashMap<String, usize>> {
    let map = shard_map(&mut client(via)).await?;
    let mut split: HashMap<String, usize> = HashMap::new();
    for owner in &map.owners {
        *split.entry(owner.address.clone()).or_default() += 1;
    }
    let shards = map.shard_count as usize;
    let (lo, hi) = (shards / addrs.len(), shards.div_ceil(addrs.len()));
    let even = map.owners.len() == shards
        && split.len() == addrs.len()
        && addrs.iter().all(|a| {
            split
                .get(&a.to_string())
                .is_some_and(|n| (lo..=hi).contains(n))
        });
    even.then_some(split)
}

#[tokio::test]
async fn replicas_joining_and_leaving_a_running_hunt_rebalance_evenly_and_never_over_admit() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let metrics_port = integration::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let first_args = [
        "--escrow-min-limit",
        "1",
        "--metrics-listen",
        metrics.as_str(),
    ];
    let args = ["--escrow-min-limit", "1"];
    let first = ServiceProcess::start("limiter-svc", &etcd, &prefix, &first_args).await;
    let addrs = [first.addr];
    let disturb = async {
        poll_until(
            "one replica to own every shard",
            Duration::from_secs(10),
            || split_evenly(first.addr, vec![first.addr]),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut second = ServiceProcess::start("limiter-svc", &etcd, &prefix, &args).await;
        let started = std::time::Instant::now();
        poll_until(
            "two replicas to split the shards 24/24",
            Duration::from_secs(10),
            || split_evenly(first.addr, vec![first.addr, second.addr]),
        )
        .await;
        tracing::info!(after = ?started.elapsed(), "rebalanced onto two replicas");
        let third = ServiceProcess::start("limiter-svc", &etcd, &prefix, &args).await;
        poll_until(
            "three replicas to split the shards 16/16/16",
            Duration::from_secs(10),
            || split_evenly(first.addr, vec![first.addr, second.addr, third.addr]),
        )
        .await;
        // The count every replica reports on /metrics agrees.
        poll_until(
            "limiter_shards_owned 16 on /metrics",
            Duration::from_secs(5),
            || async {
                support::scrape(metrics.parse().unwrap())
                    .await
                    .lines()
                    .any(|l| l.ends_with("limiter_shards_owned 16"))
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A graceful leave hands its shards to the two left, and exits cleanly.
        second.signal_terminate().await;
        poll_until(
            "the two left to split the shards 24/24",
            Duration::from_secs(10),
            || split_evenly(first.addr, vec![first.addr, third.addr]),
        )
        .await;
        assert!(
            second.wait().await.success(),
            "the leaving replica did not exit cleanly"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        third
    };
    let mut third = None;
    hunt_over_admission(&addrs, Duration::from_secs(20), async {
        third = Some(disturb.await);
    })
    .await;
    // Planned moves lose no capacity: nothing is left counted once the holders are gone.
    let mut c = client(first.addr);
    poll_until(
        "the hunted key to hold nothing",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move { (usage(&mut c, "AC1", "hunt").await.ok()?.in_flight == 0).then_some(()) }
        },
    )
    .await;
    let _ = (&mut c, third);
}

/// Which of `addrs` owns the key's shard, from the shard map and the documented hash.
async fn owner_of(via: std::net::SocketAddr, account: &str, resource: &str) -> String {
    let map = shard_map(&mut client(via)).await.expect("GetShardMap");
    let shard = u32::from(
        limiter_svc::model::SlotKey {
            account: account.into(),
            resource: resource.into(),
        }
        .shard(),
    );
    assert_eq!(map.shard_count, u32::from(limiter_svc::model::SHARDS));
    map.owners
        .iter()
        .find(|o| o.shard == shard)
        .map(|o| o.address.clone())
        .expect("the key's shard has an owner")
}

#[tokio::test]
async fn a_planned_handoff_loses_no_capacity_and_fencing_tokens_keep_rising() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let endpoints = vec![etcd.endpoint.clone()];
    let a = support::limiter_on_with(
        endpoints.clone(),
        &prefix,
        100,
        support::escrow_everywhere(),
    )
    .await;
    let b = support::limiter_on_with(endpoints, &prefix, 100, support::escrow_everywhere()).await;
    let mut ca = client(a.addr);
    set_limit(&mut ca, "AC1", "handoff", 10, false).await;
    poll_until(
        "an even split over A and B",
        Duration::from_secs(15),
        || split_evenly(a.addr, vec![a.addr, b.addr]),
    )
    .await;
    let owner = owner_of(a.addr, "AC1", "handoff").await;
    let (owner, other) = if owner == a.addr.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    let mut co = client(owner.addr);
    ready(&co, "AC1", "handoff").await;
    // Ten slots from the owner's escrow block; tokens rise with every grant.
    let mut slots = Vec::new();
    let mut last = 0;
    for _ in 0..10 {
        let answer = acquire(&mut co, "AC1", "handoff", 120).await;
        assert!(granted(&answer), "{answer:?}");
        assert!(
            answer.fencing_token > last,
            "token {} after {last}",
            answer.fencing_token
        );
        last = answer.fencing_token;
        slots.push(answer);
    }
    assert!(
        !granted(&acquire(&mut co, "AC1", "handoff", 120).await),
        "an 11th slot of 10"
    );
    let renewed = co
        .renew(Tokens::request(
            &admin(),
            pb::RenewRequest {
                slot_id: slots[0].slot_id.clone(),
                hold_seconds: 120,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        renewed.fencing_token, slots[0].fencing_token,
        "Renew keeps the slot's token"
    );
    // The owner leaves gracefully: its shards, escrow slots written out exactly, go over.
    owner.shutdown().await.unwrap();
    let mut c = client(other.addr);
    let held = poll_until(
        "the survivor to serve the key",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move { usage(&mut c, "AC1", "handoff").await.ok() }
        },
    )
    .await;
    assert_eq!(
        held.in_flight, 10,
        "the handoff lost or invented slots: {held:?}"
    );
    assert!(
        !granted(&acquire(&mut c, "AC1", "handoff", 120).await),
        "over-admitted after the handoff"
    );
    let renewed = c
        .renew(Tokens::request(
            &admin(),
            pb::RenewRequest {
                slot_id: slots[1].slot_id.clone(),
                hold_seconds: 120,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        renewed.fencing_token, slots[1].fencing_token,
        "the token survives the handoff"
    );
    for slot in &slots {
        assert!(
            release(&mut c, &slot.slot_id).await,
            "a handed-off slot was not held"
        );
    }
    // No capacity lost: all ten are grantable at once, with tokens above every earlier one.
    for _ in 0..10 {
        let answer = acquire(&mut c, "AC1", "handoff", 120).await;
        assert!(granted(&answer), "capacity lost in the handoff: {answer:?}");
        assert!(
            answer.fencing_token > last,
            "token {} not above {last}",
            answer.fencing_token
        );
        last = answer.fencing_token;
    }
    other.shutdown().await.unwrap();
}

#[tokio::test]
async fn after_a_crash_with_blocks_in_use_the_successor_counts_them_and_tokens_keep_rising() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let endpoints = vec![etcd.endpoint.clone()];
    let a = support::limiter_on_with(
        endpoints.clone(),
        &prefix,
        100,
        support::escrow_everywhere(),
    )
    .await;
    let b = support::limiter_on_with(endpoints, &prefix, 100, support::escrow_everywhere()).await;
    set_limit(&mut client(a.addr), "AC1", "crash", 10, false).await;
    poll_until(
        "an even split over A and B",
        Duration::from_secs(15),
        || split_evenly(a.addr, vec![a.addr, b.addr]),
    )
    .await;
    let owner = owner_of(a.addr, "AC1", "crash").await;
    let (owner, survivor) = if owner == a.addr.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    let mut co = client(owner.addr);
    ready(&co, "AC1", "crash").await;
    let mut last = 0;
    for _ in 0..4 {
        let answer = acquire(&mut co, "AC1", "crash", 2).await;
        assert!(granted(&answer));
        last = last.max(answer.fencing_token);
    }
    owner.crash();
    let mut cs = client(survivor.addr);
    // The survivor knows nothing of the four holders, only the owner's escrow block: it
    // counts the whole block as held, so it grants nothing beyond what the limit allows.
    let first = poll_until(
        "the survivor to serve the key after the crash",
        Duration::from_secs(20),
        || {
            let mut cs = cs.clone();
            async move { usage(&mut cs, "AC1", "crash").await.ok() }
        },
    )
    .await;
    assert!(
        first.in_flight > 4,
        "the block was not counted whole (were blocks in use?): {first:?}"
    );
    let mut granted_now = 0;
    while granted(&acquire(&mut cs, "AC1", "crash", 60).await) {
        granted_now += 1;
        assert!(
            granted_now <= 6,
            "over-admission: more than 10 - 4 granted after the crash"
        );
    }
    // Converges: the block expires (it covered holds of 2 s) and its capacity comes back.
    let answer = poll_until(
        "the dead owner's block to expire",
        Duration::from_secs(60),
        || {
            let mut cs = cs.clone();
            async move { Some(acquire(&mut cs, "AC1", "crash", 60).await).filter(granted) }
        },
    )
    .await;
    assert!(
        answer.fencing_token > last,
        "token {} not above the dead owner's {last}",
        answer.fencing_token
    );
    let _ = &mut co;
    survivor.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_shard_map_names_each_keys_owner_and_forwarded_replies_say_so() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(support::limiter(&etcd, &prefix, 100).await);
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let split = poll_until("an even 16/16/16 split", Duration::from_secs(15), || {
        split_evenly(addrs[0], addrs.clone())
    })
    .await;
    assert!(split.values().all(|n| *n == 16), "{split:?}");
    let map = shard_map(&mut client(addrs[1])).await.unwrap();
    let mut members = map.members.clone();
    members.sort();
    let mut expected: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    expected.sort();
    assert_eq!(members, expected);
    for n in 0..8 {
        let resource = format!("mapped-{n}");
        let owner = owner_of(addrs[0], "AC1", &resource).await;
        for addr in &addrs {
            let mut c = client(*addr);
            let response = c
                .acquire(Tokens::request(
                    &admin(),
                    acquire_req("AC1", &resource, "", 30, 0),
                ))
                .await
                .unwrap();
            let forwarded = response.metadata().get("x-switchboard-forwarded").is_some();
            assert_eq!(
                forwarded,
                addr.to_string() != owner,
                "{resource} via {addr} (owner {owner})"
            );
            let answer = response.into_inner();
            assert!(granted(&answer), "{answer:?}");
            assert!(release(&mut c, &answer.slot_id).await);
        }
    }
    for r in replicas {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_limiter_replica_whose_lease_is_revoked_rejoins_under_a_new_lease() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let server = support::limiter(&etcd, &prefix, 100).await;
    let mut limiter = client(server.addr);
    set_limit(&mut limiter, "AC1", "calls", 3, false).await;
    ready(&limiter, "AC1", "calls").await;
    let held = [
        acquire(&mut limiter, "AC1", "calls", 60).await,
        acquire(&mut limiter, "AC1", "calls", 60).await,
    ];
    assert!(held.iter().all(granted), "two slots held before the loss");

    let mut etcd_client = etcd.client().await;
    let lease_of = |kvs: &[etcd_client::KeyValue]| kvs.first().map(|kv| kv.lease());
    let member_key = {
        let members = etcd_client
            .get(
                format!("{prefix}/limiter/members/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(members.kvs().len(), 1, "one replica registered");
        members.kvs()[0].key_str().unwrap().to_owned()
    };
    let old = lease_of(
        etcd_client
            .get(member_key.as_str(), None)
            .await
            .unwrap()
            .kvs(),
    )
    .expect("the member key is in etcd");
    assert_ne!(old, 0, "the member key is under the replica lease");
    etcd_client.lease_revoke(old).await.unwrap();

    // The replica registers again under a new lease and owns every shard under it.
    let shards_prefix = format!("{prefix}/limiter/shards/");
    let new = poll_until(
        "the member key and all 48 ownership keys under a new lease",
        Duration::from_secs(15),
        || {
            let mut etcd_client = etcd_client.clone();
            let (member_key, shards_prefix) = (member_key.clone(), shards_prefix.clone());
            async move {
                let member = etcd_client.get(member_key, None).await.ok()?;
                let lease = lease_of(member.kvs()).filter(|l| *l != old)?;
                let shards = etcd_client
                    .get(
                        shards_prefix,
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .ok()?;
                let all =
                    shards.kvs().len() == 48 && shards.kvs().iter().all(|kv| kv.lease() == lease);
                all.then_some(lease)
            }
        },
    )
    .await;
    assert_ne!(new, old);

    // The two slots held through the loss are still counted, exactly: one more is granted,
    // the next is rejected with three in flight.
    let third = poll_until(
        "the key served again after the lease loss",
        Duration::from_secs(15),
        || {
            let mut limiter = limiter.clone();
            async move { Some(acquire(&mut limiter, "AC1", "calls", 60).await) }
        },
    )
    .await;
    assert!(granted(&third), "a third slot fits under the limit of 3");
    let fourth = acquire(&mut limiter, "AC1", "calls", 60).await;
    assert_eq!(fourth.decision, pb::Decision::Rejected as i32);
    assert_eq!(
        fourth.in_flight, 3,
        "the slots held through the loss were forgotten"
    );

    // And they are still releasable.
    for slot in &held {
        assert!(
            release(&mut limiter, &slot.slot_id).await,
            "a slot held through the loss could not be released"
        );
    }
    let usage = usage(&mut limiter, "AC1", "calls").await.unwrap();
    assert_eq!(usage.in_flight, 1);
    assert!(
        !server.join.is_finished(),
        "the replica stopped on losing its lease"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn raising_a_limit_or_deleting_its_override_grants_queued_waiters_at_once_in_fifo_order() {
    let etcd = Etcd::start().await;
    // The default for every key is 100; AC1's `calls` has an override of 1.
    let server = support::limiter(&etcd, &unique_prefix(), 100).await;
    let mut c = client(server.addr);
    set_limit(&mut c, "AC1", "calls", 1, false).await;
    ready(&c, "AC1", "calls").await;
    let holder = acquire(&mut c, "AC1", "calls", 60).await;
    assert!(granted(&holder));
    // Three waiters queue, in a known order, with deadlines far beyond the test.
    let (grants_tx, mut grants) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for i in 0..3u32 {
        let (mut waiter, grants_tx) = (c.clone(), grants_tx.clone());
        waiters.push(tokio::spawn(async move {
            let answer = waiter
                .acquire(Tokens::request(
                    &admin(),
                    acquire_req("AC1", "calls", &format!("waiter-{i}"), 60, 60_000),
                ))
                .await
                .unwrap()
                .into_inner();
            let _ = grants_tx.send((i, answer));
        }));
        poll_until("the waiter to be queued", Duration::from_secs(5), || {
            let mut c = c.clone();
            async move {
                let usage = calls_usage(&mut c).await.ok()?;
                (usage.queued == i + 1).then_some(())
            }
        })
        .await;
    }

    // Raised to 3 while the holder still holds: the first two waiters are granted, in
    // order, and the third stays queued.
    set_limit(&mut c, "AC1", "calls", 3, false).await;
    let mut held = vec![holder.slot_id.clone()];
    for expected in 0..2 {
        let (i, answer) = tokio::time::timeout(Duration::from_secs(5), grants.recv())
            .await
            .expect("a waiter granted after the raise, well before its deadline")
            .unwrap();
        assert_eq!(i, expected, "waiter {i} was granted out of order");
        assert!(granted(&answer), "waiter {i}: {answer:?}");
        held.push(answer.slot_id);
    }
    let usage = calls_usage(&mut c).await.unwrap();
    assert_eq!((usage.in_flight, usage.queued), (3, 1));

    // Deleting the override (the default of 100 applies again) grants the last one.
    let deleted = c
        .delete_limit(Tokens::request(
            &admin(),
            pb::DeleteLimitRequest {
                account_id: "AC1".into(),
                resource: "calls".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    let (i, answer) = tokio::time::timeout(Duration::from_secs(5), grants.recv())
        .await
        .expect("the last waiter granted after the override was deleted")
        .unwrap();
    assert_eq!(i, 2);
    assert!(granted(&answer));
    held.push(answer.slot_id);
    for waiter in waiters {
        waiter.await.unwrap();
    }

    // Lowering it below usage revokes nothing: all four stay held and renewable, and no
    // one is admitted until usage is under the new limit.
    set_limit(&mut c, "AC1", "calls", 2, false).await;
    for slot in &held {
        let renewed = c
            .renew(Tokens::request(
                &admin(),
                pb::RenewRequest {
                    slot_id: slot.clone(),
                    hold_seconds: 60,
                },
            ))
            .await;
        assert!(
            renewed.is_ok(),
            "a held slot was revoked by lowering the limit"
        );
    }
    assert_eq!(calls_usage(&mut c).await.unwrap().in_flight, 4);
    assert!(!granted(&acquire(&mut c, "AC1", "calls", 60).await));
    for slot in &held[..3] {
        assert!(release(&mut c, slot).await);
    }
    assert!(granted(&acquire(&mut c, "AC1", "calls", 60).await));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_identitys_communications_take_the_accounts_family_limit_and_are_unlimited_without_one()
{
    let etcd = Etcd::start().await;
    // The server default (1) applies to ordinary resources, not to family members.
    let server = support::limiter(&etcd, &unique_prefix(), 1).await;
    let mut c = client(server.addr);
    let alice = "identity.communications/alice@example.com";
    let bob = "identity.communications/bob+1";
    ready(&c, "AC1", alice).await;
    for _ in 0..3 {
        assert!(
            granted(&acquire(&mut c, "AC1", alice, 60).await),
            "a member without any limit is unlimited"
        );
    }
    let unlimited = usage(&mut c, "AC1", alice).await.unwrap();
    assert_eq!((unlimited.in_flight, unlimited.limit), (3, 0));

    // The account's limit of the family applies to each member on its own.
    set_limit(&mut c, "AC1", "identity.communications", 4, false).await;
    assert!(granted(&acquire(&mut c, "AC1", alice, 60).await));
    let full = acquire(&mut c, "AC1", alice, 60).await;
    assert!(!granted(&full), "alice is at the family limit of 4");
    assert_eq!((full.in_flight, full.limit), (4, 4));
    assert!(
        granted(&acquire(&mut c, "AC1", bob, 60).await),
        "bob is counted apart from alice"
    );
    // A member's own limit wins over the family's.
    set_limit(&mut c, "AC1", alice, 5, false).await;
    assert!(granted(&acquire(&mut c, "AC1", alice, 60).await));
    assert_eq!(usage(&mut c, "AC1", alice).await.unwrap().limit, 5);
    // An account token with only `limiter.acquire` may read its own key's usage.
    let acquirer = Tokens::platform("AC1", &[Scope::LimiterAcquire]);
    let read = c
        .get_usage(Tokens::request(
            &acquirer,
            pb::GetUsageRequest {
                account_id: "AC1".into(),
                resource: bob.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.usage.unwrap().in_flight, 1);
    server.shutdown().await.unwrap();
}
