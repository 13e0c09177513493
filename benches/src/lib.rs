//! Benchmarks live in `pipeline.rs`; run them with `cargo bench -p wardroom-benches`.
