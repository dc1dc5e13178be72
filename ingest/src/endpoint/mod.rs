//! The endpoint: an accept loop over one or more listeners (plain TCP, TLS),
//! one task per connection, one appender.
//!
//! - `codec`: bytes ↔ packets, per protocol.
//! - `session`: one connection's protocol state machine, pure.
//! - `connection`: the task around a session and its socket.
//! - `appender`: group commit into the stream.
//! - `mailbox`: what reaches a connection from outside: its records' fate,
//!   a kick, a shutdown.
//! - `closer`: finished connections' sockets, closed at idle priority.
//! - `tap`: live subscriptions to durable telemetry.

pub(crate) mod appender;
mod closer;
mod codec;
mod connection;
pub mod fuzzing;
pub(crate) mod mailbox;
mod session;
pub(crate) mod tap;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;
use std::task::Poll;

use stream::StreamProducer;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::EndpointConfig;
use crate::metrics::{IngestMetrics, bump};
use appender::AppendRequest;
use closer::Closer;
use connection::Connection;
use mailbox::{Mailbox, Reasons};
use session::SessionConfig;
pub use tap::LiveTap;
use tap::TapHub;

/// What every connection task shares.
pub(crate) struct Shared {
    config: EndpointConfig,
    session: Arc<SessionConfig>,
    metrics: Arc<IngestMetrics>,
    registry: ClientRegistry,
    tap: Arc<TapHub>,
    appender: mpsc::UnboundedSender<AppendRequest>,
    closer: Closer,
}

/// A bound socket the endpoint serves MQTT on.
pub struct Listener {
    socket: TcpListener,
    /// Set for a TLS listener: every connection's handshake runs through it.
    tls: Option<TlsAcceptor>,
}

impl Listener {
    /// Plain MQTT over TCP.
    pub fn tcp(socket: TcpListener) -> Self {
        Listener { socket, tls: None }
    }

    /// MQTT over TLS; see [`crate::tls::acceptor`].
    pub fn tls(socket: TcpListener, acceptor: TlsAcceptor) -> Self {
        Listener {
            socket,
            tls: Some(acceptor),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.socket.local_addr().ok())
            .field("tls", &self.is_tls())
            .finish()
    }
}

/// Serves plain MQTT on `listener`; [`serve_on`] with that one listener.
pub async fn serve(
    listener: TcpListener,
    producer: Arc<dyn StreamProducer>,
    config: EndpointConfig,
    metrics: Arc<IngestMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_on(
        vec![Listener::tcp(listener)],
        producer,
        config,
        metrics,
        shutdown,
    )
    .await
}

/// Serves MQTT on every listener until `shutdown` completes, appending to
/// `producer`. All listeners share one appender, one client-id registry and
/// one live tap, so a device may move between them.
///
/// On shutdown it stops accepting and reading, lets the appender finish what
/// is in flight (retrying the stream for up to `shutdown_timeout`), sends the
/// acknowledgements that became durable, closes every connection and returns.
/// It returns an error only if the listener fails for good.
pub async fn serve_on(
    listeners: Vec<Listener>,
    producer: Arc<dyn StreamProducer>,
    config: EndpointConfig,
    metrics: Arc<IngestMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let abandon = CancellationToken::new();
    let (closer, closing) = Closer::start();
    let (shared, appender) = start_appender(producer, config, metrics.clone(), closer, &abandon);
    for l in &listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, tls = l.is_tls(), "The MQTT endpoint is listening.");
        }
    }

    // Each open connection's mailbox, by its task, to raise shutdown in.
    let mut mailboxes: HashMap<tokio::task::Id, Arc<Mailbox>> = HashMap::new();
    let slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    let mut accept_backoff = Duration::from_millis(5);
    let mut next_listener = 0;
    let mut result = Ok(());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = connections.join_next_with_id() => {
                mailboxes.remove(&ended(done));
                continue;
            }
            a = accept_any(&listeners, &mut next_listener) => a,
        };
        let (socket, tls) = match accepted {
            Ok((socket, tls)) => (socket, tls),
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "Accepting a connection failed; retrying.");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(accept_backoff) => {}
                }
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "The listener failed; the endpoint stops.");
                result = Err(e);
                break;
            }
        };
        accept_backoff = Duration::from_millis(5);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            bump(&metrics.connections_refused);
            drop(socket);
            continue;
        };
        // Acknowledgements are batched already; waiting for more only adds
        // latency.
        let _ = socket.set_nodelay(true);
        next_id += 1;
        bump(&metrics.connections_total);
        metrics.connections_current.fetch_add(1, Ordering::Relaxed);
        let mailbox = Mailbox::new();
        let task = spawn_connection(
            &mut connections,
            (socket, tls),
            next_id,
            &shared,
            mailbox.clone(),
            permit,
        );
        mailboxes.insert(task, mailbox);
    }
    drop(listeners);

    tracing::info!(
        connections = connections.len(),
        "The MQTT endpoint is shutting down."
    );
    for mailbox in mailboxes.values() {
        mailbox.raise(Reasons::SHUTDOWN);
    }
    drop(mailboxes);
    settle(connections, shared, appender, &abandon).await;
    // The last `Closer` went with `shared`: the thread ends once every
    // socket handed to it is closed.
    if let Some(closing) = closing {
        let _ = tokio::task::spawn_blocking(move || closing.join()).await;
    }
    tracing::info!("The MQTT endpoint has stopped.");
    result
}

