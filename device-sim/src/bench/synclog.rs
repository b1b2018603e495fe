//! The sync log's costs and gains, measured:
//!
//! 1. **Catch-up bytes**: a device that missed N changes of a realistic thermostat bucket
//!    subscribes with the version it holds; the bytes on the wire of the answer (status
//!    line, headers and body, read off the socket) with the whole value (`diffs` off)
//!    and with a diff (`diffs` on), as JSON and as protobuf; the body alone too. Byte
//!    counts are exact; they vary by a byte or two between runs (the widths of versions).
//! 2. **PUT throughput**: the closed-loop PUT load of `http-ceiling` against the previous
//!    release (`--baseline-bin`, built without the log) and this one — with plain writes
//!    and with every write carrying an op id — alternating in the same run, so the log's
//!    cost is a same-run ratio.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::{json, Value};
use tether_proto::api::{HeldBucket, SubscribeRequest, UpdateResponse, WireMessage};
use tether_proto::credentials::{basic_header, Credentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ceiling::{closed_loop, Load};
use super::{now_utc, ratio, tether, write_json, Machine, Spread};

/// Options of `tether-bench sync-log`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// This release's `tether` binary.
    pub tether_bin: PathBuf,
    /// The previous release's binary (no sync log); without it the throughput part
    /// compares plain writes with op-id writes on this release only.
    pub baseline_bin: Option<PathBuf>,
    /// Repetitions of the throughput part.
    pub runs: usize,
    /// Measured seconds per target per run.
    pub secs: f64,
    /// Concurrent connections.
    pub conns: usize,
    /// HTTP workers.
    pub workers: usize,
    /// Missed changes to catch up from.
    pub missed: Vec<usize>,
    /// Where results go.
    pub out: PathBuf,
}

/// Bytes of one answer: on the wire (status line, headers, body) and of the body alone.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bytes {
    /// Everything read off the socket.
    pub wire: usize,
    /// The body.
    pub body: usize,
}

/// Bytes of one catch-up answer in each form.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUp {
    /// Changes the device missed.
    pub missed: usize,
    /// Whole value, JSON.
    pub json_full: Bytes,
    /// Diff, JSON.
    pub json_diff: Bytes,
    /// Whole value, protobuf.
    pub pb_full: Bytes,
    /// Diff, protobuf.
    pub pb_diff: Bytes,
    /// Whether the node answered with a diff (false: the held version fell out of the
    /// bucket's history, the whole value went).
    pub diff_sent: bool,
}

/// One throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRun {
    /// The previous release (if given).
    pub baseline: Option<Load>,
    /// This release, writes without op ids.
    pub log: Load,
    /// This release, every write with an op id.
    pub log_op_ids: Load,
}

/// A thermostat's settings bucket as an app and the device keep it: a dozen settings and
/// a weekly schedule (≈0.9 KB of JSON).
fn settings() -> Value {
    let day = json!([[6, 30, 21.0], [8, 30, 17.5], [17, 0, 21.0], [22, 30, 16.0]]);
    json!({
        "target_temperature": 21.0, "mode": "heat", "name": "Living room", "away": false,
        "fan": "auto", "eco": true, "units": "celsius", "humidity_target": 45,
        "lock": false, "display_brightness": 70, "hold_until": null,
        "schedule": {"mon": day, "tue": day, "wed": day, "thu": day, "fri": day,
                     "sat": [[8, 0, 21.0], [23, 0, 16.0]], "sun": [[8, 0, 21.0], [23, 0, 16.0]]}
    })
}

/// The `i`-th change another client makes: one small setting.
fn change(i: usize) -> Value {
    match i % 4 {
        0 => json!({"target_temperature": 18.0 + (i % 10) as f64 * 0.5}),
        1 => {
            let mode = ["heat", "cool", "auto"][i % 3];
            json!({ "mode": mode })
        }
        2 => json!({"away": i % 8 == 2}),
        _ => {
            let fan = ["auto", "on"][i % 2];
            json!({ "fan": fan })
        }
    }
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and returns the whole response
/// as read off the socket.
async fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .context("waiting for the answer")??;
    Ok(out)
}

