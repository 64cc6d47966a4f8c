//! The dashboard (`deploy/grafana/switchboard.json`) and the alerts
//! (`deploy/prometheus/alerts.yml`) use only metrics the services export: every
//! `switchboard_*` name in their queries is looked up in the `/metrics` of a running
//! presence, limiter and router, after each has done the work that creates its labelled
//! series (a Connect and a watch, acquires up to a limit, a route through webhooks).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::{Etcd, Tokens, common_args, free_port, serve_in_process, unique_prefix};
use plumbing::auth::Scope;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as ppb;
use proto::router::v1 as rpb;

use crate::presence_support::{Tenant, client};
use crate::router_support::{ACCOUNT, WebhookServer, World, admin};
use crate::support::{self, scrape};

/// A file under `deploy/`.
fn deploy_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The PromQL of every panel of the dashboard (rows' nested panels included).
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana/switchboard.json")).unwrap();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    let nested: Vec<&serde_json::Value> = panels
        .iter()
        .filter_map(|panel| panel["panels"].as_array())
        .flatten()
        .collect();
    panels.extend(nested);
    panels
        .iter()
        .filter_map(|panel| panel["targets"].as_array())
        .flatten()
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect()
}

/// The `expr` of every rule in alerts.yml, on one line or in a `|` block.
fn alert_queries() -> Vec<String> {
    let text = deploy_file("prometheus/alerts.yml");
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut queries = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        if !matches!(rest.trim(), "|" | "|-" | ">" | ">-") {
            queries.push(rest.trim().to_owned());
            continue;
        }
        let mut block = String::new();
        while let Some(next) =
            lines.next_if(|next| next.trim().is_empty() || indent(next) > indent(line))
        {
            block.push_str(next.trim());
            block.push('\n');
        }
        queries.push(block);
    }
    queries
}

