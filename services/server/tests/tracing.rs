//! Distributed tracing: one trace follows a message from the sender's
//! WebSocket frame through routing, the store and the bus to the gateway
//! that delivers it, and across a real internal gRPC hop. A test binary of
//! its own, because it installs the process-wide tracing subscriber (a
//! `tracing_opentelemetry` layer over an in-memory exporter) and the global
//! W3C TraceContext propagator, as `beseda serve` does with an OTLP endpoint.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The spans finished so far, for every test of this binary.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    let (exporter, _) = EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // Spans are exported as they end, so a test sees them without a flush.
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("beseda-test"))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .init();
        (exporter, provider)
    });
    exporter
}

/// Waits until the finished spans satisfy `done`; returns them.
async fn spans_until(done: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let spans = exporter().get_finished_spans().unwrap();
        if done(&spans) {
            return spans;
        }
        assert!(tokio::time::Instant::now() < deadline, "spans did not finish in time: {:#?}", names(&spans));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(spans: &[SpanData]) -> Vec<(String, TraceId, SpanId, SpanId)> {
    spans
        .iter()
        .map(|span| {
            (span.name.to_string(), span.span_context.trace_id(), span.span_context.span_id(), span.parent_span_id)
        })
        .collect()
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|pair| pair.key.as_str() == key).map(|pair| pair.value.to_string())
}

/// The one span of `trace` named `name` (with `key` = `value` when given).
fn the<'a>(spans: &'a [SpanData], trace: TraceId, name: &str, attribute_is: Option<(&str, &str)>) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|span| span.span_context.trace_id() == trace && span.name == name)
        .filter(|span| attribute_is.is_none_or(|(key, value)| attribute(span, key).as_deref() == Some(value)))
        .collect();
    assert_eq!(found.len(), 1, "one {name} {attribute_is:?} in trace {trace}: {:#?}", names(spans));
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_from_the_sender_to_the_receiving_gateway() {
    exporter();
    let Team { server, application, conversation_id, .. } = Team::start().await;
    let mut alice = Client::connect(&server, &application.token("a1", "Alice")).await;
    let mut bob = Client::connect(&server, &application.token("b1", "Bob")).await;
    for client in [&mut alice, &mut bob] {
        let subscribed = client.request(json!({"subscribe": {"conversation": {"id": conversation_id}}})).await;
        assert_eq!(subscribed["subscribed"]["conversationId"], conversation_id.as_str(), "{subscribed}");
    }

    let sent = alice.request(json!({"sendMessage": {"conversation": {"id": conversation_id}, "text": "traced"}})).await;
    assert_eq!(sent["message"]["text"], "traced", "{sent}");
    assert_eq!(bob.next_event().await["messageCreated"]["text"], "traced");
    assert_eq!(alice.next_event().await["messageCreated"]["text"], "traced");

    // Both connections delivered: two gateway.deliver spans end after their pushes.
    let trace_of_send = |spans: &[SpanData]| {
        spans.iter().find(|span| span.name == "ws.send_message").map(|span| span.span_context.trace_id())
    };
    let spans = spans_until(|spans| {
        trace_of_send(spans).is_some_and(|trace| {
            spans.iter().filter(|span| span.name == "gateway.deliver" && span.span_context.trace_id() == trace).count()
                == 2
        })
    })
    .await;
    let trace = trace_of_send(&spans).unwrap();

    let send = the(&spans, trace, "ws.send_message", None);
    let routing = the(&spans, trace, "routing.send_message", None);
    let store = the(&spans, trace, "store.append_message", None);
    let publish = the(&spans, trace, "bus.publish", Some(("topic_kind", "conversation")));
    // The sender's frame starts the trace; routing, the store and the bus nest in it.
    assert_eq!(send.parent_span_id, SpanId::INVALID, "ws.send_message is the root");
    assert_eq!(routing.parent_span_id, send.span_context.span_id());
    assert_eq!(store.parent_span_id, routing.span_context.span_id());
    assert_eq!(publish.parent_span_id, routing.span_context.span_id());
    // Notifications and unread counts went out on the bus in the same trace.
    assert!(spans.iter().any(|span| span.span_context.trace_id() == trace
        && span.name == "bus.publish"
        && attribute(span, "topic_kind").as_deref() == Some("user")));

    // Each receiving connection's gateway.deliver is a child of bus.publish
    // through the trace context the BusEvent carried: its parent is remote
    // (extracted by the propagator), not a span of the delivering task.
    let deliveries: Vec<&SpanData> =
        spans.iter().filter(|span| span.name == "gateway.deliver" && span.span_context.trace_id() == trace).collect();
    assert_eq!(deliveries.len(), 2, "{:#?}", names(&spans));
    for deliver in deliveries {
        assert_eq!(deliver.parent_span_id, publish.span_context.span_id(), "{:#?}", names(&spans));
        assert!(deliver.parent_span_is_remote, "gateway.deliver's parent came from the BusEvent");
        assert!(deliver.span_context.is_sampled());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_internal_grpc_to_a_remote_routing_service() {
    use beseda_proto::v1 as wire;
    use beseda_proto::v1::routing_server::Routing as _;
    exporter();
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn beseda_store::Store> =
        Arc::new(beseda_store::sqlite::SqliteStore::open(&directory.path().join("routing.db")).unwrap());
    let mailer =
        Arc::new(beseda_routing::mail::OutboxMailer::new(directory.path().join("outbox"), "beseda@localhost").unwrap());
    let routing = beseda_routing::RoutingService::new(
        store,
        Arc::new(beseda_bus::InProcessBus::new()),
        mailer,
        beseda_routing::RoutingConfig { public_url: "http://test".into() },
    );
    let routes = beseda::internal_grpc::routes(Some(routing), None, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let served = tokio::spawn(beseda::internal_grpc::serve(routes, listener, None, stopped));
    let remote = beseda_routing::remote::RemoteRouting::connect_one(&format!("http://{address}")).await.unwrap();

    // What a gateway in another process does: call routing inside its span.
    let caller = beseda_routing::Caller { application_id: "no-such-app".into(), user_id: None, privileged: true };
    let span = tracing::info_span!("gateway.call");
    let trace = span.context().span().span_context().trace_id();
    let request = wire::SendMessageRequest {
        conversation: Some(wire::ConversationRef { by: Some(wire::conversation_ref::By::Id("missing".into())) }),
        text: "over gRPC".into(),
        author_id: "nobody".into(),
        ..Default::default()
    };
    // The conversation does not exist: the answer is an error, the trace is whole.
    let answer = async { remote.send_message(caller.request(request)).await }.instrument(span.clone()).await;
    assert!(answer.is_err());
    let client_span = span.context().span().span_context().span_id();
    drop(span);

    let spans = spans_until(|spans| {
        spans.iter().any(|span| span.name == "routing.send_message" && span.span_context.trace_id() == trace)
            && spans.iter().any(|span| span.name == "grpc.request" && span.span_context.trace_id() == trace)
    })
    .await;
    let grpc = the(&spans, trace, "grpc.request", None);
    assert_eq!(attribute(grpc, "rpc").as_deref(), Some("/beseda.v1.Routing/SendMessage"));
    assert_eq!(grpc.parent_span_id, client_span, "grpc.request continues the caller's span");
    assert!(grpc.parent_span_is_remote, "the parent came in the traceparent header");
    let routing = the(&spans, trace, "routing.send_message", None);
    assert_eq!(routing.parent_span_id, grpc.span_context.span_id(), "the handler runs inside grpc.request");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(WAIT, served).await;
}
