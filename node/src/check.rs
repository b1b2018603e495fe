//! `tether check <url>`: what the Helm chart's `helm test` pod runs against an installed
//! cluster, through the same Service devices use.
//!
//! Three steps, each retried until it passes or `--timeout-s` runs out: `GET /healthz`
//! answers 200; `GET /readyz` answers 200 "ready" (with `--expect-members`, that many
//! cluster members) three times in a row, each on a new connection, so a Service that
//! spreads connections over the pods checks several of them; and the device API answers
//! a request without credentials with its JSON 401. Every outcome is printed; the exit
//! code is 0 only when all passed.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use crate::config::CheckArgs;
use crate::error::{NodeError, Result};

/// Runs the check on a runtime of its own.
pub fn run(args: CheckArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::Internal(e.to_string()))?;
    rt.block_on(check(args))
}

fn fail(msg: impl Into<String>) -> NodeError {
    NodeError::Config(msg.into())
}

async fn client(args: &CheckArgs, base: &reqwest::Url) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(3))
        // A new connection per request: a Service balances connections, not requests.
        .pool_max_idle_per_host(0);
    if base.scheme() == "https" {
        let path = args.ca_file.as_ref().ok_or_else(|| {
            fail("an https:// URL needs --ca-file (the CA that signed the node's certificate)")
        })?;
        let pem = std::fs::read(path)
            .map_err(|e| fail(format!("reading --ca-file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| fail(format!("--ca-file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(fail(format!(
                "--ca-file {} holds no certificate",
                path.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some(host) = &args.connect_host {
        let name = base
            .host_str()
            .ok_or_else(|| fail(format!("{base} has no host")))?;
        let addr = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .map_err(|e| fail(format!("--connect-host {host}: {e}")))?
            .next()
            .ok_or_else(|| fail(format!("--connect-host {host} resolves to nothing")))?;
        b = b.resolve(name, addr);
    }
    b.build().map_err(|e| fail(format!("HTTP client: {e}")))
}

/// One attempt at a step: `Ok(description)` when it passed, `Err(why not)`.
type Attempt = std::result::Result<String, String>;

async fn healthz(http: &reqwest::Client, base: &reqwest::Url) -> Attempt {
    let r = get(http, base, "/healthz").await?;
    match r.0 {
        StatusCode::OK => Ok("alive".into()),
        s => Err(format!("{s} {}", r.1)),
    }
}

async fn readyz(
    http: &reqwest::Client,
    base: &reqwest::Url,
    expect_members: Option<usize>,
) -> Attempt {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, body) = get(http, base, "/readyz").await?;
        if status != StatusCode::OK {
            return Err(format!("{status} {body}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        let members = v["members"].as_u64().unwrap_or(0) as usize;
        if let Some(want) = expect_members {
            if members != want {
                return Err(format!("{members} members, expected {want}"));
            }
        }
        seen.push(members);
    }
    Ok(format!("ready 3 times in a row; members {seen:?}"))
}

async fn device_api(http: &reqwest::Client, base: &reqwest::Url) -> Attempt {
    let (status, body) = get(http, base, "/v1/buckets").await?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if status == StatusCode::UNAUTHORIZED && v["error"].is_string() {
        Ok(format!(
            "401 {} without credentials, as it must",
            v["error"]
        ))
    } else {
        Err(format!("expected a JSON 401, got {status} {body}"))
    }
}

async fn get(
    http: &reqwest::Client,
    base: &reqwest::Url,
    path: &str,
) -> std::result::Result<(StatusCode, String), String> {
    let url = base.join(path).map_err(|e| e.to_string())?;
    let r = http.get(url.clone()).send().await.map_err(|e| {
        // Show the whole cause chain: TLS failures hide below the first level.
        let mut msg = format!("GET {url}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    Ok((status, body))
}

async fn check(args: CheckArgs) -> Result<()> {
    let base = reqwest::Url::parse(&args.url)
        .map_err(|e| fail(format!("{:?} is not a URL: {e}", args.url)))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(fail(format!("{base}: expected http:// or https://")));
    }
    let http = client(&args, &base).await?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    println!("checking {base}");
    let steps: [&str; 3] = ["/healthz", "/readyz", "device API"];
    for step in steps {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let outcome = match step {
                "/healthz" => healthz(&http, &base).await,
                "/readyz" => readyz(&http, &base, args.expect_members).await,
                _ => device_api(&http, &base).await,
            };
            match outcome {
                Ok(what) => {
                    println!("ok   {step}: {what}");
                    break;
                }
                Err(why) if Instant::now() < deadline => {
                    if attempts == 1 || attempts % 10 == 0 {
                        println!("wait {step}: {why}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(why) => {
                    println!("FAIL {step}: {why}");
                    return Err(fail(format!("{step}: {why}")));
                }
            }
        }
    }
    println!("all checks passed");
    Ok(())
}
