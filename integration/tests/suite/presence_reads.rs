//! Reads from the watch-fed cache: batches in request order, pages with a status filter,
//! read-your-writes through another replica, and group-committed connect storms.

use futures::future::join_all;
use integration::{Etcd, Tokens, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1 as pb;

use crate::presence_support::{
    Session, Tenant, TwoReplicas, client, presence_of, register, two_replicas, wait_for_devices,
};
use crate::support;

fn registration(identity: &str, device_id: &str, status: pb::Status) -> pb::RegisterRequest {
    pb::RegisterRequest {
        identity: identity.into(),
        device_id: device_id.into(),
        status: status as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn batch_get_answers_in_request_order_with_offline_identities() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let admin = tenant.token(None, &[Scope::Admin]);
    let presence = client(&server);
    register(
        &presence,
        &admin,
        registration("bob", "b1", pb::Status::Busy),
    )
    .await
    .unwrap();
    let last = register(
        &presence,
        &admin,
        registration("alice", "a1", pb::Status::Away),
    )
    .await
    .unwrap();
    let request = pb::BatchGetPresenceRequest {
        identities: vec!["bob".into(), "carol".into(), "alice".into(), "bob".into()],
        min_revision: last.revision,
        ..Default::default()
    };
    let answer = presence
        .clone()
        .batch_get_presence(Tokens::request(&admin, request))
        .await
        .unwrap()
        .into_inner();
    let summary: Vec<(String, i32, usize)> = answer
        .presences
        .iter()
        .map(|p| (p.identity.clone(), p.status, p.devices.len()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("bob".into(), pb::Status::Busy as i32, 1),
            ("carol".into(), pb::Status::Offline as i32, 0),
            ("alice".into(), pb::Status::Away as i32, 1),
            ("bob".into(), pb::Status::Busy as i32, 1),
        ]
    );
    assert!(answer.revision >= last.revision);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_pages_through_present_identities_with_a_status_filter() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let admin = tenant.token(None, &[Scope::Admin]);
    let presence = client(&server);
    let mut last = 0;
    for i in 0..12 {
        let status = if i % 3 == 0 {
            pb::Status::Busy
        } else {
            pb::Status::Available
        };
        let identity = format!("user{i:02}");
        last = register(&presence, &admin, registration(&identity, "d", status))
            .await
            .unwrap()
            .revision;
    }
    let list = |status: pb::Status| {
        let presence = presence.clone();
        let admin = admin.clone();
        async move {
            let mut seen = Vec::new();
            let mut token = String::new();
            loop {
                let request = pb::ListPresenceRequest {
                    page_size: 5,
                    page_token: token,
                    status: status as i32,
                    min_revision: last,
                    ..Default::default()
                };
                let page = presence
                    .clone()
                    .list_presence(Tokens::request(&admin, request))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(page.presences.len() <= 5);
                seen.extend(page.presences.into_iter().map(|p| p.identity));
                if page.next_page_token.is_empty() {
                    return seen;
                }
                token = page.next_page_token;
            }
        }
    };
    let all = list(pb::Status::Unspecified).await;
    let expected: Vec<String> = (0..12).map(|i| format!("user{i:02}")).collect();
    assert_eq!(all, expected);
    let busy = list(pb::Status::Busy).await;
    assert_eq!(busy, ["user00", "user03", "user06", "user09"]);
    assert!(list(pb::Status::Offline).await.is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reads_with_min_revision_see_a_write_made_through_another_replica() {
    let TwoReplicas {
        etcd: _etcd,
        a,
        b,
        tenant,
    } = two_replicas().await;
    let alice = tenant.device("alice");
    let (via_a, via_b) = (client(&a), client(&b));
    for round in 0..20 {
        let device = format!("d{round}");
        let written = register(
            &via_a,
            &alice,
            registration("", &device, pb::Status::Available),
        )
        .await
        .unwrap();
        let seen = presence_of(&via_b, &alice, "alice", written.revision).await;
        assert!(
            seen.devices.iter().any(|d| d.device_id == device),
            "round {round}: replica B missed a write at its revision"
        );
        let request = pb::UnregisterRequest {
            device_id: device,
            ..Default::default()
        };
        via_a
            .clone()
            .unregister(Tokens::request(&alice, request))
            .await
            .unwrap();
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connect_storm_is_group_committed_into_few_etcd_writes() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let presence = client(&server);
    let reader = tenant.token(None, &[Scope::PresenceRead]);
    let revision = || async {
        let mut client = etcd.client().await;
        let response = client.get("probe", None).await.unwrap();
        response.header().unwrap().revision()
    };
    let before = revision().await;
    let sessions = join_all((0..300).map(|i| {
        let channel = support::channel(&server);
        let token = tenant.device(&format!("user{i}"));
        async move { Session::hello(channel, &token, "phone").await }
    }))
    .await;
    let writes = revision().await - before;
    assert!(
        writes < 150,
        "300 hellos took {writes} etcd revisions: they were not batched"
    );
    let last = sessions.iter().map(|s| s.device.revision).max().unwrap();
    for i in [0, 150, 299] {
        let seen = presence_of(&presence, &reader, &format!("user{i}"), last).await;
        assert_eq!(seen.devices.len(), 1);
    }
    drop(sessions);
    wait_for_devices(
        &presence,
        &reader,
        "user299",
        0,
        crate::presence_support::STEP,
    )
    .await;
    server.shutdown().await.unwrap();
}
