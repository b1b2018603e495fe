//! Blobs (issue 18): a blob uploaded whole and downloaded whole through one node, against
//! the same bytes copied from file to file on the same disk in the same run (`fs::copy`
//! then `fsync`: a node acknowledges an upload only once it is durable), and the node's
//! memory per upload in progress: `concurrent` uploads started (announced, headers and the
//! first 100 KiB of the body sent) and held open, the node's RSS before and while they
//! wait.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;
use serde_json::json;
use tether_proto::credentials::{basic_header, Credentials};
use tokio::io::AsyncWriteExt;

use super::plot::{self, Panel};
use super::{now_utc, ratio, tether, write_json, Machine, Spread};

/// Options of `tether-bench blobs`.
#[derive(Debug, Clone)]
pub struct Opts {
    /// The `tether` binary.
    pub tether_bin: PathBuf,
    /// Repetitions (a fresh node each).
    pub runs: usize,
    /// Size of the blob timed, MiB.
    pub mib: usize,
    /// Uploads held open at once for the memory figure.
    pub concurrent: usize,
    /// Where results go.
    pub out: PathBuf,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Upload (announce, then one PUT of the whole blob) through the node, MB/s.
    pub upload_mb_s: f64,
    /// Download (one GET of the whole blob), MB/s.
    pub download_mb_s: f64,
    /// The same bytes copied file to file and fsynced, MB/s.
    pub copy_mb_s: f64,
    /// upload / copy.
    pub upload_over_copy: f64,
    /// download / copy.
    pub download_over_copy: f64,
    /// Node RSS growth per upload held open, KiB.
    pub kib_per_upload: f64,
}

/// Bytes that differ from chunk to chunk.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mb_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

async fn announce(
    http: &reqwest::Client,
    url: &str,
    creds: &Credentials,
    sha: &str,
    size: usize,
) -> Result<()> {
    let r = http
        .post(format!("{url}/v1/blobs"))
        .header(AUTHORIZATION, basic_header(creds))
        .json(&json!({"sha256": sha, "size": size, "content_type": "application/octet-stream"}))
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("announce {sha}: {}", r.status());
    }
    Ok(())
}

/// The copy baseline: `bytes` written to a file (not timed), then copied and fsynced.
fn copy_baseline(bytes: &[u8]) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut f = std::fs::File::create(&a)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    let t0 = Instant::now();
    std::fs::copy(&a, &b)?;
    std::fs::File::open(&b)?.sync_all()?;
    Ok(t0.elapsed())
}

