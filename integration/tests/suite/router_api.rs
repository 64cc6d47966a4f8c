//! The RouterService API around routing: applications and their secrets, field rules that
//! change nothing, tenant isolation, and following communications (Get, List, Watch).

use plumbing::auth::Scope;
use proto::presence::v1 as ppb;
use proto::router::v1 as pb;
use proto::router::v1::TimelineEventKind as Kind;
use tonic::Code;

use crate::presence_support::Tenant;
use crate::router_support::{ACCOUNT, Router, World, outcome};

#[tokio::test]
async fn applications_keep_their_secret_out_of_reads() {
    let world = World::start(10).await;
    let router = world.router();
    let created = router
        .put(pb::Application {
            address: "support".into(),
            instructions: "<Response><Reject/></Response>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let secret = created.signing_secret.clone();
    assert!(secret.len() >= 32);
    let mut client = router.client.clone();
    let read = client
        .get_application(integration::Tokens::request(
            &router.token,
            pb::GetApplicationRequest {
                account_id: ACCOUNT.into(),
                address: "support".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert!(
        read.signing_secret.is_empty(),
        "reads never return the secret"
    );
    assert_eq!(read.create_time, created.create_time);
    // Replacing without a secret keeps it; naming one sets it.
    let kept = router
        .put(pb::Application {
            address: "support".into(),
            instructions: "<Response><Hangup/></Response>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kept.signing_secret, secret);
    assert_eq!(kept.create_time, created.create_time);
    let chosen = router
        .put(pb::Application {
            address: "support".into(),
            instructions: "<Response><Hangup/></Response>".into(),
            signing_secret: "my-own-secret-0123456789".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(chosen.signing_secret, "my-own-secret-0123456789");
    for address in ["b", "c", "d"] {
        world.inline(address, "<Response/>").await;
    }
    let mut page = pb::ListApplicationsRequest {
        account_id: ACCOUNT.into(),
        page_size: 3,
        ..Default::default()
    };
    let first = client
        .list_applications(integration::Tokens::request(&router.token, page.clone()))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = first
        .applications
        .iter()
        .map(|a| a.address.as_str())
        .collect();
    assert_eq!(names, ["b", "c", "d"]);
    assert!(
        first
            .applications
            .iter()
            .all(|a| a.signing_secret.is_empty())
    );
    page.page_token = first.next_page_token;
    let second = client
        .list_applications(integration::Tokens::request(&router.token, page))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.applications.len(), 1);
    assert!(second.next_page_token.is_empty());
    let delete = pb::DeleteApplicationRequest {
        account_id: ACCOUNT.into(),
        address: "b".into(),
    };
    let deleted = client
        .delete_application(integration::Tokens::request(&router.token, delete.clone()))
        .await
        .unwrap();
    assert!(deleted.into_inner().deleted);
    let again = client
        .delete_application(integration::Tokens::request(&router.token, delete))
        .await
        .unwrap();
    assert!(!again.into_inner().deleted, "delete is idempotent");
    let missing = router.route("b", "CM-none").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_input_names_the_field_and_changes_nothing() {
    let world = World::start(10).await;
    let router = world.router();
    let long = "x".repeat(3000);
    let cases: Vec<(pb::Application, &str)> = vec![
        (
            pb::Application {
                address: String::new(),
                instructions: "<Response/>".into(),
                ..Default::default()
            },
            "application.address",
        ),
        (
            pb::Application {
                address: "a b".into(),
                instructions: "<Response/>".into(),
                ..Default::default()
            },
            "application.address",
        ),
        (
            pb::Application {
                address: "s".into(),
                ..Default::default()
            },
            "application.instructions_url",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions: "<Response/>".into(),
                instructions_url: "http://h/".into(),
                ..Default::default()
            },
            "application.instructions",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions_url: "ftp://h/".into(),
                ..Default::default()
            },
            "application.instructions_url",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions_url: format!("http://h/{long}"),
                ..Default::default()
            },
            "application.instructions_url",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions: "<Response/>".into(),
                fallback_url: "nope".into(),
                ..Default::default()
            },
            "application.fallback_url",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions: "<Response/>".into(),
                status_callback_url: "http://u@h/".into(),
                ..Default::default()
            },
            "application.status_callback_url",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions: "<Response/>".into(),
                signing_secret: "short".into(),
                ..Default::default()
            },
            "application.signing_secret",
        ),
        (
            pb::Application {
                address: "s".into(),
                instructions: "<Response/>".into(),
                method: 7,
                ..Default::default()
            },
            "application.method",
        ),
    ];
    for (app, field) in cases {
        let refused = router.put(app).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        assert!(
            refused.message().starts_with(field),
            "{field}: {}",
            refused.message()
        );
    }
    let mut client = router.client.clone();
    let listed = client
        .list_applications(integration::Tokens::request(
            &router.token,
            pb::ListApplicationsRequest {
                account_id: ACCOUNT.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.applications.is_empty(), "nothing was stored");
    world.inline("support", "<Response/>").await;
    let route = |f: fn(&mut pb::RouteRequest)| {
        let mut request = pb::RouteRequest {
            account_id: ACCOUNT.into(),
            from: "+1".into(),
            to: "support".into(),
            ..Default::default()
        };
        f(&mut request);
        request
    };
    for (request, field) in [
        (route(|r| r.from.clear()), "from"),
        (route(|r| r.to = "no such/addr".into()), "to"),
        (route(|r| r.channel = "Voice!".into()), "channel"),
        (
            route(|r| r.communication_id = "bad id".into()),
            "communication_id",
        ),
        (
            route(|r| r.communication_id = "x".repeat(129)),
            "communication_id",
        ),
        (
            route(|r| {
                r.parameters.insert(String::new(), "v".into());
            }),
            "parameters",
        ),
    ] {
        let refused = router.route_with(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        assert!(
            refused.message().starts_with(field),
            "{field}: {}",
            refused.message()
        );
    }
    let listed = client
        .list_communications(integration::Tokens::request(
            &router.token,
            pb::ListCommunicationsRequest {
                account_id: ACCOUNT.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.communications.is_empty(),
        "no communication was created"
    );
    let negative = client
        .list_communications(integration::Tokens::request(
            &router.token,
            pb::ListCommunicationsRequest {
                account_id: ACCOUNT.into(),
                page_size: -1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(negative.message().starts_with("page_size"));
}

#[tokio::test]
async fn one_account_never_sees_another_accounts_applications_or_communications() {
    let world = World::start(10).await;
    world
        .inline("support", "<Response><Reject/></Response>")
        .await;
    world.router().route("support", "CM-a").await.unwrap();
    let other = Tenant::create(&world.presence, "AC2").await;
    let token = other.token(None, &[Scope::RouterAdmin, Scope::RouterRoute]);
    let router = Router {
        client: world.router().client,
        token,
    };
    // Naming account AC1 with AC2's token is refused outright…
    let mut client = router.client.clone();
    let denied = crate::router_support::until_known(|| {
        let mut client = client.clone();
        let token = router.token.clone();
        async move {
            client
                .get_application(integration::Tokens::request(
                    &token,
                    pb::GetApplicationRequest {
                        account_id: ACCOUNT.into(),
                        address: "support".into(),
                    },
                ))
                .await
                .unwrap_err()
        }
    })
    .await;
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(router.get("CM-a").await.unwrap_err().code() == Code::PermissionDenied);
    // …and AC2's own namespace holds none of AC1's things.
    let own = client
        .get_application(integration::Tokens::request(
            &router.token,
            pb::GetApplicationRequest {
                account_id: String::new(),
                address: "support".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::NotFound);
    let own = client
        .get_communication(integration::Tokens::request(
            &router.token,
            pb::GetCommunicationRequest {
                account_id: String::new(),
                communication_id: "CM-a".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::NotFound);
    let listed = client
        .list_communications(integration::Tokens::request(
            &router.token,
            pb::ListCommunicationsRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.communications.is_empty());
    let hangup = client
        .hangup(integration::Tokens::request(
            &router.token,
            pb::HangupRequest {
                communication_id: "CM-a".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(hangup.code(), Code::NotFound);
    // A token without router scopes is refused by scope.
    let reader = other.token(None, &[Scope::PresenceRead]);
    let scoped = client
        .route(integration::Tokens::request(
            &reader,
            pb::RouteRequest {
                from: "x".into(),
                to: "support".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(scoped.code(), Code::PermissionDenied);
    assert!(scoped.message().contains("router.route"));
}

#[tokio::test]
async fn watch_list_and_get_follow_communications() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-watch").await }
    });
    let offer = alice.offer().await;
    let mut client = router.client.clone();
    let mut stream = client
        .watch_communication(integration::Tokens::request(
            &router.token,
            pb::WatchCommunicationRequest {
                account_id: ACCOUNT.into(),
                communication_id: "CM-watch".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    routing.await.unwrap().unwrap();
    // Through another replica the connected communication is readable and can be hung up.
    let other = world.another_router().await;
    let there = Router::new(&other);
    assert_eq!(
        there.get("CM-watch").await.unwrap().state,
        pb::CommunicationState::Connected as i32
    );
    there.hangup("CM-watch").await.unwrap();
    let mut seen = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        let event = message.event.unwrap();
        assert_eq!(
            event.sequence as usize,
            seen.len() + 1,
            "events in order, none skipped"
        );
        seen.push(Kind::try_from(event.kind).unwrap());
    }
    assert_eq!(seen.first(), Some(&Kind::Created));
    assert_eq!(
        seen.last(),
        Some(&Kind::Ended),
        "the stream ends after ENDED"
    );
    assert!(seen.contains(&Kind::Connected));
    // A replayed watch of the ended communication gives the same events.
    let replay = there
        .client
        .clone()
        .watch_communication(integration::Tokens::request(
            &router.token,
            pb::WatchCommunicationRequest {
                account_id: ACCOUNT.into(),
                communication_id: "CM-watch".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    use tokio_stream::StreamExt;
    assert_eq!(replay.collect::<Vec<_>>().await.len(), seen.len());
    world
        .inline("busy", "<Response><Reject reason=\"busy\"/></Response>")
        .await;
    for n in 0..3 {
        router.route("busy", &format!("CM-list-{n}")).await.unwrap();
    }
    let list = |state: pb::CommunicationState, page_token: String| pb::ListCommunicationsRequest {
        account_id: ACCOUNT.into(),
        page_size: 2,
        page_token,
        state: state as i32,
    };
    let first = client
        .list_communications(integration::Tokens::request(
            &router.token,
            list(pb::CommunicationState::Ended, String::new()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.communications.len(), 2);
    let at = |c: &pb::Communication| c.create_time.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(
        at(&first.communications[0]) >= at(&first.communications[1]),
        "newest first"
    );
    let second = client
        .list_communications(integration::Tokens::request(
            &router.token,
            list(pb::CommunicationState::Ended, first.next_page_token),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.communications.len(), 2);
    assert!(second.next_page_token.is_empty());
    let ids: std::collections::HashSet<_> = first
        .communications
        .iter()
        .chain(&second.communications)
        .map(|c| c.communication_id.clone())
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(
        second
            .communications
            .iter()
            .chain(&first.communications)
            .all(|c| c.state == pb::CommunicationState::Ended as i32)
    );
    let connected = client
        .list_communications(integration::Tokens::request(
            &router.token,
            list(pb::CommunicationState::Connected, String::new()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(connected.communications.is_empty());
    assert_eq!(
        outcome(&router.get("CM-list-0").await.unwrap()),
        pb::Outcome::Busy
    );
    other.shutdown().await.unwrap();
}

#[tokio::test]
async fn many_concurrent_routes_are_group_committed_without_loss() {
    let world = World::start(0).await;
    world
        .inline("busy", "<Response><Reject reason=\"busy\"/></Response>")
        .await;
    let router = world.router();
    let routes: Vec<_> = (0..300)
        .map(|n| {
            let router = router.clone();
            tokio::spawn(async move { router.route("busy", &format!("CM-many-{n}")).await })
        })
        .collect();
    for route in routes {
        let comm = route.await.unwrap().unwrap();
        assert_eq!(outcome(&comm), pb::Outcome::Busy);
    }
    let mut client = router.client.clone();
    let request = pb::ListCommunicationsRequest {
        account_id: ACCOUNT.into(),
        page_size: 1000,
        ..Default::default()
    };
    let listed = client
        .list_communications(integration::Tokens::request(&router.token, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.communications.len(), 300, "every record was stored");
}
