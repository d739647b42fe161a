//! The client listener's front: long-polling `/sync` without hyper's
//! buffers.
//!
//! hyper keeps a read buffer (8 KiB, doubled while a request is in flight)
//! and a write buffer (8 KiB) for every connection, for as long as the
//! connection lives. A phone waiting in `/sync` holds its connection for
//! half a minute at a time, so those 24 KiB were most of what an idle
//! client cost. The front reads each request head itself, into a buffer
//! sized by the head and freed once parsed. A `GET` of `/sync` it serves
//! itself through the same router, writing the answer in one piece.
//! While the answer is awaited, it watches the socket without a buffer, so
//! a client that leaves ends its request. Anything else (another request,
//! a body, an upgrade, a head it cannot parse) hands the connection, with
//! the bytes already read, to hyper for the rest of its life.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::serve::IncomingStream;
use axum::Router;
use bytes::{Buf, Bytes};
use http::{header, HeaderName, HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// The largest request head the front reads before handing over.
const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a head the front serves.
const MAX_HEADERS: usize = 64;
/// Bytes read at a time while a head is incomplete.
const READ_STEP: usize = 1024;

/// The address of the client at the other end, as the request handlers
/// read it (`ConnectInfo<ClientAddr>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, FrontListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, FrontListener>) -> Self {
        *stream.remote_addr()
    }
}

/// Accepts connections and serves their long-polls; hands the other
/// connections to the HTTP server that takes them from `accept`.
pub struct FrontListener {
    tcp: TcpListener,
    router: Router,
    fronts: JoinSet<Option<(Rewind, ClientAddr)>>,
}

