//! `tether check <url>`, the Helm chart's `helm test`: passes against a healthy node, fails
//! (exit 1, saying why) when the member count is not the expected one or nothing answers,
//! and refuses an `https://` URL without a CA to verify it with. (Run through a Service,
//! as rendered, in `helm/execute`.)

use std::time::Duration;

use tether_test_support::node::*;

async fn check(args: &[&str]) -> (bool, String) {
    let out = within(
        Duration::from_secs(60),
        "tether check",
        tokio::process::Command::new(tether_test_support::bin::tether())
            .arg("check")
            .args(args)
            .output(),
    )
    .await
    .expect("run tether check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_node_and_says_what_fails() {
    let node = Node::start().await;
    let (ok, out) = check(&[&node.base, "--expect-members", "1", "--timeout-s", "10"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("ok   /healthz"), "{out}");
    assert!(
        out.contains("ok   /readyz: ready 3 times in a row"),
        "{out}"
    );
    assert!(
        out.contains("ok   device API: 401 \"unauthorized\""),
        "{out}"
    );
    assert!(out.contains("all checks passed"), "{out}");

    let (ok, out) = check(&[&node.base, "--expect-members", "3", "--timeout-s", "2"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL /readyz: 1 members, expected 3"), "{out}");

    let (ok, out) = check(&["https://127.0.0.1:1", "--timeout-s", "1"]).await;
    assert!(!ok && out.contains("needs --ca-file"), "{out}");

    // Nothing listening: fails after the timeout, naming the connection failure.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let (ok, out) = check(&[&format!("http://127.0.0.1:{port}"), "--timeout-s", "2"]).await;
    assert!(!ok && out.contains("FAIL /healthz"), "{out}");
}
