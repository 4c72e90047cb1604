//! An embedded S3-compatible server (s3s + s3s-fs over a directory) for the dev stack and
//! the tests. It speaks real S3 with SigV4 authentication, including presigned URLs and
//! `Range` requests. Not for production.
//!
//! Model artifacts are gigabytes, and s3s-fs is tuned for neither direction: it streams
//! GET bodies in 4 KiB reads (about 90 MB/s) and writes uploads in whatever pieces arrive,
//! which leaves the object in small page-cache folios that read back at half the speed or
//! less. [`Store`] keeps every operation of s3s-fs but gathers upload bodies into 4 MiB
//! writes and streams GET bodies itself: a blocking thread reads into pooled buffers that
//! the body sends as they are, a few ahead of the socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use edgewise_operator::s3::S3Settings;

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
        let (listener, addr) = crate::listen(bind)
            .await
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

/// s3s-fs with fast GET bodies, and the checks a directory-backed store needs.
struct Store {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

impl Store {
    /// Objects are files under `root/bucket`: a key with `.` or `..` segments would name a
    /// file elsewhere (another bucket), so it is refused, and the bucket must exist (s3s-fs
    /// would create it on PUT and answer NoSuchKey on GET).
    fn check(&self, bucket: &str, key: &str) -> S3Result<()> {
        if key
            .split('/')
            .any(|segment| segment == ".." || segment == ".")
        {
            return Err(s3s::s3_error!(
                InvalidArgument,
                "this store keeps objects as files: keys with '.' or '..' path segments are refused"
            ));
        }
        if bucket.is_empty() || bucket.contains(['/', '\\']) || !self.root.join(bucket).is_dir() {
            return Err(s3s::s3_error!(NoSuchBucket));
        }
        Ok(())
    }
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
const GET_CHUNK: usize = 256 << 10;

#[async_trait::async_trait]
impl S3 for Store {
    delegate! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        delete_bucket: DeleteBucketInput => DeleteBucketOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
        copy_object: CopyObjectInput => CopyObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        list_objects: ListObjectsInput => ListObjectsOutput,
        list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
        list_parts: ListPartsInput => ListPartsOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    }

    async fn head_object(
        &self,
        req: S3Request<s3s::dto::HeadObjectInput>,
    ) -> S3Result<S3Response<s3s::dto::HeadObjectOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
        self.fs.head_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<s3s::dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<s3s::dto::DeleteObjectOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
        self.fs.delete_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<s3s::dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<s3s::dto::CreateMultipartUploadOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
        self.fs.create_multipart_upload(req).await
    }

    async fn put_object(
        &self,
        mut req: S3Request<s3s::dto::PutObjectInput>,
    ) -> S3Result<S3Response<s3s::dto::PutObjectOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
        req.input.body = req.input.body.take().map(coalesce);
        self.fs.put_object(req).await
    }

    async fn upload_part(
        &self,
        mut req: S3Request<s3s::dto::UploadPartInput>,
    ) -> S3Result<S3Response<s3s::dto::UploadPartOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
        req.input.body = req.input.body.take().map(coalesce);
        self.fs.upload_part(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<s3s::dto::GetObjectInput>,
    ) -> S3Result<S3Response<s3s::dto::GetObjectOutput>> {
        self.check(&req.input.bucket, &req.input.key)?;
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

/// Bytes an upload is gathered into before s3s-fs writes them.
const PUT_CHUNK: usize = 4 << 20;

/// Gathers an upload body into [`PUT_CHUNK`] writes. s3s-fs writes each body chunk as it
/// arrives (tens of KiB), and the page cache keeps a file in folios the size of the writes
/// that made it: an artifact laid out by small writes reads back (every GET) at half the
/// speed of one written in large pieces, or less.
fn coalesce(body: s3s::dto::StreamingBlob) -> s3s::dto::StreamingBlob {
    s3s::dto::StreamingBlob::wrap(Coalesce {
        inner: body,
        gathered: bytes::BytesMut::new(),
        ended: false,
    })
}

struct Coalesce {
    inner: s3s::dto::StreamingBlob,
    gathered: bytes::BytesMut,
    ended: bool,
}

impl futures_util::Stream for Coalesce {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        while !this.ended {
            match std::pin::Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.gathered.is_empty() && chunk.len() >= PUT_CHUNK {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    if this.gathered.is_empty() {
                        this.gathered.reserve(PUT_CHUNK);
                    }
                    this.gathered.extend_from_slice(&chunk);
                    if this.gathered.len() >= PUT_CHUNK {
                        return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        if this.gathered.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Ok(this.gathered.split().freeze())))
        }
    }
}

/// Reads `length` bytes of `file` from `start` on a blocking thread, [`GET_CHUNK`] at a time,
/// up to [`READ_AHEAD`] chunks ahead of the socket. Chunks are pooled buffers that become
/// the body's bytes as they are (no second copy) and come back when the socket is done
/// with them (faulting in and zeroing fresh pages for every chunk was 7.6 % of a GET's CPU
/// samples). The thread stops when the body is dropped.
fn read_ahead(
    file: std::fs::File,
    start: u64,
    length: u64,
) -> tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>> {
    use std::os::unix::fs::FileExt;
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        // Enough for the chunks queued, the ones the socket holds and the one being filled.
        // The channel bounds the read-ahead; a consumer that holds more chunks only makes
        // the reader allocate (waiting for a buffer to come back could wait forever).
        let (home, free) = std::sync::mpsc::sync_channel::<Vec<u8>>(READ_AHEAD + 2);
        let mut offset = start;
        let end = start + length;
        while offset < end {
            let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; GET_CHUNK]);
            let want = usize::try_from(end - offset).map_or(GET_CHUNK, |w| w.min(GET_CHUNK));
            let item = match file.read_at(&mut buf[..want], offset) {
                Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    offset += n as u64;
                    Ok(bytes::Bytes::from_owner(PooledChunk {
                        buf,
                        len: n,
                        home: home.clone(),
                    }))
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

/// A GET body chunk that returns its buffer to the reader's pool when dropped.
struct PooledChunk {
    buf: Vec<u8>,
    len: usize,
    home: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        // A full pool or a finished reader: the buffer is simply freed.
        let _ = self.home.try_send(std::mem::take(&mut self.buf));
    }
}

