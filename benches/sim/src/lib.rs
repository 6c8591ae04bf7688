//! Strobe's simulated fleet: instances that fold realistic traffic with the agent's own window and ship it with the
//! agent's own shipper over real gRPC. The `strobe` binary runs it as `strobe demo` and `strobe loadgen`; the
//! benchmarks in `benches/` drive it too. Nothing here is part of the product's data path.
//!
//! # Layout
//! - [`sim`]: one simulated instance's traffic per second (rates, errors, latency) and its shipping loop.
//! - [`demo`]: the `strobe demo` scenario: an aggregator, a small fleet, a staged bad deploy.
//! - [`loadgen`]: `strobe loadgen`: thousands of instances over a few shared HTTP/2 connections.
//! - [`traffic`]: production-shaped traffic within a second (shocks that requests share and that persist).

pub mod demo;
pub mod loadgen;
pub mod sim;
pub mod traffic;
