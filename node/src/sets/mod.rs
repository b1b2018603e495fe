//! Bucket sets: one actor per active set (`actor`) and the node's registry that finds,
//! starts, passivates and hands off those actors (`registry`), and the waiters of sets
//! whose actor stopped while subscriptions wait on them (`parked`).

pub mod actor;
pub mod env;
pub(crate) mod parked;
pub mod registry;
pub mod traced;
