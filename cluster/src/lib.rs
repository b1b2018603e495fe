//! Cluster membership, placement and ownership.
//!
//! Today Tether runs as one node, so placement has one answer: this node. The cluster
//! issue replaces [`Placement`]'s single implementation with a gossiped hash ring; the
//! registration server already asks this trait for a device's allocated sync server
//! (seed 000 FIG 17C), so nothing above it changes.

/// Names the node that should own a bucket set and serve its device.
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// The public base URL of the sync server allocated to `set_key`.
    fn sync_url(&self, set_key: &str) -> String;
}

/// One node owns everything.
#[derive(Debug, Clone)]
pub struct SingleNode {
    /// This node's public base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
}

impl Placement for SingleNode {
    fn sync_url(&self, _set_key: &str) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_allocates_every_set_to_itself() {
        let p = SingleNode {
            url: "http://127.0.0.1:8080".into(),
        };
        assert_eq!(p.sync_url("01AA02AB"), "http://127.0.0.1:8080");
        assert_eq!(p.sync_url("other"), "http://127.0.0.1:8080");
    }
}
