//! The gateway's zero-copy views must read exactly what agents send.
#![allow(missing_docs)]

use edgewise_proto::fleet::{InferenceEvent, ModelEvent, TelemetryBatch};
use edgewise_proto::view::TelemetryBatchView;
use prost::Message;

/// Every field set to a distinct non-default value, so a wrong number or type shows.
fn full_batch() -> TelemetryBatch {
    TelemetryBatch {
        batch_id: "b-1".into(),
        device_id: "dev-1".into(),
        inference: vec![InferenceEvent {
            event_id: "e-1".into(),
            time_unix_ms: -1_800_000_000_000,
            model: "m".into(),
            version: "1.2.3".into(),
            variant: "cpu".into(),
            target: "cloud".into(),
            on_device: true,
            rule: "r".into(),
            policy_version: "p".into(),
            latency_ms: 12.5,
            ok: true,
            fallback_used: true,
            error: "boom".into(),
            input_tokens: 7,
            output_tokens: 9,
            cost_usd: 0.25,
            shadow: 2,
            task: "chat".into(),
            data_class: "private".into(),
            rollout: "ns/ro".into(),
            router_version: "0.3.0".into(),
            first_token_ms: 17.25,
        }],
        model_events: vec![ModelEvent {
            event_id: "e-2".into(),
            time_unix_ms: 1_800_000_000_001,
            kind: 5,
            model: "m2".into(),
            version: "2.0.0".into(),
            variant: "gpu".into(),
            duration_ms: 11,
            bytes: 1 << 40,
            error: "bad digest".into(),
            rollout: "ns/ro2".into(),
        }],
        dropped_events: 3,
    }
}

#[test]
fn views_decode_batches_field_for_field() {
    let wire = full_batch().encode_to_vec();
    let view = TelemetryBatchView::decode(bytes::Bytes::from(wire.clone())).expect("decodes");
    // Same numbers and types: re-encoding the view gives the same bytes.
    assert_eq!(view.encode_to_vec(), wire);
    let i = &view.inference[0];
    assert_eq!(
        (&i.event_id[..], &i.rollout[..], i.shadow, i.cost_usd),
        (&b"e-1"[..], &b"ns/ro"[..], 2, 0.25)
    );
    let m = &view.model_events[0];
    assert_eq!(
        (&m.error[..], m.kind, m.bytes),
        (&b"bad digest"[..], 5, 1 << 40)
    );
    assert_eq!(view.dropped_events, 3);
}
