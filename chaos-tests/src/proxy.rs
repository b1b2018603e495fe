//! A userspace TCP fault proxy (this kernel has no `tc netem`): each [`Link`] is a
//! listener that forwards every connection it accepts to one upstream address, and
//! whose faults can be changed while connections are open:
//!
//! - **latency**: every chunk read is held for `one_way ± jitter` (uniform) before it is
//!   written on, in each direction. A direction is a delay *queue*: the reader keeps
//!   reading while earlier chunks wait, and a chunk is never sent before the one read
//!   before it (its due time is at least its predecessor's), so bytes keep their order.
//! - **stall**: every byte is held until a given instant ([`Link::stall`]).
//! - **clog**: every byte is held until [`Link::unclog`] (FoundationDB's swizzle clogs
//!   links this way).
//!
//! Nothing is ever dropped or reordered. Buffers are bounded: a direction holds at most
//! [`QUEUE_CHUNKS`] chunks of at most [`CHUNK`] bytes; beyond that the proxy stops reading
//! and TCP's flow control pushes back on the sender. When one side closes its write half,
//! the proxy delivers what it holds and then closes the same half towards the other side;
//! when writing to a side fails, that direction ends and its reader is dropped.
//!
//! In the namespaced cluster the links run in the test's namespace on the bridge gateway
//! (one port per link) and nftables `nat output` rules in each node's namespace redirect
//! its connections to a peer's gRPC port or to PostgreSQL to the link's port
//! ([`nat_rules`]); peers still advertise and dial their real addresses (TLS names
//! included), so the redirect is invisible to the nodes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest chunk read at once.
pub const CHUNK: usize = 16 * 1024;
/// Chunks one direction of one connection may hold (read, not yet written).
pub const QUEUE_CHUNKS: usize = 64;

/// A link's faults at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Added to every chunk, in each direction.
    pub one_way: Duration,
    /// The added delay is drawn uniformly from `one_way ± jitter` (never below zero).
    pub jitter: Duration,
    /// Hold every byte until unclogged.
    pub clogged: bool,
    /// Hold every byte until this instant.
    pub stalled_until: Option<Instant>,
}

impl Faults {
    /// A delay drawn for one chunk.
    fn delay(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.one_way;
        }
        let base = self.one_way.as_micros() as i128;
        let j = self.jitter.as_micros() as i128;
        let d = base + rand::rng().random_range(-j..=j);
        Duration::from_micros(u64::try_from(d.max(0)).unwrap_or(0))
    }

    /// Until when bytes are held now: `None` when they may flow, `Some(None)` when
    /// clogged (until the faults change), `Some(Some(t))` when stalled until `t`.
    fn held(&self, now: Instant) -> Option<Option<Instant>> {
        if self.clogged {
            return Some(None);
        }
        match self.stalled_until {
            Some(t) if t > now => Some(Some(t)),
            _ => None,
        }
    }
}

/// What a link has carried so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Connections accepted.
    pub connections: u64,
    /// Bytes read from either side.
    pub bytes_read: u64,
    /// Bytes written to either side.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    faults: watch::Sender<Faults>,
    counters: Counters,
}

/// One proxied link: a listener forwarding to one upstream. Dropping it stops the
/// listener and closes every connection it carries.
#[derive(Debug)]
pub struct Link {
    name: String,
    local: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): aborting it drops them.
        self.task.abort();
    }
}

