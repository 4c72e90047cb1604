//! The router's Unix socket: one listener for both gRPC and the framed lane ([`super::lane`]),
//! told apart by a connection's first bytes.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use edgewise_proto::router::router_server::RouterServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::LocalRouter;
use super::service::RouterService;
use super::{authority, lane};

/// Serves the Router API on a Unix socket until `shutdown`: gRPC, and the framed lane
/// ([`super::lane`]) for clients that open with its magic.
///
/// # Errors
/// When the socket cannot be bound or the server fails.
#[tracing::instrument(name = "router", skip_all, fields(socket = %path.display()))]
pub async fn serve_unix(
    path: PathBuf,
    peers: crate::local_socket::PeerPolicy,
    router: Arc<LocalRouter>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = crate::local_socket::LocalListener::bind(&path, peers)?;
    let (grpc_tx, grpc_rx) = tokio::sync::mpsc::channel::<std::io::Result<Replayed>>(64);
    let grpc = tonic::transport::Server::builder()
        .add_service(RouterServer::new(RouterService::new(router.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(grpc_rx),
            shutdown.clone().cancelled_owned(),
        );
    let accept = async {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted?,
            };
            let (router, grpc_tx) = (router.clone(), grpc_tx.clone());
            tokio::spawn(
                async move {
                    if let Err(e) = dispatch(stream, router, grpc_tx).await {
                        tracing::debug!(error = %e, "router connection ended");
                    }
                }
                .instrument(tracing::debug_span!("router connection")),
            );
        }
    };
    let served = tokio::select! {
        served = grpc => served.map_err(std::io::Error::other),
        accepted = accept => accepted,
    };
    // Apps must not find a socket nobody listens on.
    let _ = std::fs::remove_file(path);
    served
}

/// Reads a connection's first bytes: the lane's magic, or the start of gRPC's HTTP/2
/// preface, which goes to the gRPC server with those bytes put back.
async fn dispatch(
    mut stream: UnixStream,
    router: Arc<LocalRouter>,
    grpc: tokio::sync::mpsc::Sender<std::io::Result<Replayed>>,
) -> std::io::Result<()> {
    let mut first = [0u8; 4];
    stream.read_exact(&mut first).await?;
    if first == lane::MAGIC {
        return lane::serve(stream, router).await;
    }
    // Every gRPC connection goes through the authority relay (see [`authority`]): stock
    // gRPC clients send an `:authority` the server would refuse.
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    grpc.send(Ok(Replayed(Box::new(theirs))))
        .await
        .map_err(|_| std::io::Error::other("router gRPC server stopped"))?;
    let (read, mut write) = stream.into_split();
    let (mut from_server, to_server) = tokio::io::split(ours);
    let up = authority::relay(&first, read, to_server);
    let down = async {
        tokio::io::copy(&mut from_server, &mut write).await?;
        write.shutdown().await
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// What a connection's bytes travel through on their way to the gRPC server.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A Unix connection whose first bytes were read, replayed to the gRPC server (or relayed
/// with its authority rewritten).
struct Replayed(Box<dyn Io>);

impl tonic::transport::server::Connected for Replayed {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
