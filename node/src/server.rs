//! Wires a node together and runs it until SIGTERM/Ctrl-C.

use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::h1::DeferredResponse;
use actix_http::{HttpService, KeepAlive, Protocol};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Service};
use actix_web::error::DispatchError;
use actix_web::{web, App};
use futures::FutureExt;
use tracing::Instrument;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::HttpMessage;
use tether_proto::credentials::format_set_credentials;

use crate::api::conn::{Conn, Connections, Stream};
use crate::api::http::{self, AppState};
use crate::config::Config;
use crate::error::{NodeError, Result};
use crate::metrics::Metrics;
use crate::routing::cluster::ClusterNode;
use crate::routing::router::Router;
use crate::security::auth::{Auth, SetCredentials};
use crate::security::credentials::CredentialService;
use crate::security::limits::{LogBudget, Sources};
use crate::security::tls::ReloadableCert;
use crate::sets::registry::{ActorConfig, Shared};

/// How long a graceful shutdown waits for actors to finish their queued commits.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a draining cluster node keeps forwarding after it left, for the load
/// balancer to notice its `/readyz`.
const LB_GRACE: Duration = Duration::from_secs(2);

/// Runs the node on the current actix system until a termination signal, then drains:
/// held subscriptions are answered, queued writes committed, the store closed.
pub async fn run(config: Config) -> Result<()> {
    #[cfg(any(
        feature = "planted-ack-before-durable",
        feature = "planted-skip-epoch-check",
        feature = "planted-stale-reads",
        feature = "planted-drop-notification"
    ))]
    crate::planted::announce()?;
    let metrics = Metrics::new();
    metrics.set_store_backend(config.store.backend());
    #[cfg(feature = "fdb")]
    let _fdb_network = matches!(config.store, crate::config::StoreUrl::Fdb(_))
        .then(crate::store::fdb::Network::boot);
    let mut store = crate::store::open(
        &config.store,
        metrics.clone(),
        32,
        config.store_timeout,
        config.store_cache,
    )
    .await?;
    if let Some(dir) = &config.test_store_faults {
        tracing::warn!(dir = %dir.display(), "test fault injection on the store (--test-store-faults)");
        store = Arc::new(crate::store::faults::FaultyStore::new(store, dir));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| NodeError::Config(format!("creating {}: {e}", config.data_dir.display())))?;
    let shared = Shared::new(
        config.node_id.clone(),
        store.clone(),
        metrics.clone(),
        ActorConfig {
            passivate_after: config.passivate_after,
            max_bucket_bytes: config.max_bucket_bytes,
            history_per_bucket: config.history_per_bucket,
            op_ids_per_set: config.op_ids_per_set,
            op_id_retention: config.op_id_retention,
            fault_stall_op_prefix: config.fault_stall_op_prefix.clone(),
            templates: Arc::new(config.registration.clone()),
            max_ids: config.limits.max_ids_per_request,
            max_answer_bytes: config.limits.max_answer_bytes,
        },
        config.actor_threads,
    );
    if let Some(push) = &config.push {
        tracing::info!(webhook = %push.webhook, rate = push.rate.get(), "push wake-ups on");
        shared.set_pusher(crate::push::Pusher::new(push.clone(), metrics.clone())?);
    }

    tokio::spawn(shared.clone().follow_store_clock(config.max_clock_offset));

    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| NodeError::Config(format!("binding {}: {e}", config.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{bound}"));
    let (router, placement, joined, cluster): (
        Arc<Router>,
        Arc<dyn tether_cluster::Placement>,
        Arc<AtomicBool>,
        Option<ClusterNode>,
    ) = match &config.cluster {
        None => (
            Router::single(shared.clone()),
            Arc::new(tether_cluster::SingleNode { url }),
            Arc::new(AtomicBool::new(true)),
            None,
        ),
        Some(c) => {
            let advertise = c
                .advertise
                .resolve(crate::config::Advertise::RESOLVE_DEADLINE)
                .await?;
            let node = ClusterNode::start(
                c,
                advertise,
                &config.node_id,
                url,
                shared.clone(),
                config.http_workers,
            )?;
            (
                node.router(),
                node.placement(),
                node.ready_flag(),
                Some(node),
            )
        }
    };
    let mut credentials = config.credentials.clone();
    if credentials.mfg_keys.is_empty() {
        credentials
            .mfg_keys
            .insert(DEV_KEY_ID.into(), dev_mfg_key(&config.data_dir)?);
    }
    let limits = config.limits.clone();
    let sources = Sources::new(limits.trusted_proxies.clone());
    let conns = Connections::new(
        limits.max_connections,
        limits.max_connections_per_source,
        sources.clone(),
        metrics.clone(),
    );
    let registrations = (!config.bench_unbatched_registration).then(|| {
        crate::store::registrations::Registrations::start(
            store.clone(),
            crate::store::registrations::RegistrationBatching::default(),
        )
    });
    let auth = Auth::new(
        CredentialService::new(store.clone(), credentials, metrics.clone()),
        router.clone(),
        sources,
        registrations,
    );
    let state = web::Data::new(AppState::new(
        router.clone(),
        config.clone(),
        placement,
        auth,
        joined,
        conns.clone(),
    ));
    tokio::spawn(forget_idle_principals(state.clone().into_inner()));
    tokio::spawn(return_freed_memory(shared.clone()));
    if let Some(blobs) = state.blobs.clone() {
        tokio::spawn(collect_blobs(
            blobs,
            store.clone(),
            metrics.clone(),
            config.blob_grace,
        ));
    }
    let tls = match &config.tls {
        Some((cert, key)) => Some(ReloadableCert::load(cert.clone(), key.clone())?),
        None => None,
    };
    let acceptor = match &tls {
        Some(cert) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            cert.server_config()?,
        ))),
        None => None,
    };
    // 401/403/429 are logged within a budget, the rest counted in the next line logged
    // (finding 7: a flood of rejections must not flood the logs).
    let rejections = Arc::new(LogBudget::new(limits.rejections_logged_per_minute));

    let app_state = state.clone();
    let make_app = move || {
        let metrics = app_state.shared.metrics.clone();
        let rejections = rejections.clone();
        App::new()
            .app_data(app_state.clone())
            .wrap_fn(move |mut req, srv| {
                // A version-4 id from the thread's CSPRNG (`rand::rng`): `Uuid::new_v4`
                // asks the kernel (`getrandom`) for every request.
                let request_id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
                let route: Cow<'static, str> = match http::frequent_route(req.path()) {
                    Some(route) => Cow::Borrowed(route),
                    None => req
                        .match_pattern()
                        .map_or(Cow::Borrowed("unmatched"), Cow::Owned),
                };
                if route == "/v1/subscribe" {
                    // Kept for the whole hold: no room for headers it does not have.
                    crate::api::held::compact_headers(req.head_mut());
                }
                let method = crate::telemetry::known_method(req.method().as_str());
                // One span per request: child of the caller's `traceparent`, exported when
                // tracing is on; its request id and trace id name every log line under it.
                let (span, trace) = crate::telemetry::http_server_span(&req, request_id, &route);
                let done = RequestDone {
                    exported: crate::telemetry::exemplar(&trace).is_some(),
                    trace_id: trace.trace_id,
                    metrics: metrics.clone(),
                    rejections: rejections.clone(),
                    started: Instant::now(),
                    route,
                    method,
                    request_id,
                };
                // The request id and trace context ride along when the request is forwarded.
                let call = crate::telemetry::propagation::LOG_TRACE.scope(trace, srv.call(req));
                crate::routing::forward::REQUEST_ID
                    .scope(request_id, call)
                    .map(move |res| {
                        res.map(|mut r| {
                            let held = r
                                .response_mut()
                                .extensions_mut()
                                .remove::<http::HeldResponse>();
                            if let Some(held) = held {
                                // A held subscribe: its request is let go now, its response
                                // is counted, logged and sent when the hold ends.
                                r.response_mut()
                                    .extensions_mut()
                                    .insert(done.deferred(held, tracing::Span::current()));
                                return r;
                            }
                            let (req, mut response) = r.into_parts();
                            let status = response.status();
                            {
                                let ext = req.extensions();
                                done.finish(
                                    status,
                                    error_code(&response),
                                    ext.get::<http::WriteDone>(),
                                    ext.get::<SetCredentials>(),
                                    response.headers_mut(),
                                );
                            }
                            actix_web::dev::ServiceResponse::new(req, response)
                        })
                    })
                    .instrument(span)
            })
            .configure(http::routes)
    };
    // actix-web's HttpServer, assembled by hand so that every connection passes through
    // `api::conn` first: refused at once beyond the per-source and total limits, TLS
    // within a handshake timeout, and protocol-level errors answered with JSON bodies.
    let server = actix_server::Server::build()
        .workers(config.http_workers)
        .backlog(4096)
        // Per worker; the node-wide limit is `Connections`'.
        .max_concurrent_connections(limits.max_connections)
        .disable_signals()
        .shutdown_timeout(5)
        .listen("tether-http", listener, move || {
            let app = make_app()
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response());
            let http = HttpService::build()
                .keep_alive(KeepAlive::Timeout(limits.keep_alive))
                .client_request_timeout(limits.header_read_timeout)
                .client_disconnect_timeout(Duration::from_secs(1))
                .h1_allow_half_closed(false)
                .local_addr(bound)
                .finish(map_config(app, |_| AppConfig::default()));
            let (conns, acceptor) = (conns.clone(), acceptor.clone());
            let handshake = limits.tls_handshake_timeout;
            // Boxed as a whole too: actix-server's task keeps the connection's future twice
            // (as the task's argument and as the future it awaits), so inline it would be
            // two copies of the HTTP/1 dispatcher in every connection's task cell.
            actix_service::boxed::factory(
                fn_service(move |tcp: tokio::net::TcpStream| {
                    let (conns, acceptor) = (conns.clone(), acceptor.clone());
                    // Boxed: the connection's future holds this one, then the HTTP
                    // dispatcher's, in one allocation as large as the larger; inline, the
                    // TLS handshake's state (≈ 1.3 KB) would size that allocation for every
                    // connection for as long as it lives.
                    Box::pin(async move {
                        let refused = |why: String| DispatchError::Io(std::io::Error::other(why));
                        let peer = tcp.peer_addr().ok();
                        let permit = conns
                            .admit(peer)
                            .map_err(|r| refused(format!("connection refused: {r:?}")))?;
                        let _ = tcp.set_nodelay(true);
                        let stream = match acceptor {
                            None => Stream::Plain(tcp),
                            Some(acceptor) => {
                                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                                    Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                                    Ok(Err(e)) => return Err(refused(format!("TLS: {e}"))),
                                    Err(_) => {
                                        return Err(refused("TLS handshake timed out".into()))
                                    }
                                }
                            }
                        };
                        Ok((Conn::new(stream, permit), Protocol::Http1, peer))
                    })
                })
                .and_then(http),
            )
        })
        .map_err(|e| NodeError::Config(format!("listening on {bound}: {e}")))?
        .run();

    // The one line tests and scripts wait for; logs go to stderr.
    println!("listening on {scheme}://{bound}");
    let _ = std::io::stdout().flush();
    tracing::info!(%bound, data_dir = %config.data_dir.display(), node = %config.node_id, "tether serving");
    if let Some(prefix) = &config.fault_stall_op_prefix {
        tracing::warn!(%prefix, "FAULT INJECTION: answers of writes whose op id starts with this are never sent");
    }

    let handle = server.handle();
    let serve = tokio::spawn(server);
    if let Some(cert) = tls {
        if let Some(interval) = config.tls_reload_interval {
            cert.watch(interval);
        }
        tokio::spawn(reload_on_sighup(cert));
    }
    wait_for_signal().await;
    // `--features dhat-heap` only: the heap as it was while serving (issue 17).
    crate::heap_profile::snapshot();
    tracing::info!(
        drain_timeout_s = config.drain_timeout.as_secs(),
        "shutting down: answering held subscriptions, draining writes"
    );
    let drain = drain(
        config.drain_timeout,
        state,
        cluster,
        shared,
        handle,
        serve,
        store,
    );
    match tokio::time::timeout(config.drain_timeout, drain).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(
                drain_timeout_s = config.drain_timeout.as_secs(),
                "graceful shutdown did not finish in time; exiting (acknowledged writes are durable)"
            );
            Ok(())
        }
    }
}

