//! The device port's connections, below HTTP: how many are open, from where, and what a
//! connection says when the HTTP layer itself refuses a request.
//!
//! - [`Connections`] admits or refuses each accepted TCP connection: at most
//!   `max_connections_per_source` per client address (trusted proxies excepted) and
//!   `capacity` in all, where the capacity never exceeds what the process's file limit
//!   allows. A refused connection is closed at once, before TLS or HTTP cost anything.
//!   `/readyz` compares [`Connections::open`] with the capacity, so a load balancer stops
//!   sending new clients before the node runs out (issue 13 finding 5).
//! - [`Conn`] is the stream actix-http reads and writes. Its one intervention: the
//!   responses actix-http's HTTP/1 dispatcher writes on its own, with an empty body,
//!   before any handler runs — 400 (unparsable request), 408 (headers too slow), 431
//!   (headers too large) — get the API's JSON error body (finding 7), built by
//!   [`NodeError`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::security::limits::Sources;

/// File descriptors kept for everything that is not a device connection (store pool,
/// peers, files).
const FD_RESERVE: usize = 256;

/// The soft limit on open files of this process (`/proc/self/limits`), if known.
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Open connections of the device port, in all and per source.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    capacity: usize,
    max_per_source: usize,
    sources: Sources,
    metrics: Metrics,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `capacity` connections.
    Full,
    /// Its source holds `max_per_source`.
    Source,
}

impl Connections {
    /// At most `max_total` (and what the file limit allows) in all, `max_per_source` from one
    /// address unless `sources` says it is a trusted proxy.
    pub fn new(
        max_total: usize,
        max_per_source: usize,
        sources: Sources,
        metrics: Metrics,
    ) -> Arc<Self> {
        let by_files = open_files_limit().map_or(usize::MAX, |n| n.saturating_sub(FD_RESERVE));
        let capacity = max_total.min(by_files).max(1);
        if capacity < max_total {
            tracing::warn!(
                capacity,
                max_connections = max_total,
                "the open-files limit caps device connections below --max-connections; raise `ulimit -n`"
            );
        }
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            capacity,
            max_per_source,
            sources,
            metrics,
        })
    }

    /// Admits a new connection from `peer`: a permit that counts it until dropped, or why not.
    pub fn admit(self: &Arc<Self>, peer: Option<SocketAddr>) -> Result<Permit, Refused> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.limited("connections_total");
            return Err(Refused::Full);
        }
        let source = peer
            .map(|p| p.ip())
            .filter(|ip| !self.sources.is_trusted_proxy(*ip));
        if let Some(ip) = source {
            let mut per = self
                .per_source
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = per.entry(ip).or_insert(0);
            if *n >= self.max_per_source {
                drop(per);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.metrics.limited("connections_per_source");
                return Err(Refused::Source);
            }
            *n += 1;
        }
        self.metrics.connections_open(1);
        Ok(Permit {
            conns: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Most connections the node takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// One admitted connection; dropping it (the connection closed) frees its place.
#[derive(Debug)]
pub struct Permit {
    conns: Arc<Connections>,
    source: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut per = self
                .conns
                .per_source
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
        self.conns.open.fetch_sub(1, Ordering::AcqRel);
        self.conns.metrics.connections_open(-1);
    }
}

/// A device connection: plain TCP (loopback development) or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An admitted connection as actix-http sees it: the stream, its permit, and the JSON
/// bodies of dispatcher-level errors.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    _permit: Permit,
    /// Bytes accepted from the writer but not yet written to the socket (only ever a
    /// rewritten error response).
    pending: Vec<u8>,
    written: usize,
}

impl Conn {
    /// Wraps an admitted stream.
    pub fn new(stream: Stream, permit: Permit) -> Self {
        Conn {
            stream,
            _permit: permit,
            pending: Vec::new(),
            written: 0,
        }
    }

    fn io(&mut self) -> Pin<&mut dyn AsyncWriteRead> {
        pin_io(&mut self.stream)
    }

    /// Writes what is pending; `Ready(Ok)` once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let r = pin_io(&mut self.stream).poll_write(cx, &self.pending[self.written..]);
            match ready!(r) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

fn pin_io(stream: &mut Stream) -> Pin<&mut dyn AsyncWriteRead> {
    match stream {
        Stream::Plain(s) => {
            let p: Pin<&mut TcpStream> = Pin::new(s);
            p
        }
        Stream::Tls(s) => {
            let p: Pin<&mut tokio_rustls::server::TlsStream<TcpStream>> = Pin::new(s.as_mut());
            p
        }
    }
}

/// Both halves, as one object-safe trait for [`Conn::io`].
trait AsyncWriteRead: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncWriteRead for T {}

/// The response actix-http writes for a request it refuses itself, with the API's JSON
/// error body: the head's `content-length: 0` becomes the body's length and type. `None`
/// for anything else (every response of a handler already has its body).
pub fn with_json_body(out: &[u8]) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";
    let status = out.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    let error = match status {
        b"400" => NodeError::BadRequest("malformed HTTP request".into()),
        b"408" => NodeError::RequestTimeout("request headers did not arrive in time".into()),
        b"431" => NodeError::HeadersTooLarge("request headers are too large".into()),
        _ => return None,
    };
    let line_end = out.windows(2).position(|w| w == b"\r\n")?;
    if !out[line_end..].starts_with(EMPTY) {
        return None;
    }
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body = serde_json::to_vec(&error.body()).ok()?;
    let mut rewritten = Vec::with_capacity(out.len() + body.len() + 64);
    rewritten.extend_from_slice(&out[..line_end]);
    rewritten.extend_from_slice(
        format!(
            "\r\ncontent-length: {}\r\ncontent-type: application/json\r\n",
            body.len()
        )
        .as_bytes(),
    );
    rewritten.extend_from_slice(&out[line_end + EMPTY.len()..head_end]);
    rewritten.extend_from_slice(&body);
    rewritten.extend_from_slice(&out[head_end..]);
    Some(rewritten)
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        // The dispatcher hands over everything it encoded since its last write, so a
        // response head it wrote itself starts the buffer.
        if let Some(rewritten) = with_json_body(buf) {
            self.pending = rewritten;
            self.written = 0;
            // Written now if the socket takes it, else by the flush that follows.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatcher_errors_get_the_json_body_and_handler_answers_are_untouched() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\ndate: Mon, 01 Jan 2026 00:00:00 GMT\r\n\r\n";
        let out = with_json_body(head).expect("rewritten");
        let text = String::from_utf8(out).expect("ascii");
        let (h, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            h.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{h}"
        );
        assert!(h.contains("\r\ncontent-type: application/json\r\n"), "{h}");
        assert!(h.contains("\r\nconnection: close\r\n"), "{h}");
        assert!(
            h.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{h}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(v["error"], "headers_too_large");
        for status in ["400 Bad Request", "408 Request Timeout"] {
            let head = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            assert!(with_json_body(head.as_bytes()).is_some(), "{status}");
        }
        // A handler's error already has its body; other statuses are never touched.
        assert!(
            with_json_body(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 57\r\n\r\n{}").is_none()
        );
        assert!(with_json_body(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(with_json_body(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(with_json_body(b"{\"buckets\":[]}").is_none());
        assert!(with_json_body(b"").is_none());
    }
}