/// The metric names in a query: identifiers starting with `switchboard_`.
fn metric_names(query: &str) -> BTreeSet<String> {
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let bytes = query.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = query[from..].find("switchboard_") {
        let start = from + found;
        let end = start + bytes[start..].iter().take_while(|b| is_name(**b)).count();
        if start == 0 || !is_name(bytes[start - 1]) {
            names.insert(query[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// What a set of `/metrics` pages declare (family → type) and which samples they hold.
#[derive(Debug, Default)]
struct Exported {
    types: HashMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exported {
    /// Reads exposition texts (an HTTP response's headers, if any, are skipped).
    fn from_pages(pages: &[String]) -> Self {
        let mut exported = Self::default();
        for page in pages {
            let body = page
                .split_once("\r\n\r\n")
                .map_or(page.as_str(), |(_, b)| b);
            for line in body.lines() {
                if let Some(declared) = line.strip_prefix("# TYPE ") {
                    let mut words = declared.split_whitespace();
                    if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                        exported.types.insert(name.to_owned(), kind.to_owned());
                    }
                } else if !line.starts_with('#') && !line.trim().is_empty() {
                    let name = line.split(['{', ' ']).next().unwrap_or_default();
                    exported.samples.insert(name.to_owned());
                }
            }
        }
        exported
    }

    /// Why the query name `name` is not exported, if it is not: counters are declared
    /// without `_total`, histograms without `_bucket`/`_sum`/`_count`.
    fn why_missing(&self, name: &str) -> Option<&'static str> {
        let suffixed = [
            ("_total", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
        ];
        let declared = suffixed.iter().any(|(suffix, kind)| {
            name.strip_suffix(suffix)
                .is_some_and(|family| self.types.get(family).is_some_and(|t| t == kind))
        });
        match self.types.get(name).map(String::as_str) {
            _ if declared => {}
            Some("histogram") => return Some("a histogram: query _bucket, _sum or _count"),
            Some("counter") => return Some("a counter: query it with _total"),
            Some(_) => {}
            None => return Some("declared by no service"),
        }
        if !self.samples.contains(name) {
            return Some("declared, but no service has a sample of it");
        }
        None
    }

    /// Each name of `names` that is not exported, with why.
    fn missing<'a>(&self, names: &'a BTreeSet<String>) -> BTreeMap<&'a str, &'static str> {
        names
            .iter()
            .filter_map(|name| Some((name.as_str(), self.why_missing(name)?)))
            .collect()
    }
}

/// Every metric name the dashboard and the alerts query.
fn referenced_names() -> BTreeSet<String> {
    let dashboard = dashboard_queries();
    let alerts = alert_queries();
    assert!(
        dashboard.len() > 20,
        "{} dashboard queries",
        dashboard.len()
    );
    assert!(alerts.len() >= 8, "{} alert queries", alerts.len());
    dashboard
        .iter()
        .chain(&alerts)
        .flat_map(|query| metric_names(query))
        .collect()
}

fn metrics_address() -> SocketAddr {
    ([127, 0, 0, 1], free_port()).into()
}

/// etcd and the three services, each serving `/metrics` at the address returned with it.
async fn observed_world() -> (World, [SocketAddr; 3]) {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let addresses = [metrics_address(), metrics_address(), metrics_address()];
    let mut common = common_args(&etcd, &prefix);
    common.metrics_listen = Some(addresses[0]);
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    let presence = serve_in_process(move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await;
    let mut common = common_args(&etcd, &prefix);
    common.metrics_listen = Some(addresses[1]);
    let limiter = support::limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common,
    })
    .await;
    let mut args = support::router_args(
        &etcd,
        &prefix,
        presence.addr.to_string(),
        Some(limiter.addr.to_string()),
        true,
    );
    args.common.metrics_listen = Some(addresses[2]);
    let router = support::router_serving(args, router_svc::RouterArgs::default()).await;
    let tenant = Tenant::create(&presence, ACCOUNT).await;
    tenant.known_to(&presence).await;
    let world = World {
        etcd,
        prefix,
        presence,
        limiter,
        router,
        tenant,
    };
    (world, addresses)
}

/// Acquires `resource` slots of [`ACCOUNT`] until one is rejected by its limit; the granted
/// ones stay held, so the key stays at its limit.
async fn fill_to_the_limit(world: &World, resource: &str) {
    let limiter = LimiterServiceClient::new(support::channel(&world.limiter));
    let token = admin();
    integration::poll_until(
        "an acquire rejected by the limit",
        Duration::from_secs(10),
        || {
            let (mut limiter, token) = (limiter.clone(), token.clone());
            async move {
                let request = lpb::AcquireRequest {
                    account_id: ACCOUNT.into(),
                    resource: resource.into(),
                    hold_seconds: 120,
                    ..Default::default()
                };
                let answer = limiter
                    .acquire(Tokens::request(&token, request))
                    .await
                    .ok()?
                    .into_inner();
                (answer.decision == lpb::Decision::Rejected as i32).then_some(())
            }
        },
    )
    .await;
}

/// A route through an instructions webhook to a device that answers, then a hang-up
/// (status callbacks go to the same webhook server).
async fn route_through_webhooks(world: &World) {
    let webhooks = WebhookServer::start(|request| match request.path() {
        "/voice" => (
            200,
            "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>".into(),
        ),
        _ => (204, String::new()),
    })
    .await;
    world
        .put_app(rpb::Application {
            address: "support".into(),
            instructions_url: webhooks.url("/voice"),
            status_callback_url: webhooks.url("/status"),
            ..Default::default()
        })
        .await;
    let mut phone = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-observed").await }
    });
    let offer = phone.offer().await;
    phone
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(comm.state, rpb::CommunicationState::Connected as i32);
    router.hangup("CM-observed").await.unwrap();
    router.ended("CM-observed").await;
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let names = referenced_names();
    let (world, addresses) = observed_world().await;
    // A watch open before alice connects, so that her joining is delivered through it.
    let reader = world.tenant.token(None, &[Scope::PresenceRead]);
    let mut watch = client(&world.presence)
        .watch_presence(Tokens::request(
            &reader,
            ppb::WatchPresenceRequest {
                account_id: ACCOUNT.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    world.set_limit_of("calls", 2).await;
    fill_to_the_limit(&world, "calls").await;
    route_through_webhooks(&world).await;
    tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("no watch event in time")
        .unwrap()
        .expect("the watch ended");

    // Gauges are published every second: allow a few rounds before judging.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (exported, missing) = loop {
        let mut pages = Vec::new();
        for address in addresses {
            pages.push(scrape(address).await);
        }
        let exported = Exported::from_pages(&pages);
        let missing: BTreeMap<String, &str> = exported
            .missing(&names)
            .into_iter()
            .map(|(name, why)| (name.to_owned(), why))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (exported, missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts query metrics the services do not export:\n{}\n\
         (declared families: {:?})",
        missing
            .iter()
            .map(|(name, why)| format!("  {name}: {why}"))
            .collect::<Vec<_>>()
            .join("\n"),
        exported.types.keys().collect::<BTreeSet<_>>()
    );
}

#[test]
fn names_no_service_exports_are_reported_with_why() {
    let page = "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n\
        # TYPE switchboard_limiter_grants counter\n\
        switchboard_limiter_grants_total{resource=\"calls\"} 1\n\
        # TYPE switchboard_limiter_txn_duration_seconds histogram\n\
        switchboard_limiter_txn_duration_seconds_count 1\n\
        # TYPE switchboard_limiter_queued gauge\n\
        # TYPE switchboard_limiter_acquire_failures counter\n\
        switchboard_limiter_acquire_failures_total{reason=\"etcd\"} 0\n\
        # EOF\n";
    let exported = Exported::from_pages(&[page.to_owned()]);
    let names = metric_names(
        "sum(rate(switchboard_limiter_grants_total[5m])) / switchboard_limiter_queued \
         + switchboard_limiter_txn_duration_seconds_count + switchboard_limiter_grants \
         + rate(switchboard_limiter_acquire_failures_total[5m]) + switchboard_no_such_metric \
         + histogram_quantile(0.9, switchboard_limiter_txn_duration_seconds)",
    );
    let missing = exported.missing(&names);
    assert_eq!(
        missing.keys().copied().collect::<Vec<_>>(),
        [
            "switchboard_limiter_grants",
            "switchboard_limiter_queued",
            "switchboard_limiter_txn_duration_seconds",
            "switchboard_no_such_metric",
        ],
        "{missing:?}"
    );
    assert_eq!(
        missing["switchboard_limiter_grants"],
        "a counter: query it with _total"
    );
    assert_eq!(
        missing["switchboard_no_such_metric"],
        "declared by no service"
    );
}

#[test]
fn alert_and_dashboard_queries_are_found_and_named() {
    let names = referenced_names();
    for expected in [
        "switchboard_requests_total",
        "switchboard_etcd_requests_total",
        "switchboard_limiter_shards_owned",
        "switchboard_router_webhooks_total",
        "switchboard_presence_watch_lag_seconds_bucket",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not found in {names:?}"
        );
    }
    assert!(
        names.iter().all(|n| !n.ends_with('_')),
        "a name was cut short: {names:?}"
    );
}
