//! The container image the pods run: the OCI layout `scripts/oci-image.py` builds from the
//! `tether` binary under test, checked, and unpacked by umoci into a runtime bundle whose
//! root filesystem every pod's container runs in (chrooted, read-only).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::render::root;

/// An unpacked image.
#[derive(Debug)]
pub struct Image {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The tag in it.
    pub tag: String,
    /// The bundle's root filesystem.
    pub rootfs: PathBuf,
    /// The image config's entrypoint.
    pub entrypoint: Vec<String>,
    /// Its environment (`KEY=value`).
    pub env: Vec<String>,
    /// Its user (`uid:gid`).
    pub user: String,
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Image {
    /// The image of the `tether` binary under test, built and checked once per process.
    pub fn get() -> Result<&'static Image> {
        static IMAGE: OnceLock<std::result::Result<Image, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| {
                Self::build(tether_test_support::bin::tether()).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("building the image: {e}"))
    }

    fn build(binary: &Path) -> Result<Image> {
        let root = root();
        let base = root.join("target/helm-execute");
        std::fs::create_dir_all(&base)?;
        // Leftovers of runs that died.
        for e in std::fs::read_dir(&base)?.flatten() {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(std::process::id().to_string());
        let layout = dir.join("oci");
        let bundle = dir.join("bundle");
        let tag = "under-test".to_string();
        let script = root.join("scripts/oci-image.py");
        run(
            Command::new("python3")
                .arg(&script)
                .arg("build")
                .arg("--binary")
                .arg(binary)
                .arg("--out")
                .arg(&layout)
                .args(["--tag", &tag]),
            "oci-image.py build",
        )?;
        let checked = run(
            Command::new("python3")
                .arg(&script)
                .arg("check")
                .arg("--layout")
                .arg(&layout)
                .args(["--tag", &tag])
                .arg("--unpack")
                .arg(&bundle),
            "oci-image.py check",
        )?;
        eprintln!("{checked}");
        let config: Value = serde_json::from_str(&run(
            Command::new("skopeo")
                .args(["inspect", "--config"])
                .arg(format!("oci:{}:{tag}", layout.display())),
            "skopeo inspect --config",
        )?)?;
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let rootfs = bundle.join("rootfs");
        // What a runtime creates in the container's root before it mounts anything there.
        for f in ["etc/resolv.conf", "etc/hosts", "etc/hostname"] {
            std::fs::write(rootfs.join(f), "")?;
        }
        for d in ["null", "zero", "random", "urandom"] {
            std::fs::write(rootfs.join("dev").join(d), "")?;
        }
        Ok(Image {
            layout,
            tag,
            rootfs,
            entrypoint: strings(&c["Entrypoint"]),
            env: strings(&c["Env"]),
            user: c["User"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Creates a mount point in the root filesystem (a runtime does this in the
    /// container's own layer).
    pub fn mount_point(&self, path: &str) -> Result<()> {
        let p = self.rootfs.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&p).with_context(|| format!("mount point {}", p.display()))
    }
}