/// The answer to a subscribe holding `version` of `id`: its bytes, and whether the body
/// carries a diff.
async fn catch_up_bytes(
    addr: &str,
    creds: &Credentials,
    id: &str,
    version: u64,
    diffs: bool,
    protobuf: bool,
) -> Result<(Bytes, bool)> {
    let req = SubscribeRequest {
        buckets: vec![HeldBucket {
            id: id.to_string(),
            timestamp: None,
            version: Some(version),
        }],
        session: Some("bench-device".into()),
        timeout_ms: Some(1_000),
        diffs,
        max_bytes: None,
        stream: false,
        next_sync_ms: None,
    };
    let (body, ct) = if protobuf {
        (req.encode_pb(), "application/x-protobuf")
    } else {
        (serde_json::to_vec(&req)?, "application/json")
    };
    let headers = [
        ("Authorization", basic_header(creds)),
        ("Content-Type", ct.to_string()),
        ("Accept", ct.to_string()),
    ];
    let resp = raw(addr, "POST", "/v1/subscribe", &headers, &body).await?;
    let text = String::from_utf8_lossy(&resp);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("subscribe answered {}", text.lines().next().unwrap_or(""));
    }
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let payload = &resp[split + 4..];
    let has_diff = if protobuf {
        tether_proto::api::BucketList::decode_pb(payload)?
            .buckets
            .first()
            .is_some_and(|b| b.base_version.is_some())
    } else {
        let v: Value = serde_json::from_slice(payload)?;
        v["buckets"][0].get("changes").is_some()
    };
    Ok((
        Bytes {
            wire: resp.len(),
            body: payload.len(),
        },
        has_diff,
    ))
}

/// Part 1: bytes of catching up after each number of missed changes.
async fn catch_up(o: &Opts) -> Result<Vec<CatchUp>> {
    let http = reqwest::Client::new();
    let node = tether::start(&o.tether_bin, &[]).await?;
    let url = node.url().to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let creds = tether::register(&http, &url, &node.mfg_key, "CATCH0001").await?;
    let id = "shared.CATCH0001";
    let put = |fields: Value, base: u64| {
        let http = http.clone();
        let (url, creds) = (url.clone(), creds.clone());
        async move {
            let r = http
                .put(format!("{url}/v1/buckets/{id}"))
                .header(AUTHORIZATION, basic_header(&creds))
                .json(&json!({"value": fields, "base_version": base, "session": "app"}))
                .send()
                .await?
                .error_for_status()?
                .json::<UpdateResponse>()
                .await?;
            Ok::<u64, anyhow::Error>(r.version)
        }
    };
    let mut version = put(settings(), 1).await?;
    let mut rows = Vec::new();
    let mut missed: Vec<usize> = o.missed.clone();
    missed.sort_unstable();
    for n in missed {
        let held = version;
        for i in 0..n {
            version = put(change(i), version).await?;
        }
        let (json_full, _) = catch_up_bytes(&addr, &creds, id, held, false, false).await?;
        let (json_diff, diff_sent) = catch_up_bytes(&addr, &creds, id, held, true, false).await?;
        let (pb_full, _) = catch_up_bytes(&addr, &creds, id, held, false, true).await?;
        let (pb_diff, _) = catch_up_bytes(&addr, &creds, id, held, true, true).await?;
        eprintln!(
            "missed {n:>4}: JSON {} B whole vs {} B diff; protobuf {} B vs {} B{}",
            json_full.wire,
            json_diff.wire,
            pb_full.wire,
            pb_diff.wire,
            if diff_sent {
                ""
            } else {
                " — held version out of the history: whole value"
            }
        );
        rows.push(CatchUp {
            missed: n,
            json_full,
            json_diff,
            pb_full,
            pb_diff,
            diff_sent,
        });
    }
    node.server.stop().await;
    Ok(rows)
}

async fn load_on(
    bin: &std::path::Path,
    o: &Opts,
    op_ids: bool,
    tag: &str,
    http: &reqwest::Client,
) -> Result<Load> {
    let workers = o.workers.to_string();
    let node = tether::start(bin, &["--http-workers", &workers]).await?;
    let devices = tether::register_many(http, node.url(), &node.mfg_key, tag, o.conns, 16).await?;
    let load = closed_loop(http, node.url(), &devices, o.conns, o.secs, op_ids).await;
    node.server.stop().await;
    Ok(load)
}

