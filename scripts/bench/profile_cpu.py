#!/usr/bin/env python3
"""Summarizes folded perf stacks (inferno-collapse-perf output) of the tether process:
inclusive share of samples per cost centre (a sample counts once in every centre its stack
passes through) and per function. Used by scripts/bench/profile; standard library only.

Usage: profile_cpu.py <name>.folded [<name>.folded …]  (markdown on stdout)
"""

import gzip
import re
import sys
from collections import Counter

# Stages of a request, inclusive: a sample counts once in every stage its stack passes
# through. Patterns name the stage's own functions, not the wrappers around a whole request
# (Instrumented::poll, handler_service, the dispatcher's poll), which would count everything.
CENTRES = [
    ("HTTP/1 dispatcher (everything on the HTTP workers: parse, handlers, respond)", r"actix_http::h1::dispatcher::Dispatcher<.*::poll$"),
    ("  parse request head (Codec::decode)", r"actix_http::h1::codec::Codec as tokio_util::codec::decoder::Decoder|actix_http::h1::decoder::"),
    ("  held answer body stream (poll_next: answer, pack, encode)", r"MessageBodyMapErr<.*>::poll_next$"),
    ("  actix-web routing (route regexes, match_pattern, guards)", r"actix_web::rmap::|actix_web::app_service::AppRouting|actix_web::guard::|actix_router::|regex_lite::"),
    ("  auth: AppState::principal (credential check)", r"tether_node::api::http::AppState::principal"),
    ("  router calls (routing/router.rs, HTTP side)", r"tether_node::routing::router::Router::"),
    ("  unsubscribe on answer (drop SubscriptionGuard)", r"drop_in_place<tether_node::routing::router::SubscriptionGuard>"),
    ("  metrics (prometheus-client)", r"prometheus_client::|tether_node::metrics::"),
    ("bucket-set actors (actix mailbox → handlers)", r"<actix::context_impl::ContextFut<.*::poll$"),
    ("  actor Put handler (reconcile, queue)", r"Handler<tether_node::sets::actor::Put>>::handle$"),
    ("  actor Subscribe handler", r"Handler<tether_node::sets::actor::Subscribe>>::handle$"),
    ("  start_commit (hand batch to store, answer writes + held subscribers)", r"BucketSetActor::start_commit"),
    ("store writer thread: redb commit (writer_loop)", r"tether_node::store::redb::writer_loop"),
    ("  fsync (CPU part)", r"sync_data|vfs_fsync|ext4_sync_file"),
    ("blocking pool: store reads (auth's get_pairing per request)", r"tether_node::store::redb::RedbStore as tether_node::store::Store>::get_"),
    ("tracing: spans (new/enter/close) + log events, all subscribers", r"tracing::span::Span::(new|make_with|new_with|record)|tracing_core::span::Attributes::record|drop_in_place<tracing::span::Span>|tracing_core::event::Event::dispatch|tracing_subscriber::.*::(on_event|on_new_span|try_close|new_span|on_close|on_record)$"),
    ("  log field formatting (telemetry::LogFieldVisitor)", r"tether_node::telemetry::LogFieldVisitor"),
    ("JSON encode/decode (serde_json)", r"serde_json::"),
    ("malloc/free (glibc)", r"^(malloc|free|cfree@.*|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk.*|__libc_malloc|__libc_free|__libc_realloc)$"),
    ("memcpy/memmove", r"^__mem(cpy|move)"),
    ("kernel: TCP send (tcp_sendmsg, incl. loopback delivery)", r"^tcp_sendmsg_\[k\]$"),
    ("kernel: TCP receive (tcp_recvmsg)", r"^tcp_recvmsg_\[k\]$"),
    ("kernel: epoll / futex / context switch", r"do_epoll_wait|ep_poll|futex_(wake|wait)|do_futex|finish_task_switch|__schedule"),
    ("kernel (all)", r"_\[k\]$"),
]
# Exclusive: each sample goes to the innermost frame that matches one of these (first rule
# that matches that frame), so the rows add up to 100 %.
COMPONENTS = [
    ("kernel: TCP/loopback", r"^(tcp_|__tcp_|ip_|__ip_|ipv4_|__dev_queue|loopback_|net_rx|__netif|__napi|process_backlog|sock_|__sock|skb_|__skb|kfree_skb|inet_)"),
    ("kernel: scheduler, futex, epoll", r"^(finish_task_switch|__schedule|schedule|futex_|do_futex|ep_|do_epoll|try_to_wake_up|_raw_spin)"),
    ("kernel: file I/O + fsync", r"^(ext4_|jbd2|blk_|iomap_|filemap_|vfs_|file_|iowrite)"),
    ("kernel: other", r"_\[k\]$"),
    ("malloc/free", r"^(malloc|free|cfree@.*|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk.*|__libc_malloc|__libc_free|__libc_realloc|tcache_.*)$"),
    ("memcpy/memmove/memcmp", r"^__mem(cpy|move|cmp|set)"),
    ("tracing + logging", r"tracing_subscriber::|tracing_core::|^tracing::|<tracing::|tether_node::telemetry|sharded_slab::"),
    ("JSON (serde_json)", r"serde_json::"),
    ("redb (store)", r"redb::"),
    ("tether-proto (reconcile, diffs)", r"tether_proto::"),
    ("tether-node code", r"tether_node::"),
    ("actix-http / actix-web (incl. route regexes)", r"actix_http::|actix_web::|actix_router::|regex_lite::|httparse::"),
    ("actix actors", r"^actix::|<actix::"),
    ("tokio runtime", r"tokio::|mio::"),
    ("hashing / crypto", r"sha2::|hmac::|ring::|chacha20|poly1305|siphash|hashbrown::|foldhash"),
    ("prometheus-client", r"prometheus_client::"),
]
COMPONENTS = [(n, re.compile(p)) for n, p in COMPONENTS]
CENTRES = [(n, re.compile(p)) for n, p in CENTRES]


