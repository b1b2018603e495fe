//! A push gateway on loopback (API.md "Presence and wake-ups"): what a node's
//! `--push-webhook` posts wake-ups to. It records every request, checks its
//! `X-Tether-Signature` against the shared secret, answers each with the next status a test
//! scripted (200 once the script runs out), and passes the device id of every validly
//! signed wake-up it accepted to whoever listens ([`Gateway::wakes`]) — the simulator's
//! sleeping devices wake on it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tether_proto::presence::{wakeup_signature_valid, SIGNATURE_HEADER};
use tokio::sync::mpsc;

/// Most requests remembered (a long simulation stops recording, it keeps counting).
const KEPT: usize = 100_000;

/// One request the gateway received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its `X-Tether-Signature`.
    pub signature: Option<String>,
    /// Its body.
    pub body: Vec<u8>,
    /// The signature is the body's under the gateway's secret.
    pub signed: bool,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The wake-up's `device_id`.
    pub fn device(&self) -> Option<String> {
        self.json()["device_id"].as_str().map(str::to_string)
    }
}

#[derive(Debug, Default)]
struct State {
    got: Vec<Received>,
    total: u64,
    unsigned: u64,
    script: VecDeque<u16>,
    wakes: Option<mpsc::UnboundedSender<String>>,
}

/// The gateway; cloning shares it.
#[derive(Debug, Clone)]
pub struct Gateway {
    addr: SocketAddr,
    secret: Arc<Vec<u8>>,
    state: Arc<Mutex<State>>,
}

impl Gateway {
    /// A gateway on a free loopback port.
    pub async fn start(secret: &[u8]) -> Gateway {
        Self::bind("127.0.0.1:0".parse().expect("loopback"), secret)
            .await
            .expect("bind a loopback port for the push gateway")
    }

    /// A gateway on `addr`, serving on the current tokio runtime for as long as it runs.
    pub async fn bind(addr: SocketAddr, secret: &[u8]) -> std::io::Result<Gateway> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let gw = Gateway {
            addr: listener.local_addr()?,
            secret: Arc::new(secret.to_vec()),
            state: Arc::default(),
        };
        let g = gw.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| g.clone().serve(req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(gw)
    }

    async fn serve(
        self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
        let signature = req
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = req.into_body().collect().await?.to_bytes().to_vec();
        let signed = signature
            .as_deref()
            .is_some_and(|s| wakeup_signature_valid(&self.secret, &body, s));
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let status = if signed {
            st.script.pop_front().unwrap_or(200)
        } else {
            401
        };
        st.total += 1;
        if !signed {
            st.unsigned += 1;
        }
        let r = Received {
            signature,
            body,
            signed,
            status,
        };
        if status == 200 {
            if let (Some(tx), Some(device)) = (&st.wakes, r.device()) {
                let _ = tx.send(device);
            }
        }
        if st.got.len() < KEPT {
            st.got.push(r);
        }
        drop(st);
        Ok(hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default())
    }

    /// The URL to give `--push-webhook`.
    pub fn url(&self) -> String {
        format!("http://{}/wake", self.addr)
    }

    /// Answers the next validly signed request with `status` (in order, before any 200).
    pub fn fail_next(&self, status: u16) {
        self.lock().script.push_back(status);
    }

    /// The device id of every wake-up accepted from now on (one listener).
    pub fn wakes(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().wakes = Some(tx);
        rx
    }

    /// Every request received so far (the first [`KEPT`]).
    pub fn received(&self) -> Vec<Received> {
        self.lock().got.clone()
    }

    /// Requests received, and those not validly signed.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.total, st.unsigned)
    }

    /// The requests for `device`.
    pub fn for_device(&self, device: &str) -> Vec<Received> {
        self.lock()
            .got
            .iter()
            .filter(|r| r.device().as_deref() == Some(device))
            .cloned()
            .collect()
    }

    /// Waits until `n` requests for `device` arrived; panics after `limit`.
    pub async fn wait_for(&self, device: &str, n: usize, limit: Duration) -> Vec<Received> {
        crate::node::within(limit, "wake-ups", async {
            loop {
                let got = self.for_device(device);
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
