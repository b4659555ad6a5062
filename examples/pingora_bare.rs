//! Reference point for `bench/run.sh` (not part of idem): the smallest Pingora 0.9 proxy,
//! with the settings idem runs with (threads, no work stealing, allocator, no L4 read buffer on client
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
    respond: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    /// With `BARE_RESPOND=1` the proxy answers every request itself (no upstream): the
    /// ceiling for a response served from memory, like idem's replay.
    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        if !self.respond {
            return Ok(false);
        }
        if session.read_request_body().await?.is_some() {
            while session.read_request_body().await?.is_some() {}
        }
        let mut h = pingora::http::ResponseHeader::build(200, Some(2))?;
        h.insert_header("content-type", "text/plain")?;
        h.insert_header("content-length", "3")?;
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(bytes::Bytes::from_static(b"ok\n")), true)
            .await?;
        Ok(true)
    }

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
    // Runtime knobs for experiments (bench/run.sh uses the defaults, which are idem's).
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut conf = ServerConf {
        threads: env("BARE_THREADS", 2),
        work_stealing: env("BARE_WORK_STEALING", 0) == 1,
        listener_tasks_per_fd: env("BARE_LISTENER_TASKS", 1),
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = conf.upstream_keepalive_pool_size.max(1024);
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            backend,
            respond: env("BARE_RESPOND", 0) == 1,
        },
    );
    proxy.add_listener(
        ListenerConfig::tcp(listen.clone()).l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(proxy);
    server.run_forever();
}
