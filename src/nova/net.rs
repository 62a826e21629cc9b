//! One line for a request that could not be sent: whether the name did not
//! resolve, the connection was refused or timed out, or TLS failed, and for
//! which URL. reqwest's own text says only "error sending request for url".

use std::error::Error as _;
use std::io::ErrorKind;

/// Why `error` happened, in words an operator can act on, with the URL and the deepest cause.
pub fn send_error(error: &reqwest::Error) -> String {
    let url = error.url().map_or_else(|| "?".to_string(), |u| u.to_string());
    let causes = || std::iter::successors(error.source(), |e| (*e).source());
    let text = causes().map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
    let lower = text.to_lowercase();
    let io_kind = causes()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .map(|e| e.kind());
    let what = if error.is_timeout() || io_kind == Some(ErrorKind::TimedOut) {
        "timed out"
    } else if lower.contains("dns error") || lower.contains("lookup address") {
        "cannot resolve the host name"
    } else if io_kind == Some(ErrorKind::ConnectionRefused) {
        "connection refused"
    } else if [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "invalidcontenttype",
    ]
    .iter()
    .any(|word| lower.contains(word))
    {
        "TLS failed"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "the request failed"
    };
    let detail = causes().last().map_or_else(|| error.to_string(), |e| e.to_string());
    format!("{what} for {url} ({detail})")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failure(url: &str) -> String {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .expect("client");
        let error = client.get(url).send().await.expect_err("fails");
        send_error(&error)
    }

    #[tokio::test]
    async fn a_refused_connection_is_named_with_its_url() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let url = format!("http://127.0.0.1:{port}/v3/auth/tokens");
        let said = failure(&url).await;
        assert!(said.starts_with(&format!("connection refused for {url}")), "{said}");
    }

    #[tokio::test]
    async fn tls_to_a_plain_http_server_is_a_tls_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "plain" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let said = failure(&format!("https://127.0.0.1:{port}/")).await;
        assert!(said.starts_with("TLS failed for https://127.0.0.1:"), "{said}");
    }
}
