//! A kubelet for one pod: its network namespace (own IP), its volumes laid out as kubelet
//! lays them out, its container run from the image's root filesystem exactly as the
//! template says, its probes, restarts, and termination.
//!
//! - **Volumes**: a Secret or ConfigMap volume is kubelet's atomic-writer layout — the
//!   files in a timestamped directory, `..data` pointing at it, each visible name a
//!   symlink through `..data`, owned `root:<fsGroup>` with the volume's `defaultMode` —
//!   and an update swaps `..data` in one rename ([`Pod::sync_volumes`]). An emptyDir is a
//!   fresh directory, group-writable for `fsGroup`.
//! - **Container**: `ip netns exec <pod> unshare --mount --uts` → in that private mount
//!   namespace the image's root filesystem is bind-mounted onto itself, every volume
//!   bind-mounted at its `mountPath` (read-only when the mount says so), the namespace's
//!   resolv.conf (search `<ns>.svc.<domain> svc.<domain> <domain>`, `ndots:5`) at
//!   /etc/resolv.conf, /proc, /sys, the basic /dev nodes; the root is remounted read-only
//!   (`readOnlyRootFilesystem`); then `chroot --userspec=<runAsUser>:<runAsGroup>
//!   --groups=<fsGroup>` runs the image's entrypoint with the template's `args`, `$(VAR)`
//!   expanded, and an environment of exactly the image's `Env` and the template's `env`.
//!   The process that is spawned *is* the container's process (every step `exec`s).
//! - **Probes**: httpGet from the host namespace (as kubelet probes from the node) to the
//!   pod's IP, TLS not verified (as kubelet does), with the template's delays, periods,
//!   timeouts and thresholds; startup gates the others; a failed liveness or startup probe
//!   restarts the container (graceful: preStop, SIGTERM, SIGKILL at the grace period).
//! - **Restarts**: an exited container is started again (restartPolicy Always) after 1 s.
//! - **Termination** ([`Pod::terminate`]): not ready at once, the preStop `sleep`, SIGTERM,
//!   SIGKILL when the grace period (counted from the start) runs out; the result says
//!   whether SIGKILL was needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether_test_support::netns::Namespace;
use tokio::sync::watch;

use crate::image::Image;
use crate::pod::{PodTemplate, Probe, Source};

