//! `wardroom-plugin-api`: the contract between Wardroom and the filter
//! plugins that extend it. Plugin crates depend on this crate alone.
//!
//! The filter contract (`Filter`, `Verdict`, `FilterFactory`, `Registry`)
//! arrives with the policy pipeline; until then this crate is empty.
#![warn(missing_docs)]
