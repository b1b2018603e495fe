//! Cold registrations through ONE node on PostgreSQL (issue 16, item 2), each figure
//! against baselines measured in the same run:
//!
//! - **batched**: the node as shipped — a new device's credentials, set and record are
//!   written by one batched store transaction shared with concurrent registrations;
//! - **general**: the same binary with `--bench-unbatched-registration` (the path every
//!   registration took before: issue the credentials, ensure the set through its actor —
//!   lease, load, commit — then read and write the device record);
//! - **embedded**: the same registrations against one node on its embedded store (redb).
//!
//! Printed per run: registrations/s of each and the ratios batched/general and
//! batched/embedded. Once per PostgreSQL variant, with `log_statement = all`, the SQL
//! statements PostgreSQL executed per registration (registrations one at a time, so
//! nothing is shared). Loopback, one machine: the node, PostgreSQL and the client share
//! its cores. Every loop is bounded (a fixed count of registrations, each with a timeout).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use tether_proto::credentials::basic_header;

use super::{now_utc, ratio, tether, write_json, Machine, Spread};

/// Options of `tether-bench register`.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// The `tether` binary (a release build).
    #[arg(long, default_value = "target/release/tether")]
    pub tether_bin: PathBuf,
    /// Repetitions.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// New devices registered per measurement.
    #[arg(long, default_value_t = 3000)]
    pub registrations: usize,
    /// Registrations in flight.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Registrations (one at a time) whose SQL statements are counted.
    #[arg(long, default_value_t = 20)]
    pub counted: usize,
    /// Results directory.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// One repetition.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// One PostgreSQL node, batched first contacts.
    pub batched_per_s: f64,
    /// One PostgreSQL node, the general path.
    pub general_per_s: f64,
    /// One node on its embedded store.
    pub embedded_per_s: f64,
    /// batched / general.
    pub batched_vs_general: f64,
    /// batched / embedded.
    pub batched_vs_embedded: f64,
}

/// The whole result.
#[derive(Debug, Serialize)]
pub struct Results {
    pub benchmark: &'static str,
    pub date: String,
    pub machine: Machine,
    pub registrations: usize,
    pub concurrency: usize,
    /// SQL statements PostgreSQL executed per cold registration, batched path.
    pub statements_batched: f64,
    /// The same, general path.
    pub statements_general: f64,
    /// SQL statements per `GET /v1/buckets` of a device registered by the batched path.
    pub statements_per_get_batched: f64,
    /// The same after the general path.
    pub statements_per_get_general: f64,
    pub runs: Vec<Run>,
    pub batched_per_s: Spread,
    pub general_per_s: Spread,
    pub batched_vs_general: Spread,
    pub batched_vs_embedded: Spread,
}

/// `tether-bench register`.
pub async fn run(o: Opts) -> Result<()> {
    let machine = Machine::probe();
    let (_, date) = now_utc();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.concurrency)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let pg = tether_node::store::pg_server::PgServer::start()
        .context("starting a private PostgreSQL (apt-get install postgresql)")?;

    let (statements_batched, get_batched) =
        statements_per_registration(&http, &pg, &o, false).await?;
    let (statements_general, get_general) =
        statements_per_registration(&http, &pg, &o, true).await?;
    println!(
        "SQL statements per cold registration (one at a time): batched {statements_batched:.1}, general {statements_general:.1}; \
         per GET /v1/buckets of a registered device right after: {get_batched:.1} (batched), {get_general:.1} (general)"
    );

    let mut runs = Vec::new();
    for r in 0..o.runs {
        let embedded = tether::start(&o.tether_bin, &[]).await?;
        let embedded_per_s = registrations(&http, &embedded, &format!("RE{r}X"), &o).await?;
        embedded.server.stop().await;
        let general_per_s = on_postgres(&http, &pg, &o, &format!("general{r}"), true).await?;
        let batched_per_s = on_postgres(&http, &pg, &o, &format!("batched{r}"), false).await?;
        let run = Run {
            batched_vs_general: ratio(batched_per_s, general_per_s),
            batched_vs_embedded: ratio(batched_per_s, embedded_per_s),
            batched_per_s,
            general_per_s,
            embedded_per_s,
        };
        println!(
            "run {}: cold registrations/s, one node on PostgreSQL: batched {:.0} / general {:.0} = {:.2}; one node on its embedded store {:.0} (batched/embedded {:.2})",
            r + 1,
            run.batched_per_s,
            run.general_per_s,
            run.batched_vs_general,
            run.embedded_per_s,
            run.batched_vs_embedded
        );
        runs.push(run);
    }
    let spread = |f: fn(&Run) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let results = Results {
        benchmark: "register",
        date,
        machine,
        registrations: o.registrations,
        concurrency: o.concurrency,
        statements_batched,
        statements_general,
        statements_per_get_batched: get_batched,
        statements_per_get_general: get_general,
        batched_per_s: spread(|r| r.batched_per_s),
        general_per_s: spread(|r| r.general_per_s),
        batched_vs_general: spread(|r| r.batched_vs_general),
        batched_vs_embedded: spread(|r| r.batched_vs_embedded),
        runs,
    };
    println!(
        "cold registrations/s on one PostgreSQL node: batched {}, general {}; batched/general {}; batched/embedded {}",
        results.batched_per_s.show(0),
        results.general_per_s.show(0),
        results.batched_vs_general.show(2),
        results.batched_vs_embedded.show(2)
    );
    let path = write_json(&o.out, "register", &results)?;
    println!("results: {}", path.display());
    Ok(())
}

