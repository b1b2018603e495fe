//! W3C trace context (`traceparent`, `tracestate`) in and out of the node: from device and
//! app requests (actix headers, which are `http` 0.2 and so need their own extractor), and
//! the span context a forwarded call carries to the owner (as binary fields of its message,
//! `routing::forward`).
//!
//! With export off there is no OpenTelemetry layer, but the trace id still travels: the
//! incoming `traceparent`'s trace id (or a fresh one) names the request in every log line
//! on every node it crosses ([`LogTrace`]).

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Reads trace context from an actix-web request's headers.
#[derive(Debug)]
pub struct ActixHeaders<'a>(pub &'a actix_web::http::header::HeaderMap);

impl Extractor for ActixHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The context of a remote parent carried by `carrier`, if it carries a valid one.
pub fn extract(carrier: &dyn Extractor) -> Option<Context> {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The trace context a forwarded call carries: the current (client) span's when its trace
/// is exported, else the request's trace id with its sampling flag under a fresh parent
/// span id, so the owner logs under the same trace id and, for a trace sampled out here,
/// does not start exporting one of its own. `None` outside a request (the node's own
/// calls: link pings, releases).
pub fn outgoing() -> Option<SpanContext> {
    let current = tracing::Span::current();
    if super::exported(&current) {
        let sc = current.context().span().span_context().clone();
        if sc.is_valid() {
            return Some(sc);
        }
    }
    LOG_TRACE.try_with(LogTrace::parent).ok()
}

tokio::task_local! {
    /// The trace of the request being served (its log lines' trace id).
    pub static LOG_TRACE: LogTrace;
}

/// A request's trace: the caller's trace id (from its `traceparent`) or a fresh one, so
/// the logs of every node it crosses share it, and whether it is sampled.
#[derive(Debug, Clone, Copy)]
pub struct LogTrace {
    /// The trace id.
    pub trace_id: TraceId,
    /// Sampled: exported here (export on), or the caller's flag (export off).
    pub sampled: bool,
}

impl LogTrace {
    /// The caller's trace id from a `traceparent` value, else a fresh random one.
    pub fn from_header(traceparent: Option<&str>) -> LogTrace {
        LogTrace::from_parent(traceparent.and_then(parse_traceparent).as_ref())
    }

    /// The trace of a remote parent (a forwarded call's), else a fresh random one.
    pub fn from_parent(parent: Option<&SpanContext>) -> LogTrace {
        parent.map_or_else(
            || LogTrace {
                trace_id: TraceId::from_bytes(rand::random::<u128>().to_be_bytes()),
                sampled: false,
            },
            |sc| LogTrace {
                trace_id: sc.trace_id(),
                sampled: sc.is_sampled(),
            },
        )
    }

    /// A trace `trace_id`, sampled or not.
    pub fn new(trace_id: TraceId, sampled: bool) -> LogTrace {
        LogTrace { trace_id, sampled }
    }

    /// A parent naming this trace, for a forwarded call (a fresh span id: nothing is
    /// exported, the owner only needs the trace id and the sampling flag).
    pub fn parent(&self) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes()),
            TraceFlags::new(u8::from(self.sampled)),
            true,
            TraceState::NONE,
        )
    }
}

/// Parses a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00"
        || parts.next().is_some()
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_example_traceparent_parses_and_garbage_does_not() {
        let sc = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("the W3C example");
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(sc.is_sampled());
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319cz-b7ad6b716920333-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn log_trace_keeps_the_callers_trace_id_across_a_hop() {
        let t = LogTrace::from_header(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        let again = LogTrace::from_parent(Some(&t.parent()));
        assert_eq!(again.trace_id, t.trace_id);
        assert!(again.sampled);
        assert_ne!(LogTrace::from_header(None).trace_id, TraceId::INVALID);
    }
}
