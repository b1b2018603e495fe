//! The OpenAPI document against the routes the node really serves (issue 14).
//!
//! Routes are registered with actix-web's `.route(path, web::<method>()…)` (or
//! `web::resource(path).route(web::<method>()…)`), which no
//! OpenAPI generator can see. This test reads the node's source with `syn`, collects
//! every such registration, and fails if a route exists that `GET /v1/openapi.json` does
//! not describe, or the spec describes an operation no route serves. It also calls every
//! described operation on a running node to prove it reaches a handler (never the
//! "no route" fallback), and checks what clients and Schemathesis rely on: OpenAPI 3.1,
//! the Basic security scheme, error schemas, examples and the register → buckets →
//! subscribe links.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use syn::visit::Visit;
use tether_test_support::node::*;

/// Routes that are not part of the API the spec describes: the Swagger UI pages.
const NOT_API: &[&str] = &["/docs"];

#[derive(Default)]
struct Routes {
    found: BTreeSet<(String, String)>,
    unsupported: Vec<String>,
    /// The path of every `web::resource("/path")` call, and of those whose routes were read.
    resources: Vec<String>,
    routed_resources: BTreeSet<String>,
}

/// The literal path of the `web::resource("/path")` a method chain starts from.
fn resource_path(mut expr: &syn::Expr) -> Option<String> {
    loop {
        match expr {
            syn::Expr::MethodCall(m) => expr = &m.receiver,
            syn::Expr::Call(c) if quote_free(&c.func).ends_with("web :: resource") => {
                return match c.args.first() {
                    Some(syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(path),
                        ..
                    })) => Some(path.value()),
                    _ => None,
                };
            }
            _ => return None,
        }
    }
}

fn method_of(expr: &syn::Expr) -> Option<String> {
    // `web::get().to(handler)` → GET: the first `web::<method>` call in the chain.
    let text = quote_free(expr);
    ["get", "put", "post", "delete", "patch", "head"]
        .into_iter()
        .find(|m| text.contains(&format!("web :: {m} ()")) || text.contains(&format!("web::{m}()")))
        .map(str::to_uppercase)
}

fn quote_free(expr: &syn::Expr) -> String {
    use quote::ToTokens;
    expr.to_token_stream().to_string()
}

