//! Logs and traces: the `tracing` subscriber every log line goes through and, when an OTLP
//! endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or `--otlp-endpoint`), the
//! OpenTelemetry layer that exports the node's spans over OTLP (gRPC or HTTP/protobuf).
//!
//! Export off costs nothing but a trace id per request for the logs: no OpenTelemetry layer
//! is installed and span helpers check [`enabled`] before touching OpenTelemetry.
//!
//! What is traced (span names; ARCHITECTURE.md has the tree): the HTTP request (`{method}
//! {route}`, semantic-convention attributes), `auth`, `route` and `forward {op}` (client)
//! on the node a device reached, `tether.node.v1.Sets/{Op}` (server) on the owner,
//! `actor.mailbox` (queue wait), `actor.{op}`, `reconcile`, `store.commit` (one per batch,
//! linked to every request in it), `notify`, `lease.acquire`, `lease.handoff`. Gossip is
//! not traced.
//!
//! The spans inside a request's handling (`route` to a local set, `actor.*`, `reconcile`,
//! `store.commit`, `notify`) exist only where someone sees them: in an exported trace, or
//! with debug logs on ([`inner_span`]). Otherwise the request's own span stands in for
//! them, so a log line written inside still carries the request's ids, and a request
//! pays for one span, not seven.

pub mod http_client;
pub mod propagation;
pub mod sampling;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::error::{NodeError, Result};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The configured sampler, applied before the OpenTelemetry layer ([`sampling`]).
static SAMPLER: OnceLock<Sampler> = OnceLock::new();

/// Whether spans are exported (an OpenTelemetry layer is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How the node exports traces; each field is a `tether serve` flag whose environment
/// variable is the standard `OTEL_*` one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL (`http://collector:4317`
    /// for gRPC, `http://collector:4318` for HTTP, which appends `/v1/traces`).
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the traces URL, used as is.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf` (the default).
    pub protocol: Option<String>,
    /// `OTEL_SERVICE_NAME` [default: tether].
    pub service_name: Option<String>,
    /// `OTEL_TRACES_SAMPLER` [default: parentbased_always_on].
    pub sampler: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `*traceidratio` samplers.
    pub sampler_arg: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,…` describing this process.
    pub resource_attributes: Option<String>,
    /// `OTEL_SDK_DISABLED=true` turns export off whatever else is set.
    pub disabled: bool,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

impl TelemetryConfig {
    /// Whether any export is configured.
    pub fn exports(&self) -> bool {
        !self.disabled && (self.endpoint.is_some() || self.traces_endpoint.is_some())
    }

    /// The transport, checked.
    pub fn protocol(&self) -> Result<Protocol> {
        match self.protocol.as_deref().map(str::trim) {
            None | Some("") | Some("http/protobuf") => Ok(Protocol::HttpProtobuf),
            Some("grpc") => Ok(Protocol::Grpc),
            Some(other) => Err(NodeError::Config(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL / --otlp-protocol {other:?}: expected grpc or \
                 http/protobuf"
            ))),
        }
    }

    /// The URL spans are sent to.
    pub fn traces_url(&self) -> Result<String> {
        let protocol = self.protocol()?;
        let url = match (&self.traces_endpoint, &self.endpoint) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(base)) => match protocol {
                Protocol::Grpc => base.trim().to_string(),
                Protocol::HttpProtobuf => {
                    format!("{}/v1/traces", base.trim().trim_end_matches('/'))
                }
            },
            (None, None) => return Err(NodeError::Config("no OTLP endpoint".into())),
        };
        // Since opentelemetry-otlp 0.33 a schemeless endpoint means TLS; say so rather than
        // fail at the first export.
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(NodeError::Config(format!(
                "OTLP endpoint {url:?}: write the scheme (http://collector:4317)"
            )));
        }
        if url.starts_with("https://") {
            return Err(NodeError::Config(format!(
                "OTLP endpoint {url:?}: TLS export is not built in; use a local collector over http://"
            )));
        }
        Ok(url)
    }

    /// The sampler, as the OpenTelemetry specification defines the names.
    pub fn sampler(&self) -> Result<Sampler> {
        let ratio = || -> Result<f64> {
            match self.sampler_arg.as_deref().map(str::trim) {
                None | Some("") => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        NodeError::Config(format!(
                            "OTEL_TRACES_SAMPLER_ARG {a:?}: expected a ratio between 0 and 1"
                        ))
                    }),
            }
        };
        Ok(match self.sampler.as_deref().map(str::trim) {
            None | Some("") | Some("parentbased_always_on") => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
            }
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::TraceIdRatioBased(ratio()?),
            Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some("parentbased_traceidratio") => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
            }
            Some(other) => {
                return Err(NodeError::Config(format!(
                    "OTEL_TRACES_SAMPLER {other:?}: expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                )))
            }
        })
    }

    fn resource(&self, node_id: &str) -> Result<Resource> {
        let mut attrs = vec![
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", node_id.to_string()),
        ];
        for pair in self
            .resource_attributes
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                NodeError::Config(format!(
                    "OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"
                ))
            })?;
            attrs.retain(|kv| kv.key.as_str() != k.trim());
            attrs.push(KeyValue::new(k.trim().to_string(), v.trim().to_string()));
        }
        let name = self.service_name.clone().or_else(|| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == "service.name")
                .map(|kv| kv.value.to_string())
        });
        // `builder_empty`: every attribute comes from the flags above (whose defaults are
        // the environment), so a flag always wins over the variable it stands for.
        Ok(Resource::builder_empty()
            .with_attributes(attrs)
            .with_service_name(name.unwrap_or_else(|| "tether".into()))
            .build())
    }
}

