//! The upstream client for plain-`http` providers (local model servers, sidecars, the mock):
//! HTTP/1.1 connections that the request's own task drives, instead of a connection task
//! per connection as reqwest (hyper-util) runs them.
//!
//! Why: with a connection task, every chunk of a response body crosses a channel that holds
//! one chunk, so a stream whose events arrive together still reaches the gateway one event
//! per task switch, and the client side of the gateway flushes (one `writev`) per event.
//! Driven inline, the stream reads every chunk already received before it hands the client
//! what it has, so a burst of events is one write, as nginx does (ADR 0024). `https`
//! providers, and any provider when an HTTP proxy is configured in the environment, keep
//! reqwest (TLS roots, HTTP/2, proxies).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Boxed: hyper's connection state is ~700 bytes, moved with every response otherwise.
type Conn = Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>;

/// A pooled connection is dropped after this long idle: shorter than common upstream
/// keep-alives, so one is not reused just as the server closes it (the reqwest setting).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per provider; more are closed when they come back.
const MAX_IDLE: usize = 512;

/// One provider's `host:port`, and its idle connections.
pub struct Pool {
    authority: String,
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    send: SendRequest<Full<Bytes>>,
    conn: Conn,
    since: Instant,
}

/// Whether plain-`http` providers may use this client: not when the environment names an
/// HTTP proxy, which reqwest honours (with its `NO_PROXY` rules) and this client does not.
pub fn usable() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .all(|v| std::env::var_os(v).is_none_or(|s| s.is_empty()))
}

impl Pool {
    /// For a provider whose base URL is `http://…`; `None` for any other scheme.
    pub fn for_url(url: &reqwest::Url, connect_timeout: Duration) -> Option<Pool> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        Some(Pool {
            authority: format!("{host}:{port}"),
            host_header: HeaderValue::from_str(&host_header).ok()?,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection still fit to carry a request: its peer has not closed it (polling
    /// it once sees an EOF the runtime has already noticed) and it is ready for a request.
    fn checkout(&self) -> Option<Idle> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            let mut idle = self.idle.lock().ok()?.pop()?;
            if idle.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            if Pin::new(&mut idle.conn).poll(&mut cx).is_ready() {
                continue;
            }
            if let Poll::Ready(Ok(())) = idle.send.poll_ready(&mut cx) {
                return Some(idle);
            }
        }
    }

    fn checkin(&self, send: SendRequest<Full<Bytes>>, conn: Conn) {
        if let Ok(mut idle) = self.idle.lock() {
            // Pushed in time order (checkout takes the newest), so the expired are a prefix.
            let now = Instant::now();
            let expired = idle.partition_point(|i| now.duration_since(i.since) >= IDLE_TIMEOUT);
            idle.drain(..expired);
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    send,
                    conn,
                    since: now,
                });
            }
        }
    }

    async fn connect(&self) -> Result<(SendRequest<Full<Bytes>>, Conn), BoxError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.authority))??;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await?;
        Ok((send, Box::new(conn)))
    }

    /// Sends a POST and waits for the response head. A reused connection that fails before
    /// any of the answer arrived (the server closed it while idle) is replaced by a new one
    /// once; a new connection's failure is the caller's to classify.
    pub async fn post(
        self: &Arc<Pool>,
        path_and_query: &str,
        headers: [&HeaderMap; 2],
        body: Bytes,
    ) -> Result<H1Response, BoxError> {
        let mut reused = self.checkout();
        loop {
            let was_reused = reused.is_some();
            let (send, conn) = match reused.take() {
                Some(i) => (i.send, i.conn),
                None => self.connect().await?,
            };
            let mut req = Request::post(path_and_query).body(Full::new(body.clone()))?;
            let h = req.headers_mut();
            h.reserve(headers[0].len() + headers[1].len() + 3);
            h.insert(http::header::HOST, self.host_header.clone());
            for map in headers {
                for (k, v) in map {
                    h.append(k, v.clone());
                }
            }
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let mut send = send;
            let sent = std::pin::pin!(send.send_request(req));
            let mut ex = Exchange {
                send: Some(send),
                conn: Some(conn),
                pool: self.clone(),
            };
            match ex.drive(sent).await {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    return Ok(H1Response {
                        status: head.status,
                        headers: head.headers,
                        body,
                        ex,
                        failed: None,
                    });
                }
                Err(e) if was_reused && e.is_incomplete_or_canceled() => {
                    tracing::debug!(authority = %self.authority, error = %e.0, "pooled upstream connection was closed; reconnecting");
                    continue;
                }
                Err(e) => return Err(e.0),
            }
        }
    }
}

