//! Logs and traces of `beseda serve` (docs/observability.md).
//!
//! Logs go to stderr as text or JSON, filtered by `log.filter`. Traces are
//! off unless `telemetry.otlp_endpoint` is set: then a `tracing_opentelemetry`
//! layer turns the spans of the services into OpenTelemetry spans, a batch
//! span processor on tokio exports them over OTLP/gRPC, and the W3C
//! TraceContext propagator carries the trace across gRPC calls and the bus.
//! Off means off: no exporter, no background task, no propagator.

use std::io::IsTerminal;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::{Resource, runtime};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::NodeConfig;
use crate::roles::Roles;

/// Installs the process-wide subscriber: the log layer and, when an OTLP
/// endpoint is configured, the tracing layer. Call once, inside the tokio
/// runtime (the exporter and its batch task live there). Keep the guard and
/// call [`TelemetryGuard::shutdown`] at the end, so that queued spans are
/// exported.
pub fn init(config: &NodeConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&config.log.filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, never in files or log collectors.
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::with_capacity(2);
    if config.log.format == "json" {
        layers.push(fmt.json().with_filter(filter).boxed());
    } else {
        layers.push(fmt.with_filter(filter).boxed());
    }
    let provider = match &config.telemetry.otlp_endpoint {
        Some(endpoint) => {
            let provider = tracer_provider(endpoint, config)?;
            let tracer = provider.tracer("beseda");
            layers.push(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(span_filter()).boxed());
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            opentelemetry::global::set_tracer_provider(provider.clone());
            Some(provider)
        }
        None => None,
    };
    tracing_subscriber::registry().with(layers).try_init().context("a tracing subscriber is already installed")?;
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        tracing::info!(endpoint, sample_ratio = config.telemetry.sample_ratio, "exporting traces over OTLP");
    }
    Ok(TelemetryGuard { provider })
}

/// `service.name` of this process: `beseda` for all-in-one, else `beseda-`
/// and its roles (`beseda-gateway`, `beseda-gateway-routing`).
pub fn service_name(roles: &Roles) -> String {
    if roles.is_all_in_one() {
        return "beseda".to_owned();
    }
    let names: Vec<&str> = roles.iter().map(|role| role.as_str()).collect();
    format!("beseda-{}", names.join("-"))
}

fn tracer_provider(endpoint: &str, config: &NodeConfig) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("cannot export traces to {endpoint}"))?;
    let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
    let resource = Resource::builder()
        .with_service_name(service_name(&config.server.roles))
        .with_attribute(KeyValue::new("service.instance.id", config.server.node_id.clone()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.telemetry.sample_ratio))))
        .with_resource(resource)
        .build())
}

/// Which spans become OpenTelemetry spans: Beseda's at info and above,
/// never the HTTP/2 and gRPC plumbing (the exporter's own calls would
/// otherwise trace themselves).
fn span_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

/// Exports the spans still queued when shut down (or dropped).
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes queued spans and stops the exporter. The flush blocks, so it
    /// runs off the async workers.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || shut_down(&provider)).await;
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| shut_down(&provider));
            }
            // Blocking the only thread of a current-thread runtime would
            // starve the batch task it waits for: what is queued is lost.
            Ok(_) => {}
            Err(_) => shut_down(&provider),
        }
    }
}

fn shut_down(provider: &SdkTracerProvider) {
    if let Err(error) = provider.shutdown() {
        tracing::warn!(%error, "traces still queued may not have been exported");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_name_names_the_roles() {
        assert_eq!(service_name(&Roles::default()), "beseda");
        assert_eq!(service_name(&Roles::parse("all,registry").unwrap()), "beseda");
        assert_eq!(service_name(&Roles::parse("gateway").unwrap()), "beseda-gateway");
        assert_eq!(service_name(&Roles::parse("routing,gateway").unwrap()), "beseda-gateway-routing");
    }
}
