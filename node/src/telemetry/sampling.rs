//! Head sampling in front of the OpenTelemetry layer, so a request that is not sampled
//! costs what it costs with export off.
//!
//! `tracing-opentelemetry` builds OpenTelemetry data for every span it sees (a span
//! builder with its attributes, start and end times, the context attached on every
//! enter) and asks the SDK's sampler only when the span starts; a sampled-out span is
//! then dropped, but the work is done. [`HeadSampled`] wraps that layer and decides
//! first: the root of each trace on this node (the HTTP request, a forwarded call, a
//! lease handoff) is decided by the configured sampler, every other span takes its
//! parent's decision, and the wrapped layer only ever sees the spans of sampled traces.
//! The SDK's own sampler is then `always_on`, and the trace id the decision was made on
//! is the trace id exported ([`PresetTraceIds`]).
//!
//! The decision is kept in each span's registry extensions ([`Head`]), so children find
//! it through an explicit parent (actor messages carry their sender's span) as well as
//! through the current span.

use std::any::TypeId;
use std::cell::Cell;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use tracing::span;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// A span's sampling decision.
#[derive(Debug, Clone, Copy)]
struct Head(bool);

thread_local! {
    /// The decision for the next span created on this thread, made by its creator
    /// ([`decided`]): a server span decided on its caller's `traceparent`.
    static NEXT_DECISION: Cell<Option<bool>> = const { Cell::new(None) };
    /// The trace id the next root span started on this thread gets ([`with_trace_id`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Creates a span (`make`) whose sampling decision is `sampled`, whatever its parent.
pub fn decided<T>(sampled: bool, make: impl FnOnce() -> T) -> T {
    NEXT_DECISION.with(|d| d.set(Some(sampled)));
    let made = make();
    // Taken by the layer when the span was created; cleared in case it was not (a span
    // disabled by every filter).
    NEXT_DECISION.with(|d| d.set(None));
    made
}

/// Runs `f` (which starts a root span) so that the span's trace id is `trace_id`.
pub fn with_trace_id<T>(trace_id: TraceId, f: impl FnOnce() -> T) -> T {
    NEXT_TRACE_ID.with(|t| t.set(Some(trace_id)));
    let r = f();
    NEXT_TRACE_ID.with(|t| t.set(None));
    r
}

/// The SDK's id generator, except that a root started inside [`with_trace_id`] gets the
/// trace id its sampling decision was made on.
#[derive(Debug, Default)]
pub struct PresetTraceIds(RandomIdGenerator);

impl IdGenerator for PresetTraceIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// Whether `sampler` samples a trace `trace_id` whose (remote) parent is `parent`.
pub fn should_sample(
    sampler: &Sampler,
    parent: Option<&opentelemetry::Context>,
    trace_id: TraceId,
    name: &str,
    kind: SpanKind,
) -> bool {
    let result = sampler.should_sample(parent, trace_id, name, &kind, &[], &[]);
    !matches!(result.decision, SamplingDecision::Drop)
}

/// The OpenTelemetry layer behind a head sampler: see the module documentation.
#[derive(Debug)]
pub struct HeadSampled<L> {
    inner: L,
    sampler: Sampler,
}

impl<L> HeadSampled<L> {
    /// `inner` sees only the spans of traces `sampler` samples.
    pub fn new(inner: L, sampler: Sampler) -> Self {
        HeadSampled { inner, sampler }
    }
}

fn decision<S>(id: &span::Id, ctx: &Context<'_, S>) -> Option<bool>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    ctx.span(id)?.extensions().get::<Head>().map(|h| h.0)
}

impl<L> HeadSampled<L> {
    fn sampled<S>(&self, id: &span::Id, ctx: &Context<'_, S>) -> bool
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        decision(id, ctx).unwrap_or(false)
    }

    fn decide<S>(&self, attrs: &span::Attributes<'_>, ctx: &Context<'_, S>) -> bool
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if let Some(d) = NEXT_DECISION.with(Cell::take) {
            return d;
        }
        let parent = if let Some(p) = attrs.parent() {
            decision(p, ctx)
        } else if attrs.is_contextual() {
            ctx.lookup_current()
                .and_then(|s| s.extensions().get::<Head>().map(|h| h.0))
        } else {
            None
        };
        parent.unwrap_or_else(|| {
            // A root of this node's own (a lease handoff, a drain): the sampler decides.
            let trace_id = TraceId::from_bytes(rand::random::<u128>().to_be_bytes());
            should_sample(
                &self.sampler,
                None,
                trace_id,
                attrs.metadata().name(),
                SpanKind::Internal,
            )
        })
    }
}

