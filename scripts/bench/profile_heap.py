#!/usr/bin/env python3
"""Issue 17, step 1: where a held device's bytes go (driven by scripts/bench/profile).

`hold`: starts one `tether serve` (the plain release binary or the `dhat-heap` one), holds
`--count` devices on it from `tether-sim` processes (register, fetch, hold a subscribe; no
updates: what `tether-bench idle-subscriptions` does), records RSS and kernel socket memory
while they are held, then either SIGKILLs the node (plain) or sends SIGTERM so the dhat
build writes its heap profile while every device is still connected. Bounded in time.

`analyze`: reads the records and dhat profiles of two counts and prints per-device figures
as the slope between them (so fixed costs cancel), by category and by allocation site.

Loopback only. Python standard library only.
"""

import argparse
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

# ---------------------------------------------------------------------------------------
# hold


def metric(url, name):
    """Sum of all series of `name` in the node's Prometheus text, or None."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            total += float(m.group(3))
            seen = True
    return total if seen else None


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmData", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    names = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                n = re.sub(r"\d+", "#", f.read().strip())
        except OSError:
            continue
        names[n] = names.get(n, 0) + 1
    out["thread_names"] = names
    return out


def sockstat():
    """Kernel-wide TCP socket figures (loopback: client and server ends both count)."""
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()[1:]
                out = {p[i]: int(p[i + 1]) for i in range(0, len(p) - 1, 2)}
    out["page_kib"] = os.sysconf("SC_PAGE_SIZE") // 1024
    return out


def slab(names=("TCP", "sock_inode_cache", "tcp_bind_bucket", "request_sock_TCP")):
    """Active objects and object size of a few slab caches (root only)."""
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                p = line.split()
                if p and p[0] in names:
                    out[p[0]] = {"active_objs": int(p[1]), "objsize": int(p[3])}
    except OSError:
        pass
    return out


def hold(a):
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="tether-profile-")
    key = os.path.join(tmp.name, "k1.key")
    subprocess.run([a.tether, "admin", "mfg-key", "generate", key], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    env = dict(os.environ)
    dhat_file = None
    if a.dhat:
        dhat_file = os.path.abspath(os.path.join(a.out, f"{a.label}.dhat.json"))
        if os.path.exists(dhat_file):
            os.remove(dhat_file)
        env["TETHER_DHAT_FILE"] = dhat_file
    log_path = os.path.join(tmp.name, "node.log")
    log = open(log_path, "w")
    node = subprocess.Popen(
        [a.tether, "serve", "--listen", "127.0.0.1:0", "--data-dir",
         os.path.join(tmp.name, "data"), "--mfg-key-file", f"k1={key}",
         "--requests-per-second", "1000000", "--max-connections-per-source", "1000000",
         "--register-per-hour", "1000000", *a.node_arg],
        stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    sims = []
    rec = {"label": a.label, "count": a.count, "dhat": bool(a.dhat)}
    try:
        url = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = node.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if not url:
            raise SystemExit("tether did not print its address within 60 s")
        time.sleep(0.5)
        rec["base"] = proc_status(node.pid)
        rec["sockstat_base"] = sockstat()
        rec["slab_base"] = slab()
        started = time.time()
        per = -(-a.count // a.procs)
        # Fresh loopback source addresses per invocation: no TIME_WAIT from earlier runs.
        net = random.randint(16, 250)
        for p in range(a.procs):
            n = min(per, a.count - p * per)
            if n <= 0:
                continue
            sims.append(subprocess.Popen(
                [a.sim, "--url", url, "--mfg-key-file", key, "--key-id", "k1",
                 "--serial-prefix", f"PROF{a.label.replace('-', '')}X",
                 "--devices", str(n), "--first-index", str(p * per),
                 "--local-address", f"127.{net}.{p + 1}.1",
                 "--update-rate", "0", "--companion-rate", "0",
                 "--subscribe-timeout-ms", "1800000", "--request-timeout-ms", "60000",
                 "--setup-timeout-s", str(a.limit_s), "--duration-s", str(a.limit_s + 300),
                 "--ramp-s", str(n / a.ramp_per_s), "--quiet", "--json"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        held = 0
        deadline = time.time() + a.limit_s
        while time.time() < deadline:
            held = int(metric(url, "tether_held_subscriptions") or 0)
            if held >= a.count:
                break
            time.sleep(0.5)
        rec["setup_s"] = round(time.time() - started, 1)
        if held < a.count:
            raise SystemExit(f"only {held} of {a.count} held after {a.limit_s} s")
        time.sleep(a.settle_s)
        rec["held"] = int(metric(url, "tether_held_subscriptions") or 0)
        rec["active_sets"] = metric(url, "tether_active_bucket_sets")
        rec["open_connections"] = metric(url, "tether_connections_open")
        rec["holding"] = proc_status(node.pid)
        rec["sockstat_holding"] = sockstat()
        rec["slab_holding"] = slab()
        rec["load_avg"] = os.getloadavg()
        if a.late_s > 0:
            # Again once idle helper threads (tokio's blocking pool keeps one 10 s) are gone.
            time.sleep(a.late_s)
            rec["holding_late"] = proc_status(node.pid)
            rec["held_late"] = int(metric(url, "tether_held_subscriptions") or 0)
        if a.dhat:
            # The profile is written on SIGTERM, before the drain answers anything.
            node.send_signal(signal.SIGTERM)
            deadline = time.time() + a.write_limit_s
            while time.time() < deadline and node.poll() is None:
                time.sleep(0.5)
            if node.poll() is None:
                node.kill()
            with open(log_path) as f:
                rec["dhat_lines"] = [l.strip() for l in f if "dhat" in l][-6:]
            if not os.path.exists(dhat_file):
                raise SystemExit(f"no dhat profile written to {dhat_file}")
            rec["dhat_file"] = os.path.basename(dhat_file)
    finally:
        for s in sims:
            s.kill()
        for s in sims:
            s.wait()
        if node.poll() is None:
            node.kill()
        node.wait()
        log.close()
        tmp.cleanup()
    path = os.path.join(a.out, f"heap-{a.label}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    kib = (rec["holding"]["VmRSS"] - rec["base"]["VmRSS"]) / max(rec["held"], 1)
    print(f"{a.label}: {rec['held']} held, RSS {rec['base']['VmRSS']} -> "
          f"{rec['holding']['VmRSS']} KiB ({kib:.2f} KiB/device incl. intercept), "
          f"setup {rec['setup_s']} s -> {path}")


# ---------------------------------------------------------------------------------------
# analyze

# An allocation belongs to its *owner*: the innermost frame of its stack that is not
# allocator, collection or std plumbing (BORING, by source path; dhat's frames are DWARF
# names with the crate-relative path of their source). The owner frame is matched against
# OWNERS in order; `full` rules see the frame with its generic arguments (tokio's task cells
# say whose future they hold only there), the others without them.
BORING = re.compile(
    r"\((dhat-|alloc/src/|core/src/|std/src/|src/raw_vec/|src/vec/|collections/|bytes-|"
    r"src/raw/|hashbrown-|collections/hash/|dashmap-|src/page/|src/boxed|iter/traits/|btree/|serde_json-|smallvec-|indexmap-|proto/src/|"
    r"future/future/mod\.rs|src/ops/function\.rs|src/sync/oneshot\.rs|src/string\.rs|"
    r"src/slice\.rs|src/str/|src/fmt/|src/rc\.rs|node/src/main\.rs)|^\?\?\?|^\[root\]")

OWNERS = [
    ("HTTP connection: actix-http read + write buffers (2 × BytesMut 8 KiB)",
     r"\(src/h1/dispatcher\.rs:30[78]:", False),
    ("HTTP connection: the connection's tokio task (its future inline before 2026-12-04)",
     r"^new<tokio::runtime::task::core::Cell<actix_server::service|^new<actix_server::service.*\(runtime/task/core\.rs", True),
    ("HTTP connection: the connection's future, boxed (the HTTP/1 dispatcher's state)",
     r"^call<actix_service::and_then::AndThenService<.*HttpServiceHandler.*\(actix-service-[\d.]+/src/boxed\.rs", True),
    ("held request: the handler's future, boxed by actix-web",
     r"^call<actix_service::fn_service::FnService<actix_web::handler::handler_service.*\(actix-service-[\d.]+/src/boxed\.rs", True),
    ("HTTP connection: tokio I/O registration (per socket)", r"\(runtime/io/", False),
    ("HTTP connection: other actix-http (decoder, dispatcher, on-connect data)",
     r"\((src/h1/|actix-http-|src/requests?/|src/extensions\.rs)", False),
    ("held response: boxed body stream (the handler's held state)",
     r"\((src/body/|src/response/|src/responses/|actix-web-)", False),
    ("held request: router's boxed subscribe future, guard",
     r"\(src/routing/", False),
    ("held request: api handler state (held slot per principal)",
     r"\(src/api/", False),
    ("bucket-set actor: tokio task holding the actor + context",
     r"^new<tokio::runtime::task::core::Cell<actix::context_impl::ContextFut|^new<actix::context_impl::ContextFut.*\(runtime/task/core\.rs", True),
    ("bucket-set actor: committed buckets + recent history (values, changes)",
     r"^(start_commit|finish_commit|apply\w*|reconcile\w*|load\w*|activate\w*) \(src/sets/actor\.rs", False),
    ("bucket-set actor: held subscribers map, sizes, other state",
     r"\(src/sets/actor\.rs", False),
    ("bucket-set actor: actix runtime (mailbox channel, address, interval timer)",
     r"\((actix-0\.|src/address/|src/mailbox\.rs|src/utils\.rs|src/context)", False),
    ("actor registry (set → address map)", r"\(src/sets/", False),
    ("credential cache + rate-limiter maps (security/)",
     r"\((src/security/|lru-|governor-|state/keyed)", False),
    ("store: redb page cache (grows with data written, capped)", r"\((tree_store/|redb-)", False),
    ("tracing: span slab + span extensions (open spans)", r"sharded-slab|tracing|\(src/registry/", False),
    ("tokio: other tasks", r"\(runtime/task/", False),
]
OWNERS = [(n, re.compile(p), full) for n, p, full in OWNERS]


def frames_of(prof, pp):
    return [re.sub(r"^0x[0-9a-f]+: ", "", prof["ftbl"][i]) for i in pp["fs"]]


def plain(frame):
    """The frame without generic arguments: `name<…> (path:line:col)`."""
    name, sep, loc = frame.rpartition(" (")
    if not sep:
        name, loc = frame, ""
    while True:
        stripped = re.sub(r"<[^<>]*>", "\u2039\u203a", name)
        if stripped == name:
            break
        name = stripped
    name = name.replace("\u2039\u203a", "<…>")
    return f"{name} ({loc}" if loc else name


def owner(frames):
    for f in frames:
        if not BORING.search(f):
            return f
    return frames[0] if frames else "?"


def category(frames):
    f = owner(frames)
    p = plain(f)
    for name, rx, full in OWNERS:
        if rx.search(f if full else p):
            return name
    return "other"


def site(frames, n=3):
    """The owner frame and the `n - 1` frames that called it, without generics."""
    out = []
    started = False
    for f in frames:
        if not started and BORING.search(f):
            continue
        started = True
        out.append(re.sub(r":\d+\)$", ")", plain(f)))
        if len(out) == n:
            break
    return " ← ".join(out) if out else "?"


def load(out, label):
    with open(os.path.join(out, f"heap-{label}.json")) as f:
        rec = json.load(f)
    prof = None
    if rec.get("dhat_file"):
        path = os.path.join(out, rec["dhat_file"])
        # scripts/bench/profile keeps the profiles gzipped.
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            with gzip.open(path + ".gz", "rt") as f:
                prof = json.load(f)
        else:
            with open(path) as f:
                prof = json.load(f)
    return rec, prof


def by(prof, key):
    agg = {}
    for pp in prof["pps"]:
        fr = frames_of(prof, pp)
        k = key(fr)
        b, n = agg.get(k, (0, 0))
        agg[k] = (b + pp.get("eb", 0), n + pp.get("ebk", 0))
    return agg


def analyze(a):
    lo, hi = a.counts
    x = a.prefix
    plain_lo, _ = load(a.out, f"{x}plain-{lo}")
    plain_hi, _ = load(a.out, f"{x}plain-{hi}")
    dhat_lo, prof_lo = load(a.out, f"{x}dhat-{lo}")
    dhat_hi, prof_hi = load(a.out, f"{x}dhat-{hi}")
    dn_plain = plain_hi["held"] - plain_lo["held"]
    dn_dhat = dhat_hi["held"] - dhat_lo["held"]
    lines = []
    p = lines.append

    def rss_slope(k):
        return (plain_hi["holding"][k] - plain_lo["holding"][k]) * 1024 / dn_plain

    heap_lo = sum(pp.get("eb", 0) for pp in prof_lo["pps"])
    heap_hi = sum(pp.get("eb", 0) for pp in prof_hi["pps"])
    blk_lo = sum(pp.get("ebk", 0) for pp in prof_lo["pps"])
    blk_hi = sum(pp.get("ebk", 0) for pp in prof_hi["pps"])
    heap_slope = (heap_hi - heap_lo) / dn_dhat
    blk_slope = (blk_hi - blk_lo) / dn_dhat
    # glibc malloc: 8 bytes of chunk header, sizes rounded up to 16, 32 at least. Estimated
    # from the mean block size (the profile keeps sums, not every block's size).
    mean = heap_slope / blk_slope if blk_slope else 0
    chunk = max(32, -(-(mean + 8) // 16) * 16) if blk_slope else 0
    malloc_slope = blk_slope * chunk

    ss_lo, ss_hi = plain_lo["sockstat_holding"], plain_hi["sockstat_holding"]
    page = ss_hi.get("page_kib", 4)
    sock_mem_slope = (ss_hi.get("mem", 0) - ss_lo.get("mem", 0)) * page * 1024 / dn_plain
    p(f"# Where a held device's bytes go: slope between {lo} and {hi} held devices")
    p("")
    p(f"plain release binary: RSS {plain_lo['holding']['VmRSS']} KiB at {plain_lo['held']} held, "
      f"{plain_hi['holding']['VmRSS']} KiB at {plain_hi['held']} held; "
      f"setup {plain_lo['setup_s']} s / {plain_hi['setup_s']} s; "
      f"load avg at measurement {plain_lo['load_avg'][0]:.2f} / {plain_hi['load_avg'][0]:.2f}")
    p(f"- RSS per held device (slope): {rss_slope('VmRSS'):.0f} B "
      f"(anonymous {rss_slope('RssAnon'):.0f} B)")
    for rec, n in ((plain_lo, lo), (plain_hi, hi)):
        p(f"- RSS per held device at {n} incl. fixed costs (what idle-subscriptions reports): "
          f"{(rec['holding']['VmRSS'] - rec['base']['VmRSS']) * 1024 / rec['held']:.0f} B")
    p(f"dhat build: live heap at SIGTERM {heap_lo:,} B in {blk_lo:,} blocks at {dhat_lo['held']} held, "
      f"{heap_hi:,} B in {blk_hi:,} blocks at {dhat_hi['held']} held")
    p(f"- live heap per held device (slope): {heap_slope:.0f} B requested in {blk_slope:.1f} blocks "
      f"(mean {mean:.0f} B); with glibc chunk rounding ≈ {malloc_slope:.0f} B")
    p(f"- heap (with malloc chunk overhead) is {100 * malloc_slope / rss_slope('VmRSS'):.0f} % of the "
      f"RSS slope: above 100 % means allocated pages never written are not resident (the "
      f"2 × 8 KiB HTTP/1 buffers of an idle connection hold a few hundred bytes); below "
      f"100 % means free memory malloc keeps")
    p(f"- kernel TCP buffer memory (sockstat 'mem', both ends, not in RSS): "
      f"{sock_mem_slope:.0f} B per device; sockets in use {ss_lo.get('inuse')} → {ss_hi.get('inuse')}")
    sl_lo, sl_hi = plain_lo.get("slab_holding", {}), plain_hi.get("slab_holding", {})
    for name in ("TCP", "sock_inode_cache"):
        if name in sl_lo and name in sl_hi:
            d = (sl_hi[name]["active_objs"] - sl_lo[name]["active_objs"]) * sl_hi[name]["objsize"]
            p(f"- kernel slab {name} (both ends of each loopback connection, not in RSS): "
              f"{d / dn_plain:.0f} B per device")
    p("")
    p("## By category (dhat, live bytes at SIGTERM; slope per held device)")
    p("")
    p("| category | bytes/device | blocks/device | share of heap slope |")
    p("| --- | ---: | ---: | ---: |")
    c_lo, c_hi = by(prof_lo, category), by(prof_hi, category)
    rows = []
    for k in set(c_lo) | set(c_hi):
        b = (c_hi.get(k, (0, 0))[0] - c_lo.get(k, (0, 0))[0]) / dn_dhat
        n = (c_hi.get(k, (0, 0))[1] - c_lo.get(k, (0, 0))[1]) / dn_dhat
        rows.append((b, n, k))
    for b, n, k in sorted(rows, reverse=True):
        p(f"| {k} | {b:.0f} | {n:.2f} | {100 * b / heap_slope:.1f} % |")
    p(f"| **total** | **{heap_slope:.0f}** | **{blk_slope:.1f}** | 100 % |")
    p("")
    p(f"## Top allocation sites (slope per held device, ≥ {a.min_bytes} B)")
    p("")
    p("| bytes/device | blocks/device | category | site (first non-collection frames) |")
    p("| ---: | ---: | --- | --- |")
    s_lo = by(prof_lo, lambda fr: (site(fr, a.depth), category(fr)))
    s_hi = by(prof_hi, lambda fr: (site(fr, a.depth), category(fr)))
    rows = []
    for k in set(s_lo) | set(s_hi):
        b = (s_hi.get(k, (0, 0))[0] - s_lo.get(k, (0, 0))[0]) / dn_dhat
        n = (s_hi.get(k, (0, 0))[1] - s_lo.get(k, (0, 0))[1]) / dn_dhat
        rows.append((b, n, k))
    for b, n, (s, c) in sorted(rows, reverse=True):
        if b < a.min_bytes:
            break
        p(f"| {b:.0f} | {n:.2f} | {c} | {s.replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"{a.prefix}heap-summary.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--tether", required=True)
    h.add_argument("--sim", required=True)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--procs", type=int, default=2)
    h.add_argument("--label", required=True)
    h.add_argument("--out", default="results/profile")
    h.add_argument("--dhat", action="store_true")
    h.add_argument("--node-arg", action="append", default=[],
                   help="an extra flag for tether serve (repeat), e.g. --node-arg=--passivate-after-ms=2000")
    h.add_argument("--ramp-per-s", type=float, default=200.0)
    h.add_argument("--limit-s", type=int, default=400)
    h.add_argument("--settle-s", type=float, default=3.0)
    h.add_argument("--write-limit-s", type=int, default=300)
    h.add_argument("--late-s", type=float, default=15.0)
    z = sub.add_parser("analyze")
    z.add_argument("--out", default="results/profile")
    z.add_argument("--counts", type=int, nargs=2, default=[2000, 8000])
    z.add_argument("--prefix", default="",
                   help="labels <prefix>plain-N and <prefix>dhat-N; writes <prefix>heap-summary.md")
    z.add_argument("--depth", type=int, default=3)
    z.add_argument("--min-bytes", type=float, default=40.0)
    a = ap.parse_args()
    hold(a) if a.cmd == "hold" else analyze(a)


if __name__ == "__main__":
    main()
