//! A release of the chart, running: the rendered StatefulSet's pods (each a network
//! namespace with a kubelet, see [`crate::kubelet`]), a StatefulSet controller (Parallel
//! pod management, rolling updates from the highest ordinal one pod at a time, scaling),
//! the DNS names the chart relies on, the device Service, the Secrets it references, a
//! real PostgreSQL in a namespace of its own, and the `helm test` pod.
//!
//! DNS (dnsmasq, see `tether_test_support::dns`), as CoreDNS would answer for the
//! rendered Services:
//! - `<pod>.<headless>.<ns>.svc.<domain>` → the pod's IP, from the moment the pod exists
//!   until it is marked for deletion (`publishNotReadyAddresses: true`);
//! - `<headless>.<ns>.svc.<domain>` → every such pod;
//! - `<service>.<ns>.svc.<domain>` and the public host → the Service's virtual address;
//! - the PostgreSQL host of the store URL → the database's namespace.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde_json::Value;
use tether_node::store::pg_server::{PgOptions, PgServer};
use tether_test_support::dns::Dns;
use tether_test_support::netns::{Namespace, Network};

use crate::image::Image;
use crate::kubelet::{Objects, Pod, PodEnv, Termination};
use crate::pod::{PodTemplate, Source};
use crate::render::{render, Rendered};
use crate::service::{Endpoint, Endpoints, ServiceProxy};

/// The namespace prefix and subnet of this suite (issue 11).
pub const NET_PREFIX: &str = "t11";
/// `10.<octet>.0.0/16`.
pub const NET_OCTET: u8 = 11;
/// How long a new pod may take to be ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(90);

/// Values read off the render.
#[derive(Debug, Clone)]
pub struct Info {
    /// StatefulSet name.
    pub sts: String,
    /// Headless Service.
    pub headless: String,
    /// Device Service.
    pub service: String,
    /// Its port.
    pub service_port: u16,
    /// The container port it targets.
    pub target_port: u16,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Cluster domain.
    pub domain: String,
    /// `--public-url`.
    pub public_url: String,
    /// Its host.
    pub public_host: String,
    /// The manufacturing key (`k1`), for simulated devices.
    pub mfg_key: Vec<u8>,
    /// The key id.
    pub key_id: String,
    /// The TLS certificate the pods serve now (PEM file), if TLS is on.
    pub tls_cert: Option<PathBuf>,
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn random_token(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// `postgres://user[:pw]@host:port/db` → (user, host, port, db).
fn parse_pg(url: &str) -> Result<(String, String, u16, String)> {
    let rest = url
        .split_once("://")
        .map(|x| x.1)
        .context("store URL scheme")?;
    let (auth, rest) = rest.rsplit_once('@').context("store URL without a user")?;
    let user = auth.split(':').next().unwrap_or_default().to_string();
    let (hostport, db) = rest
        .split_once('/')
        .context("store URL without a database")?;
    let (host, port) = hostport
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.parse().unwrap_or(5432)))
        .unwrap_or((hostport.to_string(), 5432));
    Ok((user, host, port, db.to_string()))
}

/// A running release.
#[derive(Debug)]
pub struct Cluster {
    /// The render running now.
    pub rendered: Rendered,
    /// Its pod template.
    pub template: Arc<PodTemplate>,
    /// Desired replicas.
    pub replicas: usize,
    /// Facts about the release.
    pub info: Info,
    /// The API objects (Secrets) the pods mount.
    pub objects: Arc<Objects>,
    /// The device Service's endpoints.
    pub endpoints: Arc<Endpoints>,
    /// Every pod deletion so far: pod name and how it ended.
    pub terminations: Vec<(String, Termination)>,
    /// The cold start alone: from creating the first pods (image built, PostgreSQL and DNS
    /// up) until all of them are ready.
    pub cold_start: Duration,
    pods: BTreeMap<usize, Pod>,
    mirrors: BTreeMap<usize, tokio::task::JoinHandle<()>>,
    proxy: ServiceProxy,
    dns: Dns,
    pg: PgServer,
    generation: u32,
    history: Vec<String>,
    fixtures: tempfile::TempDir,
    // Dropped last, in this order: namespaces, then the bridge.
    _dns_ns: Namespace,
    _pg_ns: Namespace,
    net: Network,
}

