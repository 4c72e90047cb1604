//! An embedded S3-compatible server (s3s + s3s-fs over a directory) for the dev stack and
//! the tests. It speaks real S3 with SigV4 authentication, including presigned URLs and
//! `Range` requests. Not for production.
//!
//! s3s-fs streams object bodies in 4 KiB reads, which caps a GET at about 90 MB/s; model
//! artifacts are gigabytes, so [`Store`] keeps every operation of s3s-fs but streams GET
//! bodies itself: a blocking thread reads 1 MiB at a time straight into the buffers the
//! body sends, a few ahead of the socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::s3::S3Settings;

/// A running embedded S3 server.
#[derive(Debug)]
pub struct EmbeddedS3 {
    addr: SocketAddr,
    access_key_id: String,
    secret_access_key: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Why the embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory could not be used.
    #[error("S3 data directory {dir}: {message}")]
    Storage {
        /// The directory.
        dir: String,
        /// What went wrong.
        message: String,
    },
    /// The listen address could not be bound.
    #[error("binding S3 listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl EmbeddedS3 {
    /// Serves the buckets under `root` (one sub-directory per bucket) on `bind`.
    ///
    /// # Errors
    /// [`Error`] when `root` is unusable or `bind` cannot be bound.
    pub async fn start(
        root: &Path,
        bind: SocketAddr,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, Error> {
        let storage = |message: String| Error::Storage {
            dir: root.display().to_string(),
            message,
        };
        std::fs::create_dir_all(root).map_err(|e| storage(e.to_string()))?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| storage(format!("{e:?}")))?;
        let mut builder = S3ServiceBuilder::new(Store {
            fs,
            root: root.to_owned(),
        });
        builder.set_auth(SimpleAuth::from_single(access_key_id, secret_access_key));
        let service = builder.build();
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(
            async move {
                let http = ConnBuilder::new(TokioExecutor::new());
                let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                loop {
                    let socket = tokio::select! {
                        () = stop.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((socket, _)) => socket,
                            Err(e) => {
                                warn!(error = %e, "accepting S3 connection");
                                continue;
                            }
                        },
                    };
                    let conn = http.serve_connection(TokioIo::new(socket), service.clone());
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                // Open downloads get a moment to finish; the directory is the state.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), graceful.shutdown())
                        .await;
            }
            .instrument(info_span!("embedded_s3", %addr)),
        );
        Ok(EmbeddedS3 {
            addr,
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            shutdown,
            task,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Client settings for this server.
    #[must_use]
    pub fn settings(&self) -> S3Settings {
        S3Settings::with_endpoint(
            self.endpoint(),
            &self.access_key_id,
            &self.secret_access_key,
        )
    }

    /// Stops accepting and waits for the server task.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// s3s-fs with fast GET bodies.
struct Store {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

/// Forwards operations to s3s-fs unchanged. Written in `async_trait`'s expanded form, since
/// that attribute cannot see into methods a macro generates.
macro_rules! delegate {
    ($($op:ident: $input:ident => $output:ident),* $(,)?) => {
        $(
            fn $op<'life0, 'async_trait>(
                &'life0 self,
                req: S3Request<s3s::dto::$input>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = S3Result<S3Response<s3s::dto::$output>>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                self.fs.$op(req)
            }
        )*
    };
}

/// Bytes a GET body reads from disk at a time.
const GET_CHUNK: usize = 1 << 20;

#[async_trait::async_trait]
impl S3 for Store {
    delegate! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        delete_bucket: DeleteBucketInput => DeleteBucketOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
        put_object: PutObjectInput => PutObjectOutput,
        head_object: HeadObjectInput => HeadObjectOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        list_objects: ListObjectsInput => ListObjectsOutput,
        list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        list_parts: ListPartsInput => ListPartsOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    }

    async fn get_object(
        &self,
        req: S3Request<s3s::dto::GetObjectInput>,
    ) -> S3Result<S3Response<s3s::dto::GetObjectOutput>> {
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        // s3s-fs resolves the range, ETag and headers; only its body is replaced.
        let mut response = self.fs.get_object(req).await?;
        let start = response
            .output
            .content_range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes "))
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let length = response
            .output
            .content_length
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0);
        let file = std::fs::File::open(&path).map_err(|e| s3s::s3_error!(e, NoSuchKey))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(read_ahead(file, start, length));
        response.output.body = Some(s3s::dto::StreamingBlob::wrap(stream));
        Ok(response)
    }
}

/// Reads `length` bytes of `file` from `start` on a blocking thread, [`GET_CHUNK`] at a time
/// into fresh buffers that become the body's chunks as they are (no second copy), up to
/// [`READ_AHEAD`] chunks ahead of the socket. The thread stops when the body is dropped.
fn read_ahead(
    mut file: std::fs::File,
    start: u64,
    length: u64,
) -> tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> {
    use std::io::{Read, Seek};
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut left = length;
        let seek = file.seek(std::io::SeekFrom::Start(start));
        if let Err(e) = seek {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        while left > 0 {
            let want = left.min(GET_CHUNK as u64);
            // `read_to_end` fills the spare capacity without zeroing it first.
            let mut chunk = Vec::with_capacity(GET_CHUNK);
            let item = match (&file).take(want).read_to_end(&mut chunk) {
                Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    left -= n as u64;
                    Ok(bytes::Bytes::from(chunk))
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;
