//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless `[tracing] otlp_endpoint` is
//! set; when off, a request pays one `Option` check.
//!
//! Spans:
//! * every request: a server span named `METHOD route`, child of the client's W3C
//!   `traceparent` when it sent one (its `tracestate` travels on untouched);
//! * a leader's upstream call: a client span, child of the leader's server span, ended when
//!   the call's outcome is known (after its client left, too); the `traceparent` sent
//!   upstream names it, so the app's spans hang below it;
//! * a pass-through request sends its own server span as the app's parent;
//! * waiters and replays: their server span carries a link to the leader's server span
//!   (kept with the flight and the stored record as a [`SpanRef`]).
//!
//! Export: the SDK's batch processor on a thread of its own, sending to the collector with
//! a blocking HTTP client; the standard `OTEL_BSP_*` variables tune the batches (default: a
//! batch every 5 s, at most 2048 spans queued; past that, spans are dropped, never a request
//! slowed). A graceful exit flushes what is queued. Sampling follows the parent's decision,
//! else keeps `sample_ratio` of the traces started here.

use crate::config::settings::TracingSettings;
use crate::observe::request_id::SpanRef;
use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::sync::Arc;
use std::time::Duration;

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful exit waits for the last spans to be sent.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The tracer, when traces are on.
pub(crate) struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Traces {
    /// Builds the exporter and the tracer. Call before any runtime starts (the blocking HTTP
    /// client must not be created inside one).
    pub(crate) fn start(s: &TracingSettings) -> Result<Arc<Traces>, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(s.otlp_endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing: cannot build the OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                s.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(s.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "idem");
        Ok(Arc::new(Traces {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        }))
    }

    /// The server span of a request with `headers` (`traceparent` is its parent).
    pub(crate) fn request(&self, method: &str, path: &str, headers: &HeaderMap) -> RequestSpan {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan { span }
    }

    /// The span of a leader's upstream call, child of its server span `parent`.
    pub(crate) fn call(&self, parent: &SpanContext, method: &str) -> CallSpan {
        let cx = Context::new().with_remote_span_context(parent.clone());
        let span = self
            .tracer
            .span_builder(format!("upstream {method}"))
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(&self.tracer, &cx);
        CallSpan { span }
    }

    /// Sends what is queued (graceful exit).
    pub(crate) fn flush(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_AT_EXIT) {
            tracing::warn!("tracing: the last spans could not be sent: {e}");
        }
    }
}

/// A request's server span.
pub(crate) struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl RequestSpan {
    /// Its context (the parent of a leader's call span).
    pub(crate) fn context(&self) -> SpanContext {
        self.span.span_context().clone()
    }

    /// How a waiter or a replay will name it.
    pub(crate) fn span_ref(&self) -> SpanRef {
        let c = self.span.span_context();
        SpanRef {
            trace_id: c.trace_id().to_bytes(),
            span_id: c.span_id().to_bytes(),
        }
    }

    /// The `traceparent` that makes this span the parent of the app's.
    pub(crate) fn traceparent(&self) -> HeaderValue {
        traceparent(self.span.span_context())
    }

    /// Links the span of the request that led this one's call.
    pub(crate) fn link(&mut self, leader: &SpanRef) {
        self.span.add_link(remote(leader), Vec::new());
    }

    /// Ends the span with what the access log says.
    pub(crate) fn end(mut self, e: &SpanEnd<'_>) {
        self.span.update_name(format!("{} {}", e.method, e.route));
        let mut attrs = vec![
            KeyValue::new("idem.route", e.route.to_string()),
            KeyValue::new("idem.outcome", e.outcome),
            KeyValue::new("idem.request_id", e.request_id.to_string()),
        ];
        if let Some(s) = e.status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        if let Some(k) = e.key {
            attrs.push(KeyValue::new("idem.key", k.to_string()));
        }
        if let Some(l) = e.leader_request_id {
            attrs.push(KeyValue::new("idem.leader_request_id", l.to_string()));
        }
        if let Some(c) = e.client {
            attrs.push(KeyValue::new("client.address", c.to_string()));
        }
        if e.client_left {
            attrs.push(KeyValue::new("idem.client_left", true));
        }
        self.span.set_attributes(attrs);
        if e.status.is_some_and(|s| s >= 500) {
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }
}

/// What a request's span says when it ends.
pub(crate) struct SpanEnd<'a> {
    /// The request method.
    pub(crate) method: &'a str,
    /// The route's name.
    pub(crate) route: &'a str,
    /// The `outcome` label.
    pub(crate) outcome: &'static str,
    /// The status sent; `None` when the client left first.
    pub(crate) status: Option<u16>,
    /// The request id.
    pub(crate) request_id: &'a str,
    /// The leader's, for waiters and replays.
    pub(crate) leader_request_id: Option<&'a str>,
    /// The short dedup key.
    pub(crate) key: Option<&'a str>,
    /// The client address.
    pub(crate) client: Option<std::net::IpAddr>,
    /// The client left before its answer.
    pub(crate) client_left: bool,
}

/// A leader's upstream call span.
pub(crate) struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl CallSpan {
    /// The `traceparent` sent upstream with the call.
    pub(crate) fn traceparent(&self) -> HeaderValue {
        traceparent(self.span.span_context())
    }

    /// Ends the span: the backend it went to, and the status it answered (`None`: no answer).
    pub(crate) fn end(mut self, backend: Option<String>, status: Option<u16>) {
        if let Some(b) = backend {
            self.span.set_attribute(KeyValue::new("server.address", b));
        }
        match status {
            Some(s) => {
                self.span
                    .set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
                if s >= 500 {
                    self.span.set_status(Status::error(""));
                }
            }
            None => self.span.set_status(Status::error("no response")),
        }
        self.span.end();
    }
}

/// The W3C `traceparent` of `c`: `00-<trace id>-<span id>-<flags>`.
fn traceparent(c: &SpanContext) -> HeaderValue {
    let text = format!(
        "00-{}-{}-{:02x}",
        c.trace_id(),
        c.span_id(),
        c.trace_flags().to_u8()
    );
    HeaderValue::from_str(&text).expect("hex digits and dashes")
}

/// A span known by its ids, as the parent or the target of a link.
fn remote(s: &SpanRef) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(s.trace_id),
        SpanId::from_bytes(s.span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// A request's headers, read by the W3C propagator.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_the_w3c_form() {
        let c = SpanContext::new(
            TraceId::from_bytes([0xab; 16]),
            SpanId::from_bytes([0x01; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        assert_eq!(
            traceparent(&c),
            "00-abababababababababababababababab-0101010101010101-01"
        );
    }

    #[test]
    fn a_client_traceparent_is_the_parent_of_the_request_span() {
        let provider = SdkTracerProvider::builder().build();
        let traces = Traces {
            tracer: opentelemetry::trace::TracerProvider::tracer(&provider, "test"),
            provider,
            propagator: TraceContextPropagator::new(),
        };
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let span = traces.request("GET", "/", &h);
        let c = span.context();
        assert_eq!(c.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(c.span_id().to_string(), "b7ad6b7169203331");
        // Without one, a new trace.
        let fresh = traces.request("GET", "/", &HeaderMap::new());
        assert_ne!(fresh.context().trace_id(), c.trace_id());
        assert!(fresh.context().is_valid());
    }
}
