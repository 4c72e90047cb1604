//! The data plane's HTTP client for cloud targets: hyper-util's pooled client over rustls
//! (HTTP/1.1, or HTTP/2 where the endpoint offers it), through the proxy the environment
//! names. It is hyper-util's client rather than reqwest's wrapper of it because it sits on
//! every proxied request's path: beside a bare axum → reqwest proxy on loopback it adds
//! about 40 µs less per request (docs/benchmarks.md, "Data plane").

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::ServiceExt;

/// Which endpoints go through which proxy; [`CloudHttp::new`] reads it from the environment.
pub use hyper_util::client::proxy::matcher::Matcher as Proxies;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled client for cloud endpoints. Cheap to clone: the pool is shared.
#[derive(Clone)]
pub struct CloudHttp {
    client: Client<HttpsConnector<ProxyAware>, Full<Bytes>>,
    proxies: Arc<Proxies>,
}

impl CloudHttp {
    /// A client trusting the Mozilla roots (webpki-roots), as the agent's cloud calls
    /// always have, and honouring `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`
    /// as curl does.
    ///
    /// # Errors
    /// When rustls cannot be configured with its default protocol versions.
    pub fn new() -> Result<Self, rustls::Error> {
        Self::with_proxies(Proxies::from_env())
    }

    /// As [`CloudHttp::new`], with these proxies instead of the environment's.
    ///
    /// # Errors
    /// When rustls cannot be configured with its default protocol versions.
    pub fn with_proxies(proxies: Proxies) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        // https URIs pass through to this connector: TLS is layered on top of it.
        http.enforce_http(false);
        let proxies = Arc::new(proxies);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyAware {
                http,
                proxies: proxies.clone(),
            });
        let client = Client::builder(TokioExecutor::new())
            // Without a timer idle connections are only found stale when next checked out.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(CloudHttp { client, proxies })
    }

    /// Sends `request`; resolves with the response head, its body streaming.
    ///
    /// # Errors
    /// Connection, TLS and protocol errors.
    pub async fn send(
        &self,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        // A plain-HTTP endpoint behind a proxy is asked in absolute form through it, and
        // the proxy's credentials go with each request (a tunnel sends them once).
        if request.uri().scheme_str() == Some("http")
            && let Some(auth) = self
                .proxies
                .intercept(request.uri())
                .and_then(|p| p.basic_auth().cloned())
        {
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        self.client.request(request).await
    }
}

/// Connects straight to the endpoint, or through the proxy the environment names for it:
/// a CONNECT tunnel for HTTPS, the proxy itself for plain HTTP.
#[derive(Clone)]
struct ProxyAware {
    http: HttpConnector,
    proxies: Arc<Proxies>,
}

impl tower::Service<Uri> for ProxyAware {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(())) // the HTTP connector is always ready
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let http = self.http.clone();
        let proxy = self.proxies.intercept(&dst);
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let io = http.oneshot(dst).await?;
                return Ok(Stream { io, proxied: false });
            };
            if dst.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), http);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel.oneshot(dst).await?;
                Ok(Stream { io, proxied: false })
            } else {
                let io = http.oneshot(proxy.uri().clone()).await?;
                Ok(Stream { io, proxied: true })
            }
        })
    }
}

/// A connection, saying whether it goes to a proxy (which is then asked in absolute form).
struct Stream {
    io: TokioIo<tokio::net::TcpStream>,
    proxied: bool,
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// The header value of a bearer token; `None` when the key cannot be a header value.
pub fn bearer(key: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}
