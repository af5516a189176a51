//! The processing connection (ВыполнитьОбработкуБотов, standard #798): one
//! connection per application (data area) carries the events of every bot
//! of that application. Each ExecuteBotProcessing frame opens or extends a
//! lease; while it holds, the connection is fed from the bots' durable
//! queues and the application acknowledges each event after its handler
//! succeeded. When the lease lapses the server closes the connection and
//! events wait in the queues for the next one.
//!
//! The transport is a stream of frames either way: the WebSocket endpoint
//! of the gateway and the gRPC `BotProcessing.Process` call both end up in
//! [`BotsService::open_processing`].

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use beseda_core::bots::{ApplicationEventKind, Bot, BotEventKind, ConsumerKind, Delivery};
use beseda_core::model::{Micros, now_micros};
use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1 as wire;
use beseda_routing::Caller;
use beseda_routing::convert::{button_to_wire, conversation_to_wire, message_to_wire, timestamp};
use beseda_store::bots::Claim;
use dashmap::DashMap;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc, watch};

use crate::convert::bot_to_wire;
use crate::{BotsService, backoff};

pub type ClientFrames = Pin<Box<dyn Stream<Item = Result<wire::ProcessingClientFrame>> + Send>>;
pub type ServerFrames = Pin<Box<dyn Stream<Item = wire::ProcessingServerFrame> + Send>>;

/// How long a new connection may take to send its first ExecuteBotProcessing.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames buffered towards one connection.
const OUTBOUND_FRAMES: usize = 256;
/// Client frames handled together at most.
const FRAMES_PER_ROUND: usize = 256;

/// The live processing connection of each application.
pub struct ProcessingHub {
    connections: DashMap<String, Slot>,
    generations: AtomicU64,
    shutdown: watch::Sender<bool>,
}

struct Slot {
    generation: u64,
    wake: Arc<Notify>,
    superseded: Arc<Notify>,
}

impl Default for ProcessingHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessingHub {
    pub fn new() -> Self {
        ProcessingHub { connections: DashMap::new(), generations: AtomicU64::new(0), shutdown: watch::channel(false).0 }
    }

    /// New events are queued for the application's bots.
    pub fn wake(&self, application_id: &str) {
        if let Some(slot) = self.connections.get(application_id) {
            slot.wake.notify_one();
        }
    }

    /// Whether the application has a processing connection on this node.
    pub fn is_connected(&self, application_id: &str) -> bool {
        self.connections.contains_key(application_id)
    }

    /// Closes every connection (server shutdown); their events stay queued.
    pub fn close_all(&self) {
        self.shutdown.send_replace(true);
    }

    /// Takes the application's slot, telling an older connection to leave.
    fn register(&self, application_id: &str) -> (u64, Arc<Notify>, Arc<Notify>) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot { generation, wake: Arc::new(Notify::new()), superseded: Arc::new(Notify::new()) };
        let handles = (generation, slot.wake.clone(), slot.superseded.clone());
        if let Some(previous) = self.connections.insert(application_id.to_owned(), slot) {
            previous.superseded.notify_one();
        }
        handles
    }

    fn deregister(&self, application_id: &str, generation: u64) {
        self.connections.remove_if(application_id, |_, slot| slot.generation == generation);
    }
}

fn closed(code: ErrorCode, message: impl Into<String>) -> wire::ProcessingServerFrame {
    wire::ProcessingServerFrame {
        frame: Some(wire::processing_server_frame::Frame::Closed(wire::ProcessingClosed {
            code: code.as_str().into(),
            message: message.into(),
        })),
    }
}

pub(crate) fn error_frame(error: &Error) -> wire::ProcessingServerFrame {
    wire::ProcessingServerFrame {
        frame: Some(wire::processing_server_frame::Frame::Error(wire::Error {
            code: error.code.as_str().into(),
            message: error.message.clone(),
            field: error.field.clone().unwrap_or_default(),
        })),
    }
}

fn micros_after(duration: Duration) -> Micros {
    now_micros().saturating_add(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX))
}

