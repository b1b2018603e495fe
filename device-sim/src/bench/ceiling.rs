//! HTTP ceiling: the same closed-loop client (C connections, each sending its next PUT
//! when the last one is answered) against a trivial actix-web handler and against
//! Tether's durable PUT path. The ratio says how much of the HTTP stack's ceiling the
//! durable write path keeps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Result;
use hdrhistogram::Histogram;
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::json;
use tether_proto::api::UpdateResponse;
use tether_proto::credentials::{basic_header, Credentials};

use super::plot::{self, Panel};
use super::{now_utc, procs, ratio, tether, write_json, Machine, Spread};
use crate::report::{latency_histogram, LatencySummary};

/// Options of `tether-bench http-ceiling`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// Repetitions.
    pub runs: usize,
    /// Measured seconds per target per run (after a 1 s warm-up).
    pub secs: f64,
    /// Concurrent connections.
    pub conns: usize,
    /// HTTP workers of both servers.
    pub workers: usize,
    /// Where results go.
    pub out: PathBuf,
}

/// What one target did in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// Answered requests per second.
    pub rps: f64,
    /// Requests that failed.
    pub errors: u64,
    /// Request latency.
    pub latency: LatencySummary,
    /// Requests answered, the warm-up second's included.
    pub answered: u64,
    /// The server process's CPU time (user + system, all threads) per answered request
    /// while the load ran, warm-up included — steadier on a shared machine than a rate:
    /// other tenants slow the server down but do not add to its CPU time. `None` when not
    /// measured (a cluster's load, or no `/proc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_request: Option<f64>,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The trivial handler.
    pub trivial: Load,
    /// Tether's durable PUT.
    pub tether: Load,
    /// tether.rps / trivial.rps.
    pub ratio: f64,
    /// Store transactions per second during the Tether load.
    pub tether_commits_per_s: f64,
    /// fsyncs of the store's write-ahead log per second (`tether_store_wal_syncs_total`;
    /// each covers every transaction written since the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tether_wal_syncs_per_s: Option<f64>,
    /// The share of the Tether load's time its store writer thread spent in transactions
    /// (`tether_store_writer_busy_seconds_total`; near 1, the writer bounds the PUT rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tether_writer_busy: Option<f64>,
    /// The trivial server's CPU per request / Tether's per durable PUT: the share of the
    /// HTTP stack's cost per request a durable PUT adds up to (1 = no more than the
    /// trivial handler; the CPU counterpart of `ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ratio: Option<f64>,
}

/// `tether-bench trivial-server`: PUT /v1/buckets/{id} reads the body and answers a
/// constant `applied` outcome. Prints `listening on http://…`.
pub fn trivial_server(workers: usize) -> Result<()> {
    let sys = actix_rt::System::new();
    sys.block_on(async move {
        let server = HttpServer::new(|| {
            App::new().route(
                "/v1/buckets/{id}",
                web::put().to(|id: web::Path<String>, _body: web::Bytes| async move {
                    HttpResponse::Ok().json(json!({
                        "outcome": "applied", "id": id.as_str(), "timestamp": 1, "version": 1
                    }))
                }),
            )
        })
        .workers(workers.max(1))
        .bind(("127.0.0.1", 0))?;
        let addr = server.addrs()[0];
        println!("listening on http://{addr}");
        server.run().await
    })?;
    Ok(())
}