/// The graceful shutdown after SIGTERM, bounded by the caller.
#[allow(clippy::too_many_arguments)]
async fn drain(
    drain_timeout: Duration,
    state: web::Data<AppState>,
    mut cluster: Option<ClusterNode>,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Arc<dyn crate::store::Store>,
) -> Result<()> {
    let deadline = DRAIN_DEADLINE.min(drain_timeout);
    state.serving.store(false, Ordering::Release);
    if let Some(cluster) = &mut cluster {
        // Peers take this node's sets over at once; its actors commit what is queued and
        // answer their held subscriptions, whose clients resubscribe elsewhere.
        cluster.leave().await;
        shared.wait_idle(deadline).await;
    }
    state.start_draining();
    if cluster.is_some() {
        // Requests still arriving (the load balancer notices /readyz within its check
        // interval) are forwarded to the new owners meanwhile.
        tokio::time::sleep(LB_GRACE).await;
    }
    shared.shutdown(deadline).await;
    handle.stop(true).await;
    let _ = serve.await;
    if let Some(mut cluster) = cluster {
        cluster.stop();
    }
    store.close().await?;
    tracing::info!("store flushed; bye");
    Ok(())
}

/// Key id of the development manufacturing key used when none is configured.
pub const DEV_KEY_ID: &str = "dev";

