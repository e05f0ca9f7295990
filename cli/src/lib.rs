//! What of `isdpctl` other crates run as a library: reading policy
//! documents (`yaml`), so the fuzz harness drives the CLI's own code.
//! Everything else is the binary's (`main.rs`).

#![forbid(unsafe_code)]

pub mod yaml;
