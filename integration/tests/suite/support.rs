//! Starting the services in-process for tests.

use integration::{Etcd, InProcess, common_args, serve_in_process};
use plumbing::server::ServeError;
use tonic::transport::Channel;

/// presence-svc in-process against `etcd` under `prefix`.
pub async fn presence(etcd: &Etcd, prefix: &str) -> InProcess<ServeError> {
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common: common_args(etcd, prefix),
    };
    serve_in_process(move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// A channel to an in-process server.
pub fn channel<E>(server: &InProcess<E>) -> Channel {
    plumbing::client::channel(&server.addr.to_string()).unwrap()
}