impl Link {
    /// Listens on `listen` (port 0: any) and forwards every connection to `upstream`.
    pub async fn start(
        name: impl Into<String>,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> std::io::Result<Link> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            faults,
            counters: Counters::default(),
        });
        let task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Link {
            name: name.into(),
            local,
            upstream,
            shared,
            task,
        })
    }

    /// Its name (e.g. `n0->n1`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The faults now.
    pub fn faults(&self) -> Faults {
        *self.shared.faults.borrow()
    }

    /// Every chunk read from now on waits `one_way ± jitter`, in each direction.
    pub fn set_latency(&self, one_way: Duration, jitter: Duration) {
        self.shared.faults.send_modify(|f| {
            f.one_way = one_way;
            f.jitter = jitter;
        });
    }

    /// Holds every byte (also those already read) for `period` from now.
    pub fn stall(&self, period: Duration) {
        let until = Instant::now() + period;
        self.shared
            .faults
            .send_modify(|f| f.stalled_until = Some(until));
    }

    /// Holds every byte until [`Link::unclog`].
    pub fn clog(&self) {
        self.shared.faults.send_modify(|f| f.clogged = true);
    }

    /// Lets held bytes flow again (in order).
    pub fn unclog(&self) {
        self.shared.faults.send_modify(|f| f.clogged = false);
    }

    /// No latency, stall or clog.
    pub fn heal(&self) {
        self.shared.faults.send_replace(Faults::default());
    }

    /// What it carried so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        LinkStats {
            connections: c.connections.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors or similar: back off, keep listening.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                conns.spawn(connection(client, upstream, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Carries one connection until both directions ended. If the upstream refuses, the
/// client's connection is closed at once (it sees the failure as a reset/EOF).
async fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(pump(cr, sw, &shared), pump(sr, cw, &shared));
}

/// One direction: a reader queueing chunks with their due times, and a writer sending
/// each when it is due and the link holds nothing. Ends when the reader's side closed
/// and everything read was written (then the write half is shut down), or when writing
/// fails.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut last_due = Instant::now();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            shared
                .counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            let delay = shared.faults.borrow().delay();
            // Never before the chunk read before it: order is kept.
            let due = (Instant::now() + delay).max(last_due);
            last_due = due;
            if tx.send((due, buf)).await.is_err() {
                break;
            }
        }
    };
    let writer = async {
        let mut faults = shared.faults.subscribe();
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                let held = faults.borrow_and_update().held(Instant::now());
                match held {
                    None => break,
                    Some(None) => {
                        if faults.changed().await.is_err() {
                            return;
                        }
                    }
                    Some(Some(until)) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            r = faults.changed() => if r.is_err() { return },
                        }
                    }
                }
            }
            if to.write_all(&buf).await.is_err() {
                return;
            }
            shared
                .counters
                .bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    let mut reading = true;
    loop {
        tokio::select! {
            () = &mut reader, if reading => reading = false,
            () = &mut writer => return,
        }
    }
}

