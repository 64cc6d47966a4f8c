//! Cross-service tests against real etcd processes and real servers on port 0.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abuse;
mod abuse_support;
mod auth;
mod etcd;
mod etcd_security;
mod fault_etcd_leader;
mod fault_etcd_restart;
mod fault_replica_kill;
mod fault_sigterm;
mod fault_support;
mod fuzz_regressions;
mod guard;
mod limiter;
mod metrics;
mod presence_auth;
mod presence_reads;
mod presence_registration;
mod presence_relay;
mod presence_sessions;
mod presence_support;
mod presence_validation;
mod presence_watch;
mod router_api;
mod router_crash;
mod router_dial;
mod router_support;
mod router_throughput;
mod router_webhooks;
mod secrets;
mod shutdown;
mod softphone;
mod support;
mod tls;
mod trace;
