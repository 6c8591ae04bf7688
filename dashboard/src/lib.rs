//! Strobe's browser dashboard: static files embedded in the binary at build time and served by the aggregator.
//! No build step: plain HTML, CSS and JavaScript drawing on canvas. The page reads only the public API
//! (`/api/v1/stream`, `/api/v1/alerts`, `/api/v1/services`, `/api/v1/cluster`), so anyone can build their own view the same way.

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// URL path it is served at.
    pub path: &'static str,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The file.
    pub body: &'static str,
}

/// Every file of the dashboard.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../style.css"),
    },
];
