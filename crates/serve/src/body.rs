//! [`RequestBody`]: the body of every request a role's service gets, whichever protocol
//! carried it (HTTP/1.1 through [`crate::h1`], HTTP/2 through hyper), and [`upgrade`]: the
//! connection a `101 Switching Protocols` answer hands over (RFC 9110 §7.8).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// Error of a request body: the connection failed or the framing was broken while it was
/// read (RFC 9112 §7.1 chunked coding, §6.3 length), or the HTTP/2 stream was reset.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request as the serve path hands it to a role's service: nothing (most
/// requests), read from an HTTP/1.1 connection as the service polls it, or hyper's HTTP/2
/// stream body.
#[derive(Debug)]
pub struct RequestBody(Kind);

#[derive(Debug)]
enum Kind {
    Empty,
    Http1(Http1Body),
    Hyper(Incoming),
}

/// The receiving end of a request body that [`crate::h1`] reads from the connection.
#[derive(Debug)]
pub(crate) struct Http1Body {
    /// Chunks as the connection decodes them; closed after the last one.
    pub(crate) chunks: mpsc::Receiver<io::Result<Bytes>>,
    /// Told on the first poll: the connection reads no body byte (and sends no
    /// `100 Continue`, RFC 9110 §10.1.1) before the service asks for the body.
    pub(crate) wanted: Option<oneshot::Sender<()>>,
    /// Bytes still to come when the length is known (`Content-Length`).
    pub(crate) remaining: Option<u64>,
}

impl RequestBody {
    /// A body with no bytes.
    pub fn empty() -> RequestBody {
        RequestBody(Kind::Empty)
    }

    pub(crate) fn http1(body: Http1Body) -> RequestBody {
        RequestBody(Kind::Http1(body))
    }

    pub(crate) fn hyper(body: Incoming) -> RequestBody {
        RequestBody(Kind::Hyper(body))
    }
}

impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::empty()
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Kind::Http1(b) => {
                if let Some(w) = b.wanted.take() {
                    let _ = w.send(());
                }
                match b.chunks.poll_recv(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        if let Some(r) = &mut b.remaining {
                            *r = r.saturating_sub(data.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => {
                        b.remaining = Some(0);
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Hyper(b) => b.is_end_stream(),
            Kind::Http1(b) => b.remaining == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Hyper(b) => b.size_hint(),
            Kind::Http1(b) => b.remaining.map_or_else(SizeHint::new, SizeHint::with_exact),
        }
    }
}

/// The connection of an upgraded request and what the server had read past its head.
pub mod upgrade {
    use super::*;

    /// An I/O stream the serve path can hand over.
    pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
    impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

    /// The client's connection after a `101 Switching Protocols` answer: bytes the client
    /// sent after its request head (already read by the server) come first.
    pub type Upgraded = crate::io::Rewind<Box<dyn Io>>;

    /// Why no upgraded connection came.
    #[derive(Debug, thiserror::Error)]
    pub enum UpgradeError {
        /// The request cannot be upgraded: not HTTP/1.1 with `Connection: upgrade` and an
        /// `Upgrade` field, or [`on`] was already called for it.
        #[error("the request cannot be upgraded")]
        NotUpgradable,
        /// The connection ended, or the answer was not `101 Switching Protocols`.
        #[error("the connection was not upgraded")]
        NotUpgraded,
    }

    /// Put in the extensions of a request that asked for an upgrade; taken by [`on`].
    #[derive(Clone)]
    pub(crate) struct Pending(pub(crate) Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

    /// The upgraded connection of `req`, once its `101` answer has been written (like
    /// `hyper::upgrade::on`). Call it before answering.
    pub fn on<B>(
        req: &mut http::Request<B>,
    ) -> impl std::future::Future<Output = Result<Upgraded, UpgradeError>> + Send + 'static {
        let rx = req
            .extensions_mut()
            .remove::<Pending>()
            .and_then(|p| p.0.lock().ok().and_then(|mut g| g.take()));
        async move {
            match rx {
                None => Err(UpgradeError::NotUpgradable),
                Some(rx) => rx.await.map_err(|_| UpgradeError::NotUpgraded),
            }
        }
    }
}
