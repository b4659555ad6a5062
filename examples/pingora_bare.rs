//! Reference point for `bench/run.sh` (not part of idem): the smallest Pingora 0.9 proxy,
//! with the settings idem runs with (threads, allocator, no L4 read buffer on client
//! connections, h1). It forwards everything to one backend and does nothing else, so its
//! throughput is the ceiling of any proxy built on Pingora on the machine at hand.
//!
//! ```text
//! pingora_bare LISTEN_ADDR BACKEND_ADDR
//! ```

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    backend: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(backend)) = (args.first(), args.get(1)) else {
        eprintln!("usage: pingora_bare LISTEN_ADDR BACKEND_ADDR");
        std::process::exit(2);
    };
    let backend: SocketAddr = backend.parse().expect("backend address");
    let mut conf = ServerConf {
        threads: 2,
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(1024);
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Bare { backend });
    proxy.add_listener(
        ListenerConfig::tcp(listen.clone()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(proxy);
    server.run_forever();
}