fn node_args(store: &str, general: bool) -> Vec<&str> {
    let mut args = vec!["--store", store];
    if general {
        args.push("--bench-unbatched-registration");
    }
    args
}

/// Registrations/s through a fresh node on a fresh database of `pg`.
async fn on_postgres(
    http: &reqwest::Client,
    pg: &tether_node::store::pg_server::PgServer,
    o: &Opts,
    db: &str,
    general: bool,
) -> Result<f64> {
    let url = pg.url(db).context("benchmark database")?;
    let node = tether::start(&o.tether_bin, &node_args(&url, general)).await?;
    let per_s = registrations(http, &node, &format!("R{}X", db.to_uppercase()), o).await;
    node.server.stop().await;
    per_s
}

/// Registers `o.registrations` new devices through `node`; per second.
async fn registrations(
    http: &reqwest::Client,
    node: &tether::TetherNode,
    prefix: &str,
    o: &Opts,
) -> Result<f64> {
    let started = Instant::now();
    tether::register_many(
        http,
        node.url(),
        &node.mfg_key,
        prefix,
        o.registrations,
        o.concurrency,
    )
    .await
    .context("cold registrations")?;
    Ok(o.registrations as f64 / started.elapsed().as_secs_f64())
}

/// SQL statements PostgreSQL logs (`log_statement = all`) per registration of a new
/// device, registered one at a time after a warm-up (schema, prepared statements), and
/// per `GET /v1/buckets` of each such device right after (assigned credentials).
async fn statements_per_registration(
    http: &reqwest::Client,
    pg: &tether_node::store::pg_server::PgServer,
    o: &Opts,
    general: bool,
) -> Result<(f64, f64)> {
    let db = if general {
        "count_general"
    } else {
        "count_batched"
    };
    let url = pg.url(db).context("benchmark database")?;
    let node = tether::start(&o.tether_bin, &node_args(&url, general)).await?;
    let prefix = if general { "CNTG" } else { "CNTB" };
    tether::register_many(http, node.url(), &node.mfg_key, &format!("{prefix}W"), 8, 1)
        .await
        .context("warm-up registrations")?;
    pg.psql("ALTER SYSTEM SET log_statement = 'all'")
        .and_then(|_| pg.psql("SELECT pg_reload_conf()"))
        .context("log_statement")?;
    // The reload reaches every backend before it runs its next statement.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = count_statements(&pg.log_text());
    let devices = tether::register_many(
        http,
        node.url(),
        &node.mfg_key,
        &format!("{prefix}C"),
        o.counted,
        1,
    )
    .await
    .context("counted registrations")?;
    let registered = count_statements(&pg.log_text());
    // Then each device reads its buckets with its assigned credentials, one at a time.
    for (serial, creds) in &devices {
        let r = http
            .get(format!("{}/v1/buckets?view=full", node.url()))
            .header(AUTHORIZATION, basic_header(creds))
            .send()
            .await
            .with_context(|| format!("GET /v1/buckets as {serial}"))?;
        anyhow::ensure!(
            r.status().is_success(),
            "GET /v1/buckets as {serial}: {}",
            r.status()
        );
    }
    pg.psql("ALTER SYSTEM RESET log_statement")
        .and_then(|_| pg.psql("SELECT pg_reload_conf()"))
        .context("log_statement")?;
    let read = count_statements(&pg.log_text());
    node.server.stop().await;
    let n = o.counted.max(1) as f64;
    Ok((
        (registered - before) as f64 / n,
        (read - registered) as f64 / n,
    ))
}

/// Statements logged so far (simple-query `statement:` and extended-protocol `execute`
/// lines), the benchmark's own `psql` excepted; only one node runs meanwhile.
fn count_statements(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
        .filter(|l| !l.contains("ALTER SYSTEM") && !l.contains("pg_reload_conf"))
        .count()
}
