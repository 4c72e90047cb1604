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
/// Encoded bytes per batch: well under the gateway's 4 MiB message limit, so a batch of
/// long error messages is cut by size, not sent and refused as too large forever.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// Whether the gateway refused a request for its size (tonic's `OUT_OF_RANGE` "message
/// length too large", or an older gateway's batch-size `INVALID_ARGUMENT`): the batch is
/// cut smaller and sent again, never retried as it is.
fn too_large(status: &Status) -> bool {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => status.message().contains("too large"),
        Code::InvalidArgument => status.message().contains("events; at most"),
        _ => false,
    }
}

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
    // Halved each time the gateway refuses a batch's size, back to full after an ack.
    let (mut max_events, mut max_bytes) = (MAX_BATCH_EVENTS, MAX_BATCH_BYTES);
    loop {
        let batch = match buffer.next_batch(max_events, max_bytes) {
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
                let ack = ack.into_inner();
                debug!(batch = %batch.id, accepted = ack.accepted, duplicate = ack.duplicate, "telemetry batch acknowledged");
                if let Some(first) = ack.rejected.first() {
                    // Stored without them; retrying cannot help. The gateway counts them.
                    warn!(batch = %batch.id, refused = ack.rejected.len(), first = %first.reason, "the gateway refused events of a telemetry batch");
                }
                if let Err(e) = buffer.ack(&batch) {
                    warn!(error = %e, "recording a telemetry ack");
                }
                backoff = crate::sync::delays(device.backoff);
                (max_events, max_bytes) = (MAX_BATCH_EVENTS, MAX_BATCH_BYTES);
                continue;
            }
            Err(status) if too_large(&status) && batch.len > 1 => {
                // Cut in two by events and by bytes; the same events go again, smaller.
                max_events = (batch.len / 2).max(1);
                max_bytes = (batch.encoded_events.len() / 2).max(1);
                warn!(batch = %batch.id, events = batch.len, bytes = batch.encoded_events.len(), reason = %status.message(), "telemetry batch too large for the gateway; splitting it");
                if let Err(e) = buffer.forget_inflight(&batch) {
                    warn!(error = %e, "splitting a telemetry batch");
                }
                continue;
            }
            Err(status) if status.code() == Code::InvalidArgument || too_large(&status) => {
                // Refused as invalid, or one event alone too large to send: retrying cannot
                // help. Record the loss (it is reported upstream) and move on.
                warn!(batch = %batch.id, reason = %status.message(), "telemetry batch refused; dropping it");
                if let Err(e) = buffer.reject(&batch) {
                    warn!(error = %e, "dropping a rejected batch");
                }
                continue;
            }
            Err(status) => {
                let hint = edgewise_proto::retry::retry_after(&status);
                if status.code() == Code::Unauthenticated {
                    let mut id = device
                        .identity
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = id.clear_credential();
                } else {
                    debug!(code = ?status.code(), reason = %status.message(), "telemetry upload failed; keeping the batch");
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
