//! Strobe's browser dashboard: static files embedded in the binary at build time and served by the aggregator.
//! The page reads only the public API (`/api/v1/stream`, `/api/v1/services`), so anyone can build their own view
//! the same way.

/// The dashboard page, served at `/`.
pub const INDEX_HTML: &str = include_str!("../index.html");
