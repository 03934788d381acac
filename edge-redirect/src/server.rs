//! The public listener: `GET|HEAD /{code}` -> redirect, 404 or 410.
//!
//! The hot path parses the code without allocating, answers a cache hit from
//! pre-built header values and static bodies, and counts the click without
//! waiting on anything.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cache::{Cache, Target, unix_ms};
use crate::clicks::{ClickQueue, RawClick};
use crate::resolve::Resolver;
use crate::tally::Tally;

static JSON: HeaderValue = HeaderValue::from_static("application/json");
static TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NOT_FOUND: &[u8] = br#"{"error":{"code":"not_found","message":"no link has this code"}}"#;
const GONE: &[u8] =
    br#"{"error":{"code":"gone","message":"this link has expired or been disabled"}}"#;
const BLOCKED: &[u8] =
    br#"{"error":{"code":"blocked","message":"this link's destination has been blocked"}}"#;
const BAD_METHOD: &[u8] =
    br#"{"error":{"code":"method_not_allowed","message":"only GET and HEAD are served"}}"#;
const UNAVAILABLE: &[u8] = br#"{"error":{"code":"unavailable","message":"the link cannot be looked up right now; retry shortly"}}"#;
const REDIRECT_BODY: &[u8] = b"Redirecting\n";

/// A syntactically valid code: `/` then 1 to 64 of `[A-Za-z0-9_-]`, and
/// nothing else (no further segments, no percent-encoding, no trailing
/// slash). Anything else is refused before any lookup.
pub fn parse_code(path: &str) -> Option<&str> {
    let code = path.strip_prefix('/')?;
    let ok = (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(code)
}

/// The visitor's address: the peer, unless the peer is a trusted proxy,
/// in which case the right-most untrusted address of `X-Forwarded-For`.
/// IPv4 peers of a dual-stack listener (`::ffff:a.b.c.d`) count as IPv4.
/// The header is looked up only for a trusted peer.
pub fn visitor_ip<'h>(
    peer: IpAddr,
    forwarded_for: impl FnOnce() -> Option<&'h HeaderValue>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(list) = forwarded_for().and_then(|v| v.to_str().ok()) else {
        return peer;
    };
    list.rsplit(',')
        .filter_map(|part| part.trim().parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

fn respond(
    status: StatusCode,
    content_type: &HeaderValue,
    body: &'static [u8],
    head: bool,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from_static(body)
    }));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type.clone());
    response
}

pub struct Edge {
    pub cache: Arc<Cache>,
    pub clicks: ClickQueue,
    pub resolver: Resolver,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub counters: Counters,
}

/// Statuses the edge answers with, each with its own counter.
const STATUSES: [u16; 9] = [301, 302, 307, 308, 400, 404, 405, 410, 503];

/// One request in this many is timed for `edge_http_request_duration_seconds`:
/// enough for percentiles, too few to cost the hot path anything.
const TIME_ONE_IN: u32 = 64;

/// The hot path's counters: per-thread tallies (`crate::tally`), published
/// at each read of `/metrics`; and the request-duration histogram, which
/// only one request in `TIME_ONE_IN` (64) touches.
pub struct Counters {
    /// In order: [`HITS`], [`MISSES`], [`REJECTED`], then
    /// `edge_http_responses_total{status}` from [`RESPONSES`] in `STATUSES`
    /// order, then `status="other"`.
    tally: Tally<{ RESPONSES + STATUSES.len() + 1 }>,
    duration: metrics::Histogram,
}

const HITS: usize = 0;
const MISSES: usize = 1;
const REJECTED: usize = 2;
const RESPONSES: usize = 3;

impl Counters {
    pub fn new() -> Self {
        let response = |status: &'static str| metrics::counter!("edge_http_responses_total", "status" => status);
        Self {
            tally: Tally::new([
                metrics::counter!("edge_cache_hits_total"),
                metrics::counter!("edge_cache_misses_total"),
                metrics::counter!("edge_rejected_paths_total"),
                response("301"),
                response("302"),
                response("307"),
                response("308"),
                response("400"),
                response("404"),
                response("405"),
                response("410"),
                response("503"),
                response("other"),
            ]),
            duration: metrics::histogram!("edge_http_request_duration_seconds"),
        }
    }

    fn count(&self, status: StatusCode) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status.as_u16())
            .unwrap_or(STATUSES.len());
        self.tally.add(RESPONSES + i, 1);
    }

    /// Hands the counts made so far to the `metrics` counters.
    pub fn publish(&self) {
        self.tally.publish();
    }
}

