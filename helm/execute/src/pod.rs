//! The pod template as the chart rendered it, read the way kubelet reads it: the
//! container's command line, environment (with `fieldRef`s and `$(VAR)` expansion),
//! ports, probes, preStop hook, grace period, volumes and mounts, security context.
//! Anything this harness cannot do faithfully (an exec probe, a secretKeyRef, a subPath
//! mount, a second container) is refused with an error rather than approximated.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// An HTTP probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Path.
    pub path: String,
    /// Container port (a named port resolved).
    pub port: u16,
    /// HTTPS (kubelet does not verify the certificate).
    pub https: bool,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds`.
    pub period: Duration,
    /// `timeoutSeconds`.
    pub timeout: Duration,
    /// `successThreshold`.
    pub success_threshold: u32,
    /// `failureThreshold`.
    pub failure_threshold: u32,
}

/// Where a volume's files come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A Secret: `(key, path)` items and the file mode.
    Secret {
        /// Secret name.
        name: String,
        /// Items (all keys when empty).
        items: Vec<(String, String)>,
        /// `defaultMode`.
        mode: u32,
    },
    /// A ConfigMap, likewise.
    ConfigMap {
        /// ConfigMap name.
        name: String,
        /// Items (all keys when empty).
        items: Vec<(String, String)>,
        /// `defaultMode`.
        mode: u32,
    },
    /// An emptyDir.
    EmptyDir,
}

/// A volume mount.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// The volume's name.
    pub volume: String,
    /// Where it appears in the container.
    pub path: String,
    /// `readOnly`.
    pub read_only: bool,
}

/// One environment variable as written in the spec.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvValue {
    /// `value` (may hold `$(VAR)` references).
    Value(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
}

/// What kubelet needs to run the pod's one container.
#[derive(Debug, Clone)]
pub struct PodTemplate {
    /// Revision: a hash of the whole template (what the StatefulSet controller compares).
    pub revision: String,
    /// The container image.
    pub image: String,
    /// `command` (the image's entrypoint when absent).
    pub command: Option<Vec<String>>,
    /// `args`, unexpanded.
    pub args: Vec<String>,
    /// `env`, in order.
    pub env: Vec<(String, EnvValue)>,
    /// Named container ports.
    pub ports: BTreeMap<String, u16>,
    /// Probes.
    pub startup: Option<Probe>,
    /// Probes.
    pub readiness: Option<Probe>,
    /// Probes.
    pub liveness: Option<Probe>,
    /// The preStop `sleep` action.
    pub pre_stop_sleep: Duration,
    /// `terminationGracePeriodSeconds`.
    pub grace: Duration,
    /// `minReadySeconds` of the StatefulSet (zero for a bare pod).
    pub min_ready: Duration,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, Source>,
    /// `runAsUser`.
    pub uid: u32,
    /// `runAsGroup`.
    pub gid: u32,
    /// `fsGroup` (owner group of secret files, a supplementary group of the process).
    pub fs_group: Option<u32>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `restartPolicy: Never` (a one-shot pod such as the `helm test` hook).
    pub restart_never: bool,
}

fn u32_of(v: &Value, what: &str) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .with_context(|| format!("{what}: expected a number, got {v}"))
}

fn secs(v: &Value, default: u64) -> Duration {
    Duration::from_secs(v.as_u64().unwrap_or(default))
}

fn items(v: &Value) -> Vec<(String, String)> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["key"].as_str().unwrap_or_default().to_string(),
                        i["path"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn probe(v: &Value, ports: &BTreeMap<String, u16>) -> Result<Option<Probe>> {
    if v.is_null() {
        return Ok(None);
    }
    let get = &v["httpGet"];
    if get.is_null() {
        bail!("only httpGet probes are emulated, got {v}");
    }
    let port = match &get["port"] {
        Value::String(name) => *ports
            .get(name)
            .with_context(|| format!("probe port {name:?} is not a container port"))?,
        p => u16::try_from(p.as_u64().context("probe port")?)?,
    };
    Ok(Some(Probe {
        path: get["path"].as_str().unwrap_or("/").to_string(),
        port,
        https: get["scheme"] == "HTTPS",
        initial_delay: secs(&v["initialDelaySeconds"], 0),
        period: secs(&v["periodSeconds"], 10),
        timeout: secs(&v["timeoutSeconds"], 1),
        success_threshold: v["successThreshold"].as_u64().unwrap_or(1) as u32,
        failure_threshold: v["failureThreshold"].as_u64().unwrap_or(3) as u32,
    }))
}

impl PodTemplate {
    /// The template of a StatefulSet.
    pub fn from_statefulset(sts: &Value) -> Result<Self> {
        let mut t = Self::from_pod_spec(&sts["spec"]["template"])?;
        t.min_ready = secs(&sts["spec"]["minReadySeconds"], 0);
        Ok(t)
    }

    /// A bare pod (the `helm test` hook).
    pub fn from_pod(pod: &Value) -> Result<Self> {
        Self::from_pod_spec(pod)
    }

    fn from_pod_spec(template: &Value) -> Result<Self> {
        let revision = {
            let mut h = Sha256::new();
            h.update(template.to_string().as_bytes());
            h.finalize()[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let spec = &template["spec"];
        if spec["initContainers"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            bail!("init containers are not emulated");
        }
        let containers = spec["containers"].as_array().context("containers")?;
        let [c] = containers.as_slice() else {
            bail!(
                "one container per pod is emulated, found {}",
                containers.len()
            );
        };
        let mut ports = BTreeMap::new();
        for p in c["ports"].as_array().into_iter().flatten() {
            ports.insert(
                p["name"].as_str().unwrap_or_default().to_string(),
                u16::try_from(p["containerPort"].as_u64().context("containerPort")?)?,
            );
        }
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().context("env name")?.to_string();
            let value = if let Some(v) = e["value"].as_str() {
                EnvValue::Value(v.to_string())
            } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                EnvValue::Field(f.to_string())
            } else {
                bail!("env {name}: only value and fieldRef are emulated: {e}");
            };
            env.push((name, value));
        }
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            if !m["subPath"].is_null() {
                bail!("subPath mounts are not emulated: {m}");
            }
            mounts.push(Mount {
                volume: m["name"].as_str().context("mount name")?.to_string(),
                path: m["mountPath"].as_str().context("mountPath")?.to_string(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
            });
        }
        let mut volumes = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().context("volume name")?.to_string();
            let source = if !v["secret"].is_null() {
                Source::Secret {
                    name: v["secret"]["secretName"]
                        .as_str()
                        .context("secretName")?
                        .to_string(),
                    items: items(&v["secret"]),
                    mode: v["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32,
                }
            } else if !v["configMap"].is_null() {
                Source::ConfigMap {
                    name: v["configMap"]["name"]
                        .as_str()
                        .context("configMap name")?
                        .to_string(),
                    items: items(&v["configMap"]),
                    mode: v["configMap"]["defaultMode"].as_u64().unwrap_or(0o644) as u32,
                }
            } else if !v["emptyDir"].is_null() {
                Source::EmptyDir
            } else {
                bail!("volume {name}: only secret, configMap and emptyDir are emulated");
            };
            volumes.insert(name, source);
        }
        for m in &mounts {
            if !volumes.contains_key(&m.volume) {
                bail!("mount of undefined volume {}", m.volume);
            }
        }
        let psc = &spec["securityContext"];
        let csc = &c["securityContext"];
        let pick = |k: &str| {
            if csc[k].is_null() {
                psc[k].clone()
            } else {
                csc[k].clone()
            }
        };
        let pre_stop = &c["lifecycle"]["preStop"];
        if !pre_stop.is_null() && pre_stop["sleep"].is_null() {
            bail!("only the preStop sleep action is emulated: {pre_stop}");
        }
        Ok(PodTemplate {
            revision,
            image: c["image"].as_str().context("image")?.to_string(),
            command: c["command"].as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            }),
            args: c["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            startup: probe(&c["startupProbe"], &ports)?,
            readiness: probe(&c["readinessProbe"], &ports)?,
            liveness: probe(&c["livenessProbe"], &ports)?,
            pre_stop_sleep: secs(&pre_stop["sleep"]["seconds"], 0),
            grace: secs(&spec["terminationGracePeriodSeconds"], 30),
            min_ready: Duration::ZERO,
            env,
            ports,
            mounts,
            volumes,
            uid: u32_of(&pick("runAsUser"), "runAsUser")?,
            gid: u32_of(&pick("runAsGroup"), "runAsGroup")?,
            fs_group: psc["fsGroup"].as_u64().map(|g| g as u32),
            read_only_root: csc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            restart_never: spec["restartPolicy"] == "Never",
        })
    }

    /// The environment kubelet gives the container: each value expanded against the ones
    /// before it, `fieldRef`s resolved for this pod.
    pub fn resolve_env(
        &self,
        pod_name: &str,
        namespace: &str,
        pod_ip: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.env {
            let v = match value {
                EnvValue::Value(v) => expand(v, &out),
                EnvValue::Field(f) => match f.as_str() {
                    "metadata.name" => pod_name.to_string(),
                    "metadata.namespace" => namespace.to_string(),
                    "status.podIP" => pod_ip.to_string(),
                    other => bail!("fieldRef {other} is not emulated"),
                },
            };
            out.push((name.clone(), v));
        }
        Ok(out)
    }

    /// `args` with `$(VAR)` expanded against `env`.
    pub fn resolve_args(&self, env: &[(String, String)]) -> Vec<String> {
        self.args.iter().map(|a| expand(a, env)).collect()
    }
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` → its value when defined (else left as is),
/// `$$` → `$`.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_expansion_rules() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x$(A)".to_string()),
        ];
        for (input, want) in [
            ("$(A)", "1"),
            ("$(A)-$(A)", "1-1"),
            ("$(UNDEFINED)", "$(UNDEFINED)"),
            ("$$(A)", "$(A)"),
            ("$$", "$"),
            ("a$b", "a$b"),
            ("$(A", "$(A"),
            ("pre.$(B).post", "pre.x$(A).post"),
        ] {
            assert_eq!(expand(input, &env), want, "{input}");
        }
    }
}
