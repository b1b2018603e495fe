//! The HTTP client of the `http/protobuf` OTLP exporter: hyper on the telemetry runtime.
//!
//! The SDK's batch span processor exports from a plain thread (`futures` `block_on`), where
//! an async client that needs a tokio reactor cannot run, and the blocking `reqwest` client
//! the exporter offers would add a second reqwest to the workspace. So each request is
//! spawned onto the telemetry runtime and awaited through its `JoinHandle`, which works
//! from any executor.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

/// Longest a collector may take to answer one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read (an OTLP answer is a few bytes).
const MAX_ANSWER: usize = 1 << 20;

/// Sends OTLP/HTTP requests from the telemetry runtime.
#[derive(Debug, Clone)]
pub struct RuntimeHttpClient {
    runtime: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl RuntimeHttpClient {
    /// A client whose connections live on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        RuntimeHttpClient { runtime, client }
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, Full::new(body));
            let answer = tokio::time::timeout(EXPORT_TIMEOUT, async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| -> HttpError { e })?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            })
            .await;
            match answer {
                Ok(r) => r,
                Err(_) => {
                    Err(format!("no answer from the collector within {EXPORT_TIMEOUT:?}").into())
                }
            }
        });
        task.await.map_err(|e| -> HttpError { Box::new(e) })?
    }
}