/// The installed subscriber's exporter; [`Telemetry::shutdown`] flushes it (on drain).
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Span targets exported: the node's own spans (tonic, hyper and h2 would trace the
/// exporter's own calls, and gossip lives in `tether_cluster`).
fn exported_target(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("tether_node")
        && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
}

/// Text log fields: `name=value` separated by spaces, the message bare, and the `otel.*`
/// fields (which steer the exported span: name, kind, status) left out.
#[derive(Debug, Clone, Copy, Default)]
struct LogFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for LogFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        // A span's fields are formatted into a `String` of its own when it opens (every
        // request's span, held or not); written field by field, that string grew five
        // times. They are formatted into this thread's buffer first and copied in once.
        // (A field's `Debug` that logs would come back here: it writes directly.)
        thread_local! {
            static FIELDS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        FIELDS.with(|buf| {
            let Ok(mut buf) = buf.try_borrow_mut() else {
                return format_fields_into(writer, fields);
            };
            buf.clear();
            let formatted = format_fields_into(
                tracing_subscriber::fmt::format::Writer::new(&mut *buf),
                fields,
            );
            let written = formatted.and_then(|()| writer.write_str(&buf));
            if buf.capacity() > 4096 {
                *buf = String::new();
            }
            written
        })
    }
}

/// `fields` as one log line's text (see [`LogFieldVisitor`]), written into `writer`.
fn format_fields_into<R: tracing_subscriber::field::RecordFields>(
    writer: tracing_subscriber::fmt::format::Writer<'_>,
    fields: R,
) -> std::fmt::Result {
    let mut visitor = LogFieldVisitor {
        writer,
        first: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

/// Writes a field's value into the log line as it is formatted (no copy of it first),
/// showing an escape character as `\x1b`: a value may carry text from a request, and its
/// escape sequences are shown, not obeyed.
struct Escaped<'a, 'w>(&'a mut tracing_subscriber::fmt::format::Writer<'w>);

impl std::fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut parts = s.split('\u{1b}');
        if let Some(first) = parts.next() {
            self.0.write_str(first)?;
        }
        for part in parts {
            self.0.write_str("\\x1b")?;
            self.0.write_str(part)?;
        }
        Ok(())
    }
}

struct LogFieldVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl tracing::field::Visit for LogFieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("otel.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let named = if field.name() == "message" {
            write!(self.writer, "{sep}")
        } else {
            write!(self.writer, "{sep}{}=", field.name())
        };
        self.result = named.and_then(|()| {
            std::fmt::Write::write_fmt(&mut Escaped(&mut self.writer), format_args!("{value:?}"))
        });
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            // Quoted like the default formatter, so values with spaces stay one field.
            self.record_debug(field, &value);
        }
    }
}

