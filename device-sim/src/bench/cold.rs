//! Cold activation: the time to serve the first request for a passivated bucket set (its
//! actor stopped; the set is loaded from the store and its lease taken again) against the
//! same request right after, with the actor warm. The node runs with a short
//! `--passivate-after-ms` so actors passivate quickly; each device's GET is timed cold,
//! then immediately warm, one request at a time (no queueing in the numbers).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::json;
use tether_proto::credentials::basic_header;

use super::plot::{self, Panel};
use super::{now_utc, ratio, tether, write_json, Machine, Spread};
use crate::report::{latency_histogram, LatencySummary};

/// Options of `tether-bench cold-activation`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// Repetitions (a fresh node each).
    pub runs: usize,
    /// Devices (bucket sets) timed per run.
    pub devices: usize,
    /// `--passivate-after-ms` of the node.
    pub passivate_after_ms: u64,
    /// Where results go.
    pub out: PathBuf,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// First GET of a passivated set.
    pub cold: LatencySummary,
    /// The same GET right after.
    pub warm: LatencySummary,
    /// cold p50 / warm p50.
    pub ratio_p50: f64,
    /// Actors the node started during the cold requests (should equal the devices).
    pub activations: f64,
}

/// `tether-bench cold-activation`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let mut runs = Vec::new();
    for r in 0..o.runs {
        let p = o.passivate_after_ms.to_string();
        let node = tether::start(&o.tether_bin, &["--passivate-after-ms", &p]).await?;
        let url = node.url().to_string();
        let devices =
            tether::register_many(&http, &url, &node.mfg_key, "COLD", o.devices, 8).await?;
        // Wait for every set to passivate.
        let until = Instant::now() + Duration::from_millis(o.passivate_after_ms * 10 + 10_000);
        loop {
            let active = tether::metric(&http, &url, "tether_active_bucket_sets").await;
            if active == Some(0.0) {
                break;
            }
            if Instant::now() >= until {
                bail!("bucket sets did not passivate (active: {active:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = tether::metric(&http, &url, "tether_bucket_set_activations_total")
            .await
            .unwrap_or(0.0);
        let (mut cold, mut warm) = (latency_histogram(), latency_histogram());
        for (serial, creds) in &devices {
            for h in [&mut cold, &mut warm] {
                let t0 = Instant::now();
                let resp = http
                    .get(format!(
                        "{url}/v1/buckets?view=full&ids=device.{serial},shared.{serial}"
                    ))
                    .header(AUTHORIZATION, basic_header(creds))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await?;
                let status = resp.status();
                let _ = resp.bytes().await?;
                if !status.is_success() {
                    bail!("GET buckets of {serial}: {status}");
                }
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                h.saturating_record(us.max(1));
            }
        }
        let after = tether::metric(&http, &url, "tether_bucket_set_activations_total")
            .await
            .unwrap_or(0.0);
        node.server.stop().await;
        let (cold, warm) = (LatencySummary::of(&cold), LatencySummary::of(&warm));
        let run = Run {
            ratio_p50: ratio(cold.p50_ms, warm.p50_ms),
            activations: after - before,
            cold,
            warm,
        };
        eprintln!(
            "run {}: cold p50 {:.2} ms p99 {:.2} ms, warm p50 {:.2} ms p99 {:.2} ms → cold/warm p50 {:.2} ({} activations for {} sets)",
            r + 1,
            run.cold.p50_ms,
            run.cold.p99_ms,
            run.warm.p50_ms,
            run.warm.p99_ms,
            run.ratio_p50,
            run.activations,
            o.devices
        );
        runs.push(run);
    }
    let spread = |f: &dyn Fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let cold_p50 = spread(&|r| r.cold.p50_ms);
    let cold_p99 = spread(&|r| r.cold.p99_ms);
    let warm_p50 = spread(&|r| r.warm.p50_ms);
    let warm_p99 = spread(&|r| r.warm.p99_ms);
    let ratio_s = spread(&|r| r.ratio_p50);
    println!(
        "cold-activation ({} runs × {} sets): cold p50 {} ms, p99 {} ms; warm p50 {} ms, p99 {} ms; cold/warm p50 {}",
        o.runs,
        o.devices,
        cold_p50.show(2),
        cold_p99.show(2),
        warm_p50.show(2),
        warm_p99.show(2),
        ratio_s.show(2)
    );
    let result = json!({
        "benchmark": "cold-activation", "date": date, "machine": machine,
        "params": {"runs": o.runs, "devices": o.devices, "passivate_after_ms": o.passivate_after_ms},
        "runs": runs,
        "summary": {"cold_p50_ms": cold_p50, "cold_p99_ms": cold_p99, "warm_p50_ms": warm_p50,
                    "warm_p99_ms": warm_p99, "ratio_cold_over_warm_p50": ratio_s},
    });
    let path = write_json(&o.out, "cold-activation", &result)?;
    plot::bars(
        &o.out.join("cold-activation.png"),
        "Cold activation: first GET of a passivated bucket set vs warm",
        &[
            Panel::new(
                "p50",
                "ms",
                vec![("cold".into(), cold_p50), ("warm".into(), warm_p50)],
            ),
            Panel::new(
                "p99",
                "ms",
                vec![("cold".into(), cold_p99), ("warm".into(), warm_p99)],
            ),
            Panel::new(
                "cold / warm (p50)",
                "ratio",
                vec![("ratio".into(), ratio_s)],
            ),
        ],
    )?;
    println!("results: {}", path.display());
    Ok(())
}
