//! Stock gRPC clients on the Router socket. grpc-core (grpcio, C++, Ruby), grpc-java's
//! netty UDS transport and `grpcurl -unix` send the socket path, percent-encoded, as
//! `:authority`; h2, under tonic, refuses that as a malformed authority and resets the
//! stream (hyperium/h2#487, open). On a local socket the authority carries nothing, so the
//! connection's first request is read here: a client whose authority h2 accepts (tonic,
//! grpc-go) is handed to the gRPC server as it came, bytes replayed; any other gets a relay
//! that rewrites such an `:authority` to `localhost`, re-encoding each header block (HPACK)
//! and passing every other frame through as it came.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's default, which h2 keeps.
const MAX_FRAME: usize = 16_384;
/// What a client may send in one header block before it is refused.
const MAX_BLOCK: usize = 1 << 20;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One HTTP/2 frame as read.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn header(&self) -> [u8; 9] {
        let len = u32::try_from(self.payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes();
        let s = self.stream.to_be_bytes();
        [
            len[1], len[2], len[3], self.kind, self.flags, s[0], s[1], s[2], s[3],
        ]
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header());
        out.extend_from_slice(&self.payload);
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut h = [0u8; 9];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: h[3],
        flags: h[4],
        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        payload,
    }))
}

/// A request's header block, gathered from HEADERS and its CONTINUATIONs.
struct Block {
    stream: u32,
    end_stream: bool,
    /// Stream dependency and weight, when the HEADERS frame carried them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as they came, to forward untouched when nothing needs rewriting.
    raw: Vec<u8>,
}

/// Gathers the header block that `first` (a HEADERS frame) starts.
async fn block_of<R: AsyncRead + Unpin>(r: &mut R, first: Frame) -> io::Result<Block> {
    let mut raw = Vec::new();
    first.write_to(&mut raw);
    let mut body = first.payload.as_slice();
    let mut pad = 0;
    if first.flags & PADDED != 0 {
        pad = usize::from(*body.first().ok_or_else(|| invalid("padded HEADERS"))?);
        body = &body[1..];
    }
    let priority = if first.flags & PRIORITY != 0 {
        let p: [u8; 5] = body
            .get(..5)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| invalid("HEADERS priority"))?;
        body = &body[5..];
        Some(p)
    } else {
        None
    };
    let fragment = body
        .get(..body.len().saturating_sub(pad))
        .ok_or_else(|| invalid("HEADERS padding"))?
        .to_vec();
    let mut block = Block {
        stream: first.stream,
        end_stream: first.flags & END_STREAM != 0,
        priority,
        fragment,
        raw,
    };
    let mut done = first.flags & END_HEADERS != 0;
    while !done {
        let f = read_frame(r)
            .await?
            .ok_or_else(|| invalid("connection closed inside a header block"))?;
        if f.kind != CONTINUATION || f.stream != block.stream {
            return Err(invalid("a header block must end before other frames"));
        }
        f.write_to(&mut block.raw);
        block.fragment.extend_from_slice(&f.payload);
        if block.fragment.len() > MAX_BLOCK {
            return Err(invalid("header block too large"));
        }
        done = f.flags & END_HEADERS != 0;
    }
    Ok(block)
}

/// Whether h2 would accept this `:authority`.
fn acceptable(authority: &[u8]) -> bool {
    http::uri::Authority::try_from(authority).is_ok()
}

