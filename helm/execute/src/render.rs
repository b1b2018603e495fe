//! The chart, rendered by Helm itself (helm-python-sdk, through `helm/tests/render_json.py`)
//! for a CI values file plus overrides, as JSON objects.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// A rendered release.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The release name.
    pub release: String,
    /// The namespace it was rendered for.
    pub namespace: String,
    /// The Helm SDK that rendered it.
    pub helm_sdk: String,
    /// Every object, hooks included.
    pub objects: Vec<Value>,
}

impl Rendered {
    /// The one object of `kind` (and `name`, if given).
    pub fn find(&self, kind: &str, name: Option<&str>) -> Result<&Value> {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            _ => bail!(
                "expected one {kind} {name:?} in the render, found {}",
                found.len()
            ),
        }
    }

    /// The StatefulSet.
    pub fn statefulset(&self) -> Result<&Value> {
        self.find("StatefulSet", None)
    }

    /// Every Service.
    pub fn services(&self) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == "Service")
            .collect()
    }

    /// The `helm test` pod.
    pub fn test_pod(&self) -> Result<&Value> {
        self.find("Pod", None)
    }
}

static VENV: Mutex<bool> = Mutex::new(false);

/// The chart tests' Python (target/venv-helm), made by `scripts/helm-venv` when missing or
/// out of date. Always asked (it only compares stamps when up to date, and waits for a run
/// in progress, such as the one `scripts/test` starts in the background), once per process.
fn python() -> Result<PathBuf> {
    let mut checked = VENV.lock().unwrap_or_else(|e| e.into_inner());
    let root = root();
    if !*checked {
        let st = Command::new(root.join("scripts/helm-venv"))
            .status()
            .context("running scripts/helm-venv")?;
        if !st.success() {
            bail!("scripts/helm-venv failed ({st}): helm-python-sdk is needed to render the chart");
        }
        *checked = true;
    }
    Ok(root.join("target/venv-helm/bin/python"))
}

/// Renders `helm/tether` with `helm/tether/ci/<case>.yaml` and `overrides` on top.
pub fn render(case: &str, overrides: &Value) -> Result<Rendered> {
    let root = root();
    let out = Command::new(python()?)
        .arg(root.join("helm/tests/render_json.py"))
        .arg(case)
        .arg(overrides.to_string())
        .current_dir(root.join("helm/tests"))
        .output()
        .context("running render_json.py")?;
    if !out.status.success() {
        bail!(
            "rendering the chart ({case}, {overrides}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("render_json.py output")?;
    Ok(Rendered {
        release: v["release"].as_str().unwrap_or_default().to_string(),
        namespace: v["namespace"].as_str().unwrap_or_default().to_string(),
        helm_sdk: v["helm_sdk"].as_str().unwrap_or_default().to_string(),
        objects: v["objects"].as_array().cloned().unwrap_or_default(),
    })
}
