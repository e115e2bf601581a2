//! [`EdgeIo`]: an accepted TCP connection as the serve path holds it — every byte moved is
//! reported to the connection's [`Activity`], and closing can be *lingering*: after the
//! server has sent its last response it shuts down its sending side and reads (and
//! discards) what the client still sends for a short while before closing, so an early
//! response (e.g. 413 before the body was read) is not destroyed by a TCP RST caused by
//! unread data (RFC 9112 §9.6, "tear-down"; nginx `lingering_close`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use firewall::{Activity, ConnSlot};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Longest time a lingering close waits for the client to stop sending (nginx
/// `lingering_time` is 30 s, `lingering_timeout` 5 s; a request body the server refused
/// is at most a few hundred kilobytes on the way).
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes a lingering close reads and discards.
pub const LINGER_BYTES: u64 = 1 << 20;

/// See the module docs.
#[derive(Debug)]
pub struct EdgeIo {
    stream: Option<TcpStream>,
    activity: Arc<Activity>,
    eof: bool,
    linger: Arc<AtomicBool>,
    slot: Option<ConnSlot>,
}

impl EdgeIo {
    /// Wraps an admitted connection; `slot` is held until the connection (and its
    /// lingering close) ends. Returns the I/O and the switch that enables lingering.
    pub fn new(stream: TcpStream, slot: ConnSlot) -> (EdgeIo, Arc<AtomicBool>) {
        let linger = Arc::new(AtomicBool::new(false));
        let io = EdgeIo {
            stream: Some(stream),
            activity: slot.activity().clone(),
            eof: false,
            linger: linger.clone(),
            slot: Some(slot),
        };
        (io, linger)
    }

    /// Ready when a read would not wait (tokio's `TcpStream::poll_read_ready`).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.stream {
            Some(s) => s.poll_read_ready(cx),
            None => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let stream = match this.stream() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = Pin::new(stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            if n > 0 {
                this.activity.read(n);
            } else if buf.remaining() > 0 {
                this.eof = true;
            }
        }
        r
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = match this.stream() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = Pin::new(stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.touch();
            }
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = match this.stream() {
            Ok(s) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = Pin::new(stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.touch();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for EdgeIo {
    fn drop(&mut self) {
        let (Some(stream), Some(slot)) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        let wanted = self.linger.load(Ordering::Relaxed) && !self.eof;
        let runtime = tokio::runtime::Handle::try_current();
        if let (true, Ok(rt)) = (wanted, runtime) {
            rt.spawn(linger(stream, slot));
        }
    }
}

/// Shuts down the sending side, then reads and discards until the client closes, for at
/// most [`LINGER_TIME`] and [`LINGER_BYTES`]. The slot is held until then.
async fn linger(mut stream: TcpStream, slot: ConnSlot) {
    let _ = stream.shutdown().await;
    let closed = slot.activity().closed().clone();
    let drain = async {
        let mut buf = [0u8; 8192];
        let mut total = 0u64;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(LINGER_TIME, drain) => {}
        _ = closed.cancelled() => {}
    }
    drop(slot);
}

/// A stream with bytes already read from it put back in front: reads return `first`
/// before anything of `io`; writes go to `io`. What a connection becomes when the serve
/// path hands it on (HTTP/2 told by its preface, an upgraded connection).
pub struct Rewind<I> {
    first: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(first: Bytes, io: I) -> Rewind<I> {
        Rewind { first, io }
    }
}

impl<I> std::fmt::Debug for Rewind<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind")
            .field("first", &self.first.len())
            .finish_non_exhaustive()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A stream that tells its writer it has no vectored writes, forwarding everything else.
/// What hyper's HTTP/2 connection writes to: the `h2` crate sends every DATA payload over
/// 256 bytes as a slice of its own when the stream is vectored, and then has to write it
/// out before it can take the next frame — one write (one TLS record, one syscall) per
/// response. Told the stream is not vectored, it copies payloads up to 1 KiB into its
/// 16 KiB frame buffer instead, so the small responses of many streams that finish
/// together go out in one write.
#[derive(Debug)]
pub struct Unvectored<I>(pub I);

impl<I: AsyncRead + Unpin> AsyncRead for Unvectored<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Unvectored<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
