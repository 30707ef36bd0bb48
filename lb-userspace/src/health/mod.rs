//! Health checking: keepalived's checkers and Piranha's send/expect, run as tokio tasks, with
//! keepalived's up/down rules; their verdicts reach the data plane through the same atomic
//! path as every other change.

pub mod config;
pub mod machine;
pub mod probe;
pub mod runner;
pub mod security;
pub mod spec;
pub mod state;