/// The nftables rules for one node's namespace: its connections to each `(address,
/// port)` go to the link port on `gateway` instead (`nat output`, so only connections
/// the node itself opens; conntrack rewrites the answers back).
pub fn nat_rules(table: &str, gateway: SocketAddr, redirects: &[(SocketAddr, u16)]) -> String {
    let mut rules = String::new();
    for (to, port) in redirects {
        rules.push_str(&format!(
            "    ip daddr {} tcp dport {} dnat to {}:{port}\n",
            to.ip(),
            to.port(),
            gateway.ip()
        ));
    }
    format!(
        "table ip {table} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// The nftables table holding a node namespace's redirects.
pub const NAT_TABLE: &str = "t12proxy";

/// One node of a namespaced cluster, as the link proxy needs it.
#[derive(Debug, Clone)]
pub struct Host<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// Its gRPC (cluster) address, which its peers dial.
    pub grpc: SocketAddr,
}

/// Every proxied link of a namespaced cluster: each node's connections to each other
/// node's gRPC port (`n<i>->n<j>`), and each node's connections to PostgreSQL
/// (`n<i>->store`).
#[derive(Debug)]
pub struct ClusterLinks {
    names: Vec<String>,
    /// `peers[i][j]`: node i's connections to node j (`None` for i = j).
    peers: Vec<Vec<Option<Link>>>,
    /// `store[i]`: node i's connections to PostgreSQL.
    store: Vec<Link>,
}

impl ClusterLinks {
    /// Starts a link on `gateway` (the test's address on the bridge) for every ordered
    /// pair of `hosts` and for every host to `store`, and installs the redirects in each
    /// host's namespace. Must run before the nodes start: a connection keeps the route
    /// it was opened with.
    pub async fn install(
        gateway: std::net::IpAddr,
        hosts: &[Host<'_>],
        store: SocketAddr,
    ) -> Result<ClusterLinks, String> {
        let listen = SocketAddr::new(gateway, 0);
        let mut peers = Vec::new();
        let mut stores = Vec::new();
        for (i, from) in hosts.iter().enumerate() {
            let mut row = Vec::new();
            let mut redirects = Vec::new();
            for (j, to) in hosts.iter().enumerate() {
                if i == j {
                    row.push(None);
                    continue;
                }
                let name = format!("{}->{}", from.name, to.name);
                let link = Link::start(name.clone(), listen, to.grpc)
                    .await
                    .map_err(|e| format!("link {name} on {listen}: {e}"))?;
                redirects.push((to.grpc, link.local_addr().port()));
                row.push(Some(link));
            }
            let name = format!("{}->store", from.name);
            let link = Link::start(name.clone(), listen, store)
                .await
                .map_err(|e| format!("link {name} on {listen}: {e}"))?;
            redirects.push((store, link.local_addr().port()));
            stores.push(link);
            peers.push(row);
            let rules = nat_rules(NAT_TABLE, listen, &redirects);
            crate::nemesis::nft_in(from.namespace, &rules)
                .await
                .map_err(|e| format!("{e} (nftables is Debian package nftables)"))?;
        }
        Ok(ClusterLinks {
            names: hosts.iter().map(|h| h.name.to_string()).collect(),
            peers,
            store: stores,
        })
    }

    /// Node names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Node `i`'s connections to node `j`'s gRPC port.
    pub fn peer(&self, i: usize, j: usize) -> Option<&Link> {
        self.peers.get(i)?.get(j)?.as_ref()
    }

    /// Node `i`'s connections to PostgreSQL.
    pub fn store(&self, i: usize) -> Option<&Link> {
        self.store.get(i)
    }

    /// Every node-to-node link.
    pub fn peer_links(&self) -> impl Iterator<Item = &Link> {
        self.peers.iter().flatten().flatten()
    }

    /// Every node-to-PostgreSQL link.
    pub fn store_links(&self) -> impl Iterator<Item = &Link> {
        self.store.iter()
    }

    /// Every link: node-to-node first (by source, then destination), then node-to-store.
    pub fn all(&self) -> impl Iterator<Item = &Link> {
        self.peer_links().chain(self.store_links())
    }

    /// `name: connections, bytes` of every link, for the run's notes.
    pub fn describe(&self) -> String {
        self.all()
            .map(|l| {
                let s = l.stats();
                format!("{} {} conn, {} B", l.name(), s.connections, s.bytes_read)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes everything back; its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// An upstream that accepts one connection and hands it over.
    async fn sink() -> (SocketAddr, tokio::sync::oneshot::Receiver<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = l.local_addr().expect("sink addr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok((s, _)) = l.accept().await {
                let _ = tx.send(s);
            }
        });
        (addr, rx)
    }

    async fn link_to(upstream: SocketAddr) -> Link {
        Link::start("test", "127.0.0.1:0".parse().expect("addr"), upstream)
            .await
            .expect("start link")
    }

    /// `fut`, failing the test (instead of hanging it) if a broken proxy never lets it
    /// finish; generous, never part of an assertion about speed.
    async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .unwrap_or_else(|_| panic!("{what}: not done within 30 s"))
    }

    /// Bounded wait for `what`, polling `cond`; generous, never part of an assertion.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_arrive_intact_and_in_order_under_jitter_both_ways() {
        let link = link_to(echo().await).await;
        // 0 to 6 ms per chunk: chunks read later are often drawn a shorter delay.
        link.set_latency(Duration::from_millis(3), Duration::from_millis(3));
        let data = pattern(2 * 1024 * 1024 + 17);
        let s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Many small writes, so many chunks with their own delays.
            for piece in sent.chunks(997) {
                w.write_all(piece).await.expect("write");
            }
            w.shutdown().await.expect("shutdown");
        });
        let mut back = Vec::new();
        bounded("read_to_end", r.read_to_end(&mut back))
            .await
            .expect("read back");
        writer.await.expect("writer");
        assert_eq!(back.len(), data.len(), "every byte came back");
        assert!(back == data, "bytes came back reordered or altered");
        let st = link.stats();
        assert_eq!(st.bytes_read, 2 * data.len() as u64);
        assert_eq!(st.bytes_written, 2 * data.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_delays_every_message_by_at_least_its_minimum() {
        let link = link_to(echo().await).await;
        // One way 150 ± 50 ms: a round trip through the proxy takes ≥ 2 × 100 ms.
        link.set_latency(Duration::from_millis(150), Duration::from_millis(50));
        let mut s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        for i in 0..5u8 {
            let sent = Instant::now();
            s.write_all(&[i; 10]).await.expect("write");
            let mut buf = [0u8; 10];
            bounded("read_exact", s.read_exact(&mut buf))
                .await
                .expect("read");
            let rtt = sent.elapsed();
            assert_eq!(buf, [i; 10]);
            assert!(
                rtt >= Duration::from_millis(200),
                "round trip {rtt:?} < 2 × the minimum one-way delay"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_delay_is_a_queue_the_reader_keeps_reading_while_chunks_wait() {
        let (addr, got) = sink().await;
        let link = link_to(addr).await;
        link.set_latency(Duration::from_millis(2000), Duration::ZERO);
        let mut s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let mut up = bounded("upstream connection", got)
            .await
            .expect("upstream connection");
        // Ten messages, each sent once the proxy has read the one before (so each is a
        // chunk of its own), all long before the first is due.
        for i in 0..10u8 {
            s.write_all(&[i; 100]).await.expect("write");
            let read = 100 * (u64::from(i) + 1);
            wait_for("the proxy to read the message", || {
                link.stats().bytes_read == read
            })
            .await;
        }
        // A reader that slept on each chunk until it was due would only have read the
        // second message after delivering the first.
        assert_eq!(
            link.stats().bytes_written,
            0,
            "a message went out before the proxy had read the ones behind it"
        );
        let mut first = [0u8; 100];
        bounded("read_exact", up.read_exact(&mut first))
            .await
            .expect("first message");
        assert_eq!(first, [0u8; 100]);
        let mut rest = [0u8; 900];
        bounded("read_exact", up.read_exact(&mut rest))
            .await
            .expect("the rest");
        for (i, c) in rest.chunks(100).enumerate() {
            assert_eq!(c, [i as u8 + 1; 100]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clog_holds_every_byte_until_unclogged() {
        let (addr, got) = sink().await;
        let link = link_to(addr).await;
        let mut s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let up = bounded("upstream connection", got)
            .await
            .expect("upstream connection");
        link.clog();
        let data = pattern(50_000);
        s.write_all(&data).await.expect("write");
        wait_for("the proxy to read everything", || {
            link.stats().bytes_read == data.len() as u64
        })
        .await;
        // Time for a wrong proxy to pass bytes on; a right one never does.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(link.stats().bytes_written, 0, "bytes passed a clog");
        let mut probe = [0u8; 1];
        assert!(
            matches!(up.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the upstream got bytes through a clog"
        );
        link.unclog();
        let mut up = up;
        let mut back = vec![0u8; data.len()];
        bounded("read_exact", up.read_exact(&mut back))
            .await
            .expect("read after unclog");
        assert!(back == data, "held bytes came out altered or reordered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stall_holds_bytes_for_at_least_its_period_then_delivers_them() {
        let (addr, got) = sink().await;
        let link = link_to(addr).await;
        let mut s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let mut up = bounded("upstream connection", got)
            .await
            .expect("upstream connection");
        let stalled = Instant::now();
        link.stall(Duration::from_millis(400));
        s.write_all(b"held").await.expect("write");
        let mut buf = [0u8; 4];
        bounded("read_exact", up.read_exact(&mut buf))
            .await
            .expect("read");
        assert!(stalled.elapsed() >= Duration::from_millis(400));
        assert_eq!(&buf, b"held");
        // After the stall, bytes flow without one.
        assert_eq!(link.faults().held(Instant::now()), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clogged_link_buffers_a_bounded_amount_and_pushes_back() {
        let (addr, got) = sink().await;
        let link = link_to(addr).await;
        let s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let _up = bounded("upstream connection", got)
            .await
            .expect("upstream connection");
        link.clog();
        let (_r, mut w) = s.into_split();
        let total = 64 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let block = vec![7u8; 64 * 1024];
            let mut n = 0;
            while n < total {
                if w.write_all(&block).await.is_err() {
                    break;
                }
                n += block.len();
            }
            n
        });
        // Wait until the proxy's reading stops growing (its queue is full).
        let mut last = u64::MAX;
        for round in 0.. {
            assert!(round < 100, "the proxy kept reading from a clogged link");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = link.stats().bytes_read;
            if now == last {
                break;
            }
            last = now;
        }
        assert!(!writer.is_finished(), "64 MiB went into a clogged link");
        // The queue, the chunk the reader waits to queue, the chunk the writer holds.
        let bound = (QUEUE_CHUNKS + 2) as u64 * CHUNK as u64;
        assert!(
            link.stats().bytes_read <= bound,
            "the proxy buffered {} bytes (bound {bound})",
            link.stats().bytes_read
        );
        writer.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_one_side_closes_the_other_after_its_bytes() {
        let (addr, got) = sink().await;
        let link = link_to(addr).await;
        link.set_latency(Duration::from_millis(50), Duration::from_millis(20));
        let mut s = TcpStream::connect(link.local_addr())
            .await
            .expect("connect");
        let mut up = bounded("upstream connection", got)
            .await
            .expect("upstream connection");
        s.write_all(b"last words").await.expect("write");
        s.shutdown()
            .await
            .expect("client shuts down its write half");
        let mut got = Vec::new();
        bounded("read_to_end", up.read_to_end(&mut got))
            .await
            .expect("upstream reads to EOF");
        assert_eq!(got, b"last words");
        // The other half still works, then closes too.
        up.write_all(b"reply").await.expect("upstream writes");
        drop(up);
        let mut back = Vec::new();
        bounded("read_to_end", s.read_to_end(&mut back))
            .await
            .expect("client reads to EOF");
        assert_eq!(back, b"reply");
    }

    #[test]
    fn nat_rules_redirect_each_destination_to_its_link_port() {
        let r = nat_rules(
            "t12proxy",
            "10.12.3.1:0".parse().expect("addr"),
            &[
                ("10.12.3.4:7070".parse().expect("addr"), 40001),
                ("10.12.3.2:5432".parse().expect("addr"), 40002),
            ],
        );
        assert!(r.contains("type nat hook output priority -100"), "{r}");
        assert!(
            r.contains("ip daddr 10.12.3.4 tcp dport 7070 dnat to 10.12.3.1:40001"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 10.12.3.2 tcp dport 5432 dnat to 10.12.3.1:40002"),
            "{r}"
        );
    }
}
