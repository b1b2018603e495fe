#!/usr/bin/env python3
"""The Tether container image without a container daemon: an OCI image layout assembled
from a built `tether` binary, and the checks that it is what the Dockerfile describes.

    oci-image.py build --binary target/release/tether --out target/oci/tether --tag 0.1.0
    oci-image.py check --layout target/oci/tether --tag 0.1.0 [--unpack DIR]

`build` writes two layers, reproducibly (same binary → same digests; SOURCE_DATE_EPOCH,
default 0, is every timestamp):
  1. base: the shared libraries the binary links (found with ldd: glibc and libgcc from
     this Debian bookworm host, the same packages as distroless/cc-debian12) with their
     copyright files, /etc/passwd and /etc/group naming the non-root user 65532
     (`nonroot`), /etc/nsswitch.conf, and the empty directories the pod mounts over
     (/var/lib/tether, the one writable path; /etc/tether; /proc, /sys, /dev, /tmp);
  2. app: /usr/local/bin/tether, debug info stripped.
Config: Entrypoint ["/usr/local/bin/tether"], Cmd ["serve"], User "65532:65532",
ports 8443 and 7000. No shell, no package manager, nothing setuid.

`check` validates the layout with tools that did not write it (skopeo re-verifies every
blob digest while copying; umoci unpacks it into a runtime bundle), asserts the config,
lists every file of the image against what is allowed, and runs the binary from the
unpacked root filesystem mounted read-only as uid 65532 (`tether --version`). It also
writes a `docker load`-able archive. Exits 1 with every failed check listed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UID = GID = 65532
ENTRYPOINT = "/usr/local/bin/tether"
PORTS = ["8443/tcp", "7000/tcp"]
DATA_DIR = "var/lib/tether"
# Mount points the pod (or a runtime) fills; empty in the image.
MOUNT_POINTS = ["proc", "sys", "dev", "tmp", "etc/tether", DATA_DIR]

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layer:
    """A deterministic tar: entries sorted, fixed owner and time."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = epoch()
        return ti

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = (self._info(parent, tarfile.DIRTYPE, 0o755), None)
        self.entries[name.strip("/")] = (self._info(name.strip("/"), tarfile.DIRTYPE, mode, uid, gid), None)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            parent = name.rsplit("/", 1)[0]
            if parent not in self.entries:
                self.dir(parent)
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.entries[name] = (ti, data)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name in sorted(self.entries):
                ti, data = self.entries[name]
                t.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as g:
        g.write(data)
    return buf.getvalue()


def linked_libraries(binary: Path) -> list[tuple[str, Path]]:
    """(path in the image, file on this host) for the interpreter and every library."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise SystemExit(f"ldd: {line}")
        m = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            path = m.group(1)
            libs.append((path, Path(path).resolve()))
    if not any("ld-linux" in p for p, _ in libs):
        raise SystemExit(f"no dynamic loader in ldd's output:\n{out}")
    return libs


def copyright_files(libs: list[tuple[str, Path]]) -> dict[str, bytes]:
    """The Debian copyright file of each library's package."""
    out = {}
    for _, real in libs:
        q = subprocess.run(["dpkg", "-S", str(real)], capture_output=True, text=True)
        if q.returncode != 0:
            # Merged /usr: dpkg knows the /lib path.
            q = subprocess.run(["dpkg", "-S", str(real).replace("/usr/lib/", "/lib/", 1)], capture_output=True, text=True)
        if q.returncode == 0:
            pkg = q.stdout.split(":")[0]
            doc = Path(f"/usr/share/doc/{pkg}/copyright")
            if doc.exists():
                out[f"usr/share/doc/{pkg}/copyright"] = doc.read_bytes()
    return out


def build(binary: Path, out: Path, tag: str, fdb_libs: list[Path]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / "tether"
        subprocess.run(["objcopy", "--strip-debug", str(binary), str(stripped)], check=True)
        libs = linked_libraries(binary)

        base = Layer()
        for d in MOUNT_POINTS:
            base.dir(d, 0o1777 if d == "tmp" else 0o755)
        base.dir(DATA_DIR, 0o700, UID, GID)
        base.file("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        base.file("etc/group", b"root:x:0:\nnonroot:x:65532:\n")
        base.file("etc/nsswitch.conf", b"hosts: files dns\n")
        base.dir("home/nonroot", 0o700, UID, GID)
        for image_path, real in libs:
            base.file(image_path, real.read_bytes(), 0o755)
        for extra in fdb_libs:
            base.file(f"usr/lib/{extra.name}", extra.read_bytes(), 0o755)
        for path, data in copyright_files(libs).items():
            base.file(path, data)

        app = Layer()
        app.file(ENTRYPOINT, stripped.read_bytes(), 0o755)

        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.split()[-1:]
        layers = []
        for layer in (base, app):
            raw = layer.tar()
            gz = gzip_bytes(raw)
            layers.append((raw, gz))

    created = "1970-01-01T00:00:00Z" if epoch() == 0 else __import__("datetime").datetime.utcfromtimestamp(epoch()).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {
        "org.opencontainers.image.title": "tether",
        "org.opencontainers.image.description": "Tether node: device-state sync cluster",
        "org.opencontainers.image.version": version[0] if version else tag,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{UID}:{GID}",
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["serve"],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "ExposedPorts": {p: {} for p in PORTS},
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw) for raw, _ in layers]},
        "history": [
            {"created": created, "created_by": "oci-image.py: libraries (ldd), passwd, mount points"},
            {"created": created, "created_by": f"oci-image.py: COPY tether {ENTRYPOINT}"},
        ],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()

    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": put(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": put(gz), "size": len(gz)} for _, gz in layers],
        "annotations": {"org.opencontainers.image.created": created},
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": put(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    print(f"wrote {out}:{tag}  manifest {sha256(manifest_bytes)}")
    for (raw, gz), name in zip(layers, ("base", "app")):
        print(f"  layer {name}: {len(gz) / 1e6:.1f} MB compressed, {len(raw) / 1e6:.1f} MB")


