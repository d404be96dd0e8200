//! Rewrites the `:authority` of every HTTP/2 request on a connection, so that the plugin's
//! sockets answer the clients that really call them.
//!
//! The kubelet dials plugin registration sockets by path with grpc-go and no authority
//! override, and grpc-go then sends the percent-encoded path (`%2Fvar%2Flib%2F…-reg.sock`) as
//! `:authority`; grpc C-core (Python `grpcio`) does the same for `unix://` targets. h2, under
//! tonic, refuses such a request with `PROTOCOL_ERROR` (`%` is not allowed in a host) and has no
//! setting to relax the check (hyperium/h2#487). A plugin cannot wait for every client to change,
//! so each accepted connection passes through [`RewriteIncoming`]: it reads the client's frames,
//! decodes each header block with HPACK, replaces `:authority` with a fixed value, and encodes
//! the block again for tonic. Everything else (DATA, SETTINGS, PING, WINDOW_UPDATE, …) passes
//! through untouched, and tonic serves the services as before. A unix socket has no virtual
//! hosts: the authority carries no meaning here, which is why replacing it loses nothing.
//!
//! [`RewriteOutgoing`] is the same rewrite on the other direction of a stream; the kubelet
//! stand-in and the tests use it to send exactly the `:authority` the kubelet sends.
//!
//! Our encoder never uses HPACK's dynamic table (it announces a table size of 0 in its first
//! block), so the server's decoder state can never drift from ours, whatever the server
//! advertises.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce: frames we write never exceed it.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The largest header block buffered for decoding; gRPC's own default metadata limit is 8 KiB.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The dynamic table size a decoder starts with (RFC 7541 §4.2), which tonic's server keeps.
const DEFAULT_TABLE_SIZE: usize = 4_096;
/// HPACK's "dynamic table size update" to 0 (RFC 7541 §6.3).
const TABLE_SIZE_ZERO: u8 = 0x20;

/// Why a connection could not be rewritten; the connection is then closed.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("HTTP/2 header block of stream {stream} is larger than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge { stream: u32 },
    #[error(
        "HTTP/2 frame of type {frame_type:#x} on stream {stream} interrupts the header block of stream {expected}"
    )]
    InterruptedHeaderBlock {
        frame_type: u8,
        stream: u32,
        expected: u32,
    },
    #[error("HTTP/2 {what} frame of stream {stream} is malformed: {reason}")]
    MalformedFrame {
        what: &'static str,
        stream: u32,
        reason: &'static str,
    },
    #[error("HTTP/2 header block of stream {stream} cannot be decoded: {reason}")]
    Hpack { stream: u32, reason: String },
}