/// Secrets and ConfigMaps the pods mount: the API server's objects the chart references
/// but never renders (existingSecret).
#[derive(Debug, Default)]
pub struct Objects {
    /// Secret name → key → bytes.
    pub secrets: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
    /// ConfigMap name → key → bytes.
    pub config_maps: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl Objects {
    /// Sets one key of a Secret.
    pub fn set_secret(&self, name: &str, key: &str, value: impl Into<Vec<u8>>) {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
    }

    fn files(&self, source: &Source) -> Result<Vec<(String, Vec<u8>)>> {
        let (map, name, items) = match source {
            Source::Secret { name, items, .. } => (&self.secrets, name, items),
            Source::ConfigMap { name, items, .. } => (&self.config_maps, name, items),
            Source::EmptyDir => return Ok(Vec::new()),
        };
        let map = map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(data) = map.get(name) else {
            bail!("{name} does not exist (the pod would stay ContainerCreating)");
        };
        if items.is_empty() {
            return Ok(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
        items
            .iter()
            .map(|(key, path)| {
                data.get(key)
                    .map(|v| (path.clone(), v.clone()))
                    .with_context(|| format!("{name} has no key {key}"))
            })
            .collect()
    }
}

/// What a pod needs from its surroundings.
#[derive(Debug, Clone)]
pub struct PodEnv {
    /// The Kubernetes namespace it runs in.
    pub namespace: String,
    /// Its resolv.conf.
    pub resolv_conf: String,
    /// The image.
    pub image: &'static Image,
    /// The API objects its volumes come from.
    pub objects: Arc<Objects>,
}

/// How a termination went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// The container exited before the grace period ran out (no SIGKILL).
    pub graceful: bool,
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// From the deletion to the exit.
    pub took: Duration,
}

#[derive(Debug)]
struct State {
    ready: watch::Sender<bool>,
    started: AtomicBool,
    terminating: AtomicBool,
    restarts: AtomicU32,
    pid: Mutex<Option<u32>>,
    exit_code: Mutex<Option<i32>>,
    exited: watch::Sender<u64>,
    events: Mutex<Vec<String>>,
    log_dir: PathBuf,
    since: Instant,
}

impl State {
    fn event(&self, what: String) {
        let line = format!("{:>7.2}s {what}", self.since.elapsed().as_secs_f64());
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }
}

/// A running pod.
#[derive(Debug)]
pub struct Pod {
    /// Its name (`<statefulset>-<ordinal>`).
    pub name: String,
    /// The template it was created from.
    pub template: Arc<PodTemplate>,
    ns: Namespace,
    state: Arc<State>,
    dir: tempfile::TempDir,
    env: PodEnv,
    worker: tokio::task::JoinHandle<()>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

/// Writes (or swaps in) a volume's files in kubelet's atomic-writer layout.
fn write_atomic(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    mode: u32,
    fs_group: Option<u32>,
) -> Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    static GENERATION: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(dir)?;
    let generation = format!("..gen{}", GENERATION.fetch_add(1, Ordering::Relaxed));
    let data = dir.join(&generation);
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    for (path, bytes) in files {
        let f = data.join(path);
        std::fs::write(&f, bytes)?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = fs_group {
            chown(&f, 0, g)?;
        }
        let visible = dir.join(path);
        if std::fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(path), &visible)?;
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&generation, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    Ok(())
}

impl Pod {
    /// Creates the pod in `ns` (its IP is the pod IP) and starts its container.
    pub fn start(
        name: &str,
        template: Arc<PodTemplate>,
        ns: Namespace,
        env: PodEnv,
    ) -> Result<Pod> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pod-{name}-"))
            .tempdir()
            .context("pod dir")?;
        ns.set_resolv_conf(&env.resolv_conf)?;
        for m in &template.mounts {
            env.image.mount_point(&m.path)?;
        }
        let state = Arc::new(State {
            ready: watch::channel(false).0,
            started: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            restarts: AtomicU32::new(0),
            pid: Mutex::new(None),
            exit_code: Mutex::new(None),
            exited: watch::channel(0).0,
            events: Mutex::new(Vec::new()),
            log_dir: dir.path().to_path_buf(),
            since: Instant::now(),
        });
        let mut pod = Pod {
            name: name.to_string(),
            template,
            ns,
            state,
            dir,
            env,
            worker: tokio::spawn(async {}),
        };
        pod.sync_volumes()?;
        let command = pod.container_command()?;
        pod.worker = tokio::spawn(run_container(
            command,
            pod.template.clone(),
            pod.ns.ip().to_string(),
            pod.state.clone(),
        ));
        pod.state.event(format!("created, IP {}", pod.ns.ip()));
        Ok(pod)
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name)
    }

