//! The browser client: the files of `web/`, built into the binary, served
//! at `/` when `[web] enabled` (no build step, no CDN, nothing external).

use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderValue, StatusCode};
use warp::reply::Response;

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its bytes.
    body: &'static [u8],
    /// Its media type.
    content_type: &'static str,
}

/// The files, by the path they are served at.
const ASSETS: &[(&str, Asset)] = &[
    ("", Asset { body: include_bytes!("../web/index.html"), content_type: "text/html; charset=utf-8" }),
    ("index.html", Asset { body: include_bytes!("../web/index.html"), content_type: "text/html; charset=utf-8" }),
    ("app.js", Asset { body: include_bytes!("../web/app.js"), content_type: "text/javascript; charset=utf-8" }),
    ("style.css", Asset { body: include_bytes!("../web/style.css"), content_type: "text/css; charset=utf-8" }),
];

/// The file served at `path` (relative to `/`), if any.
pub fn asset(path: &str) -> Option<Asset> {
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, asset)| *asset)
}

impl Asset {
    /// The HTTP answer for this file. The page may load nothing from
    /// elsewhere and connect only back to this server.
    pub fn response(self) -> Response {
        let mut response = Response::new(self.body.into());
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
        );
        response
    }
}
