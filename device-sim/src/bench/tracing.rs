//! Tracing overhead: the same closed-loop PUT load (http-ceiling's client) against two
//! nodes of the same binary in the same run, one with trace export off (the default) and
//! one exporting every request's spans over OTLP to an in-process receiver on loopback
//! (`--otlp-endpoint`, sampler `always_on`: every span of every request). The ratio
//! on/off is the cost of tracing everything.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;
use tether_test_support::otlp::{Collector, Protocol};

use super::ceiling::{closed_loop, Load};
use super::{now_utc, ratio, tether, write_json, Machine, Spread};

/// Options of `tether-bench tracing-overhead`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// Repetitions.
    pub runs: usize,
    /// Measured seconds per node per run (after a 1 s warm-up).
    pub secs: f64,
    /// Concurrent connections.
    pub conns: usize,
    /// HTTP workers of each node.
    pub workers: usize,
    /// `grpc` or `http/protobuf`.
    pub protocol: String,
    /// Share of requests traced (1: every one, `always_on`; below: `parentbased_traceidratio`).
    pub sample: f64,
    /// Where results go.
    pub out: PathBuf,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Export off.
    pub off: Load,
    /// Export on, every request sampled.
    pub on: Load,
    /// on.rps / off.rps.
    pub ratio: f64,
    /// Spans the receiver got from the exporting node during the run.
    pub spans_received: usize,
}

/// `tether-bench tracing-overhead`.
pub async fn run(o: Opts) -> Result<()> {
    let protocol = match o.protocol.as_str() {
        "grpc" => Protocol::Grpc,
        "http/protobuf" => Protocol::HttpProtobuf,
        other => bail!("--protocol {other:?}: grpc or http/protobuf"),
    };
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.conns * 2)
        .tcp_nodelay(true)
        .build()?;
    let workers = o.workers.to_string();
    let mut runs = Vec::new();
    for r in 0..o.runs {
        let collector = Collector::start(protocol).await;
        let endpoint = collector.endpoint();
        let off = tether::start(&o.tether_bin, &["--http-workers", &workers]).await?;
        let ratio_arg = o.sample.to_string();
        let mut on_args = vec![
            "--http-workers",
            &workers,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol.env_value(),
        ];
        if o.sample >= 1.0 {
            on_args.extend(["--otel-traces-sampler", "always_on"]);
        } else {
            on_args.extend([
                "--otel-traces-sampler",
                "parentbased_traceidratio",
                "--otel-traces-sampler-arg",
                &ratio_arg,
            ]);
        }
        let on = tether::start(&o.tether_bin, &on_args).await?;
        let off_devices =
            tether::register_many(&http, off.url(), &off.mfg_key, "TOFF", o.conns, 16).await?;
        let on_devices =
            tether::register_many(&http, on.url(), &on.mfg_key, "TON", o.conns, 16).await?;
        let before = collector.spans().len();
        // Alternate the order so neither node always runs on a warmer machine.
        let (off_load, on_load) = if r % 2 == 0 {
            let a = closed_loop(&http, off.url(), &off_devices, o.conns, o.secs, false).await;
            let b = closed_loop(&http, on.url(), &on_devices, o.conns, o.secs, false).await;
            (a, b)
        } else {
            let b = closed_loop(&http, on.url(), &on_devices, o.conns, o.secs, false).await;
            let a = closed_loop(&http, off.url(), &off_devices, o.conns, o.secs, false).await;
            (a, b)
        };
        on.server.stop().await;
        off.server.stop().await;
        let spans_received = collector.spans().len() - before;
        if spans_received == 0 {
            bail!("the exporting node sent no spans: the measurement would be of nothing");
        }
        let run = Run {
            ratio: ratio(on_load.rps, off_load.rps),
            off: off_load,
            on: on_load,
            spans_received,
        };
        eprintln!(
            "run {}: export off {:.0} req/s (p99 {:.1} ms), export on ({}) {:.0} req/s (p99 {:.1} ms, {} spans received) → ratio on/off {:.3}",
            r + 1,
            run.off.rps,
            run.off.latency.p99_ms,
            protocol.env_value(),
            run.on.rps,
            run.on.latency.p99_ms,
            run.spans_received,
            run.ratio
        );
        runs.push(run);
    }
    let spread = |f: &dyn Fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let off_s = spread(&|r| r.off.rps);
    let on_s = spread(&|r| r.on.rps);
    let ratio_s = spread(&|r| r.ratio);
    let off_p99 = spread(&|r| r.off.latency.p99_ms);
    let on_p99 = spread(&|r| r.on.latency.p99_ms);
    println!(
        "tracing-overhead ({} runs, {} connections, {} s each, {}, sampled {}): export off {} req/s (p99 {} ms), export on {} req/s (p99 {} ms), ratio on/off {}",
        o.runs,
        o.conns,
        o.secs,
        protocol.env_value(),
        o.sample,
        off_s.show(0),
        off_p99.show(1),
        on_s.show(0),
        on_p99.show(1),
        ratio_s.show(3)
    );
    let result = json!({
        "benchmark": "tracing-overhead", "date": date, "machine": machine,
        "params": {"runs": o.runs, "secs": o.secs, "connections": o.conns, "http_workers": o.workers, "protocol": o.protocol, "sample": o.sample},
        "runs": runs,
        "summary": {"off_rps": off_s, "on_rps": on_s, "off_p99_ms": off_p99, "on_p99_ms": on_p99, "ratio_on_over_off": ratio_s},
    });
    let path = write_json(&o.out, "tracing-overhead", &result)?;
    println!("results: {}", path.display());
    Ok(())
}
