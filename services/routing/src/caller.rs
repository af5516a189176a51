//! Who is calling. The edge authenticates and attaches an encoded
//! [`Caller`] to each routing request; every routing operation starts by
//! reading it, so no operation can run without a tenant.

use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1::Caller as WireCaller;
use opentelemetry::trace::TraceContextExt;
use prost::Message;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

const CALLER_KEY: &str = "x-beseda-caller-bin";

/// The authenticated caller of a routing operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub application_id: String,
    /// The user acted as; `None` for the application itself.
    pub user_id: Option<String>,
    /// Privileged mode: the application's own credentials were presented.
    pub privileged: bool,
}

impl Caller {
    pub fn user(&self) -> Result<&str> {
        self.user_id.as_deref().ok_or_else(|| {
            Error::new(
                ErrorCode::FieldRequired,
                "this operation acts as a user: authenticate with a user token or set X-Beseda-Act-As-User",
            )
            .with_field("actAsUserId")
        })
    }

    pub fn require_privileged(&self, what: &str) -> Result<()> {
        if self.privileged {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::PrivilegedModeRequired,
            format!("{what} needs privileged mode (application credentials)"),
        ))
    }

    pub fn to_wire(&self) -> WireCaller {
        WireCaller {
            application_id: self.application_id.clone(),
            user_id: self.user_id.clone().unwrap_or_default(),
            privileged: self.privileged,
        }
    }

    pub fn from_wire(wire: WireCaller) -> Result<Self> {
        if wire.application_id.is_empty() {
            return Err(Error::new(ErrorCode::Unauthenticated, "the caller has no application"));
        }
        Ok(Caller {
            application_id: wire.application_id,
            user_id: Some(wire.user_id).filter(|user_id| !user_id.is_empty()),
            privileged: wire.privileged,
        })
    }

    /// Wraps a message in a request carrying this caller and, when the
    /// current span belongs to an OpenTelemetry trace, its W3C trace context
    /// (`traceparent`, `tracestate`), so that a remote routing service
    /// continues the trace.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert_bin(CALLER_KEY, MetadataValue::from_bytes(&self.to_wire().encode_to_vec()));
        inject_trace_context(request.metadata_mut());
        request
    }

    /// Reads the caller from a request's metadata.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Self> {
        let value = request
            .metadata()
            .get_bin(CALLER_KEY)
            .ok_or_else(|| Error::new(ErrorCode::Unauthenticated, "no credentials were presented"))?;
        let bytes = value
            .to_bytes()
            .map_err(|_| Error::new(ErrorCode::Unauthenticated, "caller metadata is not valid base64"))?;
        let wire = WireCaller::decode(bytes.as_ref())
            .map_err(|_| Error::new(ErrorCode::Unauthenticated, "caller metadata does not decode"))?;
        Caller::from_wire(wire)
    }
}

/// Writes the current span's trace context into gRPC metadata through the
/// global propagator. Costs one lookup when tracing is off: without a valid
/// span context nothing is written.
fn inject_trace_context(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_round_trips_through_metadata() {
        let caller = Caller { application_id: "app".into(), user_id: Some("user".into()), privileged: true };
        assert_eq!(Caller::from_request(&caller.request(())).unwrap(), caller);
    }

    #[test]
    fn a_request_without_caller_is_unauthenticated() {
        assert_eq!(Caller::from_request(&tonic::Request::new(())).unwrap_err().code, ErrorCode::Unauthenticated);
    }

    /// A subscriber that turns tracing spans into OpenTelemetry spans, as the
    /// server's telemetry setup does.
    fn traced() -> impl tracing::Subscriber {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
    }

    #[test]
    fn a_request_carries_the_trace_context_of_the_current_span() {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let caller = Caller { application_id: "app".into(), user_id: None, privileged: true };
        tracing::subscriber::with_default(traced(), || {
            let span = tracing::info_span!("ws.send_message");
            let trace_id = span.context().span().span_context().trace_id();
            let request = span.in_scope(|| caller.request(()));
            let traceparent = request.metadata().get("traceparent").expect("traceparent").to_str().unwrap();
            assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");
            // Outside any span there is no trace to continue.
            assert!(caller.request(()).metadata().get("traceparent").is_none());
        });
        // Without an OpenTelemetry layer no span has a context: nothing is sent.
        let span = tracing::info_span!("ws.send_message");
        let request = span.in_scope(|| caller.request(()));
        assert!(request.metadata().get("traceparent").is_none());
        assert!(request.metadata().get("tracestate").is_none());
    }
}
