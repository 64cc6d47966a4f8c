//! Every way a token can fail, seen through a real server, and the account key lifecycle.

use std::time::Duration;

use integration::{Etcd, PLATFORM_KEY_ID, PLATFORM_SECRET, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1::key_service_client::KeyServiceClient;
use proto::presence::v1::{CreateKeyRequest, DisableKeyRequest, ListKeysRequest};
use tonic::Code;

use crate::support;

async fn create_key(
    client: &mut KeyServiceClient<tonic::transport::Channel>,
    account: &str,
) -> (String, String) {
    let token = Tokens::platform("*", &[Scope::Admin]);
    let created = client
        .create_key(Tokens::request(
            &token,
            CreateKeyRequest {
                account_id: account.into(),
                description: "test".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    (created.key.unwrap().key_id, created.secret)
}

fn list_request(token: &str) -> tonic::Request<ListKeysRequest> {
    Tokens::request(token, ListKeysRequest::default())
}

#[tokio::test]
async fn token_failures_are_unauthenticated_with_a_reason_and_never_echo_the_token() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let mut keys = KeyServiceClient::new(support::channel(&server));
    let (key_id, secret) = create_key(&mut keys, "AC1").await;
    let (disabled_id, disabled_secret) = create_key(&mut keys, "AC1").await;
    let admin = Tokens::platform("*", &[Scope::Admin]);
    keys.disable_key(Tokens::request(
        &admin,
        DisableKeyRequest {
            key_id: disabled_id.clone(),
        },
    ))
    .await
    .unwrap();

    let now = plumbing::auth::unix_now();
    let forged = {
        let good = Tokens::signed(&key_id, &secret, "AC1", None, &[Scope::Admin], 60);
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[2] = Tokens::signed(&key_id, "wrong-secret", "AC1", None, &[Scope::Admin], 60)
            .split('.')
            .nth(2)
            .unwrap()
            .to_owned();
        parts.join(".")
    };
    let expired = sign_claims(
        &key_id,
        &secret,
        serde_json::json!({"sub": "AC1", "exp": now - 120, "iat": now - 180}),
    );
    let not_yet = sign_claims(
        &key_id,
        &secret,
        serde_json::json!({"sub": "AC1", "exp": now + 600, "nbf": now + 300, "iat": now}),
    );
    let too_long = sign_claims(
        &key_id,
        &secret,
        serde_json::json!({"sub": "AC1", "exp": now + 3 * 86400, "iat": now}),
    );
    let wrong_sub = Tokens::signed(&key_id, &secret, "AC2", None, &[Scope::Admin], 60);
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no authorization", None, "missing `authorization`"),
        (
            "basic auth",
            Some("Basic dXNlcjpwdw==".into()),
            "must be `Bearer <JWT>`",
        ),
        ("garbage", Some("Bearer not-a-jwt".into()), "malformed"),
        (
            "forged",
            Some(format!("Bearer {forged}")),
            "signature is invalid",
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                Tokens::signed("nope", "x", "AC1", None, &[], 60)
            )),
            "unknown key id `nope`",
        ),
        (
            "disabled key",
            Some(format!(
                "Bearer {}",
                Tokens::signed(&disabled_id, &disabled_secret, "AC1", None, &[], 60)
            )),
            "disabled key",
        ),
        ("expired", Some(format!("Bearer {expired}")), "expired"),
        (
            "not yet valid",
            Some(format!("Bearer {not_yet}")),
            "not valid before",
        ),
        (
            "lifetime over 24 h",
            Some(format!("Bearer {too_long}")),
            "exceeds 24 h",
        ),
        (
            "subject of another account",
            Some(format!("Bearer {wrong_sub}")),
            "does not match the account",
        ),
    ];
    for (name, header, expected) in cases {
        let mut request = tonic::Request::new(ListKeysRequest::default());
        if let Some(value) = &header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        let status = keys.list_keys(request).await.expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{name}: message {:?} lacks {expected:?}",
            status.message()
        );
        if let Some(value) = header
            && let Some(token) = value.strip_prefix("Bearer ")
        {
            assert!(!status.message().contains(token), "{name}: token echoed");
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn account_tokens_are_denied_platform_only_rpcs() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let mut keys = KeyServiceClient::new(support::channel(&server));
    let (key_id, secret) = create_key(&mut keys, "AC1").await;
    let account_admin = Tokens::signed(&key_id, &secret, "AC1", None, &[Scope::Admin], 60);
    let status = keys
        .list_keys(list_request(&account_admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("only platform tokens"),
        "{status:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_disabled_key_is_refused_on_every_replica_within_a_second() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let a = support::presence(&etcd, &prefix).await;
    let b = support::presence(&etcd, &prefix).await;
    let mut via_a = KeyServiceClient::new(support::channel(&a));
    let via_b = KeyServiceClient::new(support::channel(&b));
    let (key_id, secret) = create_key(&mut via_a, "AC1").await;
    let account = Tokens::signed(&key_id, &secret, "AC1", None, &[Scope::Admin], 60);
    // A fresh key is accepted on the other replica once its mirror has it: the call gets
    // past authentication and fails only on the platform-only rule.
    poll_until("key to reach replica B", Duration::from_secs(1), || {
        let (mut client, token) = (via_b.clone(), account.clone());
        async move {
            (client
                .list_keys(list_request(&token))
                .await
                .unwrap_err()
                .code()
                == Code::PermissionDenied)
                .then_some(())
        }
    })
    .await;
    let admin = Tokens::platform("*", &[Scope::Admin]);
    via_a
        .disable_key(Tokens::request(
            &admin,
            DisableKeyRequest {
                key_id: key_id.clone(),
            },
        ))
        .await
        .unwrap();
    poll_until(
        "disabled key to be refused on replica B",
        Duration::from_secs(1),
        || {
            let (mut client, token) = (via_b.clone(), account.clone());
            async move {
                (client
                    .list_keys(list_request(&token))
                    .await
                    .unwrap_err()
                    .code()
                    == Code::Unauthenticated)
                    .then_some(())
            }
        },
    )
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_are_listed_by_account_and_page_without_secrets() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let mut keys = KeyServiceClient::new(support::channel(&server));
    let mut ac1 = Vec::new();
    for _ in 0..5 {
        ac1.push(create_key(&mut keys, "AC1").await.0);
    }
    create_key(&mut keys, "AC2").await;
    ac1.sort();
    let admin = Tokens::platform("*", &[Scope::Admin]);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = keys
            .list_keys(Tokens::request(
                &admin,
                ListKeysRequest {
                    account_id: "AC1".into(),
                    page_size: 2,
                    page_token: token,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ac1);
    let all = keys
        .list_keys(Tokens::request(&admin, ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.keys.len(), 6);
    let bad = keys
        .create_key(Tokens::request(
            &admin,
            CreateKeyRequest {
                account_id: "*".into(),
                description: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("account_id:"), "{bad:?}");
    let missing = keys
        .disable_key(Tokens::request(
            &admin,
            DisableKeyRequest {
                key_id: "ak_missing".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_platform_token_is_accepted_and_a_wrong_platform_secret_is_not() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let mut keys = KeyServiceClient::new(support::channel(&server));
    let good = Tokens::signed(
        PLATFORM_KEY_ID,
        PLATFORM_SECRET,
        "*",
        None,
        &[Scope::Admin],
        60,
    );
    keys.list_keys(list_request(&good)).await.unwrap();
    let bad = Tokens::signed(PLATFORM_KEY_ID, "guess", "*", None, &[Scope::Admin], 60);
    assert_eq!(
        keys.list_keys(list_request(&bad)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_platform_key_rotates_with_a_second_accepted_key() {
    use plumbing::config::Secret;
    const NEXT_ID: &str = "platform-next";
    const NEXT_SECRET: &str = "the-next-platform-secret-0123456789";
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    // Mid-rotation: the limiter still signs with the old key and accepts the new one; the
    // router signs with the new key and accepts the old one.
    let mut old_first = integration::common_args(&etcd, &prefix);
    old_first.platform_accept_key_id = Some(NEXT_ID.into());
    old_first.platform_accept_secret = Some(Secret::new(NEXT_SECRET));
    let mut new_first = integration::common_args(&etcd, &prefix);
    new_first.platform_key_id = NEXT_ID.into();
    new_first.platform_secret = Some(Secret::new(NEXT_SECRET));
    new_first.platform_accept_key_id = Some(PLATFORM_KEY_ID.into());
    new_first.platform_accept_secret = Some(Secret::new(PLATFORM_SECRET));
    let presence = support::presence(&etcd, &prefix).await;
    let limiter = support::limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common: old_first,
    })
    .await;
    let mut args = support::router_args(
        &etcd,
        &prefix,
        presence.addr.to_string(),
        Some(limiter.addr.to_string()),
        false,
    );
    args.common = new_first;
    args.guard.guard_fail_closed = true;
    let router = support::router_serving(args, router_svc::RouterArgs::default()).await;

    // Platform tokens of both keys are accepted by both sides of the rotation.
    let old = Tokens::platform("*", &[Scope::Admin]);
    let new = Tokens::signed(NEXT_ID, NEXT_SECRET, "*", None, &[Scope::Admin], 60);
    let mut routes = proto::router::v1::router_service_client::RouterServiceClient::new(
        support::channel(&router),
    );
    let mut limits = proto::limiter::v1::limiter_service_client::LimiterServiceClient::new(
        support::channel(&limiter),
    );
    for token in [&old, &new] {
        let request = proto::router::v1::ListApplicationsRequest {
            account_id: "AC1".into(),
            ..Default::default()
        };
        routes
            .list_applications(Tokens::request(token, request))
            .await
            .unwrap();
        let request = proto::limiter::v1::ListLimitsRequest {
            account_id: "AC1".into(),
            ..Default::default()
        };
        limits
            .list_limits(Tokens::request(token, request))
            .await
            .unwrap();
    }
    // Service to service: an account's call to the router passes its API guard, which the
    // router asks of the limiter with a platform token of the new key (fail-closed, so a
    // refused guard call would fail the request).
    let mut keys = KeyServiceClient::new(support::channel(&presence));
    let (key_id, secret) = create_key(&mut keys, "AC1").await;
    let account = Tokens::signed(&key_id, &secret, "AC1", None, &[Scope::Admin], 60);
    let status = poll_until(
        "the account key on the router",
        Duration::from_secs(5),
        || {
            let (mut routes, account) = (routes.clone(), account.clone());
            async move {
                let request = proto::router::v1::GetCommunicationRequest {
                    account_id: "AC1".into(),
                    communication_id: "CM-none".into(),
                };
                let status = routes
                    .get_communication(Tokens::request(&account, request))
                    .await
                    .unwrap_err();
                (status.code() != Code::Unauthenticated).then_some(status)
            }
        },
    )
    .await;
    assert_eq!(
        status.code(),
        Code::NotFound,
        "the guarded call reached the handler: {status:?}"
    );
    // After the rotation, a replica that accepts only the new key refuses the old one.
    let mut after = integration::common_args(&etcd, &prefix);
    after.platform_key_id = NEXT_ID.into();
    after.platform_secret = Some(Secret::new(NEXT_SECRET));
    let rotated = support::limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common: after,
    })
    .await;
    let mut limits = proto::limiter::v1::limiter_service_client::LimiterServiceClient::new(
        support::channel(&rotated),
    );
    let request = || proto::limiter::v1::ListLimitsRequest {
        account_id: "AC1".into(),
        ..Default::default()
    };
    limits
        .list_limits(Tokens::request(&new, request()))
        .await
        .unwrap();
    let refused = limits
        .list_limits(Tokens::request(&old, request()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    for server in [router, rotated, limiter, presence] {
        server.shutdown().await.unwrap();
    }
}

/// Signs arbitrary claims (for expiry and lifetime cases the minter refuses to produce).
fn sign_claims(key_id: &str, secret: &str, claims: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "HS256", "kid": key_id})),
        b64(&claims)
    );
    let signature = plumbing::auth::jwt::sign(secret.as_bytes(), input.as_bytes());
    format!(
        "{input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
    )
}
