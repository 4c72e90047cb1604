//! The Router socket's framed lane: `Decide` and `Report` as length-prefixed protobuf, beside
//! the gRPC service on the same Unix socket.
//!
//! A decision sits in front of every inference, so its round trip matters. gRPC over HTTP/2
//! costs HEADERS, DATA and trailers each way plus a task per call; this lane is one write and
//! one read each way with the same `edgewise.agent.v1` messages, so a client in any language
//! is a few lines over its protobuf library. The server tells the two apart by the first
//! bytes a connection sends: [`MAGIC`] here, the HTTP/2 preface for gRPC.
//!
//! After the magic, a client sends request frames and reads one response frame for each, in
//! order:
//!
//! ```text
//! request:  u32 length (little endian, of what follows) | u8 method | message
//! response: u32 length (little endian, of what follows) | u8 code   | body
//! ```
//!
//! `method` is [`Method`]; `code` is the gRPC status code (0 = OK), and `body` is the response
//! message when OK, else the error text. A frame longer than [`MAX_FRAME`] ends the
//! connection after its error response.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgewise_proto::router::{DecideRequest, DecideResponse, Outcome};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::{Code, Status};

use super::LocalRouter;

/// What a framed-lane client sends first.
pub const MAGIC: [u8; 4] = *b"EWR1";
/// Largest frame either way.
pub const MAX_FRAME: usize = 64 * 1024;

/// The calls the lane carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    /// `Router.Decide`: `DecideRequest` → `DecideResponse`.
    Decide = 1,
    /// `Router.Report`: `Outcome` → `ReportResponse` (empty).
    Report = 2,
    /// The agent's status: empty → its status document (JSON), as `edgewise-agent status
    /// --output json` prints it.
    Status = 3,
}

/// How long the agent polls a lane connection for its next request after answering one,
/// before it sleeps. Requests that follow each other closely then cost no wake-up (see
/// [`DEFAULT_POLL`]); an idle connection costs nothing once the poll ends.
pub const SERVER_POLL: Duration = Duration::from_micros(50);

/// Serves one connection whose [`MAGIC`] was already read, until the client closes it.
pub(crate) async fn serve(mut stream: UnixStream, router: Arc<LocalRouter>) -> std::io::Result<()> {
    let mut frames = FrameReader::default();
    let mut out = Vec::new();
    loop {
        let frame = match frames.next(&stream, SERVER_POLL, MAX_FRAME).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                respond(&mut out, &Err(Status::resource_exhausted(e.to_string())));
                stream.write_all(&out).await?;
                // The client may still be writing the frame: closing on its unread bytes
                // would fail its write (EPIPE) before it reads the reason. Take what it
                // sends for a moment, bounded, then close.
                drain(&mut stream).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let answer = call(&router, frame[0], &frame[1..]).await;
        respond(&mut out, &answer);
        stream.write_all(&out).await?;
    }
}

/// Most a refused connection's remaining bytes are read (and dropped) for, and how long.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

async fn drain(stream: &mut UnixStream) {
    let mut buf = vec![0u8; READ_ROOM];
    let mut taken = 0;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while taken < DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => taken += n,
            }
        }
    })
    .await;
}

/// Reads length-prefixed frames, polling the socket for a while before sleeping on it.
#[derive(Debug, Default)]
struct FrameReader {
    /// Received bytes are `buf[pos..filled]`; the rest is room to read into (zeroed once,
    /// when the buffer grows, not on every read).
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
}

/// Room kept free for each read.
const READ_ROOM: usize = 16 * 1024;