/// Whether this request is one of the timed ones (per worker thread).
fn timed() -> bool {
    thread_local! {
        static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    SEEN.with(|seen| {
        let n = seen.get().wrapping_add(1);
        seen.set(n);
        n % TIME_ONE_IN == 0
    })
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Edge::start`] made of a request.
enum Start {
    /// Answered without waiting: a rejection or a cache hit.
    Answered(Response<Full<Bytes>>),
    /// Not in the cache: [`Edge::resolve`] looks it up.
    Miss { head: bool },
}

impl Edge {
    /// Answers what needs no waiting: bad methods and paths, and cache
    /// hits. It runs inside the service's `call`, so a hit reaches hyper as
    /// a ready future that holds just the response (a couple of hundred
    /// bytes). An `async` handler's future is as big as its largest state,
    /// the miss's Redis call: 3.7 KB, which hyper moved into place on every
    /// request.
    fn start(&self, request: &Request<Incoming>, peer: IpAddr) -> Start {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => {
                let mut response =
                    respond(StatusCode::METHOD_NOT_ALLOWED, &JSON, BAD_METHOD, false);
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                return Start::Answered(response);
            }
        };
        let Some(code) = parse_code(request.uri().path()) else {
            self.counters.tally.add(REJECTED, 1);
            return Start::Answered(respond(StatusCode::NOT_FOUND, &JSON, NOT_FOUND, head));
        };
        // One clock read per hit: the cache's ages and the click.
        let now_ms = unix_ms();
        match self.cache.get_at(code, now_ms) {
            Some(target) => {
                self.counters.tally.add(HITS, 1);
                Start::Answered(self.answer(target, request, peer, code, head, now_ms))
            }
            None => {
                self.counters.tally.add(MISSES, 1);
                Start::Miss { head }
            }
        }
    }

    /// A miss: looks the code up (Redis, then the control plane), then
    /// answers.
    async fn resolve(
        &self,
        request: Request<Incoming>,
        peer: IpAddr,
        head: bool,
    ) -> Response<Full<Bytes>> {
        // `start` found the path to be `/` and a valid code.
        let code = &request.uri().path()[1..];
        debug_assert!(parse_code(request.uri().path()) == Some(code));
        let looked_up = self.resolver.lookup(code, &self.cache).await;
        // The click's time is when the edge answered.
        let now_ms = unix_ms();
        match looked_up {
            Ok(target) => self.answer(target, &request, peer, code, head, now_ms),
            Err(error) => {
                tracing::warn!(code, %error, "cannot resolve a code");
                respond(StatusCode::SERVICE_UNAVAILABLE, &JSON, UNAVAILABLE, head)
            }
        }
    }

    /// The answer for a code's target, with its click.
    fn answer(
        &self,
        target: Target,
        request: &Request<Incoming>,
        peer: IpAddr,
        code: &str,
        head: bool,
        now_ms: i64,
    ) -> Response<Full<Bytes>> {
        match target {
            Target::Redirect {
                status,
                location,
                expires_at_ms,
            } => {
                if expires_at_ms != 0 && expires_at_ms <= now_ms {
                    return respond(StatusCode::GONE, &JSON, GONE, head);
                }
                let headers = request.headers();
                // A HEAD is answered like a GET but is not a click: link
                // checkers and preview fetchers use it, visitors never do.
                if !head {
                    self.clicks.push(RawClick {
                        event_id: rand::random(),
                        code,
                        ts_ms: now_ms,
                        ip: visitor_ip(
                            peer,
                            || headers.get("x-forwarded-for"),
                            &self.trusted_proxies,
                        ),
                        user_agent: headers.get(header::USER_AGENT),
                        referer: headers.get(header::REFERER),
                        accept_language: headers.get(header::ACCEPT_LANGUAGE),
                    });
                }
                let mut response = respond(status, &TEXT, REDIRECT_BODY, head);
                let headers = response.headers_mut();
                headers.insert(header::LOCATION, location);
                headers.insert(header::CACHE_CONTROL, NO_STORE.clone());
                response
            }
            Target::Disabled => respond(StatusCode::GONE, &JSON, GONE, head),
            Target::Blocked => respond(StatusCode::GONE, &JSON, BLOCKED, head),
            Target::Missing => respond(StatusCode::NOT_FOUND, &JSON, NOT_FOUND, head),
        }
    }
}

/// A connection's service: answers hits in `call`, misses in a boxed future.
struct Service {
    state: Arc<Connection>,
    peer: IpAddr,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        self.state.step();
        let started = timed().then(std::time::Instant::now);
        match self.state.edge.start(&request, self.peer) {
            Start::Answered(response) => {
                Answer::Ready(std::future::ready(Ok(done(&self.state, response, started))))
            }
            Start::Miss { head } => {
                let state = self.state.clone();
                let peer = self.peer;
                Answer::Waiting(Box::pin(async move {
                    let response = state.edge.resolve(request, peer, head).await;
                    Ok(done(&state, response, started))
                }))
            }
        }
    }
}

/// Counts a response, times it if it is one of the timed ones, and marks
/// the connection's request answered.
fn done(
    state: &Connection,
    response: Response<Full<Bytes>>,
    started: Option<std::time::Instant>,
) -> Response<Full<Bytes>> {
    let counters = &state.edge.counters;
    counters.count(response.status());
    if let Some(started) = started {
        counters.duration.record(started.elapsed().as_secs_f64());
    }
    state.step();
    response
}

/// What [`Answer`] completes with.
type Reply = Result<Response<Full<Bytes>>, Infallible>;

/// The future of [`Service::call`].
enum Answer {
    Ready(std::future::Ready<Reply>),
    Waiting(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

impl Future for Answer {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Reply> {
        match self.get_mut() {
            Answer::Ready(ready) => Pin::new(ready).poll(cx),
            Answer::Waiting(future) => future.as_mut().poll(cx),
        }
    }
}

/// Limits that keep slow or abusive clients from holding the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// One connection's share of the server.
struct Connection {
    edge: Arc<Edge>,
    /// Bumped when a request's head has been read and again when its
    /// response is ready: odd while one is being answered.
    progress: AtomicU32,
}

impl Connection {
    fn step(&self) {
        // Only the connection's own task writes it.
        let n = self.progress.load(Ordering::Relaxed);
        self.progress.store(n.wrapping_add(1), Ordering::Relaxed);
    }
}

/// Graceful shutdown for every open connection, at no cost per request.
///
/// (hyper-util's `GracefulShutdown` polls a shared `Notify` each time a
/// connection is polled, and that takes a lock shared by all connections:
/// 0.04 us per redirect in `perf`.) Here a connection registers its task's
/// waker once; `close` sets the flag and wakes them all, and each then asks
/// hyper to finish the request in hand and close.
#[derive(Default)]
struct Drain {
    closing: AtomicBool,
    wakers: std::sync::Mutex<std::collections::HashMap<u64, Waker>>,
    next_id: AtomicU64,
}

impl Drain {
    /// The registered wakers; a panic elsewhere does not stop the drain.
    fn wakers(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Waker>> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers());
        wakers.into_values().for_each(Waker::wake);
    }

    /// Serves `conn` to its end, shutting it down gracefully once `close`
    /// is called.
    async fn watch<C>(&self, conn: C)
    where
        C: Future<Output = hyper::Result<()>>,
        C: GracefulConnection,
    {
        // Unregisters however the connection ends, also when its watchdog
        // aborts it.
        struct Registration<'a> {
            drain: &'a Drain,
            id: u64,
            waker: Option<Waker>,
        }
        impl Drop for Registration<'_> {
            fn drop(&mut self) {
                if self.waker.is_some() {
                    self.drain.wakers().remove(&self.id);
                }
            }
        }
        let mut registration = Registration {
            drain: self,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            waker: None,
        };
        let mut conn = std::pin::pin!(conn);
        let mut shutting_down = false;
        let _ = std::future::poll_fn(|cx| {
            if !shutting_down {
                if self.closing.load(Ordering::SeqCst) {
                    shutting_down = true;
                    conn.as_mut().shut_down();
                } else if !registration
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    let waker = cx.waker().clone();
                    self.wakers().insert(registration.id, waker.clone());
                    registration.waker = Some(waker);
                    // `close` may have run before the waker was in.
                    if self.closing.load(Ordering::SeqCst) {
                        cx.waker().wake_by_ref();
                    }
                }
            }
            conn.as_mut().poll(cx)
        })
        .await;
    }
}

/// A connection that can be asked to finish what it is doing and close.
trait GracefulConnection {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Closes a connection that has not completed a request head within
/// `timeout` of opening or of its last answer: slow or stalled headers,
/// and idle keep-alive connections (as hyper's header-read timeout does).
/// It looks every quarter of `timeout`, so it closes after `timeout` to
/// 1.25 x `timeout` without progress.
async fn watchdog(state: Arc<Connection>, task: tokio::task::AbortHandle, timeout: Duration) {
    let tick = (timeout / 4).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = state.progress.load(Ordering::Relaxed);
    let mut quiet = 0;
    loop {
        ticks.tick().await;
        if task.is_finished() {
            return;
        }
        let now = state.progress.load(Ordering::Relaxed);
        if now != seen || now % 2 == 1 {
            seen = now;
            quiet = 0;
            continue;
        }
        quiet += 1;
        if quiet >= 4 {
            metrics::counter!("edge_connections_timed_out_total").increment(1);
            task.abort();
            return;
        }
    }
}

/// Accepts connections until `shutdown`, then drains for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<Edge>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let drain_all = Arc::new(Drain::default());
    // Capped so that the drain below can wait for every slot at once.
    let max_connections = limits.max_connections.min(u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_connections));
    // No hyper timer: hyper's header-read timeout allocates and arms a
    // timer for every request. Each connection's `watchdog` does that job
    // with one timer tick per quarter of the timeout.
    let mut builder = http1::Builder::new();
    builder.max_buf_size(limits.max_header_bytes.max(8192));
    // Every answer is a few hundred bytes: copying the body into the header
    // buffer and sending one `write` is cheaper than queueing both and a
    // two-part `writev` (0.2 us less CPU per redirect in three alternating
    // pairs, in user space and in the kernel alike).
    builder.writev(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("edge_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Per connection, so the reference counted per request is not
        // shared with other threads' connections.
        let state = Arc::new(Connection {
            edge: edge.clone(),
            progress: AtomicU32::new(0),
        });
        let service = Service {
            state: state.clone(),
            peer: peer.ip(),
        };
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let drain_all = drain_all.clone();
        let task = tokio::spawn(async move {
            drain_all.watch(conn).await;
            drop(slot);
        });
        tokio::spawn(watchdog(
            state,
            task.abort_handle(),
            limits.header_read_timeout,
        ));
    }
    drop(listener);
    drain_all.close();
    // Every connection holds a slot until it is done.
    if tokio::time::timeout(drain, slots.acquire_many(max_connections as u32))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]

        /// Whatever the path, parsing never panics, and a code comes out
        /// exactly when the path is `/` and 1 to 64 allowed characters.
        #[test]
        fn codes_come_only_from_well_formed_paths(path in proptest::prelude::any::<String>(), tail in "[A-Za-z0-9_-]{1,70}") {
            for candidate in [path.clone(), format!("/{path}"), format!("/{tail}")] {
                let expected = candidate
                    .strip_prefix('/')
                    .filter(|c| (1..=64).contains(&c.len()))
                    .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                proptest::prop_assert_eq!(parse_code(&candidate), expected);
            }
        }
    }

    #[test]
    fn only_well_formed_codes_pass() {
        assert_eq!(parse_code("/abc"), Some("abc"));
        assert_eq!(parse_code("/A-b_9"), Some("A-b_9"));
        assert_eq!(
            parse_code(&format!("/{}", "a".repeat(64))).map(str::len),
            Some(64)
        );
        for bad in [
            "",
            "/",
            "abc",
            "/abc/",
            "/a/b",
            "/a%2Fb",
            "/%41",
            "/a.b",
            "/a b",
            "/a\0b",
            "/ä",
            "//abc",
            "/abc?x",
            &format!("/{}", "a".repeat(65)),
        ] {
            assert_eq!(parse_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_is_trusted_from_proxy_ranges() {
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ];
        let header = HeaderValue::from_static("198.51.100.7, 10.1.2.3");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // A peer in the range: the right-most address outside it.
        assert_eq!(
            visitor_ip(ip("10.9.8.7"), || Some(&header), &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            visitor_ip(ip("2001:db8:1::5"), || Some(&header), &trusted),
            ip("198.51.100.7")
        );
        // The same peer reaching a dual-stack listener.
        assert_eq!(
            visitor_ip(ip("::ffff:10.9.8.7"), || Some(&header), &trusted),
            ip("198.51.100.7")
        );
        // Just outside the ranges: the header is not believed.
        for outside in ["11.0.0.1", "2001:db8:2::5", "::ffff:11.0.0.1"] {
            assert_eq!(
                visitor_ip(ip(outside), || Some(&header), &trusted),
                ip(outside).to_canonical()
            );
        }
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let header = HeaderValue::from_static("198.51.100.7, 127.0.0.1");
        let trusted = [ipnet::IpNet::from(proxy)];
        assert_eq!(visitor_ip(stranger, || Some(&header), &trusted), stranger);
        assert_eq!(
            visitor_ip(proxy, || Some(&header), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(visitor_ip(proxy, || None, &trusted), proxy);
        let spoofed = HeaderValue::from_static("garbage");
        assert_eq!(visitor_ip(proxy, || Some(&spoofed), &trusted), proxy);
    }
}