impl Cluster {
    /// Renders `helm/tether/ci/<case>.yaml` with `overrides`, sets up everything around
    /// it, and starts the StatefulSet (all pods at once, Parallel), waiting until every
    /// pod is ready.
    pub async fn start(case: &str, overrides: &Value) -> Result<Cluster> {
        let rendered = render(case, overrides)?;
        // Built (and checked) before anything else, off the runtime.
        tokio::task::spawn_blocking(Image::get)
            .await?
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let sts = rendered.statefulset()?.clone();
        let template = Arc::new(PodTemplate::from_statefulset(&sts)?);
        let headless = sts["spec"]["serviceName"]
            .as_str()
            .context("serviceName")?
            .to_string();
        let device = rendered
            .services()
            .into_iter()
            .find(|s| s["metadata"]["name"] != headless.as_str())
            .context("the device Service")?
            .clone();
        let port_spec = &device["spec"]["ports"][0];
        let target = port_spec["targetPort"]
            .as_str()
            .context("targetPort name")?;
        let args = &template.args;
        let join = arg_value(args, "--join").context("--join")?;
        let domain = join
            .split_once(".svc.")
            .and_then(|(_, d)| d.split(':').next())
            .context("cluster domain in --join")?
            .to_string();
        let public_url = arg_value(args, "--public-url")
            .context("--public-url")?
            .to_string();
        let public_host = public_url
            .split("://")
            .nth(1)
            .and_then(|h| h.split([':', '/']).next())
            .context("public URL host")?
            .to_string();

        let mut net = Network::create(NET_PREFIX, NET_OCTET)?;
        let dns_ns = net.add_namespace("dns")?;
        let pg_ns = net.add_namespace("pg")?;
        let dns = Dns::start(&dns_ns, &[&domain]).await?;

        let fixtures = tempfile::tempdir()?;
        let objects = Arc::new(Objects::default());
        let mut info = Info {
            sts: sts["metadata"]["name"]
                .as_str()
                .context("sts name")?
                .to_string(),
            headless,
            service: device["metadata"]["name"]
                .as_str()
                .context("svc name")?
                .to_string(),
            service_port: u16::try_from(port_spec["port"].as_u64().context("port")?)?,
            target_port: *template.ports.get(target).context("target port")?,
            namespace: rendered.namespace.clone(),
            domain,
            public_url,
            public_host,
            mfg_key: Vec::new(),
            key_id: String::new(),
            tls_cert: None,
        };

        // The store: the database the rendered store URL names, with a password.
        let password = random_token(24);
        let url_in_args = arg_value(args, "--store");
        let (pg_url, pg) = {
            let base = match url_in_args {
                Some(u) => u.to_string(),
                // --store-file: the URL lives in the Secret; use the chart's CI host name.
                None => {
                    "postgres://tether@tether-postgres.db.svc.cluster.local:5432/tether".to_string()
                }
            };
            let (user, host, port, db) = parse_pg(&base)?;
            if user != "tether" {
                bail!("the harness's PostgreSQL superuser is `tether`, the render uses {user}");
            }
            let options = PgOptions {
                netns: Some(pg_ns.name().to_string()),
                listen: pg_ns.ip().into(),
                port: Some(port),
                password: Some(password.clone()),
                ..PgOptions::default()
            };
            let pg = tokio::task::spawn_blocking(move || PgServer::start_with(options))
                .await?
                .context("a private PostgreSQL (Debian package postgresql)")?;
            pg.url(&db)?;
            let mut records = dns.records().clone();
            records.insert(host.clone(), vec![pg_ns.ip()]);
            (
                format!("postgres://{user}:{password}@{host}:{port}/{db}"),
                (pg, records),
            )
        };
        let (pg, mut records) = pg;

        // The Secrets the chart references, by where the pod mounts them.
        for m in &template.mounts {
            let Some(Source::Secret { name, items, .. }) = template.volumes.get(&m.volume) else {
                continue;
            };
            let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
            match m.path.as_str() {
                "/etc/tether/cluster" => {
                    for k in &keys {
                        objects.set_secret(name, k, random_token(40));
                    }
                }
                "/etc/tether/mfg" => {
                    for (i, k) in keys.iter().enumerate() {
                        let key: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
                        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                        objects.set_secret(name, k, hex);
                        if i == 0 {
                            info.mfg_key = key;
                            let id = args
                                .iter()
                                .filter_map(|a| a.strip_prefix("--mfg-key-file="))
                                .find(|a| a.ends_with(&format!("/{k}")))
                                .and_then(|a| a.split('=').next())
                                .context("--mfg-key-file for the first key")?;
                            info.key_id = id.to_string();
                        }
                    }
                }
                "/etc/tether/store" => {
                    for k in &keys {
                        if arg_value(args, "--store-file")
                            .is_some_and(|f| f.ends_with(&format!("/{k}")))
                        {
                            objects.set_secret(name, k, pg_url.clone());
                        } else {
                            objects.set_secret(name, k, password.clone());
                        }
                    }
                }
                "/etc/tether/tls" => {
                    let (crt, key) = self_signed(&fixtures, &info, "initial").await?;
                    objects.set_secret(name, "tls.crt", std::fs::read(&crt)?);
                    objects.set_secret(name, "tls.key", std::fs::read(&key)?);
                    objects.set_secret(name, "ca.crt", std::fs::read(&crt)?);
                    info.tls_cert = Some(crt);
                }
                other => {
                    bail!("a Secret mounted at {other}: the harness does not know what it holds")
                }
            }
        }

        let endpoints = Arc::new(Endpoints::default());
        let vip = SocketAddr::from((net.gateway(), info.service_port));
        let proxy = ServiceProxy::start(vip, endpoints.clone()).await?;
        records.insert(
            format!("{}.{}.svc.{}", info.service, info.namespace, info.domain),
            vec![net.gateway()],
        );
        records.insert(info.public_host.clone(), vec![net.gateway()]);

        let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let mut cluster = Cluster {
            rendered,
            template,
            replicas: 0,
            info,
            objects,
            endpoints,
            terminations: Vec::new(),
            cold_start: Duration::ZERO,
            pods: BTreeMap::new(),
            mirrors: BTreeMap::new(),
            proxy,
            dns,
            pg,
            generation: 0,
            history: Vec::new(),
            fixtures,
            _dns_ns: dns_ns,
            _pg_ns: pg_ns,
            net,
        };
        cluster.dns.set(records)?;
        let pods_created = Instant::now();
        cluster.scale(replicas).await?;
        cluster.cold_start = pods_created.elapsed();
        Ok(cluster)
    }

