//! TLS on the device port (issue 4 §8): a certificate from `tether admin self-signed`, a
//! client that trusts only that certificate, and the full register → pair → subscribe →
//! update flow over real, verified TLS. Plain HTTP is refused on non-loopback addresses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Certificate, Client, StatusCode};
use serde_json::{json, Value};
use tether_test_support::node::*;

/// A self-signed certificate and key written by the admin CLI.
struct TestCert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

async fn self_signed(sans: &[&str]) -> TestCert {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let mut args: Vec<std::ffi::OsString> = vec![
        "self-signed".into(),
        "--cert".into(),
        cert.clone().into(),
        "--key".into(),
        key.clone().into(),
    ];
    for s in sans {
        args.push("--san".into());
        args.push((*s).into());
    }
    admin(args).await.ok();
    let pem = std::fs::read_to_string(&cert).expect("read cert");
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key)
            .expect("stat key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "private key file mode {mode:o}");
    }
    TestCert {
        _dir: dir,
        cert,
        key,
    }
}

/// A client whose only trust anchor is `cert` (rustls, ring; no built-in roots, no
/// verification shortcuts).
fn trusting(cert: &Path) -> Client {
    let pem = std::fs::read(cert).expect("read cert");
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(Certificate::from_pem(&pem).expect("parse cert"))
        .pool_max_idle_per_host(64)
        .build()
        .expect("TLS client")
}

fn held(id: &str, bucket: &Value) -> Value {
    json!({"id": id, "timestamp": bucket["timestamp"], "version": bucket["version"]})
}