    /// Lays out every volume from the current API objects (an update swaps `..data`).
    pub fn sync_volumes(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (name, source) in &self.template.volumes {
            let dir = self.volume_dir(name);
            match source {
                Source::EmptyDir => {
                    if !dir.exists() {
                        std::fs::create_dir_all(&dir)?;
                        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                    }
                }
                Source::Secret { mode, .. } | Source::ConfigMap { mode, .. } => {
                    let files = self.env.objects.files(source)?;
                    let current: Vec<(String, Vec<u8>)> = files
                        .iter()
                        .filter_map(|(p, _)| {
                            std::fs::read(dir.join(p)).ok().map(|b| (p.clone(), b))
                        })
                        .collect();
                    if current != files {
                        write_atomic(&dir, &files, *mode, self.template.fs_group)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The argv that runs the container (see the module docs).
    fn container_command(&self) -> Result<Vec<String>> {
        let t = &self.template;
        let image = self.env.image;
        let env = t.resolve_env(&self.name, &self.env.namespace, &self.ns.ip().to_string())?;
        let args = t.resolve_args(&env);
        let entry = t
            .command
            .clone()
            .unwrap_or_else(|| image.entrypoint.clone());
        if entry.is_empty() {
            bail!("no command and no image entrypoint");
        }
        let root = image.rootfs.display().to_string();
        let mut script = vec!["set -e".to_string(), format!("R={}", quote(&root))];
        script.push(r#"mount --bind "$R" "$R""#.into());
        let mut mounts = t.mounts.clone();
        mounts.sort_by_key(|m| m.path.len());
        for m in &mounts {
            let src = self.volume_dir(&m.volume).display().to_string();
            let dst = format!("\"$R\"{}", quote(&m.path));
            script.push(format!("mount --bind {} {dst}", quote(&src)));
            if m.read_only {
                script.push(format!("mount -o remount,bind,ro {dst}"));
            }
        }
        script.push(r#"mount --bind /etc/resolv.conf "$R/etc/resolv.conf""#.into());
        for d in ["null", "zero", "random", "urandom"] {
            script.push(format!(r#"mount --bind /dev/{d} "$R/dev/{d}""#));
        }
        script.push(r#"mount -t proc proc "$R/proc""#.into());
        script.push(r#"mount -t sysfs -o ro sysfs "$R/sys""#.into());
        script.push(format!("hostname {}", quote(&self.name)));
        if t.read_only_root {
            script.push(r#"mount -o remount,bind,ro "$R""#.into());
        }
        let mut exec = vec!["exec /usr/bin/env -i".to_string()];
        for kv in &image.env {
            exec.push(quote(kv));
        }
        exec.push(quote(&format!("HOSTNAME={}", self.name)));
        for (k, v) in &env {
            exec.push(quote(&format!("{k}={v}")));
        }
        exec.push(format!("/usr/sbin/chroot --userspec={}:{}", t.uid, t.gid));
        if let Some(g) = t.fs_group {
            exec.push(format!("--groups={g}"));
        }
        exec.push(r#""$R""#.into());
        for a in entry.iter().chain(args.iter()) {
            exec.push(quote(a));
        }
        script.push(exec.join(" "));
        Ok(vec![
            "/usr/sbin/ip".into(),
            "netns".into(),
            "exec".into(),
            self.ns.name().to_string(),
            "/usr/bin/unshare".into(),
            "--mount".into(),
            "--uts".into(),
            "--propagation".into(),
            "private".into(),
            "/bin/sh".into(),
            "-c".into(),
            script.join("\n"),
        ])
    }

    /// The pod's IP.
    pub fn ip(&self) -> std::net::Ipv4Addr {
        self.ns.ip()
    }

    /// The network namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Ready (readiness probe passing, not terminating).
    pub fn ready(&self) -> bool {
        *self.state.ready.borrow() && !self.terminating()
    }

    /// A receiver of the ready flag.
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.state.ready.subscribe()
    }

    /// Marked for deletion.
    pub fn terminating(&self) -> bool {
        self.state.terminating.load(Ordering::Acquire)
    }

    /// Container restarts so far.
    pub fn restarts(&self) -> u32 {
        self.state.restarts.load(Ordering::Relaxed)
    }

    /// The container's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        *self.state.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What happened to the pod, one line per event.
    pub fn events(&self) -> Vec<String> {
        self.state
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The container's output: of each run its first lines and its last `max` bytes.
    pub fn logs(&self, max: usize) -> String {
        let mut all = String::new();
        for i in 0..=self.restarts() {
            let path = self.state.log_dir.join(format!("container-{i}.log"));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            all.push_str(&format!("--- run {i} ---\n"));
            if text.len() <= max + 1500 {
                all.push_str(&text);
                continue;
            }
            let cut = |at: usize| {
                (at..=text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len())
            };
            all.push_str(&text[..cut(1000)]);
            all.push_str("\n[…]\n");
            all.push_str(&text[cut(text.len() - max)..]);
        }
        all
    }

    /// Waits until the pod is ready, up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let mut rx = self.ready_watch();
        let ready = tokio::time::timeout(limit, async { rx.wait_for(|r| *r).await.is_ok() }).await;
        match ready {
            Ok(true) => Ok(()),
            _ => bail!(
                "pod {} not ready within {limit:?}; events:\n{}\nlogs:\n{}",
                self.name,
                self.events().join("\n"),
                self.logs(4000)
            ),
        }
    }

    /// Deletes the pod gracefully: not ready, preStop, SIGTERM, SIGKILL at the grace
    /// period. The caller removes it from endpoints and DNS first.
    pub async fn terminate(self) -> (Termination, Vec<String>) {
        let started = Instant::now();
        self.state.terminating.store(true, Ordering::Release);
        self.state.ready.send_replace(false);
        self.state.event("terminating".into());
        let grace = self.template.grace;
        let mut exited = self.state.exited.subscribe();
        let exits_before = *exited.borrow_and_update();
        let running = self.pid().is_some();
        let mut graceful = true;
        if running {
            if !self.template.pre_stop_sleep.is_zero() {
                self.state
                    .event(format!("preStop: sleep {:?}", self.template.pre_stop_sleep));
                tokio::time::sleep(self.template.pre_stop_sleep.min(grace)).await;
            }
            if let Some(pid) = self.pid() {
                self.state.event("SIGTERM".into());
                signal(pid, "TERM");
            }
            let left = grace.saturating_sub(started.elapsed());
            if !exited_within(&mut exited, exits_before, left).await {
                graceful = false;
                self.state.event("grace period over: SIGKILL".into());
                if let Some(pid) = self.pid() {
                    signal(pid, "KILL");
                }
                exited_within(&mut exited, exits_before, Duration::from_secs(10)).await;
            }
        }
        let code = *self
            .state
            .exit_code
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.worker.abort();
        self.state
            .event(format!("deleted after {:?}", started.elapsed()));
        let events = self.events();
        (
            Termination {
                graceful,
                code,
                took: started.elapsed(),
            },
            events,
        )
    }

    /// Force-deletes the pod (`kubectl delete --force --grace-period=0`): SIGKILL now.
    pub async fn force_delete(self) -> Vec<String> {
        self.state.terminating.store(true, Ordering::Release);
        self.state.ready.send_replace(false);
        let mut exited = self.state.exited.subscribe();
        let before = *exited.borrow_and_update();
        if let Some(pid) = self.pid() {
            self.state.event("force delete: SIGKILL".into());
            signal(pid, "KILL");
            exited_within(&mut exited, before, Duration::from_secs(10)).await;
        }
        self.worker.abort();
        self.events()
    }

    /// Waits for a `restartPolicy: Never` pod's container to exit; its exit code.
    pub async fn wait_exit(&self, limit: Duration) -> Result<Option<i32>> {
        let mut exited = self.state.exited.subscribe();
        match exited_within(&mut exited, 0, limit).await {
            true => Ok(*self
                .state
                .exit_code
                .lock()
                .unwrap_or_else(|e| e.into_inner())),
            _ => bail!(
                "pod {} did not exit within {limit:?}; logs:\n{}",
                self.name,
                self.logs(4000)
            ),
        }
    }

    /// Kills the container's process now (a crash): kubelet restarts it.
    pub fn crash(&self) {
        if let Some(pid) = self.pid() {
            self.state.event("crash: SIGKILL".into());
            signal(pid, "KILL");
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // `HELM_EXECUTE_KEEP_LOGS=DIR` keeps every container's output (and the pod's
        // events) for reading after the run.
        if let Some(keep) = std::env::var_os("HELM_EXECUTE_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            let tag = format!("{}-{}", self.name, self.ns.name());
            for i in 0..=self.restarts() {
                let from = self.state.log_dir.join(format!("container-{i}.log"));
                let _ = std::fs::copy(&from, keep.join(format!("{tag}-run{i}.log")));
            }
            let _ = std::fs::write(
                keep.join(format!("{tag}-events.txt")),
                self.events().join("\n"),
            );
        }
        self.state.terminating.store(true, Ordering::Release);
        if let Some(pid) = self.pid() {
            signal(pid, "KILL");
        }
        self.worker.abort();
    }
}

/// Whether the container exited more than `before` times within `limit`.
async fn exited_within(rx: &mut watch::Receiver<u64>, before: u64, limit: Duration) -> bool {
    tokio::time::timeout(limit, async { rx.wait_for(|n| *n > before).await.is_ok() })
        .await
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// The probe client: from the host (the node), certificates not verified (kubelet does
/// not verify them), one connection per probe.
fn probe_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .pool_max_idle_per_host(0)
                .build()
                .expect("probe client")
        })
        .clone()
}

async fn probe_once(ip: &str, p: &Probe) -> bool {
    let scheme = if p.https { "https" } else { "http" };
    let url = format!("{scheme}://{ip}:{}{}", p.port, p.path);
    match probe_client().get(url).timeout(p.timeout).send().await {
        Ok(r) => (200..400).contains(&r.status().as_u16()),
        Err(_) => false,
    }
}

/// Why the probes stopped.
enum ProbeVerdict {
    Restart(&'static str),
}

/// Startup, then readiness and liveness, as kubelet schedules them.
async fn probe(ip: String, t: Arc<PodTemplate>, state: Arc<State>) -> ProbeVerdict {
    let begin = tokio::time::Instant::now();
    if let Some(p) = &t.startup {
        tokio::time::sleep(p.initial_delay).await;
        let mut failures = 0;
        loop {
            if probe_once(&ip, p).await {
                break;
            }
            failures += 1;
            if failures >= p.failure_threshold {
                state.event(format!("startup probe failed {failures} times"));
                return ProbeVerdict::Restart("startup probe failed");
            }
            tokio::time::sleep(p.period).await;
        }
    }
    state.started.store(true, Ordering::Release);
    state.event(format!(
        "started (startup probe passed after {:?})",
        begin.elapsed()
    ));
    let now = tokio::time::Instant::now();
    let mut next_ready = t.readiness.as_ref().map(|p| now + p.initial_delay);
    let mut next_live = t.liveness.as_ref().map(|p| now + p.initial_delay);
    if t.readiness.is_none() {
        state.ready.send_replace(true);
    }
    let (mut ready_ok, mut ready_fail, mut live_fail) = (0u32, 0u32, 0u32);
    loop {
        let due = [next_ready, next_live].into_iter().flatten().min();
        let Some(due) = due else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        if let (Some(at), Some(p)) = (next_ready, &t.readiness) {
            if at <= now {
                if probe_once(&ip, p).await {
                    ready_ok += 1;
                    ready_fail = 0;
                    if ready_ok >= p.success_threshold && !*state.ready.borrow() {
                        state.ready.send_replace(true);
                        state.event("ready".into());
                    }
                } else {
                    ready_fail += 1;
                    ready_ok = 0;
                    if ready_fail >= p.failure_threshold && *state.ready.borrow() {
                        state.ready.send_replace(false);
                        state.event("not ready".into());
                    }
                }
                next_ready = Some(now + p.period);
            }
        }
        if let (Some(at), Some(p)) = (next_live, &t.liveness) {
            if at <= now {
                if probe_once(&ip, p).await {
                    live_fail = 0;
                } else {
                    live_fail += 1;
                    if live_fail >= p.failure_threshold {
                        state.event(format!("liveness probe failed {live_fail} times"));
                        return ProbeVerdict::Restart("liveness probe failed");
                    }
                }
                next_live = Some(now + p.period);
            }
        }
    }
}

/// The container loop: start, probe, restart when it exits or a probe says so.
async fn run_container(command: Vec<String>, t: Arc<PodTemplate>, ip: String, state: Arc<State>) {
    loop {
        let run = state.restarts.load(Ordering::Relaxed);
        let log_path = state.log_dir.join(format!("container-{run}.log"));
        let spawned = std::fs::File::create(&log_path).and_then(|log| {
            let err = log.try_clone()?;
            tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(err))
                .kill_on_drop(true)
                .spawn()
        });
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                state.event(format!("container failed to start: {e}"));
                return;
            }
        };
        *state.pid.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        state.started.store(false, Ordering::Release);
        state.event(format!(
            "container started (run {run}, pid {:?})",
            child.id()
        ));
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            ProbeVerdict::Restart(why) = probe(ip.clone(), t.clone(), state.clone()) => {
                state.event(format!("restarting: {why}"));
                state.ready.send_replace(false);
                if let Some(pid) = child.id() {
                    if !t.pre_stop_sleep.is_zero() {
                        tokio::time::sleep(t.pre_stop_sleep).await;
                    }
                    signal(pid, "TERM");
                }
                match tokio::time::timeout(t.grace, child.wait()).await {
                    Ok(s) => s.ok(),
                    Err(_) => {
                        let _ = child.kill().await;
                        child.wait().await.ok()
                    }
                }
            }
        };
        *state.pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
        state.ready.send_replace(false);
        *state.exit_code.lock().unwrap_or_else(|e| e.into_inner()) = status.and_then(|s| s.code());
        state.event(format!("container exited: {status:?}"));
        state.exited.send_modify(|n| *n += 1);
        if state.terminating.load(Ordering::Acquire) || t.restart_never {
            return;
        }
        state.restarts.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if state.terminating.load(Ordering::Acquire) {
            return;
        }
    }
}