/// Runs C connections of sequential PUTs against `url` for `secs` (after a 1 s warm-up).
/// Connection `c` writes `shared.<serial>` of `devices[c % len]` (or a made-up id with no
/// credentials for the trivial server), following the versions it is answered; with
/// `op_ids`, every PUT carries a fresh op id.
pub async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    devices: &[(String, Credentials)],
    conns: usize,
    secs: f64,
    op_ids: bool,
) -> Load {
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs_f64(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let http = http.clone();
        let url = url.to_string();
        let dev = (!devices.is_empty()).then(|| devices[c % devices.len()].clone());
        let errors = errors.clone();
        tasks.spawn(async move {
            let mut h: Histogram<u64> = latency_histogram();
            let mut n = 0u64;
            let mut all = 0u64;
            let mut version = 0u64;
            let id = match &dev {
                Some((serial, _)) => format!("shared.{serial}"),
                None => format!("shared.TRIVIAL{c:04}"),
            };
            let mut seq = 0u64;
            while Instant::now() < end {
                seq += 1;
                let mut body = json!({"value": {"target_temperature": seq}, "base_version": version, "session": format!("bench-{c}")});
                if op_ids {
                    body["op_id"] = json!(format!("bench-{c}-{seq}"));
                }
                let mut rb = http
                    .put(format!("{url}/v1/buckets/{id}"))
                    .timeout(Duration::from_secs(10))
                    .json(&body);
                if let Some((_, creds)) = &dev {
                    rb = rb.header(AUTHORIZATION, basic_header(creds));
                }
                let t0 = Instant::now();
                let ok = match rb.send().await {
                    Ok(r) if r.status().is_success() => match r.json::<UpdateResponse>().await {
                        Ok(u) => {
                            version = u.version;
                            true
                        }
                        Err(_) => false,
                    },
                    _ => false,
                };
                all += u64::from(ok);
                if t0 < warm_until {
                    continue;
                }
                if ok {
                    n += 1;
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    h.saturating_record(us.max(1));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            (n, all, h)
        });
    }
    let mut total = 0u64;
    let mut answered = 0u64;
    let mut hist = latency_histogram();
    while let Some(r) = tasks.join_next().await {
        if let Ok((n, all, h)) = r {
            total += n;
            answered += all;
            let _ = hist.add(&h);
        }
    }
    Load {
        rps: total as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
        latency: LatencySummary::of(&hist),
        answered,
        server_cpu_us_per_request: None,
    }
}

/// [`closed_loop`] against the server process `pid`, with its CPU time per request.
async fn measured_loop(
    pid: u32,
    http: &reqwest::Client,
    url: &str,
    devices: &[(String, Credentials)],
    o: &Opts,
) -> Load {
    let before = procs::cpu_secs(pid);
    let mut load = closed_loop(http, url, devices, o.conns, o.secs, false).await;
    if let (Some(b), Some(a)) = (before, procs::cpu_secs(pid)) {
        load.server_cpu_us_per_request =
            (load.answered > 0).then(|| (a - b) * 1e6 / load.answered as f64);
    }
    load
}

/// `tether-bench http-ceiling`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.conns * 2)
        .tcp_nodelay(true)
        .build()?;
    let mut runs = Vec::new();
    for r in 0..o.runs {
        let workers = o.workers.to_string();
        let node = tether::start(&o.tether_bin, &["--http-workers", &workers]).await?;
        let devices =
            tether::register_many(&http, node.url(), &node.mfg_key, "CEIL", o.conns, 16).await?;
        let trivial_srv = procs::start_trivial(o.workers).await?;
        // Alternate the order so neither target always runs on a warmer machine.
        let (trivial, (tether, store)) = if r % 2 == 0 {
            let t = measured_loop(trivial_srv.pid(), &http, &trivial_srv.url, &[], &o).await;
            (t, tether_load(&http, &node.server, &devices, &o).await)
        } else {
            let x = tether_load(&http, &node.server, &devices, &o).await;
            let t = measured_loop(trivial_srv.pid(), &http, &trivial_srv.url, &[], &o).await;
            (t, x)
        };
        trivial_srv.stop().await;
        node.server.stop().await;
        let cpu_ratio = match (
            trivial.server_cpu_us_per_request,
            tether.server_cpu_us_per_request,
        ) {
            (Some(t), Some(x)) if x > 0.0 => Some(t / x),
            _ => None,
        };
        let run = Run {
            ratio: ratio(tether.rps, trivial.rps),
            trivial,
            tether,
            tether_commits_per_s: store.commits,
            tether_wal_syncs_per_s: store.syncs,
            tether_writer_busy: store.busy,
            cpu_ratio,
        };
        let us = |l: &Load| l.server_cpu_us_per_request.unwrap_or(f64::NAN);
        eprintln!(
            "run {}: trivial {:.0} req/s (p99 {:.1} ms, {:.1} µs CPU each), tether durable PUT {:.0} req/s (p99 {:.1} ms, {:.1} µs CPU each, {:.0} commits/s, {:.0} log syncs/s, writer busy {:.0} %) → ratio {:.3}, CPU ratio {:.3}",
            r + 1,
            run.trivial.rps,
            run.trivial.latency.p99_ms,
            us(&run.trivial),
            run.tether.rps,
            run.tether.latency.p99_ms,
            us(&run.tether),
            run.tether_commits_per_s,
            run.tether_wal_syncs_per_s.unwrap_or(f64::NAN),
            run.tether_writer_busy.map_or(f64::NAN, |b| b * 100.0),
            run.ratio,
            run.cpu_ratio.unwrap_or(f64::NAN)
        );
        runs.push(run);
    }
    let spread = |f: &dyn Fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let ratio_s = spread(&|r| r.ratio);
    let trivial_s = spread(&|r| r.trivial.rps);
    let tether_s = spread(&|r| r.tether.rps);
    let cpu_s = spread(&|r| r.cpu_ratio.unwrap_or(f64::NAN));
    let tether_us_s = spread(&|r| r.tether.server_cpu_us_per_request.unwrap_or(f64::NAN));
    println!(
        "http-ceiling ({} runs, {} connections, {} s each): trivial {} req/s, tether {} req/s, ratio tether/trivial {}; server CPU per request: tether {} µs, CPU ratio trivial/tether {}",
        o.runs,
        o.conns,
        o.secs,
        trivial_s.show(0),
        tether_s.show(0),
        ratio_s.show(3),
        tether_us_s.show(1),
        cpu_s.show(3)
    );
    let result = json!({
        "benchmark": "http-ceiling", "date": date, "machine": machine,
        "params": {"runs": o.runs, "secs": o.secs, "connections": o.conns, "http_workers": o.workers},
        "runs": runs,
        "summary": {"trivial_rps": trivial_s, "tether_rps": tether_s, "ratio_tether_over_trivial": ratio_s,
                    "tether_cpu_us_per_put": tether_us_s, "cpu_ratio_trivial_over_tether": cpu_s},
    });
    let json_path = write_json(&o.out, "http-ceiling", &result)?;
    plot_it(
        &o.out.join("http-ceiling.png"),
        &trivial_s,
        &tether_s,
        &ratio_s,
        &runs,
    )?;
    println!("results: {}", json_path.display());
    Ok(())
}

/// What the store did during the durable PUT load, per second.
struct StoreRates {
    /// Write transactions.
    commits: f64,
    /// fsyncs of the write-ahead log.
    syncs: Option<f64>,
    /// The writer thread's busy share.
    busy: Option<f64>,
}

/// The durable PUT load: its figures and the store's.
async fn tether_load(
    http: &reqwest::Client,
    node: &procs::Server,
    devices: &[(String, Credentials)],
    o: &Opts,
) -> (Load, StoreRates) {
    let url = node.url.as_str();
    const NAMES: [&str; 3] = [
        "tether_store_commits_total",
        "tether_store_wal_syncs_total",
        "tether_store_writer_busy_seconds_total",
    ];
    let mut before = Vec::new();
    for name in NAMES {
        before.push(tether::metric(http, url, name).await);
    }
    let load = measured_loop(node.pid(), http, url, devices, o).await;
    let mut rates = Vec::new();
    for (name, b) in NAMES.into_iter().zip(before) {
        let a = tether::metric(http, url, name).await;
        rates.push(a.zip(b).map(|(a, b)| (a - b) / (o.secs + 1.0)));
    }
    let store = StoreRates {
        commits: rates[0].unwrap_or(0.0),
        syncs: rates[1],
        busy: rates[2],
    };
    (load, store)
}

fn plot_it(
    path: &Path,
    trivial: &Spread,
    tether: &Spread,
    ratio: &Spread,
    runs: &[Run],
) -> Result<()> {
    let p99 = |f: &dyn Fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    plot::bars(
        path,
        "HTTP ceiling: trivial actix-web handler vs Tether durable PUT (same client)",
        &[
            Panel::new(
                "throughput",
                "requests/s",
                vec![
                    ("trivial".into(), trivial.clone()),
                    ("tether PUT".into(), tether.clone()),
                ],
            ),
            Panel::new(
                "p99 latency",
                "ms",
                vec![
                    ("trivial".into(), p99(&|r| r.trivial.latency.p99_ms)),
                    ("tether PUT".into(), p99(&|r| r.tether.latency.p99_ms)),
                ],
            ),
            Panel::new(
                "ratio tether / trivial",
                "ratio",
                vec![("ratio".into(), ratio.clone())],
            ),
        ],
    )
}