/// Node RSS growth per upload held open (KiB).
async fn memory_per_upload(
    http: &reqwest::Client,
    node: &tether::TetherNode,
    creds: &Credentials,
    n: usize,
) -> Result<f64> {
    let url = node.url().to_string();
    let addr = url
        .strip_prefix("http://")
        .context("a plain http node URL")?
        .to_string();
    let size = 1 << 20;
    let mut blobs = Vec::with_capacity(n);
    for i in 0..n {
        let bytes = content(size, 1_000 + i as u64);
        let sha = sha256_hex(&bytes);
        announce(http, &url, creds, &sha, size).await?;
        blobs.push((sha, bytes));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = node.server.rss_kib();
    let auth = basic_header(creds);
    let mut held = Vec::with_capacity(n);
    for (sha, bytes) in &blobs {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        let head = format!(
            "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: bench\r\nAuthorization: {auth}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(&bytes[..100 * 1024]).await?;
        s.flush().await?;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = node.server.rss_kib();
    drop(held);
    Ok(during.saturating_sub(before) as f64 / n.max(1) as f64)
}

/// `tether-bench blobs`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(300))
        .build()?;
    let size = o.mib << 20;
    let max = (size + (1 << 20)).to_string();
    let mut runs = Vec::new();
    for r in 0..o.runs {
        let node = tether::start(&o.tether_bin, &["--max-blob-bytes", &max]).await?;
        let url = node.url().to_string();
        let creds = tether::register(&http, &url, &node.mfg_key, "BLOBBENCH1").await?;
        let bytes = content(size, r as u64);
        let sha = sha256_hex(&bytes);

        let copy = copy_baseline(&bytes)?;

        let t0 = Instant::now();
        announce(&http, &url, &creds, &sha, size).await?;
        let put = http
            .put(format!("{url}/v1/blobs/{sha}"))
            .header(AUTHORIZATION, basic_header(&creds))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.clone())
            .send()
            .await?;
        if put.status().as_u16() != 201 {
            bail!("upload: {}", put.status());
        }
        let upload = t0.elapsed();

        let t0 = Instant::now();
        let got = http
            .get(format!("{url}/v1/blobs/{sha}"))
            .header(AUTHORIZATION, basic_header(&creds))
            .send()
            .await?;
        if !got.status().is_success() {
            bail!("download: {}", got.status());
        }
        let body = got.bytes().await?;
        let download = t0.elapsed();
        if body.len() != size || sha256_hex(&body) != sha {
            bail!("download: {} bytes, not the blob uploaded", body.len());
        }

        let kib_per_upload = memory_per_upload(&http, &node, &creds, o.concurrent).await?;
        node.server.stop().await;
        let (up, down, cp) = (mb_s(size, upload), mb_s(size, download), mb_s(size, copy));
        let run = Run {
            upload_mb_s: up,
            download_mb_s: down,
            copy_mb_s: cp,
            upload_over_copy: ratio(up, cp),
            download_over_copy: ratio(down, cp),
            kib_per_upload,
        };
        eprintln!(
            "run {}: {} MiB upload {:.1} MB/s, download {:.1} MB/s, file copy + fsync {:.1} MB/s → upload/copy {:.2}, download/copy {:.2}; {:.0} KiB per upload held open ({} at once)",
            r + 1,
            o.mib,
            run.upload_mb_s,
            run.download_mb_s,
            run.copy_mb_s,
            run.upload_over_copy,
            run.download_over_copy,
            run.kib_per_upload,
            o.concurrent
        );
        runs.push(run);
    }
    let spread = |f: &dyn Fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let (up, down, cp) = (
        spread(&|r| r.upload_mb_s),
        spread(&|r| r.download_mb_s),
        spread(&|r| r.copy_mb_s),
    );
    let (up_r, down_r) = (
        spread(&|r| r.upload_over_copy),
        spread(&|r| r.download_over_copy),
    );
    let mem = spread(&|r| r.kib_per_upload);
    println!(
        "blobs ({} runs, {} MiB): upload {} MB/s, download {} MB/s, file copy + fsync {} MB/s; upload/copy {}, download/copy {}; {} KiB per upload held open ({} at once)",
        o.runs,
        o.mib,
        up.show(1),
        down.show(1),
        cp.show(1),
        up_r.show(2),
        down_r.show(2),
        mem.show(0),
        o.concurrent
    );
    let result = json!({
        "benchmark": "blobs", "date": date, "machine": machine,
        "params": {"runs": o.runs, "mib": o.mib, "concurrent": o.concurrent},
        "runs": runs,
        "summary": {"upload_mb_s": up, "download_mb_s": down, "copy_mb_s": cp,
                    "upload_over_copy": up_r, "download_over_copy": down_r,
                    "kib_per_upload": mem},
    });
    let path = write_json(&o.out, "blobs", &result)?;
    plot::bars(
        &o.out.join("blobs.png"),
        "Blobs through one node vs a file copy (same run)",
        &[
            Panel::new(
                "throughput",
                "MB/s",
                vec![
                    ("upload".into(), up),
                    ("download".into(), down),
                    ("file copy".into(), cp),
                ],
            ),
            Panel::new(
                "vs file copy",
                "ratio",
                vec![("upload".into(), up_r), ("download".into(), down_r)],
            ),
            Panel::new(
                "per upload held open",
                "KiB RSS",
                vec![("node".into(), mem)],
            ),
        ],
    )?;
    println!("results: {}", path.display());
    Ok(())
}