/// Without `--mfg-key-file`, a node uses (and on first start creates) a development
/// manufacturing key in its data directory, so `tether serve` works with no flags while no
/// device can register without credentials derived from that key.
fn dev_mfg_key(data_dir: &std::path::Path) -> Result<Vec<u8>> {
    let path = data_dir.join("dev-mfg.key");
    if !path.exists() {
        crate::admin::run(crate::config::AdminCommand::MfgKey(
            crate::config::MfgKeyCommand::Generate { path: path.clone() },
        ))?;
    }
    tracing::warn!(
        key_id = DEV_KEY_ID,
        path = %path.display(),
        "no --mfg-key-file given: using the development manufacturing key"
    );
    crate::config::read_mfg_key(&path)
}

async fn reload_on_sighup(cert: Arc<ReloadableCert>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match cert.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate")
                }
            }
        }
    }
    #[cfg(not(unix))]
    drop(cert);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Every [`FORGET_IDLE_EVERY`](crate::security::credentials::FORGET_IDLE_EVERY), lets go
/// of what the node keeps per principal and no request needs any more (cached records and
/// scopes, ended failure windows, rate-limiter keys back to a full budget): a node's
/// memory follows the principals active now, not every device it ever served.
async fn forget_idle_principals(state: Arc<AppState>) {
    let mut every = tokio::time::interval(crate::security::credentials::FORGET_IDLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let forgotten = state.auth.forget_idle(std::time::Instant::now());
        tracing::debug!(?forgotten, "idle principals forgotten");
    }
}

