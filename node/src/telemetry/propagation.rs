//! W3C trace context (`traceparent`, `tracestate`) in and out of the node: from device and
//! app requests (actix headers, which are `http` 0.2 and so need their own extractor),
//! into forwarded calls (tonic metadata) and out of them on the owner (`http` 1 headers).
//!
//! With export off there is no OpenTelemetry layer, but the trace id still travels: the
//! incoming `traceparent`'s trace id (or a fresh one) names the request in every log line
//! on every node it crosses ([`LogTrace`]).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceId};
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

/// Reads trace context from `http` 1 headers (a forwarded call on the owner).
#[derive(Debug)]
pub struct HttpHeaders<'a>(pub &'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes trace context into a forwarded call's metadata.
#[derive(Debug)]
pub struct Metadata<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The context of a remote parent carried by `carrier`, if it carries a valid one.
pub fn extract(carrier: &dyn Extractor) -> Option<Context> {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Puts the trace context of the request being served into a forwarded call: the current
/// (client) span's when its trace is exported, else the request's trace id with its
/// sampling flag, so the owner logs under the same trace id and, for a trace sampled out
/// here, does not start exporting one of its own.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let current = tracing::Span::current();
    if super::exported(&current) {
        let cx = current.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut Metadata(metadata));
        });
    } else if let Ok(Some(header)) = LOG_TRACE.try_with(|t| t.traceparent()) {
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(header.as_str()) {
            metadata.insert(TRACEPARENT, v);
        }
    }
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
        traceparent
            .and_then(parse_traceparent)
            .map(|sc| LogTrace {
                trace_id: sc.trace_id(),
                sampled: sc.is_sampled(),
            })
            .unwrap_or_else(|| LogTrace {
                trace_id: TraceId::from_bytes(rand::random::<u128>().to_be_bytes()),
                sampled: false,
            })
    }

    /// A trace `trace_id`, sampled or not.
    pub fn new(trace_id: TraceId, sampled: bool) -> LogTrace {
        LogTrace { trace_id, sampled }
    }

    /// A `traceparent` naming this trace, for a forwarded call (a fresh parent span id:
    /// nothing is exported, the owner only needs the trace id).
    pub fn traceparent(&self) -> Option<String> {
        let span_id = rand::random::<u64>().max(1);
        Some(format!(
            "00-{}-{span_id:016x}-{:02x}",
            self.trace_id,
            u8::from(self.sampled)
        ))
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
    let span_id = opentelemetry::trace::SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != opentelemetry::trace::SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        opentelemetry::trace::TraceFlags::new(flags & 1),
        true,
        opentelemetry::trace::TraceState::NONE,
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
        let forwarded = t.traceparent().expect("header");
        let again = LogTrace::from_header(Some(&forwarded));
        assert_eq!(again.trace_id, t.trace_id);
        assert_ne!(LogTrace::from_header(None).trace_id, TraceId::INVALID);
    }
}
