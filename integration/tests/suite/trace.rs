//! One trace: with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a test OTLP receiver, one Route
//! yields spans from router, limiter and presence under one trace id.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::{
    Etcd, PLATFORM_KEY_ID, PLATFORM_SECRET, ServiceProcess, Tokens, poll_until, unique_prefix,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use plumbing::auth::Scope;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;

use crate::presence_support::Session;

/// (service name, trace id, span name, rpc.method) of every span received.
type Spans = Arc<Mutex<Vec<(String, Vec<u8>, String, String)>>>;

#[derive(Clone, Default)]
struct Receiver {
    spans: Spans,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.clone())
                .map(|v| {
                    if let Value::StringValue(s) = v {
                        s
                    } else {
                        String::new()
                    }
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let method = span
                        .attributes
                        .iter()
                        .find(|a| a.key == "rpc.method")
                        .and_then(|a| a.value.as_ref()?.value.clone())
                        .map(|v| {
                            if let Value::StringValue(s) = v {
                                s
                            } else {
                                String::new()
                            }
                        })
                        .unwrap_or_default();
                    spans.push((service.clone(), span.trace_id, span.name, method));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn one_route_is_one_trace_across_router_limiter_and_presence() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let collector = tokio::spawn(server);

    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let limiter = ServiceProcess::start_with_env("limiter-svc", &etcd, &prefix, &[], &env).await;
    let presence = ServiceProcess::start_with_env("presence-svc", &etcd, &prefix, &[], &env).await;
    let (limiter_addr, presence_addr) = (limiter.addr.to_string(), presence.addr.to_string());
    let router_args = [
        "--limiter",
        limiter_addr.as_str(),
        "--presence",
        presence_addr.as_str(),
    ];
    let router =
        ServiceProcess::start_with_env("router-svc", &etcd, &prefix, &router_args, &env).await;

    // alice's softphone.
    let alice = Tokens::signed(
        PLATFORM_KEY_ID,
        PLATFORM_SECRET,
        "AC1",
        Some("alice"),
        &[Scope::PresenceRegister],
        600,
    );
    let mut phone = Session::hello(
        plumbing::client::channel(&presence_addr).unwrap(),
        &alice,
        "phone",
    )
    .await;
    let admin = Tokens::platform("*", &[Scope::Admin]);
    let mut routes =
        RouterServiceClient::new(plumbing::client::channel(&router.addr.to_string()).unwrap());
    let app = rpb::Application {
        account_id: "AC1".into(),
        address: "+15550100".into(),
        instructions: "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>"
            .into(),
        ..Default::default()
    };
    routes
        .put_application(Tokens::request(
            &admin,
            rpb::PutApplicationRequest {
                application: Some(app),
            },
        ))
        .await
        .unwrap();
    let request = rpb::RouteRequest {
        account_id: "AC1".into(),
        from: "+15551234".into(),
        to: "+15550100".into(),
        communication_id: "CM-trace".into(),
        ..Default::default()
    };
    let route = tokio::spawn({
        let (mut routes, admin) = (routes.clone(), admin.clone());
        async move { routes.route(Tokens::request(&admin, request)).await }
    });
    let offer = loop {
        use proto::presence::v1::connect_response::Kind;
        if let Kind::Offer(offer) = phone.next().await {
            break offer;
        }
    };
    phone
        .send(proto::presence::v1::connect_request::Kind::Answer(
            proto::presence::v1::ConnectAnswer {
                offer_id: offer.offer_id,
                accept: true,
                ..Default::default()
            },
        ))
        .await;
    let routed = route
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .communication
        .unwrap();
    assert_eq!(routed.outcome, rpb::Outcome::Connected as i32, "{routed:?}");
    routes
        .hangup(Tokens::request(
            &admin,
            rpb::HangupRequest {
                account_id: "AC1".into(),
                communication_id: "CM-trace".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    let spans = receiver.spans.clone();
    let services = poll_until(
        "spans of all three services under the Route's trace",
        Duration::from_secs(15),
        || {
            let spans = spans.clone();
            async move {
                let spans = spans.lock().unwrap();
                let trace = spans
                    .iter()
                    .find(|(service, _, _, method)| {
                        service == "router-svc" && method.ends_with("RouterService/Route")
                    })
                    .map(|(_, trace, _, _)| trace.clone())?;
                let services: HashSet<String> = spans
                    .iter()
                    .filter(|(_, t, _, _)| *t == trace)
                    .map(|(s, _, _, _)| s.clone())
                    .collect();
                (services.len() == 3).then_some(services)
            }
        },
    )
    .await;
    assert_eq!(
        services,
        HashSet::from([
            "router-svc".to_owned(),
            "limiter-svc".to_owned(),
            "presence-svc".to_owned()
        ])
    );
    let by_service: HashMap<String, usize> =
        receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, (s, ..)| {
                *m.entry(s.clone()).or_default() += 1;
                m
            });
    assert!(by_service.values().all(|n| *n > 0));
    collector.abort();
}