impl FrontListener {
    pub fn new(tcp: TcpListener, router: Router) -> Self {
        FrontListener {
            tcp,
            router,
            fronts: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for FrontListener {
    type Io = Rewind;
    type Addr = ClientAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Small writes (WebSocket frames) go out at once,
                        // not held back by Nagle's algorithm.
                        if let Err(error) = stream.set_nodelay(true) {
                            tracing::warn!(%error, "could not set TCP_NODELAY");
                        }
                        self.fronts.spawn(front(stream, ClientAddr(peer), self.router.clone()));
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: wait, as
                        // axum's own listener does.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.fronts.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr().map(ClientAddr)
    }
}

/// Serves a connection's long-polls until it closes (`None`) or sends
/// something else (the connection to hand over).
async fn front(
    mut tcp: TcpStream,
    peer: ClientAddr,
    router: Router,
) -> Option<(Rewind, ClientAddr)> {
    let mut read = Vec::new();
    loop {
        let (request, close) = loop {
            match parse_head(&read) {
                Head::Serve {
                    request,
                    length,
                    close,
                } => {
                    read.drain(..length);
                    if read.is_empty() {
                        read = Vec::new();
                    }
                    break (request, close);
                }
                Head::HandOver => return Some((Rewind::new(read, tcp), peer)),
                Head::Partial if read.len() >= MAX_HEAD => {
                    return Some((Rewind::new(read, tcp), peer));
                }
                Head::Partial => {
                    if tcp.readable().await.is_err() {
                        return None;
                    }
                    read.reserve(READ_STEP);
                    match tcp.try_read_buf(&mut read) {
                        Ok(0) => return None,
                        Ok(_) => {}
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return None,
                    }
                }
            }
        };
        let mut request = *request;
        request.extensions_mut().insert(ConnectInfo(peer));
        let answer = router.clone().oneshot(request);
        tokio::pin!(answer);
        // Nothing more is expected while the answer is awaited: the socket
        // turning readable is the client leaving (or pipelining, which is
        // then left for after the answer).
        let mut watching = read.is_empty();
        let response = loop {
            tokio::select! {
                response = &mut answer => break response,
                gone = client_gone(&tcp), if watching => {
                    if gone {
                        return None;
                    }
                    watching = false;
                }
            }
        };
        let Ok(response) = response;
        if write_response(&mut tcp, response, close).await.is_err() || close {
            return None;
        }
    }
}

/// Whether the client closed its end (`false`: it sent more instead).
async fn client_gone(tcp: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    !matches!(tcp.peek(&mut probe).await, Ok(n) if n > 0)
}

/// Writes the head and the whole body in one write.
async fn write_response(
    tcp: &mut TcpStream,
    response: Response<Body>,
    close: bool,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
        .to_bytes();
    let mut head = String::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    let _ = write!(head, "HTTP/1.1 {} {reason}\r\n", parts.status.as_u16());
    let mut out = head.into_bytes();
    for (name, value) in &parts.headers {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let mut tail = format!("content-length: {}\r\ndate: {date}\r\n", body.len());
    if close {
        tail.push_str("connection: close\r\n");
    }
    tail.push_str("\r\n");
    out.extend_from_slice(tail.as_bytes());
    out.extend_from_slice(&body);
    tcp.write_all(&out).await?;
    if close {
        tcp.shutdown().await?;
    }
    Ok(())
}

/// What a request head asks of the front.
enum Head {
    /// A long-poll to serve here; `length` bytes of head.
    Serve {
        request: Box<Request<Body>>,
        length: usize,
        close: bool,
    },
    /// Anything else: hyper's to serve.
    HandOver,
    /// More bytes are needed.
    Partial,
}

/// Reads a request head: a `GET` of `/sync` over HTTP/1.1 with no body
/// and no upgrade is served here.
fn parse_head(bytes: &[u8]) -> Head {
    if bytes.is_empty() {
        return Head::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let length = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::HandOver,
    };
    let (Some("GET"), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::HandOver;
    };
    if !is_sync(path) {
        return Head::HandOver;
    }
    let Ok(uri) = path.parse::<Uri>() else {
        return Head::HandOver;
    };
    let mut request = Request::new(Body::empty());
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    let mut close = false;
    for header in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Head::HandOver;
        };
        match name {
            header::CONTENT_LENGTH if header.value != b"0" => return Head::HandOver,
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => return Head::HandOver,
            header::CONNECTION => {
                close = value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            }
            _ => {}
        }
        request.headers_mut().append(name, value);
    }
    Head::Serve {
        request: Box::new(request),
        length,
        close,
    }
}

/// Whether a request target is the `/sync` endpoint.
fn is_sync(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    matches!(path, "/_matrix/client/v3/sync" | "/_matrix/client/r0/sync")
}

/// A connection with the bytes the front read before handing it over.
pub struct Rewind {
    read: Bytes,
    tcp: TcpStream,
}

impl Rewind {
    fn new(read: Vec<u8>, tcp: TcpStream) -> Self {
        Rewind {
            read: Bytes::from(read),
            tcp,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.has_remaining() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if !self.read.has_remaining() {
                // Frees the buffer: the connection may live long.
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(head: &str) -> bool {
        matches!(parse_head(head.as_bytes()), Head::Serve { .. })
    }

    #[test]
    fn only_plain_sync_gets_are_served_here() {
        assert!(served(
            "GET /_matrix/client/v3/sync?since=s1_0&timeout=30000 HTTP/1.1\r\nhost: x\r\n\r\n"
        ));
        assert!(served("GET /_matrix/client/r0/sync HTTP/1.1\r\n\r\n"));
        for other in [
            "POST /_matrix/client/v3/sync HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/syncs HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/rooms HTTP/1.1\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.0\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.1\r\ncontent-length: 5\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /_matrix/client/v3/sync HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(!served(other), "{other:?}");
        }
        assert!(matches!(
            parse_head(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nhost"),
            Head::Partial
        ));
    }

    #[test]
    fn connection_close_is_noticed() {
        let Head::Serve { close, length, .. } = parse_head(
            b"GET /_matrix/client/v3/sync HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\nGET",
        ) else {
            panic!("not served");
        };
        assert!(close);
        assert_eq!(length, 71);
    }
}
