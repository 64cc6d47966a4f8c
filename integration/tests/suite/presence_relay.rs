//! Offer delivery through `SessionRelayService`: any replica reaches the replica holding
//! the device's stream; answers, cancels, hangups and ends travel both ways; a device that
//! is gone fails fast.

use integration::{Etcd, Tokens, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Send;
use proto::presence::v1::connect_response::Kind as Recv;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::presence::v1::offer_response::Kind as Event;
use tonic::Code;

use crate::presence_support::{
    Leg, Session, Tenant, TwoReplicas, client, presence_of, register, start, two_replicas,
};
use crate::support;

fn answer(offer_id: &str, accept: bool, reason: pb::RejectReason) -> Send {
    Send::Answer(pb::ConnectAnswer {
        offer_id: offer_id.into(),
        accept,
        reject_reason: reason as i32,
        ..Default::default()
    })
}

async fn offered(session: &mut Session) -> pb::ConnectOffer {
    match session.next().await {
        Recv::Offer(offer) => offer,
        other => panic!("expected an offer, got {other:?}"),
    }
}

#[tokio::test]
async fn an_offer_through_another_replica_is_accepted_and_hung_up_by_the_device() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let holder = support::presence(&etcd, &prefix).await;
    let other = support::presence(&etcd, &prefix).await;
    let tenant = Tenant::create(&holder, "AC1").await;
    tenant.known_to(&other).await;
    let alice = tenant.device("alice");
    let mut device = Session::hello(support::channel(&holder), &alice, "phone").await;
    // The other replica's cache must know where the device is.
    presence_of(&client(&other), &alice, "alice", device.device.revision).await;

    let mut offer = start("AC1", "alice", "phone", "of-1");
    offer.parameters = [("caller_name".to_owned(), "Bob".to_owned())].into();
    let mut leg = Leg::offer(support::channel(&other), offer).await.unwrap();
    let Some(Event::Delivered(delivered)) = leg.next().await else {
        panic!("expected `delivered`");
    };
    assert_eq!(delivered.device.unwrap().device_id, "phone");
    let offer = offered(&mut device).await;
    assert_eq!(offer.offer_id, "of-1");
    assert_eq!(offer.communication_id, "CM-of-1");
    assert_eq!(offer.from, "+15550100");
    assert_eq!(offer.parameters["caller_name"], "Bob");

    device
        .send(answer("of-1", true, pb::RejectReason::Unspecified))
        .await;
    let Some(Event::Answered(answered)) = leg.next().await else {
        panic!("expected `answered`");
    };
    assert!(answered.accept);

    device
        .send(Send::Hangup(pb::ConnectHangup {
            communication_id: "CM-of-1".into(),
        }))
        .await;
    assert!(matches!(leg.next().await, Some(Event::Hangup(_))));
    assert!(leg.next().await.is_none(), "the leg ends after a hangup");
    let Recv::Ended(ended) = device.next().await else {
        panic!("expected `ended`");
    };
    assert_eq!(ended.reason, pb::EndReason::DeviceHangup as i32);
    holder.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rejected_offer_ends_the_leg_with_the_reason() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut device = Session::hello(support::channel(&server), &alice, "phone").await;
    let mut leg = Leg::offer(
        support::channel(&server),
        start("AC1", "alice", "phone", "of-1"),
    )
    .await
    .unwrap();
    assert!(matches!(leg.next().await, Some(Event::Delivered(_))));
    offered(&mut device).await;
    device
        .send(answer("of-1", false, pb::RejectReason::Busy))
        .await;
    let Some(Event::Answered(answered)) = leg.next().await else {
        panic!("expected `answered`");
    };
    assert!(!answered.accept);
    assert_eq!(answered.reject_reason, pb::RejectReason::Busy as i32);
    assert!(leg.next().await.is_none());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancels_and_ends_from_the_router_reach_the_device_with_their_reason() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut device = Session::hello(support::channel(&server), &alice, "phone").await;
    let channel = support::channel(&server);

    let mut cancelled = Leg::offer(channel.clone(), start("AC1", "alice", "phone", "of-1"))
        .await
        .unwrap();
    assert!(matches!(cancelled.next().await, Some(Event::Delivered(_))));
    offered(&mut device).await;
    cancelled
        .send(Ask::Cancel(pb::OfferCancel {
            reason: pb::CancelReason::AnsweredElsewhere as i32,
        }))
        .await;
    assert!(cancelled.next().await.is_none());
    let Recv::Cancel(cancel) = device.next().await else {
        panic!("expected `cancel`");
    };
    assert_eq!(cancel.offer_id, "of-1");
    assert_eq!(cancel.reason, pb::CancelReason::AnsweredElsewhere as i32);
    // A late answer to the cancelled offer is ignored.
    device
        .send(answer("of-1", true, pb::RejectReason::Unspecified))
        .await;

    let mut ended = Leg::offer(channel.clone(), start("AC1", "alice", "phone", "of-2"))
        .await
        .unwrap();
    assert!(matches!(ended.next().await, Some(Event::Delivered(_))));
    assert_eq!(offered(&mut device).await.offer_id, "of-2");
    device
        .send(answer("of-2", true, pb::RejectReason::Unspecified))
        .await;
    assert!(matches!(ended.next().await, Some(Event::Answered(_))));
    ended
        .send(Ask::End(pb::OfferEnd {
            reason: pb::EndReason::RemoteHangup as i32,
        }))
        .await;
    assert!(ended.next().await.is_none());
    let Recv::Ended(end) = device.next().await else {
        panic!("expected `ended`");
    };
    assert_eq!(end.communication_id, "CM-of-2");
    assert_eq!(end.reason, pb::EndReason::RemoteHangup as i32);

    // A router that goes away without a word cancels its offer with FAILED.
    let abandoned = Leg::offer(channel, start("AC1", "alice", "phone", "of-3"))
        .await
        .unwrap();
    assert_eq!(offered(&mut device).await.offer_id, "of-3");
    drop(abandoned);
    let Recv::Cancel(cancel) = device.next().await else {
        panic!("expected `cancel`");
    };
    assert_eq!(cancel.reason, pb::CancelReason::Failed as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn offers_to_devices_without_a_session_fail_fast_with_distinct_errors() {
    let TwoReplicas {
        etcd: _etcd,
        a,
        b,
        tenant,
    } = two_replicas().await;
    let alice = tenant.device("alice");
    let (via_a, via_b) = (support::channel(&a), support::channel(&b));

    let status = Leg::offer(via_b.clone(), start("AC1", "alice", "nowhere", "of-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("`nowhere`"), "{status:?}");

    let desk = pb::RegisterRequest {
        device_id: "desk".into(),
        ..Default::default()
    };
    let registered = register(&client(&a), &alice, desk).await.unwrap();
    presence_of(&client(&b), &alice, "alice", registered.revision).await;
    let status = Leg::offer(via_b.clone(), start("AC1", "alice", "desk", "of-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let session = Session::hello(via_a.clone(), &alice, "phone").await;
    let left = session.device.revision;
    drop(session);
    crate::presence_support::wait_for_devices(
        &client(&b),
        &alice,
        "alice",
        1,
        crate::presence_support::STEP,
    )
    .await;
    let status = Leg::offer(via_b, start("AC1", "alice", "phone", "of-3"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?} (left at {left})");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_device_leaving_mid_offer_reports_gone_and_duplicates_are_refused() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut device = Session::hello(support::channel(&server), &alice, "phone").await;
    let channel = support::channel(&server);
    let mut leg = Leg::offer(channel.clone(), start("AC1", "alice", "phone", "of-1"))
        .await
        .unwrap();
    assert!(matches!(leg.next().await, Some(Event::Delivered(_))));
    offered(&mut device).await;
    let status = Leg::offer(channel, start("AC1", "alice", "phone", "of-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    drop(device);
    let Some(Event::Gone(gone)) = leg.next().await else {
        panic!("expected `gone`");
    };
    assert_eq!(gone.reason, pb::LeaveReason::Disconnected as i32);
    assert!(leg.next().await.is_none());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_platform_tokens_with_router_route_may_offer() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let _device = Session::hello(support::channel(&server), &alice, "phone").await;
    let channel = support::channel(&server);
    let offer = || start("AC1", "alice", "phone", "of-1");
    let account_admin = tenant.token(None, &[Scope::Admin]);
    let status = Leg::offer_as(channel.clone(), &account_admin, offer())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let reader = Tokens::platform("*", &[Scope::PresenceRead]);
    let status = Leg::offer_as(channel.clone(), &reader, offer())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("router.route"), "{status:?}");
    let other_account = Tokens::platform("AC2", &[Scope::RouterRoute]);
    let status = Leg::offer_as(channel, &other_account, offer())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    server.shutdown().await.unwrap();
}