def clean(frame):
    f = re.sub(r"::h[0-9a-f]{16}", "", frame)
    return f


def summarize(path, top=30):
    stacks = []
    total = 0
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            n = int(n)
            frames = [clean(f) for f in stack.split(";")]
            stacks.append((frames, n))
            total += n
    threads = Counter()
    centres = Counter()
    funcs = Counter()
    leaf = Counter()
    comps = Counter()
    for frames, n in stacks:
        threads[frames[0]] += n
        comp = "other (std, futures, …)"
        for f in reversed(frames[1:]):
            m = next((c for c, rx in COMPONENTS if rx.search(f)), None)
            if m:
                comp = m
                break
        comps[comp] += n
        hit = set()
        for name, rx in CENTRES:
            if any(rx.search(f) for f in frames[1:]):
                hit.add(name)
        for h in hit:
            centres[h] += n
        for f in set(frames[1:]):
            funcs[f] += n
        leaf[frames[-1]] += n
    name = path.rsplit("/", 1)[-1].removesuffix(".gz").removesuffix(".folded")
    # inferno-collapse-perf weighs each sample by its period (cpu-clock: nanoseconds).
    out = [f"## {name}: {total / 1e9:.2f} s on CPU sampled (perf cpu-clock, on-CPU time only)", ""]
    out.append("Threads: " + ", ".join(f"{t} {100 * c / total:.1f} %" for t, c in threads.most_common(8)))
    out.append("")
    out.append("| cost centre (inclusive) | % of on-CPU time |")
    out.append("| --- | ---: |")
    for n, _ in CENTRES:
        out.append(f"| {n} | {100 * centres[n] / total:.1f} |")
    out.append("")
    out.append("| component (exclusive: innermost recognised frame) | % of on-CPU time |")
    out.append("| --- | ---: |")
    for c, v in comps.most_common():
        out.append(f"| {c} | {100 * v / total:.1f} |")
    out.append("")
    out.append(f"Top functions, inclusive (below 95 %), first {top}:")
    out.append("")
    out.append("| % | function |")
    out.append("| ---: | --- |")
    shown = 0
    for f, c in funcs.most_common():
        if c / total > 0.95:
            continue
        out.append(f"| {100 * c / total:.1f} | `{f[:160]}` |")
        shown += 1
        if shown >= top:
            break
    out.append("")
    out.append("Top leaf (self) functions, first 15:")
    out.append("")
    out.append("| % | function |")
    out.append("| ---: | --- |")
    for f, c in leaf.most_common(15):
        out.append(f"| {100 * c / total:.1f} | `{f[:160]}` |")
    out.append("")
    return "\n".join(out)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("# Where the tether process's CPU goes (perf, inclusive shares)\n")
    for p in sys.argv[1:]:
        print(summarize(p))


if __name__ == "__main__":
    main()