/// Installs the global subscriber: logs on stderr (text, without colour unless stderr is a
/// terminal, or JSON lines) filtered by `TETHER_LOG`, and the OpenTelemetry layer when
/// `config` exports.
pub fn init(config: &TelemetryConfig, log_json: bool, node_id: &str) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_env("TETHER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if log_json {
        fmt.json().with_filter(filter).boxed()
    } else {
        // `otel.*` fields steer the exported span (name, kind, status); logs skip them.
        fmt.fmt_fields(LogFields).with_filter(filter).boxed()
    };
    let registry = tracing_subscriber::registry().with(fmt);
    if !config.exports() {
        registry
            .try_init()
            .map_err(|e| NodeError::Config(format!("logging: {e}")))?;
        return Ok(Telemetry::default());
    }
    let url = config.traces_url()?;
    let protocol = config.protocol()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tether-otel")
        .enable_all()
        .build()
        .map_err(|e| NodeError::Config(format!("telemetry runtime: {e}")))?;
    let exporter = {
        // The gRPC channel's connection task starts on this runtime; the HTTP client
        // spawns every request onto it.
        let _on = runtime.enter();
        let built = match protocol {
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .build(),
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(http_client::RuntimeHttpClient::new(
                    runtime.handle().clone(),
                ))
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url.clone())
                .build(),
        };
        built.map_err(|e| NodeError::Config(format!("OTLP exporter for {url}: {e}")))?
    };
    // The sampler decides in front of the OpenTelemetry layer (`sampling`), which then
    // sees sampled traces only; the SDK records whatever reaches it.
    let sampler = config.sampler()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::AlwaysOn)
        .with_id_generator(sampling::PresetTraceIds::default())
        .with_resource(config.resource(node_id)?)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tether"))
        .with_threads(false)
        .with_location(false);
    let layer =
        sampling::HeadSampled::new(otel, sampler.clone()).with_filter(filter_fn(exported_target));
    registry
        .with(layer)
        .try_init()
        .map_err(|e| NodeError::Config(format!("logging: {e}")))?;
    // Set once per process (a second `init` failed above: one global subscriber).
    let _ = SAMPLER.set(sampler);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %url, ?protocol, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}

impl Telemetry {
    /// Exports every span still buffered and stops the exporter (the node is draining).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.force_flush() {
                tracing::warn!(error = %e, "flushing spans failed");
            }
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %e, "stopping the span exporter failed");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---- span helpers ----------------------------------------------------------------------

/// HTTP methods named as such in spans and metric labels; anything else is `_OTHER` (a
/// client cannot create label values).
pub fn known_method(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "PUT" => "PUT",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "_OTHER",
    }
}

/// How a trace arrives at this node: its trace id (the caller's `traceparent`'s, or a new
/// one) and whether it is sampled — with export on, the configured sampler's decision on
/// that caller and that id; with export off, the caller's flag, passed on unchanged — and
/// the caller's context when its spans are exported under it.
fn arrive(
    carrier: &dyn opentelemetry::propagation::Extractor,
    traceparent: Option<&str>,
    name: &str,
) -> (propagation::LogTrace, Option<opentelemetry::Context>) {
    let Some(sampler) = SAMPLER.get().filter(|_| enabled()) else {
        return (propagation::LogTrace::from_header(traceparent), None);
    };
    let remote = traceparent.and_then(|_| propagation::extract(carrier));
    decide(sampler, remote, name)
}

/// [`arrive`] for a forwarded call, whose parent came as a span context.
fn arrive_forwarded(
    parent: Option<SpanContext>,
    name: &str,
) -> (propagation::LogTrace, Option<opentelemetry::Context>) {
    let Some(sampler) = SAMPLER.get().filter(|_| enabled()) else {
        return (propagation::LogTrace::from_parent(parent.as_ref()), None);
    };
    let remote = parent.map(|sc| opentelemetry::Context::new().with_remote_span_context(sc));
    decide(sampler, remote, name)
}

/// The sampler's decision on a server span with `remote` as its parent (if any).
fn decide(
    sampler: &Sampler,
    remote: Option<opentelemetry::Context>,
    name: &str,
) -> (propagation::LogTrace, Option<opentelemetry::Context>) {
    let trace_id = remote.as_ref().map_or_else(
        || TraceId::from_bytes(rand::random::<u128>().to_be_bytes()),
        |cx| cx.span().span_context().trace_id(),
    );
    let sampled =
        sampling::should_sample(sampler, remote.as_ref(), trace_id, name, SpanKind::Server);
    (propagation::LogTrace::new(trace_id, sampled), remote)
}