impl From<RewriteError> for io::Error {
    fn from(error: RewriteError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// The rewrite of one direction of one connection: the client's bytes in, the same requests with
/// the new `:authority` out.
pub struct AuthorityRewriter {
    authority: Vec<u8>,
    state: State,
    /// Bytes received and not yet rewritten (a partial frame header or header frame).
    pending: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    announced_table_size: bool,
}

enum State {
    /// Waiting for the connection preface.
    Preface,
    /// At a frame boundary, or inside a header block that CONTINUATION frames go on with.
    Frames { open_block: Option<OpenBlock> },
    /// Inside the payload of a frame that passes through: this many bytes are left.
    PassThrough { left: usize },
    /// Not HTTP/2 with prior knowledge: every byte passes through, and the server says why.
    Opaque,
}

/// A HEADERS frame whose block goes on in CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

impl AuthorityRewriter {
    /// Every request's `:authority` becomes `authority`; a request without one gets none.
    pub fn new(authority: impl Into<Vec<u8>>) -> AuthorityRewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(0);
        AuthorityRewriter {
            authority: authority.into(),
            state: State::Preface,
            pending: BytesMut::new(),
            decoder,
            encoder,
            announced_table_size: false,
        }
    }

    /// Takes bytes as the client sent them and appends to `out` what the server should read.
    /// Partial frames are kept until the rest arrives.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), RewriteError> {
        self.pending.extend_from_slice(input);
        loop {
            match &mut self.state {
                State::Opaque => {
                    out.extend_from_slice(&self.pending.split());
                    return Ok(());
                }
                State::Preface => {
                    let seen = self.pending.len().min(PREFACE.len());
                    if self.pending[..seen] != PREFACE[..seen] {
                        self.state = State::Opaque;
                        continue;
                    }
                    if seen < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&self.pending.split_to(PREFACE.len()));
                    self.state = State::Frames { open_block: None };
                }
                State::PassThrough { left } => {
                    let n = (*left).min(self.pending.len());
                    out.extend_from_slice(&self.pending.split_to(n));
                    *left -= n;
                    if *left > 0 {
                        return Ok(());
                    }
                    self.state = State::Frames { open_block: None };
                }
                State::Frames { open_block } => {
                    if self.pending.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let header = FrameHeader::parse(&self.pending[..FRAME_HEADER_LEN]);
                    let carries_block = matches!(header.kind, HEADERS | CONTINUATION);
                    if let Some(open) = open_block.as_ref()
                        && (header.kind != CONTINUATION || header.stream != open.stream)
                    {
                        return Err(RewriteError::InterruptedHeaderBlock {
                            frame_type: header.kind,
                            stream: header.stream,
                            expected: open.stream,
                        });
                    }
                    if !carries_block {
                        // A client never sends PUSH_PROMISE (the one other frame with a header
                        // block); passing it on lets the server refuse it.
                        out.extend_from_slice(&self.pending.split_to(FRAME_HEADER_LEN));
                        self.state = State::PassThrough { left: header.len };
                        continue;
                    }
                    let buffered = open_block.as_ref().map_or(0, |b| b.block.len());
                    if buffered + header.len > MAX_HEADER_BLOCK {
                        return Err(RewriteError::HeaderBlockTooLarge {
                            stream: header.stream,
                        });
                    }
                    if self.pending.len() < FRAME_HEADER_LEN + header.len {
                        return Ok(());
                    }
                    self.pending.advance(FRAME_HEADER_LEN);
                    let payload = self.pending.split_to(header.len);
                    let mut open = match open_block.take() {
                        Some(mut open) => {
                            open.block.extend_from_slice(&payload);
                            open.flags |= header.flags & END_HEADERS;
                            open
                        }
                        None if header.kind == CONTINUATION => {
                            return Err(RewriteError::MalformedFrame {
                                what: "CONTINUATION",
                                stream: header.stream,
                                reason: "no header block is open",
                            });
                        }
                        None => open_headers(&header, &payload)?,
                    };
                    if open.flags & END_HEADERS == 0 {
                        *open_block = Some(open);
                        continue;
                    }
                    open.flags &= !PADDED;
                    self.write_block(&mut open, out)?;
                }
            }
        }
    }

    /// Decodes a whole header block, replaces the authority, and writes it as one HEADERS frame
    /// and as many CONTINUATION frames as it needs.
    fn write_block(
        &mut self,
        open: &mut OpenBlock,
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        let headers = self
            .decoder
            .decode(&open.block)
            .map_err(|e| RewriteError::Hpack {
                stream: open.stream,
                reason: format!("{e:?}"),
            })?;
        let mut block = Vec::with_capacity(open.block.len() + self.authority.len());
        if !self.announced_table_size {
            block.push(TABLE_SIZE_ZERO);
            self.announced_table_size = true;
        }
        let rewritten = headers.iter().map(|(name, value)| {
            let value = if name.as_slice() == b":authority" {
                &self.authority
            } else {
                value
            };
            (name.as_slice(), value.as_slice())
        });
        // Writing into a Vec cannot fail.
        let _ = self.encoder.encode_into(rewritten, &mut block);

        let priority_len = if open.priority.is_some() { 5 } else { 0 };
        let first = block.len().min(MIN_MAX_FRAME_SIZE - priority_len);
        let mut flags = open.flags & (END_STREAM | PRIORITY);
        if first == block.len() {
            flags |= END_HEADERS;
        }
        put_frame_header(out, first + priority_len, HEADERS, flags, open.stream);
        if let Some(priority) = open.priority {
            out.put_slice(&priority);
        }
        out.put_slice(&block[..first]);
        let mut rest = &block[first..];
        while !rest.is_empty() {
            let n = rest.len().min(MIN_MAX_FRAME_SIZE);
            let flags = if n == rest.len() { END_HEADERS } else { 0 };
            put_frame_header(out, n, CONTINUATION, flags, open.stream);
            out.put_slice(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(())
    }
}

struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8]) -> FrameHeader {
        FrameHeader {
            len: (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` never exceeds MIN_MAX_FRAME_SIZE, so it fits the 24-bit length.
    let len = len as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// The fields of a HEADERS frame (RFC 9113 §6.2): padding removed, priority kept.
fn open_headers(header: &FrameHeader, payload: &[u8]) -> Result<OpenBlock, RewriteError> {
    let malformed = |reason| RewriteError::MalformedFrame {
        what: "HEADERS",
        stream: header.stream,
        reason,
    };
    let mut body = payload;
    let mut padding = 0;
    if header.flags & PADDED != 0 {
        let (&pad, rest) = body
            .split_first()
            .ok_or_else(|| malformed("no pad length"))?;
        padding = usize::from(pad);
        body = rest;
    }
    let mut priority = None;
    if header.flags & PRIORITY != 0 {
        if body.len() < 5 {
            return Err(malformed("priority fields cut short"));
        }
        let mut fields = [0; 5];
        fields.copy_from_slice(&body[..5]);
        priority = Some(fields);
        body = &body[5..];
    }
    if padding > body.len() {
        return Err(malformed("padding longer than the frame"));
    }
    Ok(OpenBlock {
        stream: header.stream,
        flags: header.flags,
        priority,
        block: body[..body.len() - padding].to_vec(),
    })
}

/// A server's side of a connection: what the client sends is rewritten before the server reads
/// it; what the server writes goes out as it is.
pub struct RewriteIncoming<S> {
    io: S,
    rewriter: AuthorityRewriter,
    ready: BytesMut,
    scratch: Box<[u8]>,
}

impl<S> RewriteIncoming<S> {
    pub fn new(io: S, authority: impl Into<Vec<u8>>) -> RewriteIncoming<S> {
        RewriteIncoming {
            io,
            rewriter: AuthorityRewriter::new(authority),
            ready: BytesMut::new(),
            scratch: vec![0; MIN_MAX_FRAME_SIZE].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteIncoming<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.ready.is_empty() {
            let mut raw = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.feed(raw.filled(), &mut this.ready)?;
        }
        let n = buf.remaining().min(this.ready.len());
        buf.put_slice(&this.ready.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteIncoming<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for RewriteIncoming<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A client's side of a connection: what the client writes is rewritten before it leaves.
pub struct RewriteOutgoing<S> {
    io: S,
    rewriter: AuthorityRewriter,
    unsent: BytesMut,
}

impl<S> RewriteOutgoing<S> {
    pub fn new(io: S, authority: impl Into<Vec<u8>>) -> RewriteOutgoing<S> {
        RewriteOutgoing {
            io,
            rewriter: AuthorityRewriter::new(authority),
            unsent: BytesMut::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> RewriteOutgoing<S> {
    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.unsent.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.unsent))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.unsent.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteOutgoing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteOutgoing<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_send_unsent(cx))?;
        this.rewriter.feed(buf, &mut this.unsent)?;
        // Sent now where the socket takes it; the rest goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send_unsent(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_unsent(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_unsent(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The `:authority` grpc-go sends when it dials `target` with no authority override: the target
/// with every byte outside RFC 3986's unreserved and sub-delims characters, `:` and `@`
/// percent-encoded (`/run/x.sock` → `%2Frun%2Fx.sock`). This is what the kubelet sends to a
/// registration socket.
pub fn grpc_go_authority(target: &str) -> String {
    let mut out = String::with_capacity(target.len() * 3);
    for &b in target.as_bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b);
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header_any(&mut out, payload.len(), kind, flags, stream);
        out.put_slice(payload);
        out.to_vec()
    }

    fn put_frame_header_any(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
        out.put_slice(&(len as u32).to_be_bytes()[1..]);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
    }

    fn request_block(
        encoder: &mut loona_hpack::Encoder<'_>,
        authority: &[u8],
        extra: &[u8],
    ) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/pluginregistration.Registration/GetInfo"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"x-extra", extra),
        ];
        encoder.encode(headers)
    }

    /// Every header block in `bytes` (the server's view), decoded in order.
    /// Header blocks (name, value pairs) and the other frames (type, flags, stream, payload).
    type ServerView = (Vec<Vec<(Vec<u8>, Vec<u8>)>>, Vec<(u8, u8, u32, Vec<u8>)>);

    fn server_view(bytes: &[u8]) -> ServerView {
        assert_eq!(&bytes[..24], PREFACE);
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[24..];
        let mut blocks = Vec::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(&rest[..9]);
            let payload = &rest[9..9 + h.len];
            assert!(h.len <= MIN_MAX_FRAME_SIZE, "frame of {} bytes", h.len);
            frames.push((h.kind, h.flags, h.stream, payload.to_vec()));
            if h.kind == HEADERS || h.kind == CONTINUATION {
                let body = if h.kind == HEADERS && h.flags & PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                assert_eq!(h.flags & PADDED, 0);
                block.extend_from_slice(body);
                if h.flags & END_HEADERS != 0 {
                    blocks.push(
                        decoder
                            .decode(&block)
                            .expect("the server can decode what we wrote"),
                    );
                    block.clear();
                }
            }
            rest = &rest[9 + h.len..];
        }
        (blocks, frames)
    }

    fn authority_of(block: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        block
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v.as_slice())
    }

    fn client_stream() -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])); // SETTINGS
        let path_authority =
            grpc_go_authority("/var/lib/kubelet/plugins_registry/gpu.tessera.dev-reg.sock");
        let first = request_block(&mut encoder, path_authority.as_bytes(), b"one");
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &first));
        bytes.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // The second request refers to the first one's entries in the client's dynamic table,
        // split over CONTINUATION, padded, with priority.
        let second = request_block(&mut encoder, path_authority.as_bytes(), b"two");
        let mut padded = vec![3];
        padded.extend([0x80, 0, 0, 1, 16]);
        padded.extend(&second[..4]);
        padded.extend([0, 0, 0]);
        bytes.extend(frame(HEADERS, PADDED | PRIORITY, 3, &padded));
        bytes.extend(frame(CONTINUATION, 0, 3, &second[4..6]));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 3, &second[6..]));
        bytes.extend(frame(0x0, END_STREAM, 3, &[0, 0, 0, 0, 0]));
        bytes
    }

    #[test]
    fn every_request_reaches_the_server_with_the_new_authority() {
        let mut rewriter = AuthorityRewriter::new("localhost");
        let mut out = BytesMut::new();
        rewriter.feed(&client_stream(), &mut out).unwrap();
        let (blocks, frames) = server_view(&out);
        assert_eq!(blocks.len(), 2);
        for (block, extra) in blocks.iter().zip([b"one", b"two"]) {
            assert_eq!(authority_of(block), Some(&b"localhost"[..]));
            assert!(block.contains(&(b"x-extra".to_vec(), extra.to_vec())));
            assert!(block.contains(&(
                b":path".to_vec(),
                b"/pluginregistration.Registration/GetInfo".to_vec()
            )));
        }
        // SETTINGS, HEADERS, DATA, HEADERS (priority kept, padding gone), DATA.
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0, END_STREAM, 1),
                (HEADERS, END_HEADERS | PRIORITY, 3),
                (0, END_STREAM, 3)
            ]
        );
        assert_eq!(frames[3].3[..5], [0x80, 0, 0, 1, 16]);
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_stream() {
        let input = client_stream();
        let mut whole = BytesMut::new();
        AuthorityRewriter::new("localhost")
            .feed(&input, &mut whole)
            .unwrap();
        for chunk in [1, 2, 7, 9, 10, 13, 64] {
            let mut rewriter = AuthorityRewriter::new("localhost");
            let mut out = BytesMut::new();
            for piece in input.chunks(chunk) {
                rewriter.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, whole, "fed {chunk} bytes at a time");
        }
    }

    #[test]
    fn a_block_larger_than_a_frame_is_split_into_continuations() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = request_block(&mut encoder, b"%2Fsock", &big);
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(MIN_MAX_FRAME_SIZE);
        input.extend(frame(HEADERS, END_STREAM, 1, a));
        let (b1, b2) = b.split_at(MIN_MAX_FRAME_SIZE);
        input.extend(frame(CONTINUATION, 0, 1, b1));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b2));
        let mut out = BytesMut::new();
        AuthorityRewriter::new("localhost")
            .feed(&input, &mut out)
            .unwrap();
        let (blocks, frames) = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), Some(&b"localhost"[..]));
        assert!(blocks[0].contains(&(b"x-extra".to_vec(), big)));
        assert_eq!(
            frames[0].1 & END_STREAM,
            END_STREAM,
            "END_STREAM stays on the HEADERS frame"
        );
        assert!(frames[1..].iter().all(|f| f.0 == CONTINUATION));
    }

    #[test]
    fn hostile_or_broken_input_closes_the_connection_with_the_reason() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = request_block(&mut encoder, b"x", b"y");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                frame(CONTINUATION, END_HEADERS, 1, &block),
                "no header block is open",
            ),
            (
                [frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"data")].concat(),
                "interrupts the header block",
            ),
            (
                [
                    frame(HEADERS, 0, 1, &block),
                    frame(CONTINUATION, END_HEADERS, 3, b""),
                ]
                .concat(),
                "interrupts the header block",
            ),
            (
                frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2]),
                "padding longer than the frame",
            ),
            (
                frame(HEADERS, END_HEADERS | PRIORITY, 1, &[1, 2]),
                "priority fields cut short",
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0x7f]),
                "cannot be decoded",
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f]),
                "cannot be decoded",
            ),
        ];
        for (frames, expected) in cases {
            let input = [PREFACE.as_slice(), &frames].concat();
            let error = AuthorityRewriter::new("localhost")
                .feed(&input, &mut BytesMut::new())
                .unwrap_err();
            assert!(
                error.to_string().contains(expected),
                "{error} should say {expected}"
            );
        }
        // A header block that never ends is refused once it passes the bound, not buffered.
        let mut rewriter = AuthorityRewriter::new("localhost");
        let mut out = BytesMut::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        rewriter
            .feed(&frame(HEADERS, 0, 1, &[0; MIN_MAX_FRAME_SIZE]), &mut out)
            .unwrap();
        let continuation = frame(CONTINUATION, 0, 1, &[0; MIN_MAX_FRAME_SIZE]);
        let error = (0..100)
            .find_map(|_| rewriter.feed(&continuation, &mut out).err())
            .expect("refused");
        assert!(
            matches!(error, RewriteError::HeaderBlockTooLarge { stream: 1 }),
            "{error}"
        );
        assert!(rewriter.pending.len() <= MAX_HEADER_BLOCK + MIN_MAX_FRAME_SIZE);
    }

    #[test]
    fn what_is_not_http2_passes_through_for_the_server_to_refuse() {
        let mut out = BytesMut::new();
        let mut rewriter = AuthorityRewriter::new("localhost");
        rewriter.feed(b"GET / HTTP/1.1\r\n", &mut out).unwrap();
        rewriter.feed(b"Host: x\r\n\r\n", &mut out).unwrap();
        assert_eq!(&out[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    proptest::proptest! {
        /// Whatever a client sends, the rewriter answers with bytes or an error, never a panic.
        #[test]
        fn arbitrary_frames_never_panic(frames in proptest::collection::vec(
            (0u8..12, proptest::num::u8::ANY, 0u32..4, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
            0..12,
        )) {
            let mut input = PREFACE.to_vec();
            for (kind, flags, stream, payload) in frames {
                input.extend(frame(kind, flags, stream, &payload));
            }
            let _ = AuthorityRewriter::new("localhost").feed(&input, &mut BytesMut::new());
        }

        /// Any header list, cut into any pieces, reaches the server whole, with only the
        /// authority changed.
        #[test]
        fn any_headers_in_any_pieces_arrive_with_only_the_authority_changed(
            requests in proptest::collection::vec(
                proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,40}"), 0..8),
                1..5,
            ),
            authority in "[!-~]{0,80}",
            cut in 1usize..50,
        ) {
            let mut encoder = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            let mut expected = Vec::new();
            for (i, fields) in requests.iter().enumerate() {
                let mut headers: Vec<(Vec<u8>, Vec<u8>)> = vec![
                    (b":method".to_vec(), b"POST".to_vec()),
                    (b":authority".to_vec(), authority.as_bytes().to_vec()),
                ];
                headers.extend(fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())));
                let block = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
                input.extend(frame(HEADERS, END_HEADERS, 2 * i as u32 + 1, &block));
                headers[1].1 = b"localhost".to_vec();
                expected.push(headers);
            }
            let mut rewriter = AuthorityRewriter::new("localhost");
            let mut out = BytesMut::new();
            for piece in input.chunks(cut) {
                rewriter.feed(piece, &mut out).unwrap();
            }
            let (blocks, _) = server_view(&out);
            proptest::prop_assert_eq!(blocks, expected);
        }
    }

    #[test]
    fn grpc_go_encodes_a_socket_path_as_the_kubelet_sends_it() {
        assert_eq!(
            grpc_go_authority("/var/lib/kubelet/plugins_registry/gpu.tessera.dev-reg.sock"),
            "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.tessera.dev-reg.sock"
        );
        assert_eq!(grpc_go_authority("a b%"), "a%20b%25");
    }
}
