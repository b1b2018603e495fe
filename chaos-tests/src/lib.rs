//! Chaos scenarios for a Tether cluster. Empty until the cluster exists: single-node
//! crash safety (`kill -9` after acknowledged writes) is tested in `node/tests/`.
