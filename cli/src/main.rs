//! `isdpctl`, the operator CLI: registry, traffic policies, authorization
//! rules, tokens and the CA, against the control plane's gRPC API over TLS
//! with a bearer token. It depends on the protos and `isdp-core` only: what
//! it knows of the control plane is its API.
//!
//! # Layout
//! - `commands`: flags, connecting, and one file per command group.
//! - `output`: table and JSON rendering.

#![forbid(unsafe_code)]

mod commands;
mod output;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = commands::Cli::parse();
    if let Err(e) = commands::run(cli).await {
        // Errors carry text from elsewhere (a sidecar's upstream names, a
        // control plane's message): escaped, as table cells are.
        eprintln!("error: {}", output::cell(&e.to_string()));
        std::process::exit(1);
    }
}