/// Starts the appender every connection hands its records to, and builds
/// what the connections share around it.
fn start_appender(
    producer: Arc<dyn StreamProducer>,
    config: EndpointConfig,
    metrics: Arc<IngestMetrics>,
    closer: Closer,
    abandon: &CancellationToken,
) -> (Arc<Shared>, tokio::task::JoinHandle<()>) {
    let (append_tx, append_rx) = mpsc::unbounded_channel();
    // The process's own publishers (alerts) share the tap when given one.
    let tap = config.tap.hub();
    let appender = tokio::spawn(appender::run(
        append_rx,
        producer,
        config.group_commit.clone(),
        metrics.clone(),
        tap.clone(),
        abandon.clone(),
    ));
    let shared = Arc::new(Shared {
        session: Arc::new(SessionConfig {
            max_inflight: config.max_inflight.max(1),
            max_packet_bytes: config.max_packet_bytes,
            max_keepalive_secs: config.max_keepalive_secs.max(1),
            authorizer: config.authorizer.clone(),
            lateness: config.lateness,
            presence: config.presence,
        }),
        config,
        metrics: metrics.clone(),
        registry: ClientRegistry::default(),
        tap,
        appender: append_tx,
        closer,
    });
    (shared, appender)
}

/// The task a finished connection ran in, however it finished.
fn ended(done: Result<(tokio::task::Id, ()), JoinError>) -> tokio::task::Id {
    match done {
        Ok((id, ())) => id,
        Err(e) => e.id(),
    }
}

/// Runs one accepted connection to its end, holding its slot (`permit`)
/// and the open-connections gauge for as long as its socket is open, which
/// is until the closer has closed it. Returns its task.
fn spawn_connection(
    connections: &mut JoinSet<()>,
    (socket, tls): (TcpStream, Option<TlsAcceptor>),
    conn_id: u64,
    shared: &Arc<Shared>,
    mailbox: Arc<Mailbox>,
    permit: OwnedSemaphorePermit,
) -> tokio::task::Id {
    let live = Live {
        metrics: shared.metrics.clone(),
        _permit: permit,
    };
    let shared = shared.clone();
    connections
        .spawn(async move {
            let started = Instant::now();
            match tls {
                None => {
                    let socket =
                        Connection::new(socket, conn_id, shared.clone(), None, started, mailbox)
                            .run()
                            .await;
                    // Closing sends the FIN after everything written.
                    shared.closer.close(Box::new((socket, live)));
                }
                Some(acceptor) => {
                    if let Some((stream, certificate)) =
                        handshake(&acceptor, socket, &shared, &mailbox).await
                    {
                        let mut stream = Connection::new(
                            stream,
                            conn_id,
                            shared.clone(),
                            certificate,
                            started,
                            mailbox,
                        )
                        .run()
                        .await;
                        // TLS says goodbye (close_notify) before the close.
                        let _ = stream.shutdown().await;
                        shared.closer.close(Box::new((stream, live)));
                    }
                }
            }
        })
        .id()
}

/// Accepts from whichever listener has a connection waiting, starting the
/// search after the listener that was served last so that none starves.
async fn accept_any(
    listeners: &[Listener],
    next: &mut usize,
) -> io::Result<(TcpStream, Option<TlsAcceptor>)> {
    if listeners.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for k in 0..listeners.len() {
            let i = (*next + k) % listeners.len();
            if let Poll::Ready(r) = listeners[i].socket.poll_accept(cx) {
                *next = i + 1;
                return Poll::Ready(r.map(|(s, _)| (s, listeners[i].tls.clone())));
            }
        }
        Poll::Pending
    })
    .await
}