impl<'ast> Visit<'ast> for Routes {
    fn visit_expr_method_call(&mut self, call: &'ast syn::ExprMethodCall) {
        if call.method == "route" {
            let args: Vec<&syn::Expr> = call.args.iter().collect();
            // `web::resource("/path")….route(web::<method>().to(handler))`.
            let on_resource = match args.as_slice() {
                [handler] => resource_path(&call.receiver).zip(method_of(handler)),
                _ => None,
            };
            match (args.first(), args.get(1), on_resource) {
                (
                    Some(syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(path),
                        ..
                    })),
                    Some(handler),
                    _,
                ) => match method_of(handler) {
                    Some(m) => {
                        self.found.insert((m, path.value()));
                    }
                    None => self.unsupported.push(format!(
                        ".route({:?}, {})",
                        path.value(),
                        quote_free(handler)
                    )),
                },
                (_, _, Some((path, method))) => {
                    self.found.insert((method, path.clone()));
                    self.routed_resources.insert(path);
                }
                _ => {
                    // Other `.route(…)` methods (the router's own) are not actix routes
                    // unless they name `web::`.
                    if args.iter().any(|a| quote_free(a).contains("web ::")) {
                        self.unsupported.push(format!(
                            ".route({})",
                            args.iter()
                                .map(|a| quote_free(a))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
            }
        }
        syn::visit::visit_expr_method_call(self, call);
    }

    fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
        let f = quote_free(&call.func);
        if f.ends_with("web :: resource") {
            // Read through its `.route(…)` calls; one with none, or without a literal
            // path, is not understood.
            match resource_path(&syn::Expr::Call(call.clone())) {
                Some(path) => self.resources.push(path),
                None => self.unsupported.push(format!("{f}(…)")),
            }
        } else if f.ends_with("web :: scope") {
            self.unsupported.push(format!("{f}(…)"));
        }
        syn::visit::visit_expr_call(self, call);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        // actix-web's routing macros register routes the `.route` scan cannot see.
        let path = attr.path();
        if ["get", "put", "post", "delete", "patch", "route"]
            .iter()
            .any(|m| {
                path.is_ident(m)
                    || path.segments.last().is_some_and(|s| {
                        s.ident == m
                            && path.segments.len() == 2
                            && path.segments[0].ident == "actix_web"
                    })
            })
        {
            use quote::ToTokens;
            self.unsupported.push(attr.to_token_stream().to_string());
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read node/src") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn registered_routes() -> BTreeSet<(String, String)> {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut routes = Routes::default();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        routes.visit_file(&file);
    }
    for path in std::mem::take(&mut routes.resources) {
        if !routes.routed_resources.contains(&path) {
            routes
                .unsupported
                .push(format!("web::resource({path:?}) without routes"));
        }
    }
    assert!(
        routes.unsupported.is_empty(),
        "routes registered in a way this test cannot read (use `.route(\"/path\", web::<method>().to(handler))`, or teach the test): {:#?}",
        routes.unsupported
    );
    assert!(
        routes.found.len() >= 10,
        "the scan found too few routes to be reading the sources right: {:?}",
        routes.found
    );
    routes.found
}

fn spec_operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            if ["get", "put", "post", "delete", "patch", "head"].contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[tokio::test]
async fn every_route_is_in_the_spec_and_every_operation_is_served() {
    let node = Node::start().await;
    let r = node.send(node.anon(Method::GET, "/v1/openapi.json")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let spec = r.json();
    let described = spec_operations(&spec);
    let served: BTreeSet<(String, String)> = registered_routes()
        .into_iter()
        .filter(|(_, p)| !NOT_API.contains(&p.as_str()))
        .collect();
    let undocumented: Vec<_> = served.difference(&described).collect();
    let unserved: Vec<_> = described.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "routes without an OpenAPI description (annotate the handler with #[utoipa::path] and list it in api/openapi.rs ApiDoc paths): {undocumented:?}\n\
         described operations no route serves: {unserved:?}"
    );

    // Every described operation reaches its handler on a running node.
    for (method, path) in &described {
        let concrete = path
            .replace("{id}", "device.NOSUCH01")
            .replace("{device_id}", "NOSUCH01");
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let r = node.send(node.anon(m, &concrete)).await;
        let fell_through = r.status == StatusCode::NOT_FOUND && r.text().contains("no route");
        assert!(
            !fell_through,
            "{method} {path} is described but not served: {}",
            r.text()
        );
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
}

#[tokio::test]
async fn the_spec_is_openapi_3_1_with_security_errors_examples_and_links() {
    let node = Node::start().await;
    let spec = node
        .send(node.anon(Method::GET, "/v1/openapi.json"))
        .await
        .json();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        spec["openapi"]
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["basic"]["scheme"],
        "basic"
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["basic"]["type"],
        "http"
    );
    let error = &spec["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error["required"],
        serde_json::json!(["error", "message"]),
        "{error}"
    );
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            let responses = op["responses"].as_object().expect("responses");
            let ok = responses
                .iter()
                .find(|(s, _)| s.starts_with('2'))
                .unwrap_or_else(|| panic!("{id}: no 2xx answer"));
            let public = op["security"] == serde_json::json!([{}]);
            // Raw bytes (a blob's content) are no message: neither JSON nor protobuf.
            let raw = |content: &Value| content.get("application/octet-stream").is_some();
            if !public && !raw(&ok.1["content"]) {
                for status in ["401", "403", "429", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{id}: {status} undocumented"
                    );
                }
                let json_ok = &ok.1["content"]["application/json"];
                assert!(
                    json_ok["example"].is_object(),
                    "{id}: no JSON example of its answer"
                );
                assert!(
                    ok.1["content"]["application/x-protobuf"].is_object(),
                    "{id}: protobuf answer undocumented"
                );
            }
            if let Some(body) = op.get("requestBody") {
                assert!(
                    raw(&body["content"])
                        || body["content"]["application/json"]["example"].is_object(),
                    "{id}: no request example"
                );
                for status in ["400", "413", "415"] {
                    assert!(
                        responses.contains_key(status),
                        "{id}: {status} undocumented"
                    );
                }
            }
        }
    }
    let link = |path: &str, method: &str, name: &str| {
        spec["paths"][path][method]["responses"]["200"]["links"][name].clone()
    };
    assert_eq!(
        link("/v1/register", "post", "GetBucket")["operationId"],
        "getBucket"
    );
    assert_eq!(
        link("/v1/register", "post", "GetBucket")["parameters"]["id"],
        "$response.body#/buckets/0"
    );
    assert_eq!(
        link("/v1/buckets/{id}", "get", "Subscribe")["operationId"],
        "subscribe"
    );
    assert_eq!(
        link("/v1/buckets/{id}", "get", "PutBucket")["operationId"],
        "putBucket"
    );
    assert_eq!(
        link("/v1/buckets/{id}", "put", "Subscribe")["operationId"],
        "subscribe"
    );
    // The streaming subscribe (API.md "Streaming subscribe"): the flag in the request
    // schema and the line-per-answer media type in the answer.
    assert_eq!(
        spec["components"]["schemas"]["SubscribeRequest"]["properties"]["stream"]["type"],
        "boolean",
        "{}",
        spec["components"]["schemas"]["SubscribeRequest"]
    );
    assert!(
        spec["paths"]["/v1/subscribe"]["post"]["responses"]["200"]["content"]
            ["application/x-ndjson"]
            .is_object(),
        "streaming answer undocumented"
    );

    // Swagger UI, offline: its page and assets come from the binary.
    let r = node.send(node.anon(Method::GET, "/docs/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().to_lowercase().contains("swagger"), "{}", r.text());
    let r = node
        .send(node.anon(Method::GET, "/docs/swagger-initializer.js"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("/v1/openapi.json"), "{}", r.text());
}