/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Small pieces are gathered into `PUT_CHUNK` writes, a large piece passes as it is,
    /// nothing is reordered or lost, and the tail comes last.
    #[tokio::test]
    async fn uploads_are_gathered_into_large_writes_in_order() {
        let data = pattern(2 * PUT_CHUNK + PUT_CHUNK + 12_345);
        let (small, rest) = data.split_at(2 * PUT_CHUNK);
        let (large, tail) = rest.split_at(PUT_CHUNK);
        let mut pieces: Vec<Result<bytes::Bytes, std::io::Error>> = small
            .chunks(65_521)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        pieces.push(Ok(bytes::Bytes::copy_from_slice(large)));
        pieces.push(Ok(bytes::Bytes::copy_from_slice(tail)));
        let body = coalesce(s3s::dto::StreamingBlob::wrap(futures_util::stream::iter(
            pieces,
        )));
        let out: Vec<bytes::Bytes> = body.map(|r| r.expect("no error")).collect().await;
        let sizes: Vec<usize> = out.iter().map(bytes::Bytes::len).collect();
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n >= PUT_CHUNK),
            "every write but the last is at least {PUT_CHUNK} bytes: {sizes:?}"
        );
        assert_eq!(out.concat(), data, "the same bytes in the same order");
    }

    /// The AWS SDK against the store: a key that would leave its bucket's directory is
    /// refused and writes nothing; a missing bucket is NoSuchBucket on GET and PUT, and a
    /// PUT does not create it.
    #[tokio::test]
    async fn keys_stay_in_their_bucket_and_missing_buckets_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s3 = EmbeddedS3::start(
            dir.path(),
            "127.0.0.1:0".parse().expect("addr"),
            "k",
            "secret-key-1234",
        )
        .await
        .expect("starts");
        let client = s3.settings().client();
        for bucket in ["alpha", "beta"] {
            client
                .create_bucket()
                .bucket(bucket)
                .send()
                .await
                .expect("bucket");
        }
        let put = |bucket: &'static str, key: &'static str| {
            client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(bytes::Bytes::from_static(b"x").into())
                .send()
        };
        let code = |e: &dyn aws_sdk_s3::error::ProvideErrorMetadata| e.code().map(str::to_owned);
        let err = put("alpha", "x/../../beta/stolen")
            .await
            .expect_err("refused");
        assert_eq!(code(&err).as_deref(), Some("InvalidArgument"), "{err:?}");
        assert!(
            !dir.path().join("beta/stolen").exists(),
            "nothing written across buckets"
        );
        let err = put("missing", "k").await.expect_err("refused");
        assert_eq!(code(&err).as_deref(), Some("NoSuchBucket"), "{err:?}");
        assert!(
            !dir.path().join("missing").exists(),
            "the bucket was not created"
        );
        let err = client
            .get_object()
            .bucket("missing")
            .key("k")
            .send()
            .await
            .expect_err("refused");
        assert_eq!(code(&err).as_deref(), Some("NoSuchBucket"), "{err:?}");
        put("alpha", "fine/key")
            .await
            .expect("an ordinary key works");
        s3.stop().await;
    }

    /// A failing upload body fails the gathered stream too; it does not end it early as if
    /// the object were complete.
    #[tokio::test]
    async fn an_upload_error_is_passed_on() {
        let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
            Ok(bytes::Bytes::from_static(b"partial")),
            Err(std::io::Error::other("connection reset")),
        ];
        let mut body = coalesce(s3s::dto::StreamingBlob::wrap(futures_util::stream::iter(
            pieces,
        )));
        let first = body.next().await.expect("an item");
        assert!(
            first.is_err_and(|e| e.to_string().contains("connection reset")),
            "the error arrives"
        );
    }

    /// GET bodies from an offset hold exactly the file's bytes, whether the consumer drops
    /// each chunk (buffers come back to the pool and are refilled) or holds them all (the
    /// reader allocates rather than waits).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_ahead_returns_exact_ranges_from_pooled_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("object");
        let data = pattern(GET_CHUNK * (READ_AHEAD + 2) * 3 + 777);
        std::fs::write(&path, &data).expect("writes");
        let start = 4_099u64;
        let length = data.len() as u64 - start - 5;

        let open = || std::fs::File::open(&path).expect("opens");
        let mut streamed = Vec::new();
        let mut chunks = read_ahead(open(), start, length);
        while let Some(chunk) = chunks.recv().await {
            streamed.extend_from_slice(&chunk.expect("reads"));
        }
        let range = &data[start as usize..(start + length) as usize];
        assert!(streamed == range, "dropping each chunk: the exact range");

        let mut held = Vec::new();
        let mut chunks = read_ahead(open(), start, length);
        while let Some(chunk) = chunks.recv().await {
            held.push(chunk.expect("reads"));
        }
        assert!(
            held.concat() == range,
            "holding every chunk: the exact range"
        );
    }
}