/// `tether-bench sync-log`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let rows = catch_up(&o).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.conns * 2)
        .tcp_nodelay(true)
        .build()?;
    let mut runs = Vec::new();
    for r in 0..o.runs {
        // Rotate the order so no target always runs on a warmer (or busier) machine.
        let mut baseline = None;
        let mut log = None;
        let mut log_ops = None;
        for k in 0..3 {
            match (r + k) % 3 {
                0 => {
                    if let Some(b) = &o.baseline_bin {
                        baseline = Some(load_on(b, &o, false, "BASE", &http).await?);
                    }
                }
                1 => log = Some(load_on(&o.tether_bin, &o, false, "LOG", &http).await?),
                _ => log_ops = Some(load_on(&o.tether_bin, &o, true, "OPS", &http).await?),
            }
        }
        let run = ThroughputRun {
            baseline,
            log: log.context("log run")?,
            log_op_ids: log_ops.context("op-id run")?,
        };
        eprintln!(
            "run {}: previous release {} req/s, this release {:.0} req/s, with op ids {:.0} req/s",
            r + 1,
            run.baseline
                .as_ref()
                .map_or("-".to_string(), |b| format!("{:.0}", b.rps)),
            run.log.rps,
            run.log_op_ids.rps
        );
        runs.push(run);
    }
    let spread =
        |f: &dyn Fn(&ThroughputRun) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let base_rps = spread(&|r| r.baseline.as_ref().map_or(0.0, |b| b.rps));
    let log_rps = spread(&|r| r.log.rps);
    let ops_rps = spread(&|r| r.log_op_ids.rps);
    let log_over_base = spread(&|r| ratio(r.log.rps, r.baseline.as_ref().map_or(0.0, |b| b.rps)));
    let ops_over_base =
        spread(&|r| ratio(r.log_op_ids.rps, r.baseline.as_ref().map_or(0.0, |b| b.rps)));
    let ops_over_log = spread(&|r| ratio(r.log_op_ids.rps, r.log.rps));
    println!("catch-up after N missed changes: bytes of the subscribe answer on the wire (body)");
    println!("  missed | JSON whole | JSON diff  | ratio | protobuf whole | protobuf diff | ratio");
    let b = |x: Bytes| format!("{} ({})", x.wire, x.body);
    for c in &rows {
        println!(
            "  {:>6} | {:>10} | {:>10} | {:.2}{} | {:>14} | {:>13} | {:.2}",
            c.missed,
            b(c.json_full),
            b(c.json_diff),
            ratio(c.json_diff.wire as f64, c.json_full.wire as f64),
            if c.diff_sent { " " } else { "*" },
            b(c.pb_full),
            b(c.pb_diff),
            ratio(c.pb_diff.wire as f64, c.pb_full.wire as f64),
        );
    }
    println!("  (* the held version had left the history: the whole value was sent)");
    println!(
        "PUT throughput ({} runs, {} connections, {} s each): previous release {} req/s, this release {} req/s, with op ids {} req/s",
        o.runs,
        o.conns,
        o.secs,
        base_rps.show(0),
        log_rps.show(0),
        ops_rps.show(0)
    );
    if o.baseline_bin.is_some() {
        println!(
            "  ratio this/previous {}, with op ids/previous {}",
            log_over_base.show(3),
            ops_over_base.show(3)
        );
    }
    println!("  ratio with op ids/without {}", ops_over_log.show(3));
    let result = json!({
        "benchmark": "sync-log", "date": date, "machine": machine,
        "params": {"runs": o.runs, "secs": o.secs, "connections": o.conns,
                   "http_workers": o.workers, "missed": o.missed,
                   "baseline_bin": o.baseline_bin},
        "catch_up": rows,
        "runs": runs,
        "summary": {"previous_rps": base_rps, "log_rps": log_rps, "log_op_ids_rps": ops_rps,
                    "log_over_previous": log_over_base, "op_ids_over_previous": ops_over_base,
                    "op_ids_over_plain": ops_over_log},
    });
    let path = write_json(&o.out, "sync-log", &result)?;
    println!("results: {}", path.display());
    Ok(())
}
