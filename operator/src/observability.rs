//! Logs, traces and metrics of the control plane, set up in one place.
//!
//! Logs are structured (`tracing`; JSON with `EDGEWISE_LOG_FORMAT=json`), filtered by
//! `RUST_LOG`. When an OTLP endpoint is configured through the standard variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the `_TRACES_` / `_METRICS_` variants, plus
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`…), spans and metrics are exported over
//! OTLP/gRPC; otherwise nothing is exported and nothing is paid for.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use opentelemetry::metrics::{Meter, ObservableCounter, ObservableGauge};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::gateway::Gateway;
use crate::telemetry::ingest::TelemetrySink;

/// Keeps the exporters alive; flushes them when dropped.
#[derive(Debug, Default)]
pub struct Observability {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for Observability {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

fn otlp_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v == "true")
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

/// Installs the global subscriber (and OTLP exporters when configured). Call once, inside
/// a Tokio runtime.
pub fn init(service: &'static str) -> Observability {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("EDGEWISE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut out = Observability::default();
    let otel = if otlp_configured() {
        let resource = Resource::builder().with_service_name(service).build();
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build();
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build();
        match (spans, metrics) {
            (Ok(spans), Ok(metrics)) => {
                let tracer = SdkTracerProvider::builder()
                    .with_batch_exporter(spans)
                    .with_resource(resource.clone())
                    .build();
                let meter = SdkMeterProvider::builder()
                    .with_periodic_exporter(metrics)
                    .with_resource(resource)
                    .build();
                opentelemetry::global::set_meter_provider(meter.clone());
                let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer(service));
                out.tracer = Some(tracer);
                out.meter = Some(meter);
                Some(layer)
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("edgewise: OTLP export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    out
}

/// The global meter for Edgewise instruments.
#[must_use]
pub fn meter() -> Meter {
    opentelemetry::global::meter("edgewise")
}

/// Instruments registered for a component; keep them alive as long as it runs.
#[derive(Debug, Default)]
pub struct Instruments {
    gauges: Vec<ObservableGauge<u64>>,
    counters: Vec<ObservableCounter<u64>>,
}

impl Instruments {
    fn gauge(
        &mut self,
        meter: &Meter,
        name: &'static str,
        description: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.gauges.push(
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |o| o.observe(read(), &[]))
                .build(),
        );
    }

    fn counter(
        &mut self,
        meter: &Meter,
        name: &'static str,
        description: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.counters.push(
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |o| o.observe(read(), &[]))
                .build(),
        );
    }

    /// Connected devices.
    pub fn gateway(&mut self, meter: &Meter, gateway: &Gateway) {
        let g = gateway.clone();
        self.gauge(
            meter,
            "edgewise.gateway.connected_devices",
            "Open Sync streams",
            move || g.sessions() as u64,
        );
    }

    /// Queue depth, batch sizes, insert latency, rejected batches, back-pressure.
    pub fn telemetry(&mut self, meter: &Meter, sink: &Arc<TelemetrySink>) {
        macro_rules! stat {
            ($kind:ident, $name:literal, $desc:literal, $field:ident) => {{
                let s = sink.clone();
                self.$kind(meter, $name, $desc, move || {
                    s.stats().$field.load(Ordering::Relaxed) as u64
                });
            }};
        }
        stat!(
            gauge,
            "edgewise.telemetry.queue_rows",
            "Rows waiting for an INSERT",
            queued_rows
        );
        stat!(
            gauge,
            "edgewise.telemetry.queue_bytes",
            "Encoded row bytes waiting for an INSERT (the bounded quantity)",
            queued_bytes
        );
        stat!(
            gauge,
            "edgewise.telemetry.queue_bytes_high_water",
            "Most encoded row bytes ever queued",
            queued_bytes_high_water
        );
        stat!(
            gauge,
            "edgewise.telemetry.last_insert_rows",
            "Rows in the last INSERT round (batch size)",
            last_insert_rows
        );
        stat!(
            gauge,
            "edgewise.telemetry.last_insert_ms",
            "Duration of the last INSERT round",
            last_insert_ms
        );
        stat!(
            counter,
            "edgewise.telemetry.rows_inserted",
            "Rows inserted",
            rows_inserted
        );
        stat!(
            counter,
            "edgewise.telemetry.batches_acked",
            "Batches acknowledged to devices",
            batches_acked
        );
        stat!(
            counter,
            "edgewise.telemetry.batches_rejected",
            "Batches refused as invalid",
            batches_rejected
        );
        stat!(
            counter,
            "edgewise.telemetry.events_rejected",
            "Events refused alone, their batches stored without them",
            events_rejected
        );
        stat!(
            counter,
            "edgewise.telemetry.insert_failures",
            "INSERT rounds that failed",
            insert_failures
        );
        stat!(
            counter,
            "edgewise.telemetry.pushed_back",
            "Uploads pushed back (queue full or store down)",
            pushed_back
        );
        stat!(
            counter,
            "edgewise.telemetry.backpressure_ms",
            "Time spent refusing uploads while ClickHouse was failing",
            backpressure_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::InMemoryMetricExporter;

    #[tokio::test]
    async fn telemetry_and_gateway_metrics_are_exported() {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_periodic_exporter(exporter.clone())
            .build();
        let meter = provider.meter("test");
        let client = crate::telemetry::client("http://127.0.0.1:9");
        let sink = TelemetrySink::start(client, crate::telemetry::ingest::SinkConfig::default());
        sink.stats().batches_rejected.store(3, Ordering::Relaxed);
        let gateway = Gateway::new(
            crate::gateway::GatewayConfig {
                ..crate::gateway::GatewayConfig::default()
            },
            crate::s3::S3Settings::with_endpoint("http://127.0.0.1:9", "a", "b").client(),
        );
        let mut instruments = Instruments::default();
        instruments.gateway(&meter, &gateway);
        instruments.telemetry(&meter, &sink);
        provider.force_flush().expect("flushes");
        let exported = exporter.get_finished_metrics().expect("metrics");
        let names: Vec<String> = exported
            .iter()
            .flat_map(|rm| rm.scope_metrics())
            .flat_map(|sm| sm.metrics())
            .map(|m| m.name().to_owned())
            .collect();
        for want in [
            "edgewise.gateway.connected_devices",
            "edgewise.telemetry.queue_rows",
            "edgewise.telemetry.queue_bytes",
            "edgewise.telemetry.batches_rejected",
            "edgewise.telemetry.backpressure_ms",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        drop(instruments);
    }
}
