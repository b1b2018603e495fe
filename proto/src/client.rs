//! The sans-IO device client (placeholder until the state machine lands).