/// The error and all its sources, for matching on the cause.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_pair_subscribe_update_over_verified_tls() {
    const T: &str = "TLS00001";
    let tc = self_signed(&["localhost", "127.0.0.1"]).await;
    let client = trusting(&tc.cert);
    let node = Node::builder()
        .tls(&tc.cert, &tc.key)
        .user("alice")
        .client(client.clone())
        .start()
        .await;
    assert!(node.base.starts_with("https://127.0.0.1:"), "{}", node.base);

    // A client without the certificate as a trust anchor fails the handshake.
    let untrusting = Client::builder().use_rustls_tls().build().expect("client");
    let err = untrusting
        .get(node.url("/healthz"))
        .send()
        .await
        .expect_err("a certificate nobody vouches for must be refused");
    let why = chain(&err);
    assert!(err.is_connect(), "handshake failure expected, got {why}");
    assert!(
        why.to_ascii_lowercase().contains("certificate"),
        "the failure is the certificate check: {why}"
    );
    // Plain HTTP to the TLS port does not get an answer either.
    let plain = http_client()
        .get(node.url("/healthz").replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP on the TLS port answered: {plain:?}"
    );
    // The trusting client also verifies the name: `localhost` is in the certificate.
    let r = client
        .get(node.url("/healthz").replacen("127.0.0.1", "localhost", 1))
        .send()
        .await
        .expect("https://localhost");
    assert_eq!(r.status(), StatusCode::OK);

    // Register with default credentials over TLS: first contact, assigned credentials.
    let d = node.device(T);
    let r = d.register("thermostat", "1.0.0").await;
    let v = r.json();
    assert_eq!(r.status, StatusCode::OK, "{v}");
    assert!(set_credentials_of(&r).is_some(), "first contact over TLS");
    assert!(
        v["sync_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "a TLS node hands out an https sync_url: {v}"
    );

    // Pair.
    let alice = node.user("alice");
    let code = d.pairing_code().await;
    let r = alice
        .pair(&code, Some("tlshome"))
        .await
        .expect_json(StatusCode::OK);
    assert_eq!(r["device_id"], T, "{r}");

    // The device holds a subscribe; the user updates; the device is answered.
    let shared = format!("shared.{T}");
    let b = d.bucket(&shared).await;
    let sub = {
        let d = d.with_client(trusting(&tc.cert));
        let body =
            json!({"buckets": [held(&shared, &b)], "session": "device", "timeout_ms": 60_000});
        tokio::spawn(async move { d.subscribe(&body, Duration::from_secs(30)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    let (_, v2) = alice
        .write(
            &shared,
            json!({"target_temperature": 22}),
            u64_of(&b, "version"),
        )
        .await;
    let r = within(NOTIFY_DEADLINE, "subscribe over TLS answered", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    let got = bucket_in(&r, &shared);
    assert_eq!(u64_of(&got, "version"), v2, "{r}");
    assert_eq!(got["value"]["target_temperature"], 22, "{r}");

    // And the other way: the user holds, the device reports.
    let dev = format!("device.{T}");
    let b = alice.bucket(&dev).await;
    let sub = {
        let a = alice.with_client(trusting(&tc.cert));
        let body = json!({"buckets": [held(&dev, &b)], "session": "app", "timeout_ms": 60_000});
        tokio::spawn(async move { a.subscribe(&body, Duration::from_secs(30)).await })
    };
    node.wait_held(1, REQUEST_DEADLINE).await;
    d.write(
        &dev,
        json!({"current_temperature": 21.5}),
        u64_of(&b, "version"),
    )
    .await;
    let r = within(NOTIFY_DEADLINE, "user's subscribe over TLS answered", sub)
        .await
        .expect("subscribe task")
        .expect_json(StatusCode::OK);
    assert_eq!(bucket_in(&r, &dev)["value"]["current_temperature"], 21.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_refused_on_non_loopback_addresses() {
    let failure = Node::builder()
        .listen("0.0.0.0:0")
        .try_start()
        .await
        .expect_err("plain HTTP on 0.0.0.0 must not start");
    let status = failure
        .status
        .unwrap_or_else(|| panic!("expected an exit, got: {}", failure.what));
    assert!(!status.success(), "exit status {status:?}");
    assert!(
        failure.stderr.contains("non-loopback"),
        "the refusal says why: {}",
        failure.stderr
    );
}

/// With TLS, a wildcard address is allowed; devices register over it with their default
/// credentials — also from a non-loopback peer address (the host must have one: the test
/// fails, never skips, without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_on_non_loopback_addresses() {
    // A local non-loopback address, if the host has one (no packet is sent).
    let local_ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let ip_san = local_ip.map(|ip| ip.to_string());
    let mut sans = vec!["localhost", "127.0.0.1"];
    if let Some(ip) = &ip_san {
        sans.push(ip);
    }
    let tc = self_signed(&sans).await;
    let node = Node::builder()
        .listen("0.0.0.0:0")
        .tls(&tc.cert, &tc.key)
        .client(trusting(&tc.cert))
        .start()
        .await;
    assert!(
        node.printed.starts_with("https://0.0.0.0:"),
        "{}",
        node.printed
    );
    node.send(node.anon(reqwest::Method::GET, "/healthz"))
        .await
        .expect(StatusCode::OK);
    node.device("WILD0001").register_thermostat().await;

    match ip_san {
        Some(ip) => {
            let port = node.base.rsplit(':').next().expect("port");
            let base = format!("https://{ip}:{port}");
            let mut d = node.device("WILD0002");
            d.base = base;
            let r = d.register("thermostat", "1.0.0").await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "default credentials over TLS from a non-loopback peer ({ip}): {}",
                r.text()
            );
            assert!(set_credentials_of(&r).is_some());
            d.bucket("device.WILD0002").await;
        }
        None => panic!(
            "this test needs a non-loopback IPv4 address on this host (none routes to \
             192.0.2.1): plain HTTP is refused off loopback, so the non-loopback peer is \
             the check that TLS alone admits devices; give the host an interface address"
        ),
    }
}

/// Kubelet's atomic writer, as for a mounted Secret: the files go into a fresh directory,
/// `..data` is swapped to it in one rename, and `tls.crt`/`tls.key` are symlinks through
/// `..data` (created once).
fn atomic_secret_update(dir: &Path, generation: u32, cert: &Path, key: &Path) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..gen{generation}"));
    std::fs::create_dir(&data).expect("generation dir");
    std::fs::copy(cert, data.join("tls.crt")).expect("copy cert");
    std::fs::copy(key, data.join("tls.key")).expect("copy key");
    for name in ["tls.crt", "tls.key"] {
        let visible = dir.join(name);
        if std::fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(name), &visible).expect("visible symlink");
        }
    }
    let tmp = dir.join("..data_tmp");
    symlink(format!("..gen{generation}"), &tmp).expect("tmp symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

/// Whether a client trusting only `cert` completes a request to `node`.
async fn accepted_by(cert: &Path, node: &Node) -> bool {
    trusting(cert)
        .get(node.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok()
}

/// Kubernetes renews a Secret in place and signals nothing: the node must notice the new
/// files by itself, serve the new certificate to new connections, and keep the working
/// one when an update is unusable (a key that does not match its certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_replaced_in_place_are_served_without_restart_or_signal() {
    let first = self_signed(&["localhost", "127.0.0.1"]).await;
    let second = self_signed(&["localhost", "127.0.0.1"]).await;
    let third = self_signed(&["localhost", "127.0.0.1"]).await;
    let mounted = tempfile::tempdir().expect("secret dir");
    atomic_secret_update(mounted.path(), 1, &first.cert, &first.key);
    let (crt, key) = (
        mounted.path().join("tls.crt"),
        mounted.path().join("tls.key"),
    );
    let node = Node::builder()
        .tls(&crt, &key)
        .arg("--tls-reload-interval-s")
        .arg("1")
        .client(trusting(&first.cert))
        .start()
        .await;
    assert!(accepted_by(&first.cert, &node).await);
    assert!(!accepted_by(&second.cert, &node).await);

    atomic_secret_update(mounted.path(), 2, &second.cert, &second.key);
    let start = std::time::Instant::now();
    while !accepted_by(&second.cert, &node).await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the new certificate is not served 20 s after the files changed; stderr:\n{}",
            node.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !accepted_by(&first.cert, &node).await,
        "new handshakes no longer get the old certificate"
    );

    // A certificate with another certificate's key: refused, the working pair stays.
    atomic_secret_update(mounted.path(), 3, &third.cert, &second.key);
    let start = std::time::Instant::now();
    while !node
        .stderr_all()
        .contains("cannot be used; keeping the previous ones")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the mismatched pair was not noticed; stderr:\n{}",
            node.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        accepted_by(&second.cert, &node).await,
        "still serving the working pair"
    );
    assert!(!accepted_by(&third.cert, &node).await);
}

/// README: "`kill -HUP` reloads the certificate files": after the files are replaced and
/// the node gets SIGHUP, new connections are served with the new certificate (a client
/// trusting only the new one connects), without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_files() {
    let first = self_signed(&["localhost", "127.0.0.1"]).await;
    let second = self_signed(&["localhost", "127.0.0.1"]).await;
    let served = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (
        served.path().join("cert.pem"),
        served.path().join("key.pem"),
    );
    std::fs::copy(&first.cert, &cert).expect("copy cert");
    std::fs::copy(&first.key, &key).expect("copy key");
    let node = Node::builder()
        .tls(&cert, &key)
        .client(trusting(&first.cert))
        .start()
        .await;
    let healthz = node.url("/healthz");
    // A fresh client (no pooled connection) trusting only the second certificate.
    let new_only = || trusting(&second.cert).get(&healthz).send();
    let refused = new_only()
        .await
        .expect_err("the first certificate is served");
    assert!(
        chain(&refused).to_lowercase().contains("certificate"),
        "{}",
        chain(&refused)
    );

    std::fs::copy(&second.cert, &cert).expect("replace cert");
    std::fs::copy(&second.key, &key).expect("replace key");
    let st = tokio::process::Command::new("kill")
        .arg("-HUP")
        .arg(node.pid().to_string())
        .status()
        .await
        .expect("run kill -HUP");
    assert!(st.success());
    let start = std::time::Instant::now();
    loop {
        match new_only().await {
            Ok(r) if r.status() == StatusCode::OK => break,
            other => assert!(
                start.elapsed() < REQUEST_DEADLINE,
                "the new certificate is not served after SIGHUP: {other:?}\n{}",
                node.stderr_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The node kept running: the old certificate is no longer what it serves.
    trusting(&first.cert)
        .get(&healthz)
        .send()
        .await
        .expect_err("the first certificate is gone");
}
