//! The process's internal gRPC server: `beseda.v1.Routing`, `Bots`,
//! `BotProcessing` and the registry's services, for whichever of those roles
//! the process has. Internal only: callers are other Beseda processes, who
//! present the cluster token when one is configured. The public edge is the
//! gateway's HTTP and WebSocket.

use beseda_bots::BotsService;
use beseda_bots::grpc::ProcessingGrpc;
use beseda_proto::v1::bot_processing_server::BotProcessingServer;
use beseda_proto::v1::bots_server::BotsServer;
use beseda_proto::v1::routing_server::RoutingServer;
use beseda_registry::RegistryNode;
use beseda_routing::RoutingService;
use beseda_routing::endpoints::TokenCheck;
use tokio::net::TcpListener;

use beseda_proto::INTERNAL_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES;

pub fn routes(
    routing: Option<RoutingService>,
    bots: Option<BotsService>,
    registry: Option<&RegistryNode>,
) -> tonic::service::Routes {
    // The registry's services come as routes of their own; the others join them.
    let mut routes = registry.map(RegistryNode::routes).unwrap_or_default();
    if let Some(routing) = routing {
        let server = RoutingServer::new(routing)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        routes = routes.add_service(server);
    }
    if let Some(bots) = bots {
        let api = BotsServer::new(bots.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        routes = routes.add_service(api);
        routes = routes.add_service(BotProcessingServer::new(ProcessingGrpc(bots)));
    }
    routes
}

/// Serves until `stop` flips; calls in progress finish. With a cluster
/// `token`, every call on every service (routing, bots, the registry's Raft
/// and API) must present it.
pub async fn serve(
    routes: tonic::service::Routes,
    listener: TcpListener,
    token: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stopped = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    if let Err(error) = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(request_span)
        .layer(tonic::service::InterceptorLayer::new(TokenCheck::new(token.as_deref())))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stopped)
        .await
    {
        tracing::error!(%error, "internal gRPC server failed");
    }
}

/// The span each call runs in: `grpc.request`, continuing the caller's trace
/// when its HTTP/2 headers carry a W3C `traceparent` (see
/// `beseda_routing::Caller::request`). Without tracing the span is a plain,
/// disabled-cheap tracing span and no header is read.
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc.request", rpc = request.uri().path());
    if request.headers().contains_key("traceparent") {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
    }
    span
}

/// Reads propagation fields from HTTP/2 headers.
struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}