/// Starts the OpenTelemetry span of a sampled server span: child of the caller's context,
/// or a root under the trace id the sampler decided on.
fn start_server_span(
    span: &tracing::Span,
    trace: propagation::LogTrace,
    remote: Option<opentelemetry::Context>,
) {
    if let Some(parent) = remote {
        // Fails only when no OpenTelemetry layer sees the span; it then has no trace.
        let _ = span.set_parent(parent);
    }
    sampling::with_trace_id(trace.trace_id, || span.context());
}

/// The span of one device or app request, child of the caller's `traceparent` if any, and
/// the trace its log lines carry and forwarded calls pass on. Only a sampled request's
/// span (and its children) reaches the OpenTelemetry layer; the others cost what they
/// cost with export off.
pub fn http_server_span(
    req: &actix_web::dev::ServiceRequest,
    request_id: uuid::Uuid,
    route: &str,
) -> (tracing::Span, propagation::LogTrace) {
    let method = known_method(req.method().as_str());
    let traceparent = req
        .headers()
        .get(propagation::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let (trace, remote) = arrive(
        &propagation::ActixHeaders(req.headers()),
        traceparent,
        "request",
    );
    let exported = enabled() && trace.sampled;
    let span = request_span(exported, request_id, trace.trace_id, method, route);
    if exported {
        span.record("otel.name", format!("{method} {route}").as_str());
        start_server_span(&span, trace, remote);
        let conn = req.connection_info();
        let attrs = [
            ("http.request.method", method.to_string()),
            ("http.route", route.to_string()),
            ("url.path", req.path().to_string()),
            ("url.scheme", conn.scheme().to_string()),
            ("server.address", conn.host().to_string()),
            (
                "network.protocol.version",
                match req.version() {
                    actix_web::http::Version::HTTP_2 => "2",
                    actix_web::http::Version::HTTP_10 => "1.0",
                    _ => "1.1",
                }
                .to_string(),
            ),
        ];
        for (k, v) in attrs {
            span.set_attribute(k, v);
        }
        if let Some(peer) = req.peer_addr() {
            span.set_attribute("client.address", peer.ip().to_string());
        }
        if let Some(ua) = req
            .headers()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
        {
            span.set_attribute("user_agent.original", ua.to_string());
        }
    }
    (span, trace)
}

/// A request's span: exported when `exported` (then [`http_server_span`] starts it), else
/// only the fields every log line under it carries.
pub fn request_span(
    exported: bool,
    request_id: uuid::Uuid,
    trace_id: TraceId,
    method: &str,
    route: &str,
) -> tracing::Span {
    sampling::decided(exported, || {
        tracing::info_span!(
            "request",
            %request_id,
            %trace_id,
            method,
            route,
            otel.name = Empty,
            otel.kind = "server",
            otel.status_code = Empty,
        )
    })
}

/// Records the answer on a request span: the status, and an error status for 5xx.
pub fn record_http_status(span: &tracing::Span, status: u16, error_code: Option<&str>) {
    if !exported(span) {
        return;
    }
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
        span.set_attribute("error.type", error_code.unwrap_or("_OTHER").to_string());
    }
}

/// Whether `span`'s trace is exported (export on and the trace sampled).
pub fn exported(span: &tracing::Span) -> bool {
    enabled() && sampling::is_sampled(span)
}

/// A span inside the handling of `parent`'s request (`make` creates it as a child of
/// `parent`): made when it is seen — `parent`'s trace is exported, or logs are at debug —
/// else `parent` itself, which costs a reference count where a span costs its registry
/// slot and its formatted fields.
pub fn inner_span(parent: &tracing::Span, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if seen(parent) {
        make()
    } else {
        parent.clone()
    }
}

/// Whether a span inside the handling of `parent`'s request is seen: `parent`'s trace is
/// exported, or logs are at debug.
pub fn seen(parent: &tracing::Span) -> bool {
    exported(parent) || tracing::enabled!(tracing::Level::DEBUG)
}

/// The trace id of an exported request, for its latency's exemplar.
pub fn exemplar(trace: &propagation::LogTrace) -> Option<TraceId> {
    (enabled() && trace.sampled).then_some(trace.trace_id)
}

