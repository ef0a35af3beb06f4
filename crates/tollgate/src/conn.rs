//! Client connections: the accept loop, its limits and its timeouts.
//!
//! Agents (and whatever is in front of them) hold connections open, and a hostile one opens
//! many and sends nothing, or a header a byte at a time. So every connection is watched:
//! - a request head must arrive within `header_read_timeout` of its first byte;
//! - an idle keep-alive connection (no request in flight, no byte of a new one) is closed
//!   after `idle_timeout`;
//! - a request body must arrive within `body_read_timeout` of its head (408 otherwise);
//! - at most `max_connections` are open: at the limit the idle and half-sent ones are closed
//!   first, then new ones are refused, with a log line and a metric either way;
//! - on shutdown, connections with no request in flight are closed at once, and the others
//!   finish theirs.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request, which would tie the idle timeout to the header timeout; the watchdog here
//! keeps the two apart.

use crate::config::ServerConfig;
use crate::error::BodyTimeout;
use crate::metrics::{ConnTimeoutLabels, Metrics};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

/// The limits in force, resolved from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_config(cfg: &ServerConfig) -> Limits {
        let max_connections = if cfg.max_connections > 0 {
            cfg.max_connections
        } else {
            auto_max_connections()
        };
        Limits {
            header_read_timeout: cfg.header_read_timeout,
            body_read_timeout: cfg.body_read_timeout,
            idle_timeout: cfg.idle_timeout,
            max_connections,
        }
    }
}

/// Half the process's open-file limit (each proxied request also holds an upstream
/// connection, and the store holds files), at most 10 000; 512 when the limit is unknown.
fn auto_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(n) => (n / 2).clamp(16, 10_000),
        None => 512,
    }
}

/// What the watchdog knows of one connection.
struct Activity {
    born: Instant,
    /// Requests whose response has not finished.
    active: AtomicUsize,
    /// Milliseconds since `born` when the connection last went idle.
    idle_since_ms: AtomicU64,
    /// Bytes of a request head arrived while idle; when the first did.
    partial: AtomicBool,
    head_started_ms: AtomicU64,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }
    fn begin(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.partial.store(false, Ordering::SeqCst);
    }
    fn end(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
    fn idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0
    }
    /// Why this connection should be closed now, if it should.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        if !self.idle() {
            return None;
        }
        let now = self.now_ms();
        if self.partial.load(Ordering::SeqCst) {
            let started = self.head_started_ms.load(Ordering::SeqCst);
            (now.saturating_sub(started) > limits.header_read_timeout.as_millis() as u64)
                .then_some("header")
        } else {
            let since = self.idle_since_ms.load(Ordering::SeqCst);
            (now.saturating_sub(since) > limits.idle_timeout.as_millis() as u64).then_some("idle")
        }
    }
}

/// The socket, noting when bytes of a new request head arrive on an idle connection.
struct Watched {
    inner: TcpStream,
    act: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.act.idle()
            && !self.act.partial.load(Ordering::SeqCst)
        {
            let now = self.act.now_ms();
            self.act.head_started_ms.store(now, Ordering::SeqCst);
            self.act.partial.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body with a deadline for all of it to arrive. The timer is only armed when the
/// body first makes the handler wait: an empty body, or one already buffered with its head,
/// costs no timer.
struct DeadlineBody {
    inner: hyper::body::Incoming,
    head_at: tokio::time::Instant,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let until = self.head_at + self.limit;
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit)))));
                }
                Poll::Pending
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that tells the watchdog when the response is done (or dropped).
struct Tracked {
    inner: axum::body::Body,
    act: Option<Arc<Activity>>,
}

impl Tracked {
    fn finish(&mut self) {
        if let Some(a) = self.act.take() {
            a.end();
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.finish();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `stop` turns true, then closes idle connections and
/// lets the others finish; returns when every connection is gone.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Wakes every connection when the slots run out: the idle ones close.
    let pressure = Arc::new(Notify::new());
    let mut conns = JoinSet::new();
    let mut last_full_log: Option<Instant> = None;
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        body_read_timeout = ?limits.body_read_timeout,
        "accepting connections"
    );
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: say so, and give the process a moment to free some.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                pressure.notify_waiters();
                match tokio::time::timeout(
                    Duration::from_millis(100),
                    slots.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics.connections_refused.inc();
                        let now = Instant::now();
                        if last_full_log
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                        {
                            tracing::warn!(
                                max_connections = limits.max_connections,
                                "connection limit reached and no idle connection to close; refusing new connections ([server] max_connections)"
                            );
                            last_full_log = Some(now);
                        }
                        drop(tcp);
                        continue;
                    }
                }
            }
        };
        // Without TCP_NODELAY, small SSE writes wait for the peer's delayed ACK (~40 ms each).
        let _ = tcp.set_nodelay(true);
        let act = Arc::new(Activity {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            partial: AtomicBool::new(false),
            head_started_ms: AtomicU64::new(0),
        });
        conns.spawn(connection(
            tcp,
            router.clone(),
            limits,
            act,
            metrics.clone(),
            pressure.clone(),
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    tcp: TcpStream,
    router: Router,
    limits: Limits,
    act: Arc<Activity>,
    metrics: Arc<Metrics>,
    pressure: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    metrics.connections_open.inc();
    let io = hyper_util::rt::TokioIo::new(Watched {
        inner: tcp,
        act: act.clone(),
    });
    let svc_act = act.clone();
    let body_timeout = limits.body_read_timeout;
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let router = router.clone();
        let act = svc_act.clone();
        act.begin();
        async move {
            use tower::ServiceExt as _;
            let req = req.map(|b| {
                axum::body::Body::new(DeadlineBody {
                    inner: b,
                    head_at: tokio::time::Instant::now(),
                    deadline: None,
                    limit: body_timeout,
                })
            });
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, std::convert::Infallible>(resp.map(|b| {
                axum::body::Body::new(Tracked {
                    inner: b,
                    act: Some(act),
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // The watchdog below times heads and idle connections apart (see the module doc).
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(25), Duration::from_secs(1));
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = tokio::time::sleep(tick) => {
                if let Some(reason) = act.expired(&limits) {
                    metrics
                        .connection_timeouts
                        .get_or_create(&ConnTimeoutLabels { reason })
                        .inc();
                    tracing::debug!(reason, "closing a connection that timed out");
                    break;
                }
            }
            _ = pressure.notified() => {
                if act.idle() {
                    metrics
                        .connection_timeouts
                        .get_or_create(&ConnTimeoutLabels { reason: "pressure" })
                        .inc();
                    break;
                }
            }
            _ = stop.wait_for(|s| *s), if !draining => {
                if act.idle() {
                    break;
                }
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
    metrics.connections_open.dec();
}
