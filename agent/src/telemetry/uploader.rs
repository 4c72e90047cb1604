//! Uploads buffered telemetry in batches; a batch leaves the buffer only after the gateway
//! acknowledged it, so nothing is lost to a crash, a cut connection or days offline.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgewise_proto::codec::{PreEncodedCodec, UPLOAD_TELEMETRY_PATH};
use edgewise_proto::fleet::{TelemetryAck, TelemetryBatch};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, warn};

use super::buffer::{Batch, TelemetryBuffer};
use crate::device::Device;

/// Events per batch.
pub const MAX_BATCH_EVENTS: usize = 5_000;

/// The upload request body: the batch's header fields, then its events exactly as the buffer
/// holds them (protobuf allows fields in any order).
fn to_wire(device_id: &str, batch: &Batch) -> Bytes {
    let header = TelemetryBatch {
        batch_id: batch.id.clone(),
        device_id: device_id.to_owned(),
        dropped_events: batch.dropped,
        ..TelemetryBatch::default()
    };
    let mut body = BytesMut::with_capacity(header.encoded_len() + batch.encoded_events.len());
    header.encode(&mut body).unwrap_or_default();
    body.extend_from_slice(&batch.encoded_events);
    body.freeze()
}

/// `Fleet.UploadTelemetry` with a pre-encoded request.
async fn upload(
    grpc: &mut Grpc<Channel>,
    request: tonic::Request<Bytes>,
) -> Result<tonic::Response<TelemetryAck>, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("gateway not ready: {e}")))?;
    grpc.unary(
        request,
        PathAndQuery::from_static(UPLOAD_TELEMETRY_PATH),
        PreEncodedCodec::<TelemetryAck>::default(),
    )
    .await
}

/// Runs until `shutdown`.
#[tracing::instrument(name = "uploader", skip_all, fields(device = %device.device_id))]
pub async fn run(
    device: Arc<Device>,
    buffer: Arc<TelemetryBuffer>,
    channel: Channel,
    shutdown: CancellationToken,
) {
    let mut grpc = Grpc::new(channel);
    let mut backoff = crate::sync::delays(device.backoff);
    loop {
        let batch = match buffer.next_batch(MAX_BATCH_EVENTS) {
            Ok(Some(b)) => b,
            Ok(None) => {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = buffer.appended() => {}
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "reading the telemetry buffer");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        let credential = device
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .credential()
            .map(|c| c.token.clone());
        let Some(credential) = credential else {
            // Enrollment is the sync client's job; wait for it.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        };
        let mut request = tonic::Request::new(to_wire(&device.device_id, &batch));
        request.set_timeout(Duration::from_secs(30));
        if let Ok(v) = format!("Bearer {credential}").parse() {
            request.metadata_mut().insert("authorization", v);
        }
        let delay = match upload(&mut grpc, request).await {
            Ok(ack) => {
                debug!(batch = %batch.id, accepted = ack.get_ref().accepted, duplicate = ack.get_ref().duplicate, "telemetry batch acknowledged");
                if let Err(e) = buffer.ack(&batch) {
                    warn!(error = %e, "recording a telemetry ack");
                }
                backoff = crate::sync::delays(device.backoff);
                continue;
            }
            Err(status) => {
                let hint = edgewise_proto::retry::retry_after(&status);
                match status.code() {
                    Code::InvalidArgument => {
                        // Retrying cannot help: record the loss (it is reported upstream) and move on.
                        warn!(batch = %batch.id, reason = %status.message(), "telemetry batch rejected as invalid; dropping it");
                        if let Err(e) = buffer.reject(&batch) {
                            warn!(error = %e, "dropping a rejected batch");
                        }
                        continue;
                    }
                    Code::Unauthenticated => {
                        let mut id = device
                            .identity
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let _ = id.clear_credential();
                    }
                    _ => {
                        debug!(code = ?status.code(), reason = %status.message(), "telemetry upload failed; keeping the batch")
                    }
                }
                let jittered = backoff.next().unwrap_or(device.backoff.max);
                hint.map_or(jittered, |h| h.max(jittered))
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
