//! Render-then-execute for the Helm chart: `helm/tether` rendered by Helm, and its
//! StatefulSet run as real `tether` processes exactly as rendered — each pod in its own
//! network namespace (own IP, the rendered ports unchanged), from the container image's
//! read-only root filesystem as the rendered non-root user, with the rendered command
//! line, environment and mounted files — while this crate plays the parts of Kubernetes
//! the chart relies on: kubelet (volumes, probes, restarts, preStop, SIGTERM then SIGKILL
//! after the grace period), the StatefulSet controller (Parallel start, rolling updates,
//! scaling), the device Service (only ready pods get connections), cluster DNS (the
//! headless Service's names, dnsmasq) and the Secrets the chart references. The store is
//! a real PostgreSQL in a namespace of its own.
//!
//! What this cannot show: the API server's admission and defaulting, the scheduler,
//! real kubelet/CoreDNS/kube-proxy timing, cloud load balancers, NetworkPolicy
//! enforcement, cert-manager, Helm release storage (see the README).
//!
//! Modules: [`render`] (Helm), [`pod`] (the template as kubelet reads it), [`image`]
//! (the image under test, unpacked), [`kubelet`], [`service`], [`cluster`] (everything
//! together). Network namespaces and DNS come from `tether_test_support::{netns, dns}`.

pub mod cluster;
pub mod image;
pub mod kubelet;
pub mod pod;
pub mod render;
pub mod service;