/// The server span of a call another node forwarded (`rpc`, e.g. `tether.node.v1.Sets/Put`),
/// for the device request `request_id` under the forwarding node's span `parent`: none when
/// the call carries neither (the node's own link pings and releases, which would otherwise
/// start a trace of their own on every sampled-in draw).
pub fn forwarded_span(
    rpc: &'static str,
    request_id: Option<uuid::Uuid>,
    parent: Option<SpanContext>,
) -> tracing::Span {
    if request_id.is_none() && parent.is_none() {
        return tracing::Span::none();
    }
    let (trace, remote) = arrive_forwarded(parent, "forwarded");
    let exported = enabled() && trace.sampled;
    let span = sampling::decided(exported, || {
        tracing::info_span!(
            "forwarded",
            request_id = %IdOrDash(request_id),
            trace_id = %trace.trace_id,
            call = rpc,
            otel.name = Empty,
            otel.kind = "server",
        )
    });
    if exported {
        span.record("otel.name", rpc);
        start_server_span(&span, trace, remote);
        let (service, method) = rpc.split_once('/').unwrap_or((rpc, ""));
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", service.to_string());
        span.set_attribute("rpc.method", method.to_string());
    }
    span
}

/// A request id in a log line, `-` when there is none.
struct IdOrDash(Option<uuid::Uuid>);

impl std::fmt::Display for IdOrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The client span of a call forwarded to `peer` (the set's owner).
pub fn forward_client_span(
    op: &'static str,
    peer: &str,
    addr: std::net::SocketAddr,
) -> tracing::Span {
    let span = tracing::info_span!(
        "forward",
        op,
        peer,
        otel.name = Empty,
        otel.kind = "client",
        otel.status_code = Empty,
    );
    if exported(&span) {
        span.record("otel.name", format!("forward {op}").as_str());
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", "tether.node.v1.Sets");
        span.set_attribute("server.address", addr.ip().to_string());
        span.set_attribute("server.port", i64::from(addr.port()));
    }
    span
}

/// The OpenTelemetry span context of `span` (for links), when exporting.
pub fn span_context(span: &tracing::Span) -> Option<opentelemetry::trace::SpanContext> {
    if !exported(span) {
        return None;
    }
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Links `span` to `to` (a batch commit to each request in it).
pub fn link(span: &tracing::Span, to: &opentelemetry::trace::SpanContext) {
    if exported(span) {
        span.add_link(to.clone());
    }
}

/// Sets an attribute on an exported span (nothing when export is off, so logs stay lean).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if exported(span) {
        span.set_attribute(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log lines written by `LogFields` while `log` runs.
    fn logged(log: impl FnOnce()) -> String {
        logged_at(tracing::Level::INFO, log)
    }

    /// Log lines written by `LogFields` at `level` and above while `log` runs.
    fn logged_at(level: tracing::Level, log: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .fmt_fields(LogFields)
            .with_writer(move || SinkWriter(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = out.lock().expect("sink").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    struct SinkWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_fields_show_escape_characters_and_leave_out_otel_fields() {
        let sent = "red\u{1b}[31m text\u{1b}";
        let line = logged(|| {
            tracing::info!(error = %sent, bucket = "b 1", otel.name = "hidden", count = 3, "put {}", "\u{1b}x");
        });
        assert!(!line.contains('\u{1b}'), "a raw escape character: {line:?}");
        assert!(
            line.contains(r#"put \x1bx error=red\x1b[31m text\x1b bucket="b 1" count=3"#),
            "{line:?}"
        );
        assert!(!line.contains("hidden"), "{line:?}");
    }

    /// A warning inside the actor's handling of a request, as `traced.rs` makes it.
    fn warn_inside_a_request() {
        let request = tracing::info_span!("request", request_id = "r-1");
        let actor = inner_span(
            &request,
            || tracing::info_span!(parent: &request, "actor", op = "put"),
        );
        actor.in_scope(|| tracing::warn!("commit failed"));
    }

    #[test]
    fn inner_spans_are_made_only_when_seen_and_log_lines_keep_the_request() {
        // Export off, info logs: no actor span; the request's own stands in.
        let line = logged(warn_inside_a_request);
        assert!(
            line.contains(r#"WARN request{request_id="r-1"}: "#) && line.contains("commit failed"),
            "{line:?}"
        );
        assert!(!line.contains("actor{"), "{line:?}");
        // Debug logs: the actor span is made and shown.
        let line = logged_at(tracing::Level::DEBUG, warn_inside_a_request);
        assert!(
            line.contains(r#"WARN request{request_id="r-1"}:actor{op="put"}: "#),
            "{line:?}"
        );
    }
}
