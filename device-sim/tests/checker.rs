//! The simulator's checker against deliberately misbehaving servers (not the real node):
//! one answers subscribes with an older version than it served before, one holds every
//! subscribe and never notifies, and one acknowledges and notifies every write but loses
//! the companions' writes from its final state. The checker must catch each and the binary
//! must exit non-zero. And one honest server whose subscribe answers travel slowly, so
//! that the device's own later PUT answers overtake them: not a violation.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use tether_proto::api::{
    ChangeDoc, HistoryResponse, RegisterRequest, SubscribeRequest, UpdateRequest,
};
use tether_proto::credentials::{assigned_secret, SET_CREDENTIALS_HEADER};
use tether_proto::synclog::ChangeKind;
use tether_proto::Fields;
use tether_sim::checker::Violation;
use tether_sim::fleet::{self, SimConfig};
use tokio::sync::watch;

/// How the fake server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Subscribe answers at once with each bucket one version older than the client holds.
    RegressVersions,
    /// Subscribe is held until its timeout and answered empty, whatever changed.
    NeverNotify,
    /// Subscribe is honest (answers with whatever is newer than the client holds, or at
    /// the first change), but reads (`GET /v1/buckets`) have lost every `companion` field:
    /// acknowledged writes missing from the final state.
    ForgetsWrites,
    /// Honest, but each subscribe answer waits 300 ms after it was made: the device's own
    /// PUTs, answered at once on another connection, arrive first with newer versions.
    SlowSubscribeAnswers,
}

/// A tiny in-memory "server" speaking just enough of API.md for a device and a companion.
#[derive(Debug)]
struct Fake {
    mode: Misbehaviour,
    base: OnceLock<String>,
    buckets: Mutex<HashMap<String, (u64, Fields)>>,
    /// Every write's change, per bucket: an honest history (also for `ForgetsWrites`,
    /// whose fault is in its reads), so the audit's op-id check passes and only the lost
    /// fields are reported.
    history: Mutex<HashMap<String, Vec<ChangeDoc>>>,
    /// Bumped on every write, waking held subscribes.
    changes: watch::Sender<u64>,
}

/// The field the companion writer owns (see `fleet`).
const COMPANION: &str = tether_sim::fleet::COMPANION_FIELD;

/// Buckets start here so a regression below it is possible.
const FIRST_VERSION: u64 = 5;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn doc(id: &str, version: u64, value: &Fields) -> Value {
    json!({"id": id, "timestamp": 1_000 + version, "version": version, "value": value})
}

async fn register(fake: web::Data<Fake>, body: web::Json<RegisterRequest>) -> HttpResponse {
    let serial = body.device_id.clone();
    let ids = vec![format!("device.{serial}"), format!("shared.{serial}")];
    {
        let mut b = fake.buckets.lock().expect("lock");
        for id in &ids {
            b.entry(id.clone())
                .or_insert((FIRST_VERSION, Fields::new()));
        }
    }
    HttpResponse::Ok()
        .insert_header((
            SET_CREDENTIALS_HEADER,
            format!("a.{serial} {}", assigned_secret([7; 16])),
        ))
        .json(json!({
            "tier": "production", "redirect": null, "software_update": null,
            "sync_url": fake.base.get().cloned().unwrap_or_default(), "buckets": ids,
        }))
}