impl FrameReader {
    /// The next frame (without its length); `None` when the peer closed between frames.
    /// A length of zero or over `max` is `InvalidData`.
    async fn next(
        &mut self,
        stream: &UnixStream,
        poll: Duration,
        max: usize,
    ) -> std::io::Result<Option<&[u8]>> {
        let poll_until = Instant::now() + poll;
        loop {
            let unread = &self.buf[self.pos..self.filled];
            if let Some(head) = unread.first_chunk::<4>() {
                let len = u32::from_le_bytes(*head) as usize;
                if len == 0 || len > max {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("frame of {len} bytes; frames hold 1 to {max}"),
                    ));
                }
                if unread.len() >= 4 + len {
                    let frame = self.pos + 4..self.pos + 4 + len;
                    self.pos += 4 + len;
                    return Ok(Some(&self.buf[frame]));
                }
            }
            // Keep the unread bytes at the front, with room after them.
            self.buf.copy_within(self.pos..self.filled, 0);
            self.filled -= self.pos;
            self.pos = 0;
            if self.buf.len() < self.filled + READ_ROOM {
                self.buf.resize(self.filled + READ_ROOM, 0);
            }
            match stream.try_read(&mut self.buf[self.filled..]) {
                Ok(0) if self.filled == 0 => return Ok(None),
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() < poll_until {
                        // Let the runtime's other tasks run, then look again.
                        tokio::task::yield_now().await;
                    } else {
                        stream.readable().await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

async fn call(router: &LocalRouter, method: u8, message: &[u8]) -> Result<Vec<u8>, Status> {
    match method {
        m if m == Method::Decide as u8 => {
            let request = DecideRequest::decode(message)
                .map_err(|e| Status::invalid_argument(format!("malformed DecideRequest: {e}")))?;
            let response = router.decide(&request).map_err(Status::from)?;
            Ok(response.encode_to_vec())
        }
        m if m == Method::Report as u8 => {
            let outcome = Outcome::decode(message)
                .map_err(|e| Status::invalid_argument(format!("malformed Outcome: {e}")))?;
            router.report(&outcome).await.map_err(Status::from)?;
            Ok(Vec::new())
        }
        m if m == Method::Status as u8 => router
            .status_json()
            .map(String::into_bytes)
            .ok_or_else(|| Status::unimplemented("this router has no agent status")),
        other => Err(Status::invalid_argument(format!(
            "unknown method {other}; 1 is Decide, 2 is Report, 3 is Status"
        ))),
    }
}

/// Writes a whole response frame into `out` (one write per response).
fn respond(out: &mut Vec<u8>, answer: &Result<Vec<u8>, Status>) {
    let (code, body) = match answer {
        Ok(body) => (Code::Ok, body.as_slice()),
        Err(status) => (status.code(), status.message().as_bytes()),
    };
    out.clear();
    out.extend_from_slice(
        &u32::try_from(body.len() + 1)
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.push(u8::try_from(code as i32).unwrap_or(u8::MAX));
    out.extend_from_slice(body);
}

/// How long a client polls for its answer before it sleeps, by default.
///
/// A decision is answered in microseconds, but waking a sleeping thread on another core can
/// cost more than that (about 17 µs per wake-up on the 2-vCPU VM of docs/benchmarks.md). The
/// caller waits for the answer anyway, so polling the socket for a short while saves one
/// wake-up per call; calls that take longer (a `Report` waits for its fsync) then sleep.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

/// A client of the framed lane: one connection, one call at a time.
#[derive(Debug)]
pub struct LaneClient {
    stream: UnixStream,
    poll: Duration,
    frames: FrameReader,
    /// The request frame being sent.
    frame: Vec<u8>,
    /// The response's code byte and body.
    response: Vec<u8>,
    message: Vec<u8>,
}

fn unavailable(e: std::io::Error) -> Status {
    Status::unavailable(format!("router socket: {e}"))
}

impl LaneClient {
    /// Connects to the agent's Router socket.
    ///
    /// # Errors
    /// When the socket cannot be reached.
    pub async fn connect(socket: &Path) -> std::io::Result<Self> {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(&MAGIC).await?;
        Ok(LaneClient {
            stream,
            poll: DEFAULT_POLL,
            frames: FrameReader::default(),
            frame: Vec::new(),
            response: Vec::new(),
            message: Vec::new(),
        })
    }

    /// Sets how long a call polls for its answer before sleeping ([`DEFAULT_POLL`]); zero
    /// never polls.
    #[must_use]
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// `Router.Decide`.
    ///
    /// # Errors
    /// The agent's status (as over gRPC), or `UNAVAILABLE` when the connection fails.
    pub async fn decide(&mut self, request: &DecideRequest) -> Result<DecideResponse, Status> {
        self.call(Method::Decide, request).await?;
        DecideResponse::decode(&self.response[1..])
            .map_err(|e| Status::internal(format!("malformed DecideResponse: {e}")))
    }

    /// `Router.Report`.
    ///
    /// # Errors
    /// As [`LaneClient::decide`].
    pub async fn report(&mut self, outcome: &Outcome) -> Result<(), Status> {
        self.call(Method::Report, outcome).await
    }

    /// The agent's status document (JSON).
    ///
    /// # Errors
    /// As [`LaneClient::decide`].
    pub async fn status(&mut self) -> Result<String, Status> {
        self.call(Method::Status, &()).await?;
        Ok(String::from_utf8_lossy(&self.response[1..]).into_owned())
    }

    /// Sends `method | message` as they are and returns the response's code and body: for
    /// tests of frames a well-behaved client never sends.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the connection fails.
    pub async fn raw(&mut self, method: u8, message: &[u8]) -> Result<(Code, Vec<u8>), Status> {
        let code = self.exchange(method, message).await?;
        Ok((code, self.response[1..].to_vec()))
    }

    async fn call(&mut self, method: Method, message: &impl Message) -> Result<(), Status> {
        let mut encoded = std::mem::take(&mut self.message);
        encoded.clear();
        message
            .encode(&mut encoded)
            .map_err(|e| Status::internal(e.to_string()))?;
        let code = self.exchange(method as u8, &encoded).await;
        self.message = encoded;
        match code? {
            Code::Ok => Ok(()),
            code => Err(Status::new(
                code,
                String::from_utf8_lossy(&self.response[1..]).into_owned(),
            )),
        }
    }

    /// One request frame out, one response frame into `self.response`; returns its code.
    async fn exchange(&mut self, method: u8, message: &[u8]) -> Result<Code, Status> {
        self.frame.clear();
        let len = u32::try_from(message.len() + 1).unwrap_or(u32::MAX);
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame.push(method);
        self.frame.extend_from_slice(message);
        self.stream
            .write_all(&self.frame)
            .await
            .map_err(unavailable)?;
        let response = self
            .frames
            .next(&self.stream, self.poll, MAX_FRAME + 1)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::unavailable("router socket: the agent closed the connection"))?;
        self.response.clear();
        self.response.extend_from_slice(response);
        Ok(Code::from(i32::from(self.response[0])))
    }
}
