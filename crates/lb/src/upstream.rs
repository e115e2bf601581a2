//! The upstream side: one connector that turns a backend name into a connection (TCP from
//! this host's address, then mutual TLS unless the insecure variant is configured); the
//! request pool on it is [`crate::exchange`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Time allowed for TCP connect plus TLS handshake to a backend.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a connection to a backend could not be made. Nothing of a request has been sent
/// when one of these occurs, so trying another backend is safe.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The URI named no configured backend (a bug in request routing).
    #[error("no backend named {0:?}")]
    UnknownBackend(String),
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    /// The TLS handshake failed (certificate, protocol or I/O).
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    /// Connect plus handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("connecting to {addr}: timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
}

/// A connection to a backend, plain or TLS; counted in its backend's open connections
/// while it lives (pooled connections only).
#[derive(Debug)]
pub(crate) struct UpstreamIo {
    stream: Stream,
    _open: Option<OpenGuard>,
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One open connection of a backend; uncounted on drop.
#[derive(Debug)]
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

impl UpstreamIo {
    /// Whether an idle connection is still usable: nothing is waiting to be read on its
    /// socket (neither an end of stream, a TLS close_notify, nor stray bytes). Costs at
    /// most one non-blocking `recv(MSG_PEEK)`; none when the runtime has not seen the
    /// socket become readable.
    pub(crate) fn idle_and_open(&mut self) -> bool {
        let tcp = match &self.stream {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        };
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

/// Maps a backend name (the host of a request URI) to a fresh connection to that backend.
/// Cheap to clone; shared by the request client and the health checkers.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    net: firewall::Net,
    /// Backend name → its address, the TLS server name its certificate carries, and its
    /// open pooled connections.
    backends: HashMap<String, (SocketAddr, String, Arc<AtomicUsize>)>,
    tls: Option<TlsConnector>,
}

impl Connector {
    /// `tls = None` is the insecure variant (plain TCP).
    pub(crate) fn new(
        net: firewall::Net,
        backends: HashMap<String, (SocketAddr, String)>,
        tls: Option<TlsConnector>,
    ) -> Connector {
        let backends = backends
            .into_iter()
            .map(|(name, (addr, sni))| (name, (addr, sni, Arc::default())))
            .collect();
        Connector {
            inner: Arc::new(ConnectorInner { net, backends, tls }),
        }
    }

    /// Open pooled connections to backend `name` (0 for an unknown name).
    pub(crate) fn open_connections(&self, name: &str) -> usize {
        self.inner
            .backends
            .get(name)
            .map_or(0, |(_, _, open)| open.load(Ordering::Relaxed))
    }

    /// A new connection to the backend called `name`, from this host's address, bounded by
    /// [`CONNECT_TIMEOUT`]; not counted in [`Connector::open_connections`] (health checks).
    pub(crate) async fn connect(&self, name: &str) -> Result<UpstreamIo, ConnectError> {
        self.connect_inner(name, false).await
    }

    /// A new connection to the backend called `name` for the request pool, counted in
    /// [`Connector::open_connections`] while it lives.
    pub(crate) async fn connect_pooled(&self, name: &str) -> Result<UpstreamIo, ConnectError> {
        self.connect_inner(name, true).await
    }

    /// The names of the configured backends.
    pub(crate) fn backend_names(&self) -> impl Iterator<Item = &str> {
        self.inner.backends.keys().map(String::as_str)
    }

    async fn connect_inner(&self, name: &str, count: bool) -> Result<UpstreamIo, ConnectError> {
        let inner = &self.inner;
        let (addr, sni, open) = inner
            .backends
            .get(name)
            .cloned()
            .ok_or_else(|| ConnectError::UnknownBackend(name.to_string()))?;
        let guard = || {
            count.then(|| {
                open.fetch_add(1, Ordering::Relaxed);
                OpenGuard(open.clone())
            })
        };
        let connect = async {
            let tcp = inner
                .net
                .connect(addr)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            let Some(tls) = &inner.tls else {
                return Ok(UpstreamIo {
                    stream: Stream::Plain(tcp),
                    _open: guard(),
                });
            };
            // A DNS name or an IP address (checked when the LB starts).
            let server_name = ServerName::try_from(sni.clone()).map_err(|e| ConnectError::Tls {
                addr,
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let stream = tls
                .connect(server_name, tcp)
                .await
                .map_err(|source| ConnectError::Tls { addr, source })?;
            Ok(UpstreamIo {
                stream: Stream::Tls(Box::new(stream)),
                _open: guard(),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
    }
}
