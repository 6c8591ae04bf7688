//! Strobe's load generation: simulated service instances (used by `strobe demo` and `strobe loadgen`), the demo
//! scenario, and the criterion benchmarks under `benches/`.

pub mod demo;
pub mod loadgen;
pub mod sim;