    /// The kubelet-style resolv.conf of a pod in the release's namespace.
    fn resolv_conf(&self) -> String {
        let (ns, d) = (&self.info.namespace, &self.info.domain);
        self.dns
            .resolv_conf(&[format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()])
    }

    fn pod_env(&self) -> Result<PodEnv> {
        Ok(PodEnv {
            namespace: self.info.namespace.clone(),
            resolv_conf: self.resolv_conf(),
            image: Image::get()?,
            objects: self.objects.clone(),
        })
    }

    /// The name of pod `ordinal`.
    pub fn pod_name(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.info.sts)
    }

    /// Republishes the pods' DNS records (what the endpoints controller and CoreDNS do).
    fn publish_dns(&mut self) -> Result<()> {
        let suffix = format!(
            "{}.{}.svc.{}",
            self.info.headless, self.info.namespace, self.info.domain
        );
        let mut records: BTreeMap<String, Vec<Ipv4Addr>> = self
            .dns
            .records()
            .iter()
            .filter(|(name, _)| !name.ends_with(&suffix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut all = Vec::new();
        for (i, pod) in &self.pods {
            if pod.terminating() {
                continue;
            }
            records.insert(format!("{}.{suffix}", self.pod_name(*i)), vec![pod.ip()]);
            all.push(pod.ip());
        }
        if !all.is_empty() {
            records.insert(suffix, all);
        }
        self.dns.set(records)
    }

    /// Creates pod `ordinal` from the current template (a new namespace and IP).
    fn create_pod(&mut self, ordinal: usize) -> Result<()> {
        self.generation += 1;
        let ns = self
            .net
            .add_namespace(&format!("p{ordinal}g{}", self.generation))?;
        let name = self.pod_name(ordinal);
        let pod = Pod::start(&name, self.template.clone(), ns, self.pod_env()?)?;
        // Endpoints follow the pod's readiness.
        let mut ready = pod.ready_watch();
        let endpoints = self.endpoints.clone();
        let addr = SocketAddr::from((pod.ip(), self.info.target_port));
        let mirror_name = name.clone();
        let mirror = tokio::spawn(async move {
            loop {
                let r = *ready.borrow_and_update();
                endpoints.set(
                    &mirror_name,
                    Endpoint {
                        addr,
                        ready: r,
                        terminating: false,
                    },
                );
                if ready.changed().await.is_err() {
                    return;
                }
            }
        });
        self.pods.insert(ordinal, pod);
        self.mirrors.insert(ordinal, mirror);
        self.publish_dns()
    }

    /// Takes pod `ordinal` out of the Service and DNS (deletion begins).
    fn unpublish(&mut self, ordinal: usize) -> Result<Pod> {
        let pod = self.pods.remove(&ordinal).context("no such pod")?;
        if let Some(m) = self.mirrors.remove(&ordinal) {
            m.abort();
        }
        self.endpoints.set(
            &pod.name,
            Endpoint {
                addr: SocketAddr::from((pod.ip(), self.info.target_port)),
                ready: false,
                terminating: true,
            },
        );
        self.publish_dns()?;
        Ok(pod)
    }

    /// Deletes pod `ordinal` gracefully (preStop, SIGTERM, SIGKILL at the grace period).
    pub async fn delete_pod(&mut self, ordinal: usize) -> Result<Termination> {
        let pod = self.unpublish(ordinal)?;
        let name = pod.name.clone();
        let (t, events) = pod.terminate().await;
        self.endpoints.remove(&name);
        self.history.push(format!("{name}: {}", events.join(" | ")));
        self.terminations.push((name, t));
        Ok(t)
    }

    /// Deletes pod `ordinal` gracefully and lets the controller create it again from the
    /// current template and Secrets (as `kubectl delete pod` does); does not wait for it.
    pub async fn recreate_pod(&mut self, ordinal: usize) -> Result<Termination> {
        let t = self.delete_pod(ordinal).await?;
        self.create_pod(ordinal)?;
        Ok(t)
    }

    /// An HTTPS client for the public URL through the Service (the device's view): the
    /// public host resolved to the Service's address, trusting `cert` only.
    pub fn device_client(&self, cert: &std::path::Path) -> Result<reqwest::Client> {
        let pem = std::fs::read(cert)?;
        Ok(reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .resolve(&self.info.public_host, self.proxy.addr())
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// The certificate pod `ordinal` serves (DER), read from a new TLS connection.
    pub async fn served_certificate(&self, ordinal: usize) -> Result<Vec<u8>> {
        let pod = self.pods.get(&ordinal).context("no such pod")?;
        let r = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!(
                "https://{}:{}/healthz",
                pod.ip(),
                self.info.target_port
            ))
            .send()
            .await?;
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(<[u8]>::to_vec)
            .context("no peer certificate")
    }

    /// `kubectl delete pod --force --grace-period=0`, and the controller recreating it.
    pub async fn force_delete_pod(&mut self, ordinal: usize) -> Result<()> {
        let pod = self.unpublish(ordinal)?;
        let name = pod.name.clone();
        let events = pod.force_delete().await;
        self.endpoints.remove(&name);
        self.history
            .push(format!("{name} (forced): {}", events.join(" | ")));
        self.create_pod(ordinal)?;
        self.wait_ready(&[ordinal]).await
    }

    /// Waits until the given pods are ready (and `minReadySeconds` passed).
    pub async fn wait_ready(&self, ordinals: &[usize]) -> Result<()> {
        for o in ordinals {
            let pod = self.pods.get(o).context("no such pod")?;
            pod.wait_ready(READY_DEADLINE).await?;
        }
        tokio::time::sleep(self.template.min_ready).await;
        Ok(())
    }

    /// Scales to `replicas` as a Parallel StatefulSet does: the missing ordinals all at
    /// once, or the highest ones deleted all at once; waits until done.
    pub async fn scale(&mut self, replicas: usize) -> Result<()> {
        let current = self.pods.len();
        if replicas > current {
            let new: Vec<usize> = (current..replicas).collect();
            for o in &new {
                self.create_pod(*o)?;
            }
            self.replicas = replicas;
            self.wait_ready(&new).await?;
        } else if replicas < current {
            self.replicas = replicas;
            let doomed: Vec<usize> = (replicas..current).rev().collect();
            let mut pods = Vec::new();
            for o in &doomed {
                pods.push(self.unpublish(*o)?);
            }
            let done = futures_join(pods.into_iter().map(|p| async move {
                let name = p.name.clone();
                let (t, ev) = p.terminate().await;
                (name, t, ev)
            }))
            .await;
            for (name, t, ev) in done {
                self.endpoints.remove(&name);
                self.history.push(format!("{name}: {}", ev.join(" | ")));
                self.terminations.push((name, t));
            }
        }
        Ok(())
    }

    /// Applies a new render: replicas first, then, when the pod template changed, a
    /// rolling update from the highest ordinal, one pod at a time, each new pod ready
    /// before the next old one goes. Returns the ordinals updated.
    pub async fn upgrade(&mut self, rendered: Rendered) -> Result<Vec<usize>> {
        let sts = rendered.statefulset()?.clone();
        let template = Arc::new(PodTemplate::from_statefulset(&sts)?);
        let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let changed = template.revision != self.template.revision;
        self.template = template;
        self.rendered = rendered;
        self.scale(replicas).await?;
        let mut updated = Vec::new();
        if changed {
            let ordinals: Vec<usize> = self.pods.keys().rev().copied().collect();
            for o in ordinals {
                if self.pods[&o].template.revision == self.template.revision {
                    continue;
                }
                self.delete_pod(o).await?;
                self.create_pod(o)?;
                self.wait_ready(&[o]).await?;
                updated.push(o);
            }
        }
        Ok(updated)
    }

    /// Re-renders the same case with other overrides.
    pub fn render(&self, case: &str, overrides: &Value) -> Result<Rendered> {
        render(case, overrides)
    }

    /// The pods, by ordinal.
    pub fn pods(&self) -> &BTreeMap<usize, Pod> {
        &self.pods
    }

    /// Kubelet re-syncs every pod's volumes from the current Secrets.
    pub fn sync_volumes(&self) -> Result<()> {
        for p in self.pods.values() {
            p.sync_volumes()?;
        }
        Ok(())
    }

    /// Replaces the TLS Secret with a new self-signed certificate; the new PEM file.
    pub async fn rotate_certificate(&mut self, label: &str) -> Result<PathBuf> {
        let (crt, key) = self_signed(&self.fixtures, &self.info, label).await?;
        let name = self
            .template
            .mounts
            .iter()
            .find(|m| m.path == "/etc/tether/tls")
            .and_then(|m| match self.template.volumes.get(&m.volume) {
                Some(Source::Secret { name, .. }) => Some(name.clone()),
                _ => None,
            })
            .context("no TLS Secret")?;
        self.objects
            .set_secret(&name, "tls.crt", std::fs::read(&crt)?);
        self.objects
            .set_secret(&name, "tls.key", std::fs::read(&key)?);
        self.objects
            .set_secret(&name, "ca.crt", std::fs::read(&crt)?);
        self.info.tls_cert = Some(crt.clone());
        self.sync_volumes()?;
        Ok(crt)
    }

    /// `GET <path>` on pod `ordinal` directly (TLS unverified, as a probe).
    pub async fn pod_get(&self, ordinal: usize, path: &str) -> Result<(u16, Value)> {
        let pod = self.pods.get(&ordinal).context("no such pod")?;
        let scheme = if self.info.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let r = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!(
                "{scheme}://{}:{}{path}",
                pod.ip(),
                self.info.target_port
            ))
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Pod `ordinal`'s `/metrics`.
    pub async fn metrics(&self, ordinal: usize) -> Result<String> {
        let pod = self.pods.get(&ordinal).context("no such pod")?;
        let scheme = if self.info.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!(
                "{scheme}://{}:{}/metrics",
                pod.ip(),
                self.info.target_port
            ))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until every pod reports `members` cluster members on /readyz.
    pub async fn wait_members(&self, members: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut seen = Vec::new();
            for o in self.pods.keys() {
                let (status, body) = self
                    .pod_get(*o, "/readyz")
                    .await
                    .unwrap_or((0, Value::Null));
                seen.push((*o, status, body["members"].as_u64().unwrap_or(0)));
            }
            if seen
                .iter()
                .all(|(_, s, m)| *s == 200 && *m == members as u64)
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "not every pod sees {members} members after {limit:?}: {seen:?}\n{}",
                    self.report()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The URL devices use and how to reach it: (public URL, host, Service address).
    pub fn device_entry(&self) -> (String, String, SocketAddr) {
        (
            self.info.public_url.clone(),
            self.info.public_host.clone(),
            self.proxy.addr(),
        )
    }

    /// Runs the rendered `helm test` pod to completion in a namespace of its own; its
    /// exit code and output.
    pub async fn helm_test(&mut self) -> Result<(Option<i32>, String)> {
        let test = self.rendered.test_pod()?.clone();
        let template = Arc::new(PodTemplate::from_pod(&test)?);
        self.generation += 1;
        let ns = self
            .net
            .add_namespace(&format!("test{}", self.generation))?;
        let pod = Pod::start(
            test["metadata"]["name"].as_str().unwrap_or("test"),
            template,
            ns,
            self.pod_env()?,
        )?;
        let code = pod.wait_exit(Duration::from_secs(180)).await?;
        Ok((code, pod.logs(20_000)))
    }

    /// Every pod's events and log tail, and the deleted pods' events (failure reports).
    pub fn report(&self) -> String {
        let mut s = String::new();
        for h in &self.history {
            s.push_str(&format!("deleted {h}\n"));
        }
        for p in self.pods.values() {
            s.push_str(&format!(
                "==== {} ({}) events:\n{}\n---- logs:\n{}\n",
                p.name,
                p.ip(),
                p.events().join("\n"),
                p.logs(3000)
            ));
        }
        s
    }

    /// The pods' IPs by name.
    pub fn pod_ips(&self) -> BTreeMap<String, Ipv4Addr> {
        self.pods
            .values()
            .map(|p| (p.name.clone(), p.ip()))
            .collect()
    }

    /// The PostgreSQL server (for its logs).
    pub fn pg(&self) -> &PgServer {
        &self.pg
    }
}

/// The DER bytes of the first certificate in a PEM file.
pub fn pem_der(path: &std::path::Path) -> Result<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(path)?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

/// Awaits every future (order kept).
async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// A self-signed certificate for the Service's and the public host's names, written by
/// the binary under test (`tether admin self-signed`).
async fn self_signed(
    dir: &tempfile::TempDir,
    info: &Info,
    label: &str,
) -> Result<(PathBuf, PathBuf)> {
    let crt = dir.path().join(format!("{label}.crt"));
    let key = dir.path().join(format!("{label}.key"));
    let svc = format!("{}.{}.svc.{}", info.service, info.namespace, info.domain);
    let out = tokio::process::Command::new(tether_test_support::bin::tether())
        .args(["admin", "self-signed", "--cert"])
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .args([
            "--san",
            &info.public_host,
            "--san",
            &svc,
            "--san",
            &info.service,
        ])
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "tether admin self-signed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((crt, key))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
            eprintln!("---- dnsmasq:\n{}", self.dns.log());
        }
        // Processes first, so every namespace can go.
        self.pods.clear();
        for m in self.mirrors.values() {
            m.abort();
        }
    }
}
