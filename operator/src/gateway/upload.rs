//! `Fleet.UploadTelemetry` without a decode into owned messages.
//!
//! Telemetry is the gateway's bulk traffic. [`FleetRoutes`] serves the whole
//! `edgewise.v1.Fleet` service and takes this one method aside: its requests reach the
//! telemetry sink as their encoded bytes ([`TelemetrySink::submit_encoded`] reads them as
//! zero-copy views and writes RowBinary from the slices). Every other method goes to the
//! generated server. Clients see the same service.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use edgewise_proto::codec::{RawRequestCodec, UPLOAD_TELEMETRY_PATH};
use edgewise_proto::fleet::TelemetryAck;
use edgewise_proto::fleet::fleet_server::FleetServer;
use edgewise_proto::retry::with_retry_after;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::{FleetService, Inner, MAX_MESSAGE_BYTES};
use crate::telemetry::ingest::IngestError;

/// The gRPC status a device sees for an ingest error: `INTERNAL` for a body that is not
/// protobuf (what tonic answers Enroll and Sync for the same bytes, so one fault has one
/// status), `INVALID_ARGUMENT` (do not retry), `PERMISSION_DENIED`, or `UNAVAILABLE` /
/// `RESOURCE_EXHAUSTED` with the retry hint.
pub fn status_of(e: &IngestError) -> Status {
    let status = match e {
        IngestError::Undecodable(_) => Status::internal(e.to_string()),
        IngestError::Invalid(_) => Status::invalid_argument(e.to_string()),
        IngestError::WrongDevice(_) => Status::permission_denied(e.to_string()),
        IngestError::QueueFull { .. } => Status::resource_exhausted(e.to_string()),
        IngestError::StoreUnavailable | IngestError::InsertFailed(_) | IngestError::Stopped => {
            Status::unavailable(e.to_string())
        }
    };
    match e.retry_after() {
        Some(after) => with_retry_after(status, after),
        None => status,
    }
}

/// `edgewise.v1.Fleet`, with `UploadTelemetry` decoded zero-copy.
#[derive(Clone)]
pub struct FleetRoutes {
    pub(super) fleet: FleetServer<FleetService>,
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for FleetRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetRoutes").finish_non_exhaustive()
    }
}

impl NamedService for FleetRoutes {
    const NAME: &'static str = <FleetServer<FleetService> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for FleetRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == UPLOAD_TELEMETRY_PATH {
            // The credential before the body: an unauthenticated client gets its answer
            // without a byte of its (up to 4 MiB) batch being read.
            let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
            let claims = match self.inner.auth.verify(&metadata) {
                Ok(claims) => claims,
                Err(refused) => return Box::pin(async move { Ok(refused.into_http()) }),
            };
            let mut request = request;
            request.extensions_mut().insert(claims);
            let upload = Upload(self.inner.clone());
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(RawRequestCodec::<TelemetryAck>::default())
                    .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), None);
                Ok(grpc.unary(upload, request).await)
            })
        } else {
            let mut fleet = self.fleet.clone();
            Box::pin(async move { Service::call(&mut fleet, request).await })
        }
    }
}

struct Upload(Arc<Inner>);

impl UnaryService<Bytes> for Upload {
    type Response = TelemetryAck;
    type Future = BoxFuture<Response<TelemetryAck>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { upload(&inner, request).await })
    }
}

/// Authenticates the device and hands the encoded batch to the sink.
pub(super) async fn upload(
    inner: &Inner,
    request: Request<Bytes>,
) -> Result<Response<TelemetryAck>, Status> {
    // Verified before the body was read when served by `FleetRoutes`.
    let claims = match request.extensions().get::<super::DeviceClaims>() {
        Some(claims) => claims.clone(),
        None => inner.auth.verify(request.metadata())?,
    };
    let Some(sink) = &inner.telemetry else {
        return Err(with_retry_after(
            Status::unavailable("this gateway has no telemetry sink configured"),
            Duration::from_secs(30),
        ));
    };
    let snapshot = inner.snapshots.current();
    let (device, labels) = (claims.sub.clone(), claims.lbl.clone());
    let assigned = move |reported: &crate::telemetry::ingest::Reported<'_>| {
        super::desired::may_report(&snapshot, &device, &labels, reported)
    };
    let ack = sink
        .submit_checked(&claims.sub, request.into_inner(), &assigned)
        .await
        .map_err(|e| status_of(&e))?;
    Ok(Response::new(ack))
}
