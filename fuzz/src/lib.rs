//! Fuzz targets for the inputs ISDP takes from outside, and a small
//! mutation harness that runs them on stable Rust.
//!
//! Each target is a plain `fn(&[u8])` that panics only on a bug: the same
//! function runs under the stable harness here (`tests/fuzz.rs`, which CI
//! runs for a bounded time per target, and `isdp-fuzz` for longer runs)
//! and under `cargo fuzz` (libFuzzer, nightly: `libfuzzer/`). Seeds live
//! in `corpus/<target>/`; every crash found is fixed and kept there.
//!
//! # Layout
//! - `targets`: the targets and their registry ([`targets::ALL`]).
//! - `mutate`: a deterministic generator and byte-level mutations.
//! - `run`: the harness: seeds first, then mutations of the corpus for a
//!   time budget; a panic anywhere in the process (tokio tasks included)
//!   fails the input, which is written out for replay.

pub mod mutate;
pub mod run;
pub mod targets;