# --- check ---------------------------------------------------------------------------


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def check(layout: Path, tag: str, unpack: Path | None) -> int:
    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    ref = f"oci:{layout}:{tag}"
    raw = run(["skopeo", "inspect", "--raw", ref])
    expect(raw.returncode == 0, f"skopeo reads the layout ({raw.stderr.strip()[:200]})")
    if raw.returncode != 0:
        return 1
    manifest = json.loads(raw.stdout)
    expect(manifest.get("mediaType") == MEDIA_MANIFEST and manifest.get("schemaVersion") == 2, "OCI image manifest v2")
    expect(all(l["mediaType"] == MEDIA_LAYER for l in manifest["layers"]), "layers are gzip tar layers")
    cfg = json.loads(run(["skopeo", "inspect", "--config", ref]).stdout)
    c = cfg.get("config", {})
    expect(cfg.get("os") == "linux" and cfg.get("architecture") == "amd64", "linux/amd64")
    expect(c.get("Entrypoint") == [ENTRYPOINT], f"entrypoint {c.get('Entrypoint')}")
    expect(c.get("User") == f"{UID}:{GID}", f"user {c.get('User')} (numeric, non-root: runAsNonRoot can verify it)")
    expect(sorted(c.get("ExposedPorts", {})) == sorted(PORTS), f"ports {sorted(c.get('ExposedPorts', {}))}")
    expect(len(cfg["rootfs"]["diff_ids"]) == len(manifest["layers"]), "one diff_id per layer")

    with tempfile.TemporaryDirectory() as tmp:
        copy = run(["skopeo", "copy", "--quiet", ref, f"dir:{tmp}/copy"])
        expect(copy.returncode == 0, f"skopeo copy verifies every blob digest ({copy.stderr.strip()[:200]})")
        archive = Path(tmp) / "tether.tar"
        dock = run(["skopeo", "copy", "--quiet", ref, f"docker-archive:{archive}:tether:{tag}"])
        expect(dock.returncode == 0 and archive.stat().st_size > 0, "a `docker load`-able archive can be written")

        # Every file of every layer, against what is allowed.
        files: dict[str, tarfile.TarInfo] = {}
        for layer in manifest["layers"]:
            blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
            with tarfile.open(blob, "r:gz") as t:
                for ti in t.getmembers():
                    files[ti.name.strip("./")] = ti
        allowed = re.compile(
            r"^(etc(/passwd|/group|/nsswitch\.conf|/tether)?|usr(/local(/bin(/tether)?)?)?|usr/share(/doc(/[^/]+(/copyright)?)?)?"
            r"|(usr/)?lib(64|/x86_64-linux-gnu)?(/[^/]+\.so[.0-9]*)?|usr/lib/libfdb_c\.so"
            r"|var|var/lib|var/lib/tether|home|home/nonroot|proc|sys|dev|tmp)$"
        )
        unexpected = sorted(n for n in files if not allowed.match(n))
        expect(not unexpected, f"only the binary, its libraries and empty mount points ({unexpected[:10]})")
        shells = [n for n in files if re.search(r"(^|/)(sh|bash|dash|ash|busybox)$", n)]
        expect(not shells, f"no shell ({shells})")
        suid = [n for n, ti in files.items() if ti.mode & (stat.S_ISUID | stat.S_ISGID)]
        expect(not suid, f"nothing setuid/setgid ({suid})")
        writable = [n for n, ti in files.items() if ti.isfile() and (ti.uid != 0 or ti.mode & 0o022)]
        expect(not writable, f"every file root-owned, not group/other-writable ({writable})")
        data = files.get(DATA_DIR)
        expect(data is not None and data.isdir() and data.uid == UID, f"{DATA_DIR}: the one writable path, owned by {UID}")

        bundle = unpack or Path(tmp) / "bundle"
        if bundle.exists():
            shutil.rmtree(bundle)
        up = run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
        expect(up.returncode == 0, f"umoci unpacks it into a runtime bundle ({up.stderr.strip()[:200]})")
        if up.returncode == 0:
            spec = json.loads((bundle / "config.json").read_text())
            proc = spec["process"]
            expect(proc["user"]["uid"] == UID and proc["user"]["gid"] == GID, f"bundle process user {proc['user']}")
            expect(proc["args"] == [ENTRYPOINT, "serve"], f"bundle process args {proc['args']}")
            rootfs = bundle / "rootfs"
            # The binary runs from the image alone: root filesystem read-only, uid 65532.
            script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec chroot --userspec=65532:65532 "$1" /usr/local/bin/tether --version'
            ran = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(rootfs)])
            expect(
                ran.returncode == 0 and ran.stdout.startswith("tether "),
                f"`tether --version` runs from the read-only root as {UID} ({(ran.stdout + ran.stderr).strip()[:200]})",
            )
    if failures:
        print(f"\n{len(failures)} image check(s) failed", file=sys.stderr)
        return 1
    print("image checks passed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--binary", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--tag", required=True)
    b.add_argument("--fdb-lib", type=Path, action="append", default=[], help="libfdb_c.so for the -fdb image")
    c = sub.add_parser("check")
    c.add_argument("--layout", type=Path, required=True)
    c.add_argument("--tag", required=True)
    c.add_argument("--unpack", type=Path, help="keep the unpacked bundle here")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.binary, a.out, a.tag, a.fdb_lib)
        return 0
    return check(a.layout, a.tag, a.unpack)


if __name__ == "__main__":
    sys.exit(main())