/// Gives the memory of stopped actors back to the system. glibc's allocator keeps an
/// arena per thread and returns only the free memory at an arena's end; the pages that
/// actors' state filled on their thread stay resident after the actors stop, free but
/// kept, unless asked (`malloc_trim`). A node whose devices' sets passivated after a
/// burst (a fleet reconnecting, BENCHMARKS.md "Memory actors freed, given back") kept
/// ≈ 12 MB that way at 18,000 devices. Checked every second ([`trim_due`]); the trim runs
/// on the blocking pool (it walks the arenas: 1–8 ms with 18,000 devices held).
async fn return_freed_memory(shared: Arc<crate::sets::registry::Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = (shared.actors_stopped(), Instant::now());
    let mut seen = trimmed_at.0;
    loop {
        every.tick().await;
        let stopped = shared.actors_stopped();
        let since = stopped.saturating_sub(trimmed_at.0);
        let quiet = stopped == seen;
        seen = stopped;
        if trim_due(since, quiet, trimmed_at.1.elapsed()) {
            trimmed_at = (stopped, Instant::now());
            let took = tokio::task::spawn_blocking(|| {
                let start = Instant::now();
                trim_heap();
                start.elapsed()
            })
            .await;
            tracing::debug!(actors_stopped = since, took = ?took.ok(), "freed memory given back");
        }
    }
}

