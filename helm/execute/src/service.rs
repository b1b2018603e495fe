//! The device Service as kube-proxy makes it: a virtual address whose connections go,
//! round robin, to the pods that are ready and not terminating, each connection to one
//! pod for its whole life (TCP, so TLS passes through to the pods). No ready pod: the
//! connection is refused. Connections per pod are counted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

/// One pod behind the Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod's IP and the target port.
    pub addr: SocketAddr,
    /// Readiness probe passing.
    pub ready: bool,
    /// Marked for deletion (no new connections, as EndpointSlice `terminating`).
    pub terminating: bool,
}

/// The Service's endpoints, by pod name.
#[derive(Debug, Default)]
pub struct Endpoints {
    pods: Mutex<BTreeMap<String, Endpoint>>,
    connections: Mutex<BTreeMap<String, u64>>,
    next: AtomicUsize,
}

impl Endpoints {
    /// Adds or updates a pod.
    pub fn set(&self, pod: &str, e: Endpoint) {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_string(), e);
    }

    /// Removes a pod.
    pub fn remove(&self, pod: &str) {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod);
    }

    /// The pods that get new connections now.
    pub fn serving(&self) -> Vec<(String, SocketAddr)> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.ready && !e.terminating)
            .map(|(n, e)| (n.clone(), e.addr))
            .collect()
    }

    /// Connections each pod was given so far.
    pub fn connections(&self) -> BTreeMap<String, u64> {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn pick(&self) -> Option<(String, SocketAddr)> {
        let serving = self.serving();
        if serving.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % serving.len();
        let (name, addr) = serving[i].clone();
        *self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.clone())
            .or_default() += 1;
        Some((name, addr))
    }
}

/// The proxy task; stops when dropped.
#[derive(Debug)]
pub struct ServiceProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceProxy {
    /// Listens on `bind` (the Service's address and port).
    pub async fn start(bind: SocketAddr, endpoints: Arc<Endpoints>) -> Result<ServiceProxy> {
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the Service address {bind}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Some((_, target)) = endpoints.pick() else {
                    drop(client);
                    continue;
                };
                tokio::spawn(async move {
                    let connect = tokio::time::timeout(
                        std::time::Duration::from_secs(3),
                        TcpStream::connect(target),
                    )
                    .await;
                    if let Ok(Ok(mut server)) = connect {
                        let _ = server.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(ServiceProxy { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