/// Runs a TLS handshake within the connect timeout; returns the stream and
/// the device and role its verified client certificate names, if any. A failed
/// handshake is counted and the connection dropped.
async fn handshake(
    acceptor: &TlsAcceptor,
    socket: TcpStream,
    shared: &Shared,
    mailbox: &Mailbox,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<crate::tls::Certified>,
)> {
    let result = tokio::select! {
        _ = mailbox.wait(Reasons::SHUTDOWN) => return None,
        r = tokio::time::timeout(shared.config.connect_timeout, acceptor.accept(socket)) => r,
    };
    let stream = match result {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            bump(&shared.metrics.tls_handshake_failures);
            tracing::debug!(error = %e, "A TLS handshake failed.");
            return None;
        }
        Err(_) => {
            bump(&shared.metrics.tls_handshake_failures);
            tracing::debug!("A TLS handshake did not finish in time.");
            return None;
        }
    };
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::certified(leaf));
    Some((stream, certificate))
}

/// How far shutdown has gone past its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settling {
    /// Connections drain and the appender retries what the stream refuses.
    Draining,
    /// One `shutdown_timeout` passed: the appender gives up on records the
    /// stream has not stored, and connections get one more timeout to close.
    Abandoned,
    /// Two timeouts passed: connections still open were cut off.
    CutOff,
}

/// Waits for connections to drain and the appender to finish. After
/// `shutdown_timeout` the appender gives up on records the stream will not
/// store; after twice that, connections still stuck (a socket write that never
/// completes) are cut off.
async fn settle(
    mut connections: JoinSet<()>,
    shared: Arc<Shared>,
    mut appender: tokio::task::JoinHandle<()>,
    abandon: &CancellationToken,
) {
    let timeout = shared.config.shutdown_timeout;
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    let mut settling = Settling::Draining;
    loop {
        tokio::select! {
            done = connections.join_next() => if done.is_none() { break },
            _ = &mut timer, if settling != Settling::CutOff => match settling {
                Settling::Draining => {
                    settling = Settling::Abandoned;
                    abandon.cancel();
                    timer.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                Settling::Abandoned | Settling::CutOff => {
                    settling = Settling::CutOff;
                    tracing::warn!(connections = connections.len(), "Connections did not close in time and are cut off.");
                    connections.abort_all();
                }
            },
        }
    }
    // The appender ends once the last sender, held in `shared`, is gone.
    drop(shared);
    let finished = tokio::select! {
        r = &mut appender => Some(r),
        _ = &mut timer, if settling == Settling::Draining => None,
    };
    let finished = match finished {
        Some(r) => r,
        None => {
            abandon.cancel();
            appender.await
        }
    };
    if let Err(e) = finished {
        tracing::error!(error = %e, "The appender task failed.");
    }
}

/// Held by a connection task: keeps the gauge and the connection slot.
struct Live {
    metrics: Arc<IngestMetrics>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.metrics
            .connections_current
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) || matches!(
        e.raw_os_error(),
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: out of resources for now.
        Some(24 | 23 | 105 | 12)
    )
}

/// Which connection holds which client id, so that a second CONNECT with the
/// same id closes the first connection (MQTT's session takeover).
#[derive(Default)]
pub(crate) struct ClientRegistry {
    clients: Mutex<HashMap<String, (u64, Arc<Mailbox>)>>,
}

impl ClientRegistry {
    /// Gives `client_id` to connection `conn_id`; its `mailbox` is kicked when
    /// another connection claims it. Returns whether a previous holder was
    /// told to go.
    pub fn claim(&self, client_id: &str, conn_id: u64, mailbox: Arc<Mailbox>) -> bool {
        let previous = self
            .lock()
            .insert(client_id.to_string(), (conn_id, mailbox));
        match previous {
            Some((_, old)) => {
                old.raise(Reasons::KICKED);
                true
            }
            None => false,
        }
    }

    /// Forgets `client_id` if `conn_id` still holds it.
    pub fn release(&self, client_id: &str, conn_id: u64) {
        let mut clients = self.lock();
        if clients.get(client_id).is_some_and(|(id, _)| *id == conn_id) {
            clients.remove(client_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Arc<Mailbox>)>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_kicks_the_first_holder() {
        let registry = ClientRegistry::default();
        let (first, second) = (Mailbox::new(), Mailbox::new());
        assert!(!registry.claim("c", 1, first.clone()));
        assert!(registry.claim("c", 2, second.clone()));
        assert_eq!(first.raised(), Reasons::KICKED);
        // The old holder leaving does not free the id from the new one.
        registry.release("c", 1);
        assert_eq!(second.raised(), Reasons::NONE);
        assert!(registry.claim("c", 3, Mailbox::new()));
        assert_eq!(second.raised(), Reasons::KICKED);
    }
}