impl<S, L> Layer<S> for HeadSampled<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn register_callsite(
        &self,
        metadata: &'static Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let sampled = self.decide(attrs, &ctx);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Head(sampled));
        }
        if sampled {
            self.inner.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if self.sampled(id, &ctx) {
            self.inner.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        if self.sampled(id, &ctx) && self.sampled(follows, &ctx) {
            self.inner.on_follows_from(id, follows, ctx);
        }
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let in_sampled = match event.parent() {
            Some(p) => self.sampled(p, &ctx),
            None if event.is_contextual() => ctx
                .lookup_current()
                .is_some_and(|s| s.extensions().get::<Head>().is_some_and(|h| h.0)),
            None => false,
        };
        if in_sampled {
            self.inner.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.sampled(id, &ctx) {
            self.inner.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if self.sampled(id, &ctx) {
            self.inner.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if self.sampled(&id, &ctx) {
            self.inner.on_close(id, ctx);
        }
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx);
    }

    // SAFETY: the same forwarding tracing-subscriber's own wrappers (`Layered`,
    // `Filtered`) do: a pointer to `self` for our own type, else whatever the wrapped layer
    // answers for its types (the OpenTelemetry layer's `WithContext`, which
    // `OpenTelemetrySpanExt` needs), valid for as long as `self` is.
    #[allow(unsafe_code)]
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded unchanged; the inner layer upholds the contract.
            unsafe { self.inner.downcast_raw(id) }
        }
    }
}

/// Whether `span` belongs to a sampled trace (its spans are exported).
pub fn is_sampled(span: &tracing::Span) -> bool {
    span.with_subscriber(|(id, dispatch)| {
        dispatch
            .downcast_ref::<tracing_subscriber::Registry>()
            .and_then(|r| r.span(id))
            .and_then(|s| s.extensions().get::<Head>().map(|h| h.0))
    })
    .flatten()
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the spans the SDK built (started) and ended, and keeps the ended ones.
    #[derive(Debug, Default, Clone)]
    struct Count {
        started: Arc<AtomicUsize>,
        ended: Arc<std::sync::Mutex<Vec<SpanData>>>,
    }

    impl SpanProcessor for Count {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {
            self.started.fetch_add(1, Ordering::Relaxed);
        }
        fn on_end(&self, span: SpanData) {
            self.ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    /// A request's span tree the way the node builds it: a root decided by its creator,
    /// a contextual child, and a child on "another thread" through an explicit parent
    /// (an actor message), with a grandchild of that.
    fn request(sampled: bool) {
        let root = decided(sampled, || tracing::info_span!("request"));
        let _in = root.enter();
        let route = tracing::info_span!("route");
        let _r = route.enter();
        drop(_r);
        let actor = tracing::info_span!(parent: &root, "actor");
        let _a = actor.enter();
        tracing::info_span!("reconcile").in_scope(|| tracing::warn!("an event"));
    }

    fn provider(count: &Count) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(count.clone())
            .with_sampler(Sampler::AlwaysOn)
            .with_id_generator(PresetTraceIds::default())
            .build()
    }

    #[test]
    fn a_sampled_out_request_builds_no_opentelemetry_span() {
        let count = Count::default();
        let provider = provider(&count);
        let layer = HeadSampled::new(
            tracing_opentelemetry::layer().with_tracer(provider.tracer("t")),
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0))),
        );
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            request(false);
            assert_eq!(
                count.started.load(Ordering::Relaxed),
                0,
                "spans of an unsampled request were built"
            );
            // A root of the node's own: the sampler (ratio 0) drops it, and its children.
            tracing::info_span!("lease.handoff")
                .in_scope(|| tracing::info_span!("inner").in_scope(|| ()));
            assert_eq!(count.started.load(Ordering::Relaxed), 0);
            request(true);
            assert_eq!(
                count.started.load(Ordering::Relaxed),
                4,
                "a sampled request's spans"
            );
        });
        let ended = count
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names: Vec<&str> = ended.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        let root = ended.iter().find(|s| s.name == "request").expect("root");
        for s in ended.iter() {
            assert_eq!(
                s.span_context.trace_id(),
                root.span_context.trace_id(),
                "{}",
                s.name
            );
        }
        let actor = ended.iter().find(|s| s.name == "actor").expect("actor");
        assert_eq!(
            actor.parent_span_id,
            root.span_context.span_id(),
            "explicit parent kept"
        );
        let reconcile = ended
            .iter()
            .find(|s| s.name == "reconcile")
            .expect("reconcile");
        assert_eq!(reconcile.parent_span_id, actor.span_context.span_id());
        assert_eq!(
            reconcile.events.len(),
            1,
            "the event of a sampled span is recorded"
        );
    }

    #[test]
    fn a_root_decided_on_a_trace_id_is_exported_under_that_trace_id() {
        let count = Count::default();
        let provider = provider(&count);
        let layer = HeadSampled::new(
            tracing_opentelemetry::layer().with_tracer(provider.tracer("t")),
            Sampler::AlwaysOn,
        );
        let subscriber = tracing_subscriber::registry().with(layer);
        let id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        tracing::subscriber::with_default(subscriber, || {
            let span = decided(true, || tracing::info_span!("request"));
            assert!(is_sampled(&span));
            let cx = with_trace_id(id, || span.context());
            assert_eq!(
                opentelemetry::trace::TraceContextExt::span(&cx)
                    .span_context()
                    .trace_id(),
                id
            );
            let other = decided(false, || tracing::info_span!("request"));
            assert!(!is_sampled(&other));
        });
        let ended = count
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].span_context.trace_id(), id);
    }
}