impl BotsService {
    /// Serves one processing connection of the calling application: reads
    /// `inbound` and returns the frames to send back. The first frame must
    /// be ExecuteBotProcessing.
    pub fn open_processing(&self, caller: Caller, inbound: ClientFrames) -> ServerFrames {
        let (sender, receiver) = mpsc::channel(OUTBOUND_FRAMES);
        let service = self.clone();
        tokio::spawn(async move {
            let application_id = caller.application_id.clone();
            if let Err(error) = service.serve_processing(caller, inbound, &sender).await {
                tracing::warn!(application_id, %error, "bot processing connection ended with an error");
                let _ = sender.send(error_frame(&error)).await;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }

    async fn serve_processing(
        &self,
        caller: Caller,
        mut inbound: ClientFrames,
        sender: &mpsc::Sender<wire::ProcessingServerFrame>,
    ) -> Result<()> {
        caller.require_privileged("the bot processing connection (ExecuteBotProcessing)")?;
        let application_id = caller.application_id.clone();
        let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, inbound.next()).await {
            Ok(Some(frame)) => frame?,
            Ok(None) => return Ok(()),
            Err(_) => {
                return Err(Error::new(
                    ErrorCode::HelloRequired,
                    "send ExecuteBotProcessing as the first frame, within 10 seconds of connecting",
                ));
            }
        };
        let Some(wire::processing_client_frame::Frame::Execute(execute)) = first.frame else {
            return Err(Error::new(
                ErrorCode::HelloRequired,
                "the first frame of a processing connection must be `execute` (ExecuteBotProcessing)",
            ));
        };
        let (generation, wake, superseded) = self.processing.register(&application_id);
        metrics::gauge!("beseda_bot_processing_connections").increment(1.0);
        let mut connection = Connection {
            service: self.clone(),
            caller,
            sender: sender.clone(),
            bots: HashMap::new(),
            in_flight: HashMap::new(),
            retries: Vec::new(),
            lease_until: tokio::time::Instant::now(),
        };
        let result = connection.run(execute, &mut inbound, &wake, &superseded).await;
        let in_flight: Vec<i64> = connection.in_flight.keys().copied().collect();
        if !in_flight.is_empty() {
            // The application went away mid-processing: its events are due
            // again at once for the next connection (attempts are kept).
            if let Err(error) = self.store.release(&application_id, &in_flight, now_micros()).await {
                tracing::warn!(application_id, %error, "cannot release in-flight bot events; they return after the ack timeout");
            }
        }
        self.processing.deregister(&application_id, generation);
        metrics::gauge!("beseda_bot_processing_connections").decrement(1.0);
        result
    }

    /// ExecuteBotProcessing: creates the declared predefined bots that do
    /// not exist yet and returns every bot of the application.
    pub async fn execute_bot_processing(
        &self,
        caller: &Caller,
        execute: &wire::ExecuteBotProcessing,
    ) -> Result<Vec<Bot>> {
        let application_id = &caller.application_id;
        let existing = self.store.list_bots(application_id).await?;
        for declared in &execute.predefined_bots {
            crate::grpc::validate_bot_type(&declared.bot_type, "predefinedBots.botType")?;
            if existing.iter().any(|bot| bot.predefined && bot.bot_type == declared.bot_type) {
                continue;
            }
            let name = if declared.name.trim().is_empty() { declared.bot_type.clone() } else { declared.name.clone() };
            let user = self
                .create_user(
                    caller,
                    wire::User {
                        kind: wire::UserKind::Bot as i32,
                        name,
                        full_name: declared.full_name.clone(),
                        ..Default::default()
                    },
                )
                .await?;
            let bot = Bot {
                id: beseda_core::model::new_id(),
                user_id: user.id,
                bot_type: declared.bot_type.clone(),
                additional_parameters: declared.additional_parameters.clone().into_iter().collect::<BTreeMap<_, _>>(),
                predefined: true,
                infobase_user_name: String::new(),
                created_at: now_micros(),
            };
            match self.store.insert_bot(application_id, &bot).await {
                Ok(()) => {}
                // Two connections raced to create it: the other one won.
                Err(error) if error.code == ErrorCode::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        self.store.list_bots(application_id).await
    }

    async fn create_user(&self, caller: &Caller, user: wire::User) -> Result<wire::User> {
        let application = Caller { application_id: caller.application_id.clone(), user_id: None, privileged: true };
        self.routing
            .create_user(application.request(wire::CreateUserRequest { user: Some(user) }))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| beseda_routing::status::from_status(&status))
    }
}

/// One live processing connection.
struct Connection {
    service: BotsService,
    caller: Caller,
    sender: mpsc::Sender<wire::ProcessingServerFrame>,
    bots: HashMap<String, Bot>,
    /// Delivery id → (attempt number handed out, when its claim lapses).
    in_flight: HashMap<i64, (u32, tokio::time::Instant)>,
    /// When failed events are due again: the store's earliest due time is
    /// usually in the past while a conversation waits behind an event in
    /// flight, so it cannot say when a retry comes.
    retries: Vec<Micros>,
    lease_until: tokio::time::Instant,
}

enum Step {
    Continue,
    Close,
}

impl Connection {
    fn application_id(&self) -> &str {
        &self.caller.application_id
    }

    async fn send(&self, frame: wire::ProcessingServerFrame) -> Step {
        match self.sender.send(frame).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    async fn run(
        &mut self,
        first: wire::ExecuteBotProcessing,
        inbound: &mut ClientFrames,
        wake: &Notify,
        superseded: &Notify,
    ) -> Result<()> {
        let mut shutdown = self.service.processing.shutdown.subscribe();
        if let Step::Close = self.execute(&first).await? {
            return Ok(());
        }
        loop {
            if let Step::Close = self.dispatch().await? {
                return Ok(());
            }
            let wait = self.next_wait().await?;
            tokio::select! {
                frame = inbound.next() => {
                    let Some(frame) = frame else { return Ok(()) };
                    // Whatever else has arrived is handled with it, so that a
                    // burst of acknowledgements costs one transaction.
                    let mut frames = vec![frame];
                    let mut ended = false;
                    while frames.len() < FRAMES_PER_ROUND {
                        match inbound.next().now_or_never() {
                            Some(Some(frame)) => frames.push(frame),
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    if let Step::Close = self.handle_all(frames).await? {
                        return Ok(());
                    }
                    if ended {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(self.lease_until) => {
                    let message = format!(
                        "the lease of {} seconds lapsed without ExecuteBotProcessing; events wait in the queue until the next connection",
                        self.service.config.lease.as_secs()
                    );
                    self.send(closed(ErrorCode::LeaseExpired, message)).await;
                    return Ok(());
                }
                _ = superseded.notified() => {
                    self.send(closed(ErrorCode::LeaseSuperseded, "a newer processing connection of this application took over")).await;
                    return Ok(());
                }
                _ = async { shutdown.wait_for(|closing| *closing).await.is_ok() } => {
                    self.send(closed(ErrorCode::Unavailable, "the server is shutting down; connect again")).await;
                    return Ok(());
                }
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens or extends the lease.
    async fn execute(&mut self, execute: &wire::ExecuteBotProcessing) -> Result<Step> {
        let bots = match self.service.execute_bot_processing(&self.caller, execute).await {
            Ok(bots) => bots,
            Err(error) => return Ok(self.send(error_frame(&error)).await),
        };
        self.bots = bots.iter().map(|bot| (bot.id.clone(), bot.clone())).collect();
        let lease = self.service.config.lease;
        self.lease_until = tokio::time::Instant::now() + lease;
        let frame = wire::ProcessingServerFrame {
            frame: Some(wire::processing_server_frame::Frame::Lease(wire::LeaseGranted {
                expires_at: Some(timestamp(micros_after(lease))),
                lease_seconds: u32::try_from(lease.as_secs()).unwrap_or(u32::MAX),
                bots: bots.iter().map(bot_to_wire).collect(),
            })),
        };
        Ok(self.send(frame).await)
    }

    /// Handles frames in their order, except that acknowledgements are
    /// written together at the end.
    async fn handle_all(&mut self, frames: Vec<Result<wire::ProcessingClientFrame>>) -> Result<Step> {
        use wire::processing_client_frame::Frame;
        let mut acknowledged = Vec::new();
        for frame in frames {
            let step = match frame {
                Ok(wire::ProcessingClientFrame { frame: Some(Frame::Ack(ack)) }) => {
                    self.in_flight.remove(&ack.delivery_id);
                    acknowledged.push(ack.delivery_id);
                    Step::Continue
                }
                Ok(frame) => self.handle(frame).await?,
                Err(error) => self.send(error_frame(&error)).await,
            };
            if let Step::Close = step {
                return Ok(Step::Close);
            }
        }
        if acknowledged.is_empty() {
            return Ok(Step::Continue);
        }
        let removed = self.service.store.acknowledge_many(self.application_id(), &acknowledged).await?;
        metrics::counter!("beseda_bot_events_total", "outcome" => "ok").increment(removed.len() as u64);
        for delivery_id in acknowledged.into_iter().filter(|id| !removed.contains(id)) {
            let error = Error::new(
                ErrorCode::DeliveryNotFound,
                format!("delivery {delivery_id} is not pending: acknowledged before, or never handed out"),
            );
            if let Step::Close = self.send(error_frame(&error)).await {
                return Ok(Step::Close);
            }
        }
        Ok(Step::Continue)
    }

    /// One frame other than an acknowledgement.
    async fn handle(&mut self, frame: wire::ProcessingClientFrame) -> Result<Step> {
        use wire::processing_client_frame::Frame;
        match frame.frame {
            Some(Frame::Execute(execute)) => self.execute(&execute).await,
            // Batched by `handle_all`, which never passes one here.
            Some(Frame::Ack(_)) => Ok(Step::Continue),
            Some(Frame::Nack(nack)) => {
                let attempts = self.in_flight.remove(&nack.delivery_id).map_or(1, |(attempts, _)| attempts);
                let config = &self.service.config;
                let dead = attempts >= config.max_attempts;
                let retry_at = now_micros().saturating_add(
                    i64::try_from(backoff::delay(config.initial_backoff, config.max_backoff, attempts).as_micros())
                        .unwrap_or(i64::MAX),
                );
                if !dead {
                    self.retries.push(retry_at);
                }
                let error: String = nack.error.chars().take(2000).collect();
                match self.service.store.fail(self.application_id(), nack.delivery_id, &error, retry_at, dead).await {
                    Ok(()) => {}
                    Err(error) if error.code == ErrorCode::DeliveryNotFound => {
                        return Ok(self.send(error_frame(&error)).await);
                    }
                    Err(error) => return Err(error),
                }
                let outcome = if dead { "dead" } else { "retry" };
                metrics::counter!("beseda_bot_events_total", "outcome" => outcome).increment(1);
                Ok(Step::Continue)
            }
            None => {
                let error = Error::new(ErrorCode::MalformedRequest, "empty frame: set `execute`, `ack` or `nack`");
                Ok(self.send(error_frame(&error)).await)
            }
        }
    }

    /// Hands out what is due, up to the in-flight limit.
    async fn dispatch(&mut self) -> Result<Step> {
        let config = self.service.config.clone();
        // Claims past their ack timeout are handed out again by the store;
        // they no longer count against the limit.
        let now_instant = tokio::time::Instant::now();
        self.in_flight.retain(|_, (_, until)| *until > now_instant);
        let room = config.max_in_flight.saturating_sub(u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX));
        if room == 0 {
            return Ok(Step::Continue);
        }
        let now = now_micros();
        let claim = Claim {
            consumer_kind: ConsumerKind::Bot,
            consumer_ids: Vec::new(),
            now,
            visible_again_at: micros_after(config.ack_timeout),
            max_attempts: config.max_attempts,
            limit: room,
        };
        let claimed = self.service.store.claim(self.application_id(), &claim).await?;
        for delivery in claimed {
            let bot = match self.bots.get(&delivery.consumer_id) {
                Some(bot) => bot.clone(),
                None => match self.service.store.get_bot(self.application_id(), &delivery.consumer_id).await? {
                    Some(bot) => {
                        self.bots.insert(bot.id.clone(), bot.clone());
                        bot
                    }
                    // Deleted since: its queue goes with it.
                    None => {
                        self.service.store.acknowledge(self.application_id(), delivery.id).await?;
                        continue;
                    }
                },
            };
            self.in_flight.insert(delivery.id, (delivery.attempts, now_instant + config.ack_timeout));
            if let Step::Close = self.send(bot_event_frame(&bot, &delivery)).await {
                return Ok(Step::Close);
            }
        }
        Ok(Step::Continue)
    }

    /// How long to sleep when nothing wakes the connection: until the next
    /// retry or the poll interval, whichever is first. Called right after a
    /// claim, so whatever is due already is waiting behind an unacknowledged
    /// event of its conversation (or the in-flight limit): the answer to
    /// that event wakes the loop, not the clock.
    async fn next_wait(&mut self) -> Result<Duration> {
        let poll = self.service.config.poll_interval;
        let now = now_micros();
        self.retries.retain(|retry_at| *retry_at > now);
        let stored = self.service.store.next_due(self.application_id(), ConsumerKind::Bot).await?;
        let earliest = self.retries.iter().copied().chain(stored.filter(|due| *due > now)).min();
        Ok(match earliest {
            Some(due) => Duration::from_micros(u64::try_from(due - now).unwrap_or(u64::MAX))
                .clamp(Duration::from_millis(1), poll),
            None => poll,
        })
    }
}

fn bot_event_frame(bot: &Bot, delivery: &Delivery) -> wire::ProcessingServerFrame {
    let kind = match BotEventKind::parse(&delivery.kind) {
        Some(BotEventKind::Message) => wire::BotEventKind::Message,
        Some(BotEventKind::AddedToConversation) => wire::BotEventKind::AddedToConversation,
        Some(BotEventKind::RemovedFromConversation) => wire::BotEventKind::RemovedFromConversation,
        Some(BotEventKind::ConversationCreated) => wire::BotEventKind::ConversationCreated,
        Some(BotEventKind::ButtonPressed) => wire::BotEventKind::ButtonPressed,
        None => wire::BotEventKind::Unspecified,
    };
    let mut event = wire::BotEvent {
        delivery_id: delivery.id,
        bot: Some(bot_to_wire(bot)),
        kind: kind as i32,
        attempt: delivery.attempts,
        conversation_id: delivery.event.conversation_id.clone(),
        seq: delivery.event.seq,
        ..Default::default()
    };
    match &delivery.event.kind {
        ApplicationEventKind::MessageCreated { message }
        | ApplicationEventKind::MessageEdited { message }
        | ApplicationEventKind::MessageDeleted { message } => event.message = Some(message_to_wire(message)),
        ApplicationEventKind::ConversationCreated { conversation }
        | ApplicationEventKind::ConversationChanged { conversation, .. } => {
            event.conversation = Some(conversation_to_wire(conversation, 0));
        }
        ApplicationEventKind::ButtonPressed { message, button, row, column, user_id, .. } => {
            event.message = Some(message_to_wire(message));
            event.button = Some(button_to_wire(button));
            event.button_row = *row;
            event.button_column = *column;
            event.user_id = user_id.clone();
        }
        ApplicationEventKind::BotCreated { .. }
        | ApplicationEventKind::BotUpdated { .. }
        | ApplicationEventKind::BotDeleted { .. } => {}
    }
    wire::ProcessingServerFrame { frame: Some(wire::processing_server_frame::Frame::Event(event)) }
}

/// Whoever serves processing connections: the bots service in this process,
/// or (in a cluster) a client of the `BotProcessing` gRPC service.
pub trait ProcessingConnector: Send + Sync + 'static {
    fn open(&self, caller: Caller, inbound: ClientFrames) -> ServerFrames;
}

impl ProcessingConnector for BotsService {
    fn open(&self, caller: Caller, inbound: ClientFrames) -> ServerFrames {
        self.open_processing(caller, inbound)
    }
}
