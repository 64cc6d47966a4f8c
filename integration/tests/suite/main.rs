//! Cross-service tests against real etcd processes and real servers on port 0.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod etcd;
mod shutdown;
mod support;