/// Decoded headers with an unacceptable `:authority` replaced; `None` when none was.
fn rewritten(headers: &[(Vec<u8>, Vec<u8>)]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = headers
        .iter()
        .any(|(n, v)| n.as_slice() == b":authority" && !acceptable(v));
    bad.then(|| {
        headers
            .iter()
            .map(|(n, v)| {
                if n.as_slice() == b":authority" && !acceptable(v) {
                    (n.clone(), b"localhost".to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    })
}

/// A header block re-encoded as one HEADERS frame and CONTINUATIONs of at most
/// [`MAX_FRAME`] bytes each.
fn frames_for(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let mut first = Vec::with_capacity(encoded.len().min(MAX_FRAME) + 5);
    if let Some(p) = block.priority {
        first.extend_from_slice(&p);
    }
    let room = MAX_FRAME - first.len();
    let (head, mut rest) = encoded.split_at(encoded.len().min(room));
    first.extend_from_slice(head);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    Frame {
        kind: HEADERS,
        flags,
        stream: block.stream,
        payload: first,
    }
    .write_to(out);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = after;
        Frame {
            kind: CONTINUATION,
            flags: if rest.is_empty() { END_HEADERS } else { 0 },
            stream: block.stream,
            payload: chunk.to_vec(),
        }
        .write_to(out);
    }
}

/// The HPACK state of the client-to-server direction.
struct Headers {
    /// The client's table, to read every block.
    decoder: loona_hpack::Decoder<'static>,
    /// Ours toward the server, once a block has been rewritten: from then on the server's
    /// table follows this encoder, so every later block is re-encoded too.
    encoder: Option<loona_hpack::Encoder<'static>>,
}

impl Headers {
    /// The bytes to send the server for `block`: as they came, or re-encoded.
    fn forward(&mut self, block: &Block, out: &mut Vec<u8>) -> io::Result<()> {
        let headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(format!("request headers do not decode: {e:?}")))?;
        let fixed = rewritten(&headers);
        if fixed.is_some() && self.encoder.is_none() {
            self.encoder = Some(loona_hpack::Encoder::new());
        }
        match &mut self.encoder {
            None => out.extend_from_slice(&block.raw),
            Some(encoder) => {
                let headers = fixed.unwrap_or(headers);
                let encoded =
                    encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
                frames_for(block, &encoded, out);
            }
        }
        Ok(())
    }
}

/// Relays a client's frames to the gRPC server (`first` holds the preface's first bytes,
/// already read), each frame as soon as it is whole, header blocks as [`Headers`] says,
/// until the client closes.
///
/// # Errors
/// I/O errors either way, a connection that is not HTTP/2, and header blocks that do not
/// decode.
pub async fn relay<R, W>(first: &[u8], mut client: R, mut server: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    let n = first.len().min(24);
    preface[..n].copy_from_slice(&first[..n]);
    client.read_exact(&mut preface[n..]).await?;
    if &preface != PREFACE {
        return Err(invalid("not an HTTP/2 connection"));
    }
    server.write_all(&preface).await?;
    let mut headers = Headers {
        decoder: loona_hpack::Decoder::new(),
        encoder: None,
    };
    let mut out = Vec::new();
    while let Some(frame) = read_frame(&mut client).await? {
        out.clear();
        if frame.kind == HEADERS {
            let block = block_of(&mut client, frame).await?;
            headers.forward(&block, &mut out)?;
        } else {
            frame.write_to(&mut out);
        }
        server.write_all(&out).await?;
        server.flush().await?;
    }
    server.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authority: &str, encoder: &mut loona_hpack::Encoder<'_>, stream: u32) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/edgewise.agent.v1.Router/Decide"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
        ];
        let block = encoder.encode(headers);
        let mut out = Vec::new();
        Frame {
            kind: HEADERS,
            flags: END_HEADERS,
            stream,
            payload: block,
        }
        .write_to(&mut out);
        out
    }

    fn settings() -> Vec<u8> {
        let mut out = Vec::new();
        Frame {
            kind: 0x4,
            flags: 0,
            stream: 0,
            payload: Vec::new(),
        }
        .write_to(&mut out);
        out
    }

    fn authorities(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut found = Vec::new();
        let mut rest = &bytes[24..];
        while rest.len() >= 9 {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if rest[3] == HEADERS {
                for (n, v) in decoder.decode(&rest[9..9 + len]).expect("decodes") {
                    if n == b":authority" {
                        found.push(v);
                    }
                }
            }
            rest = &rest[9 + len..];
        }
        found
    }

    async fn relayed(sent: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        relay(&sent[..4], &sent[4..], &mut out)
            .await
            .expect("relays");
        out
    }

    #[tokio::test]
    async fn a_valid_authority_is_relayed_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let sent = [
            &PREFACE[..],
            &settings(),
            &request("localhost", &mut enc, 1),
            &request("localhost", &mut enc, 3),
        ]
        .concat();
        assert_eq!(relayed(&sent).await, sent);
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_on_every_request() {
        let mut enc = loona_hpack::Encoder::new();
        let path = "tmp%2Fag%2Frouter.sock";
        // The second request refers to the client's HPACK table: the relay must follow it.
        let sent = [
            &PREFACE[..],
            &settings(),
            &request(path, &mut enc, 1),
            &request(path, &mut enc, 3),
            &settings(),
        ]
        .concat();
        let all = relayed(&sent).await;
        assert_eq!(
            authorities(&all),
            [b"localhost".to_vec(), b"localhost".to_vec()]
        );
        assert!(all.ends_with(&settings()), "other frames pass through");
    }

    #[tokio::test]
    async fn what_is_not_http2_is_refused() {
        let sent = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let err = relay(&sent[..4], &sent[4..], Vec::new())
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let block = Block {
            stream: 5,
            end_stream: true,
            priority: Some([0, 0, 0, 0, 16]),
            fragment: Vec::new(),
            raw: Vec::new(),
        };
        let encoded = vec![7u8; MAX_FRAME * 2 + 10];
        let mut out = Vec::new();
        frames_for(&block, &encoded, &mut out);
        let mut rest = out.as_slice();
        let mut kinds = Vec::new();
        let mut payload = 0;
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME);
            kinds.push((rest[3], rest[4] & END_HEADERS != 0));
            payload += len;
            rest = &rest[9 + len..];
        }
        assert_eq!(
            kinds,
            [
                (HEADERS, false),
                (CONTINUATION, false),
                (CONTINUATION, true)
            ]
        );
        assert_eq!(payload, encoded.len() + 5);
    }
}
