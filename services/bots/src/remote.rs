//! The bots service in other processes, reached over gRPC: what a gateway
//! holds when the `bots` role runs elsewhere. The REST calls forward to
//! `beseda.v1.Bots`, and a processing connection (`/bots/v1/processing`)
//! becomes one `BotProcessing.Process` stream, frame for frame.

use std::sync::Arc;

use beseda_core::{Error, ErrorCode};
use beseda_proto::v1 as wire;
use beseda_proto::v1::bot_processing_client::BotProcessingClient;
use beseda_proto::v1::bots_client::BotsClient;
use beseda_proto::v1::bots_server::Bots;
use beseda_routing::endpoints::{ClusterClientConfig, EndpointPool};
use beseda_routing::{Caller, status};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Frames buffered in each direction of a forwarded processing connection.
const FRAMES_BUFFERED: usize = 256;

use crate::processing::{ClientFrames, ProcessingConnector, ServerFrames, error_frame};

/// Forwards the bots API to the bots instances.
#[derive(Clone)]
pub struct RemoteBots {
    pool: Arc<EndpointPool>,
}

impl RemoteBots {
    pub async fn connect(endpoints: &[String], config: ClusterClientConfig) -> Result<Self, Error> {
        Ok(RemoteBots { pool: EndpointPool::start("bots", endpoints, config).await? })
    }

    /// Processing connections to the same instances, over the same channels.
    pub fn processing(&self) -> RemoteProcessing {
        RemoteProcessing { pool: self.pool.clone() }
    }
}

beseda_routing::forward_to_pool! {
impl Bots for RemoteBots via BotsClient {
    create_bot(wire::CreateBotRequest) -> wire::Bot;
    get_bot(wire::GetBotRequest) -> wire::Bot;
    update_bot(wire::UpdateBotRequest) -> wire::Bot;
    delete_bot(wire::DeleteBotRequest) -> wire::Empty;
    get_bots(wire::Empty) -> wire::BotList;
    create_integration(wire::CreateIntegrationRequest) -> wire::Integration;
    get_integration(wire::GetIntegrationRequest) -> wire::Integration;
    update_integration(wire::UpdateIntegrationRequest) -> wire::Integration;
    delete_integration(wire::DeleteIntegrationRequest) -> wire::Empty;
    get_integrations(wire::Empty) -> wire::IntegrationList;
    get_external_system_types(wire::Empty) -> wire::ExternalSystemTypes;
    get_external_system_description(wire::GetExternalSystemDescriptionRequest) -> wire::ExternalSystemDescription;
    receive_webhook(wire::WebhookRequest) -> wire::WebhookResponse;
    create_event_subscription(wire::CreateEventSubscriptionRequest) -> wire::EventSubscription;
    get_event_subscription(wire::GetEventSubscriptionRequest) -> wire::EventSubscription;
    update_event_subscription(wire::UpdateEventSubscriptionRequest) -> wire::EventSubscription;
    delete_event_subscription(wire::DeleteEventSubscriptionRequest) -> wire::Empty;
    get_event_subscriptions(wire::Empty) -> wire::EventSubscriptionList;
    replay_events(wire::ReplayEventsRequest) -> wire::ReplayEventsResponse;
    list_dead_letters(wire::ListDeadLettersRequest) -> wire::DeadLetterList;
    retry_dead_letters(wire::DeadLetterIds) -> wire::DeadLetterActionResult;
    discard_dead_letters(wire::DeadLetterIds) -> wire::DeadLetterActionResult;
}
}

/// Opens processing connections on the bots instances
/// ([`RemoteBots::processing`]).
#[derive(Clone)]
pub struct RemoteProcessing {
    pool: Arc<EndpointPool>,
}

impl ProcessingConnector for RemoteProcessing {
    fn open(&self, caller: Caller, mut inbound: ClientFrames) -> ServerFrames {
        let pool = self.pool.clone();
        let (downstream_sender, downstream) = mpsc::channel::<wire::ProcessingServerFrame>(FRAMES_BUFFERED);
        tokio::spawn(async move {
            // All processing connections of one application meet on one bots
            // instance, where a newer one supersedes the older (standard #798).
            let Some(channel) = pool.channel_for_key(&caller.application_id).await else {
                let error = Error::new(ErrorCode::Unavailable, "no bots instance is known; connect again shortly");
                let _ = downstream_sender.send(error_frame(&error)).await;
                return;
            };
            // A frame the gateway could not decode ends the upstream call; its
            // error is shown to the client after the bots instance's last frame.
            let (upstream_sender, upstream) = mpsc::channel::<wire::ProcessingClientFrame>(FRAMES_BUFFERED);
            let pump = tokio::spawn(async move {
                while let Some(frame) = inbound.next().await {
                    match frame {
                        Ok(frame) => {
                            if upstream_sender.send(frame).await.is_err() {
                                return None;
                            }
                        }
                        Err(error) => return Some(error),
                    }
                }
                None
            });
            let mut client = BotProcessingClient::new(channel)
                .max_decoding_message_size(beseda_proto::INTERNAL_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(beseda_proto::INTERNAL_MAX_MESSAGE_BYTES);
            match client.process(caller.request(ReceiverStream::new(upstream))).await {
                Ok(response) => {
                    let mut frames = response.into_inner();
                    loop {
                        let frame = match frames.next().await {
                            Some(Ok(frame)) => frame,
                            Some(Err(failure)) => error_frame(&status::from_status(&failure)),
                            None => break,
                        };
                        if downstream_sender.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
                Err(failure) => {
                    let _ = downstream_sender.send(error_frame(&status::from_status(&failure))).await;
                }
            }
            pump.abort();
            if let Ok(Some(refusal)) = pump.await {
                let _ = downstream_sender.send(error_frame(&refusal)).await;
            }
        });
        Box::pin(ReceiverStream::new(downstream))
    }
}