async fn fetch(fake: web::Data<Fake>, req: HttpRequest) -> HttpResponse {
    let q = req.query_string();
    let ids: Vec<&str> = q
        .split('&')
        .find_map(|kv| kv.strip_prefix("ids="))
        .map(|v| v.split(',').collect())
        .unwrap_or_default();
    let b = fake.buckets.lock().expect("lock");
    let docs: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            b.get(*id).map(|(v, f)| {
                let mut f = f.clone();
                if fake.mode == Misbehaviour::ForgetsWrites {
                    f.remove(COMPANION);
                }
                doc(id, *v, &f)
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({ "buckets": docs }))
}

/// The buckets of `held` that are newer in the fake than the client holds.
fn newer(fake: &Fake, held: &SubscribeRequest) -> Vec<Value> {
    let b = fake.buckets.lock().expect("lock");
    held.buckets
        .iter()
        .filter_map(|h| {
            let (v, f) = b.get(&h.id)?;
            h.version
                .is_none_or(|held| held < *v)
                .then(|| doc(&h.id, *v, f))
        })
        .collect()
}

async fn subscribe(fake: web::Data<Fake>, body: web::Json<SubscribeRequest>) -> HttpResponse {
    match fake.mode {
        Misbehaviour::RegressVersions => {
            let docs: Vec<Value> = body
                .buckets
                .iter()
                .filter_map(|h| {
                    let held = h.version?;
                    (held > 1).then(|| doc(&h.id, held - 1, &Fields::new()))
                })
                .collect();
            HttpResponse::Ok().json(json!({ "buckets": docs }))
        }
        Misbehaviour::NeverNotify => {
            let hold = body.timeout_ms.unwrap_or(1_000).min(5_000);
            tokio::time::sleep(Duration::from_millis(hold)).await;
            HttpResponse::Ok().json(json!({ "buckets": [] }))
        }
        Misbehaviour::ForgetsWrites | Misbehaviour::SlowSubscribeAnswers => {
            let hold = Duration::from_millis(body.timeout_ms.unwrap_or(1_000).min(5_000));
            let until = tokio::time::Instant::now() + hold;
            let mut changes = fake.changes.subscribe();
            loop {
                let docs = newer(&fake, &body);
                if !docs.is_empty() {
                    if fake.mode == Misbehaviour::SlowSubscribeAnswers {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    return HttpResponse::Ok().json(json!({ "buckets": docs }));
                }
                match tokio::time::timeout_at(until, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => {
                        return HttpResponse::Ok().json(json!({ "buckets": [] }))
                    }
                }
            }
        }
    }
}

async fn put(
    fake: web::Data<Fake>,
    id: web::Path<String>,
    body: web::Json<UpdateRequest>,
) -> HttpResponse {
    let mut b = fake.buckets.lock().expect("lock");
    let Some((version, fields)) = b.get_mut(id.as_str()) else {
        return HttpResponse::NotFound()
            .json(json!({"error": "not_found", "message": "no such bucket"}));
    };
    *version += 1;
    let body = body.into_inner();
    fields.extend(body.value.clone());
    let version = *version;
    drop(b);
    let timestamp = now_ms();
    fake.history
        .lock()
        .expect("lock")
        .entry(id.to_string())
        .or_default()
        .push(ChangeDoc {
            version,
            timestamp,
            outcome: ChangeKind::Applied,
            by: "device".into(),
            session: body.session,
            op_id: body.op_id,
            fields: body.value,
        });
    fake.changes.send_modify(|n| *n += 1);
    HttpResponse::Ok().json(json!({
        "outcome": "applied", "id": id.as_str(), "timestamp": timestamp, "version": version,
    }))
}

/// `GET /v1/buckets/{id}/history`: every change after `since_version`, in one page.
async fn history(fake: web::Data<Fake>, id: web::Path<String>, req: HttpRequest) -> HttpResponse {
    let since: u64 = req
        .query_string()
        .split('&')
        .find_map(|kv| kv.strip_prefix("since_version="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if !fake.buckets.lock().expect("lock").contains_key(id.as_str()) {
        return HttpResponse::NotFound()
            .json(json!({"error": "not_found", "message": "no such bucket"}));
    }
    let changes: Vec<ChangeDoc> = fake
        .history
        .lock()
        .expect("lock")
        .get(id.as_str())
        .map(|h| h.iter().filter(|c| c.version > since).cloned().collect())
        .unwrap_or_default();
    HttpResponse::Ok().json(HistoryResponse {
        id: id.to_string(),
        oldest_version: FIRST_VERSION + 1,
        truncated: false,
        next_since_version: None,
        changes,
    })
}

/// Starts a fake server on its own thread (an actix system of its own); its base URL.
fn start_fake(mode: Misbehaviour) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sys = actix_rt::System::new();
        sys.block_on(async move {
            let fake = web::Data::new(Fake {
                mode,
                base: OnceLock::new(),
                buckets: Mutex::new(HashMap::new()),
                history: Mutex::new(HashMap::new()),
                changes: watch::channel(0).0,
            });
            let data = fake.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .route("/v1/register", web::post().to(register))
                    .route("/v1/buckets", web::get().to(fetch))
                    .route("/v1/subscribe", web::post().to(subscribe))
                    .route("/v1/buckets/{id}", web::put().to(put))
                    .route("/v1/buckets/{id}/history", web::get().to(history))
            })
            .workers(1)
            .bind(("127.0.0.1", 0))
            .expect("bind fake server");
            let addr = server.addrs()[0];
            let base = format!("http://{addr}");
            let _ = fake.base.set(base.clone());
            tx.send(base).expect("report the fake's address");
            server.run().await.expect("fake server");
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("fake server started")
}

fn small_fleet(url: &str) -> SimConfig {
    let mut cfg = SimConfig::new(url, vec![0x42; 64], "k1");
    cfg.devices = 3;
    cfg.duration = Duration::from_secs(2);
    cfg.ramp = Duration::from_millis(100);
    cfg.notify_deadline = Duration::from_millis(800);
    cfg.subscribe_timeout_ms = 700;
    cfg.request_timeout = Duration::from_secs(3);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_regression_is_caught() {
    let url = start_fake(Misbehaviour::RegressVersions);
    let mut cfg = small_fleet(&url);
    cfg.update_rate = 0.0;
    cfg.companion_rate = 0.0;
    let report = fleet::run(cfg).await.expect("run the fleet");
    assert_eq!(report.connected, 3, "every device connected: {report:?}");
    assert!(!report.ok(), "the checker must fail this run");
    let regressions: Vec<&Violation> = report
        .violations
        .iter()
        .filter(|v| {
            matches!(v, Violation::VersionRegression { held, received, .. }
                if *held == FIRST_VERSION && *received == FIRST_VERSION - 1)
        })
        .collect();
    // Two buckets per device, each regressed.
    assert_eq!(regressions.len(), 6, "violations: {:?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_notification_is_caught_and_fails_the_binary() {
    let url = start_fake(Misbehaviour::NeverNotify);
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k1.key");
    std::fs::write(&key, "42".repeat(64)).expect("write key");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-sim"))
            .args(["--url", &url, "--mfg-key-file"])
            .arg(&key)
            .args([
                "--devices",
                "3",
                "--duration-s",
                "2",
                "--ramp-s",
                "0.1",
                "--update-rate",
                "1",
                "--companion-rate",
                "2",
                "--notify-deadline-ms",
                "800",
                "--subscribe-timeout-ms",
                "700",
                "--json",
            ])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("tether-sim finished within 60 s")
    .expect("run tether-sim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missed notification must exit 1; stderr: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json summary");
    let violations = report["violations"].as_array().expect("violations array");
    assert!(
        !violations.is_empty()
            && violations
                .iter()
                .all(|v| v["kind"] == "missed_notification" && v["writer"] == COMPANION),
        "expected only missed notifications, got {violations:?}"
    );
    assert!(
        report["writer_updates"].as_u64().unwrap_or(0) >= violations.len() as u64,
        "every violation is an acknowledged write: {report}"
    );
    assert!(stderr.contains("MISSED NOTIFICATION"), "printed: {stderr}");
    // The devices' own writes were acknowledged: only other clients' changes are demanded.
    assert!(
        report["device_updates"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_write_missing_from_the_final_state_is_caught_by_the_audit() {
    let url = start_fake(Misbehaviour::ForgetsWrites);
    let mut cfg = small_fleet(&url);
    cfg.update_rate = 2.0;
    cfg.companion_rate = 4.0;
    // Generous: delivery is honest here, and a late notification on a loaded 2-core
    // machine must not pass for the lost write this test is about.
    cfg.notify_deadline = Duration::from_secs(10);
    cfg.audit = true;
    let report = fleet::run(cfg).await.expect("run the fleet");
    assert_eq!(report.audited, Some(3), "every device was read: {report:?}");
    assert!(
        report.writer_updates > 0 && report.device_updates > 0,
        "{report:?}"
    );
    // Delivery was honest: the only violations are the companions' lost writes, one per
    // device that had one acknowledged, each naming the highest acknowledged number.
    assert!(!report.ok(), "the audit must fail this run: {report:?}");
    for v in &report.violations {
        assert!(
            matches!(v, Violation::LostWrite { bucket, writer, seq, found: None, .. }
                if bucket.starts_with("shared.") && writer == COMPANION && *seq >= 1),
            "unexpected violation {v}; all: {:?}",
            report.violations
        );
    }
    assert!(report.violations.len() <= 3, "{:?}", report.violations);
    // The devices' own writes (`current_temperature` in `device.*`) were kept, and were
    // audited.
    assert!(report
        .violations
        .iter()
        .all(|v| !v.to_string().contains(tether_sim::fleet::DEVICE_FIELD)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_overtaken_by_the_devices_own_put_is_not_a_regression() {
    let url = start_fake(Misbehaviour::SlowSubscribeAnswers);
    let mut cfg = small_fleet(&url);
    cfg.update_rate = 8.0;
    cfg.companion_rate = 0.0;
    cfg.duration = Duration::from_secs(3);
    let report = fleet::run(cfg).await.expect("run the fleet");
    assert!(
        report.ok(),
        "reordered answers are not violations: {}",
        report.human()
    );
    assert!(
        report.errors.is_empty(),
        "reordered answers are not errors: {}",
        report.human()
    );
    assert!(
        report.late_answers > 0,
        "the run produced overtaken answers (else it tests nothing): {}",
        report.human()
    );
}