/// A connection carrying one request; it goes back to the pool when the body has ended.
struct Exchange {
    send: Option<SendRequest<Full<Bytes>>>,
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

struct SendError(BoxError);

impl SendError {
    /// Nothing of the answer arrived: the request was not taken, or the connection closed
    /// before a response head.
    fn is_incomplete_or_canceled(&self) -> bool {
        self.0
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_canceled() || e.is_incomplete_message() || e.is_closed())
    }
}

impl Exchange {
    /// The response head, while the connection is driven on this task.
    async fn drive(
        &mut self,
        mut sent: Pin<&mut impl Future<Output = hyper::Result<Response<Incoming>>>>,
    ) -> Result<Response<Incoming>, SendError> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(|e| SendError(e.into())));
            }
            if let Some(conn) = self.conn.as_mut() {
                if let Poll::Ready(r) = Pin::new(conn).poll(cx) {
                    self.conn = None;
                    self.send = None;
                    if let Err(e) = r {
                        return Poll::Ready(Err(SendError(e.into())));
                    }
                    // The connection ended; the response future reports why.
                    return sent
                        .as_mut()
                        .poll(cx)
                        .map(|r| r.map_err(|e| SendError(e.into())));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Polls the connection once, so it reads and decodes what has arrived.
    fn pump(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut() {
            if Pin::new(conn).poll(cx).is_ready() {
                // Closed (or failed): the body's channel ends, which the body reports.
                self.conn = None;
                self.send = None;
            }
        }
    }

    fn release(&mut self) {
        if let (Some(send), Some(conn)) = (self.send.take(), self.conn.take()) {
            self.pool.checkin(send, conn);
        }
    }
}

/// A response head from a pooled connection, and its body still to be read.
pub struct H1Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    ex: Exchange,
    /// A failure that came after data, returned on the call after that data.
    failed: Option<BoxError>,
}

impl H1Response {
    /// The next chunk of the body, `None` at its end (when the connection goes back to the
    /// pool). Every chunk already received is read in one call and returned joined.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let mut got = Joined::default();
        let mut pumped = false;
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    pumped = false;
                    if let Ok(data) = frame.into_data() {
                        got.push(data);
                    }
                    // Enough for one write; the rest waits for the next call.
                    if got.len() >= 64 * 1024 {
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ex.conn = None;
                    self.ex.send = None;
                    if got.is_empty() {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    // What arrived before the failure first; the failure next.
                    self.failed = Some(e.into());
                    break;
                }
                Poll::Ready(None) => {
                    // A clean end (a cut-off body is an error): the connection is reusable
                    // unless the server closes it, which checkout notices.
                    self.ex.release();
                    if got.is_empty() {
                        return Poll::Ready(None);
                    }
                    break;
                }
                // The connection reads and decodes what has arrived, into a channel that
                // holds one chunk: polled here, on this task, until neither has more.
                Poll::Pending if !pumped => {
                    pumped = true;
                    self.ex.pump(cx);
                }
                Poll::Pending => {
                    if got.is_empty() {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        Poll::Ready(got.take().map(Ok))
    }

    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BoxError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx))
            .await
            .transpose()
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Bytes, BoxError> {
        let mut out = bytes::BytesMut::new();
        while let Some(c) = self.chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out.freeze())
    }

    pub fn into_stream(mut self) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> {
        futures_util::stream::poll_fn(move |cx| self.poll_chunk(cx))
    }
}

/// Chunks read in one call: the first as it came, more joined into one buffer.
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    more: Option<bytes::BytesMut>,
}

impl Joined {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if let Some(b) = self.more.as_mut() {
            b.extend_from_slice(&data);
        } else if let Some(f) = self.first.take() {
            let mut b = bytes::BytesMut::with_capacity(f.len() + data.len());
            b.extend_from_slice(&f);
            b.extend_from_slice(&data);
            self.more = Some(b);
        } else {
            self.first = Some(data);
        }
    }

    fn len(&self) -> usize {
        self.more
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), |b| b.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(self) -> Option<Bytes> {
        self.more.map(|b| b.freeze()).or(self.first)
    }
}