/// Whether to trim now, `stopped` actors after the last trim, `elapsed` since it, none
/// stopped in the last second (`quiet`): while actors stop in numbers, every
/// [`TRIM_AFTER_STOPPED`]; once they stopped stopping, for the last of them if they were
/// [`TRIM_WHEN_QUIET`]; else within [`TRIM_AT_LEAST_EVERY`] of the first stop.
fn trim_due(stopped: u64, quiet: bool, elapsed: Duration) -> bool {
    stopped >= TRIM_AFTER_STOPPED
        || (quiet && stopped >= TRIM_WHEN_QUIET)
        || (stopped > 0 && elapsed >= TRIM_AT_LEAST_EVERY)
}

/// Actors stopped since the last trim that call for one ([`return_freed_memory`]).
const TRIM_AFTER_STOPPED: u64 = 256;
/// Actors stopped since the last trim that call for one once no more stop.
const TRIM_WHEN_QUIET: u64 = 32;
/// Longest a stopped actor's memory waits for a trim.
const TRIM_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// Returns the allocator's free pages to the system (glibc only; elsewhere nothing).
#[allow(unsafe_code)]
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointers; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Deletes blobs no bucket references once their grace is over, and uploads never
/// finished (`store::blobs::sweep`), every quarter of the grace (1 s to 1 min). Every
/// node runs it; each step is conditional, so passes on several nodes are safe.
async fn collect_blobs(
    blobs: crate::store::blobs::Blobs,
    store: Arc<dyn crate::store::Store>,
    metrics: crate::metrics::Metrics,
    grace: Duration,
) {
    // A holder younger than this may belong to a bucket write still committing.
    const SETTLE: Duration = Duration::from_secs(600);
    let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let settle = SETTLE.min(grace);
    loop {
        tokio::time::sleep(every).await;
        let now = crate::api::http::now_ms();
        let pass = crate::store::blobs::sweep(
            &blobs,
            store.as_ref(),
            now,
            grace.as_millis() as u64,
            settle.as_millis() as u64,
        )
        .await;
        match pass {
            Ok(swept) => {
                metrics.blobs("deleted", swept.deleted);
                if swept.deleted > 0 || swept.released > 0 {
                    tracing::info!(
                        blobs = swept.blobs,
                        released = swept.released,
                        deleted = swept.deleted,
                        "blob collection"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "blob collection failed; retrying next pass"),
        }
    }
}

/// What every request's response gets when it is ready: its metrics, its access log line
/// (a PUT's with its write), its request id header and the credentials it delivers.
struct RequestDone {
    route: Cow<'static, str>,
    method: &'static str,
    /// The request's trace is exported (its id is then the metrics' exemplar).
    exported: bool,
    trace_id: opentelemetry::trace::TraceId,
    metrics: Metrics,
    rejections: Arc<LogBudget>,
    started: Instant,
    request_id: uuid::Uuid,
}

impl RequestDone {
    /// Counts and logs a response of `status` (`code`: the error it carries) in the
    /// current span and sets its headers.
    fn finish(
        &self,
        status: actix_web::http::StatusCode,
        code: Option<&'static str>,
        write: Option<&http::WriteDone>,
        set: Option<&SetCredentials>,
        headers: &mut actix_web::http::header::HeaderMap,
    ) {
        let status = status.as_u16();
        let elapsed = self.started.elapsed();
        self.metrics.http_request(
            self.route.clone(),
            self.method,
            status,
            elapsed,
            self.exported.then_some(self.trace_id),
        );
        if let Some(code) = code {
            self.metrics.request_refused(&self.route, code);
        }
        crate::telemetry::record_http_status(&tracing::Span::current(), status, code);
        let elapsed_ms = elapsed.as_millis() as u64;
        if matches!(status, 401 | 403 | 429) {
            if let Some(suppressed) = self.rejections.admit(Instant::now()) {
                tracing::info!(status, elapsed_ms, suppressed, "request rejected");
            }
        } else if let Some(w) = write {
            // A PUT: its write log and its access log in one line.
            tracing::info!(
                status,
                elapsed_ms,
                bucket = %w.bucket,
                outcome = ?w.outcome,
                version = w.version,
                op_id = w.op_id.as_deref().unwrap_or("-"),
                replayed = w.replayed,
                "request done"
            );
        } else {
            tracing::info!(status, elapsed_ms, "request done");
        }
        let mut id = uuid::Uuid::encode_buffer();
        let id = self.request_id.hyphenated().encode_lower(&mut id);
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert(HeaderName::from_static("x-request-id"), v);
        }
        // New credentials ride on every authenticated response, errors and held
        // subscribes included (API.md "Credentials").
        if let Some(SetCredentials(c)) = set {
            if let Ok(v) = HeaderValue::from_str(&format_set_credentials(c)) {
                headers.insert(HeaderName::from_static("x-tether-set-credentials"), v);
            }
        }
    }

    /// A held response's future for actix-http's dispatcher, finished as above when it is
    /// ready, in the request's `span` ([`HeldDone`]).
    fn deferred(self, held: http::HeldResponse, span: tracing::Span) -> DeferredResponse {
        let span = self.exported.then(|| Box::new(span));
        DeferredResponse(Box::pin(HeldDone {
            done: self,
            held,
            span,
        }))
    }
}

/// A held subscribe's answer, counted, logged and given its headers when it is ready.
/// Polled in the request's span when that is exported; otherwise the span was let go at
/// the hold (≈ 0.5 KB of the subscriber's registry slot and formatted fields, for as long
/// as the hold lasts) and each poll runs in one made anew with the same fields, so every
/// line logged for the request still names its request and trace ids. A plain future,
/// not an `async` block: it keeps the request's record once, nothing else.
struct HeldDone {
    done: RequestDone,
    held: http::HeldResponse,
    /// Boxed: only an exported request's is kept, and every held device keeps the field.
    span: Option<Box<tracing::Span>>,
}

impl std::future::Future for HeldDone {
    type Output = actix_http::Response<actix_web::body::BoxBody>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        let made;
        let span = match &this.span {
            Some(span) => &**span,
            None => {
                let d = &this.done;
                made = crate::telemetry::request_span(
                    false,
                    d.request_id,
                    d.trace_id,
                    d.method,
                    &d.route,
                );
                &made
            }
        };
        let _in = span.enter();
        let mut res = std::task::ready!(this.held.0.as_mut().poll(cx));
        let code = error_code(&res);
        this.done
            .finish(res.status(), code, None, None, res.headers_mut());
        std::task::Poll::Ready(res.into())
    }
}

/// The error code of the node's error a response carries, if it carries one.
fn error_code(res: &actix_web::HttpResponse) -> Option<&'static str> {
    res.error()
        .and_then(|e| e.as_error::<NodeError>())
        .map(|e| e.code_and_status().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_given_back_after_many_stops_or_a_while_after_any() {
        let (second, every) = (Duration::from_secs(1), TRIM_AT_LEAST_EVERY);
        for (stopped, quiet, elapsed, due) in [
            (0, true, every * 2, false),
            (1, false, second, false),
            (1, true, second, false),
            (1, false, every, true),
            (TRIM_WHEN_QUIET, false, second, false),
            (TRIM_WHEN_QUIET, true, second, true),
            (TRIM_AFTER_STOPPED - 1, false, second, false),
            (TRIM_AFTER_STOPPED, false, Duration::ZERO, true),
        ] {
            assert_eq!(
                trim_due(stopped, quiet, elapsed),
                due,
                "{stopped} stopped, quiet {quiet}, {elapsed:?}"
            );
        }
        // Safe to call at any time, from any thread.
        trim_heap();
    }
}
