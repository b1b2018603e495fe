//! Bucket sets: one actor per active set (`actor`) and the node's registry that finds,
//! starts, passivates and hands off those actors (`registry`).

pub mod actor;
pub mod registry;
pub mod traced;
