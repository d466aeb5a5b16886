//! The cheapest forwarding pingora does: a `ProxyHttp` whose only method
//! picks the upstream, with the proxy's own server settings (jemalloc, work
//! stealing, the 16 KiB client write buffer) and nothing else: no routing,
//! no logging, no metrics, no headers added. `scripts/passthrough-bench.sh`
//! measures it beside the proxy and nginx, so every run shows how much of
//! the proxy's cost per request is pingora's own HTTP/1 path and how much is
//! the proxy's.
//!
//! `bare_pingora_proxy LISTEN UPSTREAM THREADS`, e.g.
//! `bare_pingora_proxy 127.0.0.1:19183 127.0.0.1:19180 1`.

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Forward {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, threads] = args.as_slice() else {
        eprintln!("usage: bare_pingora_proxy LISTEN UPSTREAM THREADS");
        std::process::exit(2);
    };
    let Ok(threads) = threads.parse::<usize>() else {
        eprintln!("THREADS must be a number, not {threads:?}");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: upstream.clone(),
        },
    );
    service.add_listener(fhir_group_proxy::proxy::client_listener(listen.clone()));
    server.add_service(service);
    server.run_forever();
}
