//! [`BotStore`](crate::BotStore) over the SQL engine: bots, integrations,
//! event subscriptions, the transactional outbox and the delivery queues.
//! The rules of `domain.rs` hold here too: every tenant statement carries
//! `application_id`, and what must hold under concurrency (uniqueness, one
//! claim per delivery) is the database's job, through unique indexes and
//! UPDATEs that re-check their condition.

use beseda_core::bots::*;
use beseda_core::model::{ConversationEvent, EventKind, Micros, now_micros};
use beseda_core::{Error, ErrorCode, Result};

use crate::bots::{Claim, OutboxEntry};
use crate::domain::{CHUNK, SqlStore};
use crate::engine::{DbError, Executor, Row, SqlBuilder, Value};

const BOT_COLUMNS: &str = "id, user_id, bot_type, additional_parameters, predefined, infobase_user_name, created_at";
const INTEGRATION_COLUMNS: &str = "id, system_type, integration_key, enabled, parameters, presentation, \
    default_member_ids, connection_token, signing_secret, own_user_id, created_at, strict_status_codes";
const SUBSCRIPTION_COLUMNS: &str = "id, url, secret, event_kinds, conversation_ids, enabled, created_at";
const DELIVERY_COLUMNS: &str = "id, consumer_kind, consumer_id, kind, payload, attempts, dead, last_error, created_at";

/// Parameters bound per delivery row in a multi-row INSERT.
const DELIVERY_PARAMS: usize = 7;

// ---- helpers shared with domain.rs

/// Writes an event to the outbox; callers pass their transaction, so the
/// event commits (or not) with the change it describes.
pub(crate) async fn insert_outbox<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    event: &ApplicationEvent,
) -> Result<()> {
    ex.execute(
        "INSERT INTO event_outbox (application_id, conversation_id, seq, at, payload) VALUES ($1, $2, $3, $4, $5)",
        &[
            application_id.into(),
            (&event.conversation_id).into(),
            event.seq.into(),
            event.at.into(),
            encode_event(event)?.into(),
        ],
    )
    .await?;
    Ok(())
}

/// A logged conversation event as applications see it. The log does not
/// keep membership deltas, so a `ConversationChanged` from it has none.
pub(crate) fn application_event(event: ConversationEvent) -> ApplicationEvent {
    let kind = match event.kind {
        EventKind::MessageCreated(message) => ApplicationEventKind::MessageCreated { message },
        EventKind::MessageEdited(message) => ApplicationEventKind::MessageEdited { message },
        EventKind::MessageDeleted(message) => ApplicationEventKind::MessageDeleted { message },
        EventKind::ConversationChanged(conversation) => ApplicationEventKind::ConversationChanged {
            conversation,
            added_member_ids: Vec::new(),
            removed_member_ids: Vec::new(),
        },
    };
    ApplicationEvent { conversation_id: event.conversation_id, seq: event.seq, at: event.at, kind }
}

#[async_trait::async_trait]
impl crate::BotStore for SqlStore {
    // ---- bots

    async fn insert_bot(&self, application_id: &str, bot: &Bot) -> Result<()> {
        let mut tx = self.engine().begin().await?;
        tx.execute(
            &format!("INSERT INTO bots (application_id, {BOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
            &bot_params(application_id, bot, true)?,
        )
        .await
        .map_err(|error| bot_write_error(bot, error))?;
        insert_outbox(
            tx.as_mut(),
            application_id,
            &lifecycle_event(ApplicationEventKind::BotCreated { bot: bot.clone() }),
        )
        .await?;
        tx.commit().await?;
        tracing::debug!(application_id, bot_id = %bot.id, "bot inserted");
        Ok(())
    }

    async fn get_bot(&self, application_id: &str, bot_id: &str) -> Result<Option<Bot>> {
        fetch_bot(&mut self.auto(), application_id, bot_id).await
    }

    async fn get_bot_by_user(&self, application_id: &str, user_id: &str) -> Result<Option<Bot>> {
        let sql = format!("SELECT {BOT_COLUMNS} FROM bots WHERE application_id = $1 AND user_id = $2");
        let rows = self.engine().query(&sql, &[application_id.into(), user_id.into()]).await?;
        rows.first().map(bot_from_row).transpose()
    }

    async fn list_bots(&self, application_id: &str) -> Result<Vec<Bot>> {
        let sql = format!("SELECT {BOT_COLUMNS} FROM bots WHERE application_id = $1 ORDER BY created_at, id");
        let rows = self.engine().query(&sql, &[application_id.into()]).await?;
        rows.iter().map(bot_from_row).collect()
    }

    async fn update_bot(&self, application_id: &str, bot: &Bot) -> Result<()> {
        let mut tx = self.engine().begin().await?;
        let changed = tx
            .execute(
                "UPDATE bots SET user_id = $3, bot_type = $4, additional_parameters = $5, predefined = $6, \
                 infobase_user_name = $7 WHERE application_id = $1 AND id = $2",
                &bot_params(application_id, bot, false)?,
            )
            .await
            .map_err(|error| bot_write_error(bot, error))?;
        if changed == 0 {
            return Err(bot_not_found(&bot.id));
        }
        // The stored row, not the argument: its creation time is kept.
        let stored = fetch_bot(tx.as_mut(), application_id, &bot.id)
            .await?
            .ok_or_else(|| Error::internal("bot vanished inside its own update"))?;
        insert_outbox(tx.as_mut(), application_id, &lifecycle_event(ApplicationEventKind::BotUpdated { bot: stored }))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_bot(&self, application_id: &str, bot_id: &str) -> Result<()> {
        let mut tx = self.engine().begin().await?;
        let bot = fetch_bot(tx.as_mut(), application_id, bot_id).await?.ok_or_else(|| bot_not_found(bot_id))?;
        delete_queue(tx.as_mut(), application_id, ConsumerKind::Bot, bot_id).await?;
        tx.execute("DELETE FROM bots WHERE application_id = $1 AND id = $2", &[application_id.into(), bot_id.into()])
            .await?;
        insert_outbox(tx.as_mut(), application_id, &lifecycle_event(ApplicationEventKind::BotDeleted { bot })).await?;
        tx.commit().await?;
        tracing::debug!(application_id, bot_id, "bot deleted with its queue");
        Ok(())
    }

    // ---- integrations

    async fn insert_integration(&self, application_id: &str, integration: &Integration) -> Result<()> {
        self.engine()
            .execute(
                &format!(
                    "INSERT INTO integrations (application_id, {INTEGRATION_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ),
                &integration_params(application_id, integration, true)?,
            )
            .await
            .map_err(|error| integration_write_error(integration, error))?;
        Ok(())
    }

    async fn get_integration(&self, application_id: &str, integration_id: &str) -> Result<Option<Integration>> {
        let sql = format!("SELECT {INTEGRATION_COLUMNS} FROM integrations WHERE application_id = $1 AND id = $2");
        let rows = self.engine().query(&sql, &[application_id.into(), integration_id.into()]).await?;
        rows.first().map(integration_from_row).transpose()
    }

    async fn find_integration_by_token(&self, token: &str) -> Result<Option<(String, Integration)>> {
        let sql = format!("SELECT {INTEGRATION_COLUMNS}, application_id FROM integrations WHERE connection_token = $1");
        let rows = self.engine().query(&sql, &[token.into()]).await?;
        rows.first().map(|row| Ok((row.text(12)?, integration_from_row(row)?))).transpose()
    }

    async fn list_integrations(&self, application_id: &str) -> Result<Vec<Integration>> {
        let sql =
            format!("SELECT {INTEGRATION_COLUMNS} FROM integrations WHERE application_id = $1 ORDER BY created_at, id");
        let rows = self.engine().query(&sql, &[application_id.into()]).await?;
        rows.iter().map(integration_from_row).collect()
    }

    async fn update_integration(&self, application_id: &str, integration: &Integration) -> Result<()> {
        let changed = self
            .engine()
            .execute(
                "UPDATE integrations SET system_type = $3, integration_key = $4, enabled = $5, parameters = $6, \
                 presentation = $7, default_member_ids = $8, connection_token = $9, signing_secret = $10, \
                 own_user_id = $11, strict_status_codes = $12 WHERE application_id = $1 AND id = $2",
                &integration_params(application_id, integration, false)?,
            )
            .await
            .map_err(|error| integration_write_error(integration, error))?;
        if changed == 0 {
            return Err(integration_not_found(&integration.id));
        }
        Ok(())
    }

    async fn delete_integration(&self, application_id: &str, integration_id: &str) -> Result<()> {
        // The mapping tables follow by ON DELETE CASCADE.
        let deleted = self
            .engine()
            .execute(
                "DELETE FROM integrations WHERE application_id = $1 AND id = $2",
                &[application_id.into(), integration_id.into()],
            )
            .await?;
        if deleted == 0 {
            return Err(integration_not_found(integration_id));
        }
        Ok(())
    }

    async fn get_integration_user(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_user_id: &str,
    ) -> Result<Option<String>> {
        let rows = self
            .engine()
            .query(
                "SELECT user_id FROM integration_users WHERE application_id = $1 AND integration_id = $2 \
                 AND ext_user_id = $3",
                &[application_id.into(), integration_id.into(), ext_user_id.into()],
            )
            .await?;
        rows.first().map(|row| row.text(0)).transpose()
    }

    async fn put_integration_user(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_user_id: &str,
        user_id: &str,
    ) -> Result<()> {
        self.put_mapping(
            application_id,
            integration_id,
            "INSERT INTO integration_users (application_id, integration_id, ext_user_id, user_id) \
             VALUES ($1, $2, $3, $4)",
            vec![application_id.into(), integration_id.into(), ext_user_id.into(), user_id.into()],
            format!("external user {ext_user_id:?} is mapped already"),
        )
        .await
    }

    async fn get_integration_conversation(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
    ) -> Result<Option<IntegrationConversation>> {
        let rows = self
            .engine()
            .query(
                "SELECT ext_conversation_id, conversation_id, anonymous FROM integration_conversations \
                 WHERE application_id = $1 AND integration_id = $2 AND ext_conversation_id = $3",
                &[application_id.into(), integration_id.into(), ext_conversation_id.into()],
            )
            .await?;
        rows.first()
            .map(|row| {
                Ok(IntegrationConversation {
                    ext_conversation_id: row.text(0)?,
                    conversation_id: row.text(1)?,
                    anonymous: row.bool(2)?,
                })
            })
            .transpose()
    }

    async fn put_integration_conversation(
        &self,
        application_id: &str,
        integration_id: &str,
        mapping: &IntegrationConversation,
    ) -> Result<()> {
        self.put_mapping(
            application_id,
            integration_id,
            "INSERT INTO integration_conversations \
             (application_id, integration_id, ext_conversation_id, conversation_id, anonymous) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                application_id.into(),
                integration_id.into(),
                (&mapping.ext_conversation_id).into(),
                (&mapping.conversation_id).into(),
                mapping.anonymous.into(),
            ],
            format!("external conversation {:?} is mapped already", mapping.ext_conversation_id),
        )
        .await
    }

    async fn get_integration_message(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
        ext_message_id: &str,
    ) -> Result<Option<String>> {
        let rows = self
            .engine()
            .query(
                "SELECT message_id FROM integration_messages WHERE application_id = $1 AND integration_id = $2 \
                 AND ext_conversation_id = $3 AND ext_message_id = $4",
                &[application_id.into(), integration_id.into(), ext_conversation_id.into(), ext_message_id.into()],
            )
            .await?;
        rows.first().map(|row| row.text(0)).transpose()
    }

    async fn put_integration_message(
        &self,
        application_id: &str,
        integration_id: &str,
        ext_conversation_id: &str,
        ext_message_id: &str,
        message_id: &str,
    ) -> Result<()> {
        self.put_mapping(
            application_id,
            integration_id,
            "INSERT INTO integration_messages \
             (application_id, integration_id, ext_conversation_id, ext_message_id, message_id) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                application_id.into(),
                integration_id.into(),
                ext_conversation_id.into(),
                ext_message_id.into(),
                message_id.into(),
            ],
            format!("external message {ext_message_id:?} is mapped already"),
        )
        .await
    }

    // ---- outbound event subscriptions

    async fn insert_subscription(&self, application_id: &str, subscription: &EventSubscription) -> Result<()> {
        let result = self
            .engine()
            .execute(
                &format!(
                    "INSERT INTO event_subscriptions (application_id, {SUBSCRIPTION_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ),
                &subscription_params(application_id, subscription, true)?,
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if error.is_unique("event_subscriptions_pkey") => {
                Err(Error::new(ErrorCode::AlreadyExists, format!("event subscription {} exists", subscription.id)))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn get_subscription(&self, application_id: &str, subscription_id: &str) -> Result<Option<EventSubscription>> {
        let sql =
            format!("SELECT {SUBSCRIPTION_COLUMNS} FROM event_subscriptions WHERE application_id = $1 AND id = $2");
        let rows = self.engine().query(&sql, &[application_id.into(), subscription_id.into()]).await?;
        rows.first().map(subscription_from_row).transpose()
    }

    async fn list_subscriptions(&self, application_id: &str) -> Result<Vec<EventSubscription>> {
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM event_subscriptions WHERE application_id = $1 ORDER BY created_at, id"
        );
        let rows = self.engine().query(&sql, &[application_id.into()]).await?;
        rows.iter().map(subscription_from_row).collect()
    }

    async fn update_subscription(&self, application_id: &str, subscription: &EventSubscription) -> Result<()> {
        let changed = self
            .engine()
            .execute(
                "UPDATE event_subscriptions SET url = $3, secret = $4, event_kinds = $5, conversation_ids = $6, \
                 enabled = $7 WHERE application_id = $1 AND id = $2",
                &subscription_params(application_id, subscription, false)?,
            )
            .await?;
        if changed == 0 {
            return Err(subscription_not_found(&subscription.id));
        }
        Ok(())
    }

    async fn delete_subscription(&self, application_id: &str, subscription_id: &str) -> Result<()> {
        let mut tx = self.engine().begin().await?;
        let deleted = tx
            .execute(
                "DELETE FROM event_subscriptions WHERE application_id = $1 AND id = $2",
                &[application_id.into(), subscription_id.into()],
            )
            .await?;
        if deleted == 0 {
            return Err(subscription_not_found(subscription_id));
        }
        delete_queue(tx.as_mut(), application_id, ConsumerKind::Subscription, subscription_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn applications_with_subscriptions(&self) -> Result<Vec<String>> {
        let rows = self
            .engine()
            .query(
                "SELECT DISTINCT application_id FROM event_subscriptions WHERE enabled = TRUE ORDER BY application_id",
                &[],
            )
            .await?;
        rows.iter().map(|row| row.text(0)).collect()
    }

    // ---- outbox and queues

    async fn outbox_batch(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        let rows = self
            .engine()
            .query(
                "SELECT id, application_id, payload FROM event_outbox ORDER BY id LIMIT $1",
                &[i64::from(limit).into()],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry { id: row.int(0)?, application_id: row.text(1)?, event: decode_event(&row.text(2)?)? })
            })
            .collect()
    }

    async fn relay_outbox(&self, outbox_ids: &[i64], deliveries: &[(String, NewDelivery)]) -> Result<()> {
        let mut ids = outbox_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.engine().begin().await?;
        // Deleting first makes a concurrent relay of the same rows wait on
        // their locks and then find them gone, instead of enqueueing twice.
        let mut deleted = 0;
        for chunk in ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("DELETE FROM event_outbox WHERE id IN ");
            sql.push_in_list(chunk);
            deleted += tx.execute(&sql.sql, &sql.params).await?;
        }
        if deleted != ids.len() as u64 {
            tx.rollback().await?;
            return Err(Error::new(ErrorCode::AlreadyExists, "outbox rows were relayed already by another relay"));
        }
        let rows: Vec<(&str, &NewDelivery)> =
            deliveries.iter().map(|(application_id, delivery)| (application_id.as_str(), delivery)).collect();
        insert_deliveries(tx.as_mut(), &rows).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn publish_event(&self, application_id: &str, event: &ApplicationEvent) -> Result<()> {
        insert_outbox(&mut self.auto(), application_id, event).await
    }

    async fn enqueue(&self, application_id: &str, deliveries: &[NewDelivery]) -> Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&str, &NewDelivery)> = deliveries.iter().map(|delivery| (application_id, delivery)).collect();
        let mut tx = self.engine().begin().await?;
        insert_deliveries(tx.as_mut(), &rows).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn claim(&self, application_id: &str, claim: &Claim) -> Result<Vec<Delivery>> {
        if claim.limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.engine().begin().await?;

        let mut sql =
            SqlBuilder::new("UPDATE deliveries SET dead = TRUE, last_error = CASE WHEN last_error = '' THEN ");
        sql.push_bind(format!("gave up after {} attempts", claim.max_attempts));
        sql.push(" ELSE last_error END WHERE application_id = ").push_bind(application_id);
        sql.push(" AND consumer_kind = ").push_bind(claim.consumer_kind.as_str());
        sql.push(" AND dead = FALSE AND attempts > 0 AND next_attempt_at <= ").push_bind(claim.now);
        sql.push(" AND attempts >= ").push_bind(i64::from(claim.max_attempts));
        push_consumers(&mut sql, "consumer_id", &claim.consumer_ids);
        tx.execute(&sql.sql, &sql.params).await?;

        // Only the head of a (consumer, conversation) queue, its smallest
        // live id, may be claimed, and only when due: a head that is
        // claimed and not acknowledged yet holds back everything after it.
        let mut sql = SqlBuilder::new(
            "SELECT d.id FROM deliveries d JOIN (SELECT MIN(id) AS id FROM deliveries WHERE application_id = ",
        );
        sql.push_bind(application_id);
        sql.push(" AND consumer_kind = ").push_bind(claim.consumer_kind.as_str());
        sql.push(" AND dead = FALSE");
        push_consumers(&mut sql, "consumer_id", &claim.consumer_ids);
        sql.push(" GROUP BY consumer_id, conversation_id) heads ON heads.id = d.id WHERE d.application_id = ");
        sql.push_bind(application_id);
        sql.push(" AND d.next_attempt_at <= ").push_bind(claim.now);
        sql.push(" ORDER BY d.id LIMIT ");
        sql.push_bind(i64::from(claim.limit));
        let ids = tx.query(&sql.sql, &sql.params).await?.iter().map(|row| row.int(0)).collect::<Result<Vec<_>>>()?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }

        // The due condition is repeated so that of two concurrent claims
        // that selected one row, the one that waited for its lock skips it.
        let mut sql = SqlBuilder::new("UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ");
        sql.push_bind(claim.visible_again_at).push(" WHERE application_id = ").push_bind(application_id);
        sql.push(" AND dead = FALSE AND next_attempt_at <= ").push_bind(claim.now);
        sql.push(" AND id IN ").push_in_list(&ids);
        sql.push(&format!(" RETURNING {DELIVERY_COLUMNS}"));
        let rows = tx.query(&sql.sql, &sql.params).await?;
        let mut claimed = rows.iter().map(delivery_from_row).collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        claimed.sort_by_key(|delivery| delivery.id);
        Ok(claimed)
    }

    async fn acknowledge(&self, application_id: &str, delivery_id: i64) -> Result<bool> {
        let deleted = self
            .engine()
            .execute(
                "DELETE FROM deliveries WHERE application_id = $1 AND id = $2",
                &[application_id.into(), delivery_id.into()],
            )
            .await?;
        Ok(deleted > 0)
    }

    async fn acknowledge_many(&self, application_id: &str, delivery_ids: &[i64]) -> Result<Vec<i64>> {
        let mut tx = self.engine().begin().await?;
        let mut found = Vec::with_capacity(delivery_ids.len());
        for chunk in delivery_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("SELECT id FROM deliveries WHERE application_id = ");
            sql.push_bind(application_id).push(" AND id IN ").push_in_list(chunk);
            for row in tx.query(&sql.sql, &sql.params).await? {
                found.push(row.int(0)?);
            }
            let mut sql = SqlBuilder::new("DELETE FROM deliveries WHERE application_id = ");
            sql.push_bind(application_id).push(" AND id IN ").push_in_list(chunk);
            tx.execute(&sql.sql, &sql.params).await?;
        }
        tx.commit().await?;
        Ok(found)
    }

    async fn fail(
        &self,
        application_id: &str,
        delivery_id: i64,
        error: &str,
        retry_at: Micros,
        dead: bool,
    ) -> Result<()> {
        let changed = self
            .engine()
            .execute(
                "UPDATE deliveries SET last_error = $3, next_attempt_at = $4, dead = $5 \
                 WHERE application_id = $1 AND id = $2",
                &[application_id.into(), delivery_id.into(), error.into(), retry_at.into(), dead.into()],
            )
            .await?;
        if changed == 0 {
            return Err(Error::new(ErrorCode::DeliveryNotFound, format!("delivery {delivery_id} not found")));
        }
        Ok(())
    }

    async fn release(&self, application_id: &str, delivery_ids: &[i64], now: Micros) -> Result<()> {
        for chunk in delivery_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("UPDATE deliveries SET next_attempt_at = ");
            sql.push_bind(now).push(" WHERE application_id = ").push_bind(application_id);
            sql.push(" AND dead = FALSE AND id IN ").push_in_list(chunk);
            self.engine().execute(&sql.sql, &sql.params).await?;
        }
        Ok(())
    }

    async fn list_dead(
        &self,
        application_id: &str,
        consumer_kind: ConsumerKind,
        consumer_id: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        let mut sql = SqlBuilder::new(&format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE application_id = "));
        sql.push_bind(application_id).push(" AND consumer_kind = ").push_bind(consumer_kind.as_str());
        if let Some(consumer_id) = consumer_id {
            sql.push(" AND consumer_id = ").push_bind(consumer_id);
        }
        sql.push(" AND dead = TRUE AND id > ").push_bind(after_id);
        sql.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = self.engine().query(&sql.sql, &sql.params).await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn retry_dead(&self, application_id: &str, delivery_ids: &[i64], now: Micros) -> Result<u64> {
        let mut tx = self.engine().begin().await?;
        let mut retried = 0;
        for chunk in delivery_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("UPDATE deliveries SET dead = FALSE, attempts = 0, next_attempt_at = ");
            sql.push_bind(now).push(" WHERE application_id = ").push_bind(application_id);
            sql.push(" AND dead = TRUE AND id IN ").push_in_list(chunk);
            retried += tx.execute(&sql.sql, &sql.params).await?;
        }
        tx.commit().await?;
        Ok(retried)
    }

    async fn discard_dead(&self, application_id: &str, delivery_ids: &[i64]) -> Result<u64> {
        let mut tx = self.engine().begin().await?;
        let mut discarded = 0;
        for chunk in delivery_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("DELETE FROM deliveries WHERE application_id = ");
            sql.push_bind(application_id).push(" AND dead = TRUE AND id IN ").push_in_list(chunk);
            discarded += tx.execute(&sql.sql, &sql.params).await?;
        }
        tx.commit().await?;
        Ok(discarded)
    }

    async fn queue_depth(&self, application_id: &str, consumer_id: &str) -> Result<u64> {
        let rows = self
            .engine()
            .query(
                "SELECT COUNT(*) FROM deliveries WHERE application_id = $1 AND consumer_id = $2 AND dead = FALSE",
                &[application_id.into(), consumer_id.into()],
            )
            .await?;
        rows.first().map_or(Ok(0), |row| row.uint(0))
    }

    async fn next_due(&self, application_id: &str, consumer_kind: ConsumerKind) -> Result<Option<Micros>> {
        let rows = self
            .engine()
            .query(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE application_id = $1 AND consumer_kind = $2 \
                 AND dead = FALSE",
                &[application_id.into(), consumer_kind.as_str().into()],
            )
            .await?;
        Ok(rows.first().map(|row| row.opt_int(0)).transpose()?.flatten())
    }

    async fn events_for_replay(
        &self,
        application_id: &str,
        conversation_id: Option<&str>,
        after_seq: u64,
        since: Micros,
        limit: u32,
    ) -> Result<Vec<ApplicationEvent>> {
        let mut sql = SqlBuilder::new(
            "SELECT conversation_id, seq, at, payload FROM conversation_events WHERE application_id = ",
        );
        sql.push_bind(application_id).push(" AND at >= ").push_bind(since);
        match conversation_id {
            Some(conversation_id) => {
                sql.push(" AND conversation_id = ").push_bind(conversation_id);
                sql.push(" AND seq > ").push_bind(after_seq).push(" ORDER BY seq");
            }
            None => {
                sql.push(" ORDER BY at, conversation_id, seq");
            }
        }
        sql.push(" LIMIT ").push_bind(i64::from(limit));
        let rows = self.engine().query(&sql.sql, &sql.params).await?;
        rows.iter()
            .map(|row| {
                let kind: EventKind = serde_json::from_str(&row.text(3)?).map_err(decode_error("event"))?;
                Ok(application_event(ConversationEvent {
                    conversation_id: row.text(0)?,
                    seq: row.uint(1)?,
                    at: row.int(2)?,
                    kind,
                }))
            })
            .collect()
    }
}

impl SqlStore {
    /// Inserts a row of an integration's mapping table, checking first that
    /// the integration is this application's.
    async fn put_mapping(
        &self,
        application_id: &str,
        integration_id: &str,
        insert_sql: &str,
        params: Vec<Value>,
        taken: String,
    ) -> Result<()> {
        let mut tx = self.engine().begin().await?;
        let found = tx
            .query(
                "SELECT 1 FROM integrations WHERE application_id = $1 AND id = $2",
                &[application_id.into(), integration_id.into()],
            )
            .await?;
        if found.is_empty() {
            return Err(integration_not_found(integration_id));
        }
        match tx.execute(insert_sql, &params).await {
            Ok(_) => {}
            Err(DbError::Unique { .. }) => return Err(Error::new(ErrorCode::AlreadyExists, taken)),
            Err(error) => return Err(error.into()),
        }
        tx.commit().await?;
        Ok(())
    }
}

// ---- statements

async fn fetch_bot<E: Executor + ?Sized>(ex: &mut E, application_id: &str, bot_id: &str) -> Result<Option<Bot>> {
    let sql = format!("SELECT {BOT_COLUMNS} FROM bots WHERE application_id = $1 AND id = $2");
    let rows = ex.query(&sql, &[application_id.into(), bot_id.into()]).await?;
    rows.first().map(bot_from_row).transpose()
}

/// Deletes a consumer's queue, pending deliveries and dead letters alike.
async fn delete_queue<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    consumer_kind: ConsumerKind,
    consumer_id: &str,
) -> Result<()> {
    ex.execute(
        "DELETE FROM deliveries WHERE application_id = $1 AND consumer_id = $2 AND consumer_kind = $3",
        &[application_id.into(), consumer_id.into(), consumer_kind.as_str().into()],
    )
    .await?;
    Ok(())
}

/// Inserts deliveries in the order given, which their ids then keep. New
/// deliveries are due at once (`next_attempt_at` 0, whatever the caller's clock).
async fn insert_deliveries<E: Executor + ?Sized>(ex: &mut E, deliveries: &[(&str, &NewDelivery)]) -> Result<()> {
    let created_at = now_micros();
    for chunk in deliveries.chunks(CHUNK / DELIVERY_PARAMS) {
        let mut sql = SqlBuilder::new(
            "INSERT INTO deliveries (application_id, consumer_kind, consumer_id, conversation_id, seq, kind, payload, \
             attempts, next_attempt_at, dead, last_error, created_at) VALUES ",
        );
        let created = sql.bind(created_at);
        for (index, (application_id, delivery)) in chunk.iter().enumerate() {
            let values = [
                sql.bind(*application_id),
                sql.bind(delivery.consumer_kind.as_str()),
                sql.bind(&delivery.consumer_id),
                sql.bind(&delivery.event.conversation_id),
                sql.bind(delivery.event.seq),
                sql.bind(&delivery.kind),
                sql.bind(encode_event(&delivery.event)?),
            ];
            let separator = if index == 0 { "" } else { ", " };
            sql.push(&format!("{separator}({}, 0, 0, FALSE, '', {created})", values.join(", ")));
        }
        ex.execute(&sql.sql, &sql.params).await?;
    }
    Ok(())
}

/// Appends the consumer filter of a claim; no ids means every consumer.
fn push_consumers(sql: &mut SqlBuilder, column: &str, consumer_ids: &[String]) {
    if !consumer_ids.is_empty() {
        sql.push(&format!(" AND {column} IN ")).push_in_list(consumer_ids);
    }
}

// ---- rows and parameters

/// An event outside any conversation (bot lifecycle).
fn lifecycle_event(kind: ApplicationEventKind) -> ApplicationEvent {
    ApplicationEvent { conversation_id: String::new(), seq: 0, at: now_micros(), kind }
}

fn encode_error(what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |error| Error::internal(format!("{what} does not serialize: {error}"))
}

fn decode_error(what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |error| Error::internal(format!("stored {what} does not parse: {error}"))
}

fn encode_event(event: &ApplicationEvent) -> Result<String> {
    serde_json::to_string(event).map_err(encode_error("application event"))
}

fn decode_event(json: &str) -> Result<ApplicationEvent> {
    serde_json::from_str(json).map_err(decode_error("application event"))
}

/// `$1` application id, `$2` id, the properties, then creation time when
/// inserting: insert and update bind the same list.
fn bot_params(application_id: &str, bot: &Bot, with_created_at: bool) -> Result<Vec<Value>> {
    let parameters = serde_json::to_string(&bot.additional_parameters).map_err(encode_error("bot parameters"))?;
    let mut params: Vec<Value> = vec![
        application_id.into(),
        (&bot.id).into(),
        (&bot.user_id).into(),
        (&bot.bot_type).into(),
        parameters.into(),
        bot.predefined.into(),
        (&bot.infobase_user_name).into(),
    ];
    if with_created_at {
        params.push(bot.created_at.into());
    }
    Ok(params)
}

fn bot_from_row(row: &Row) -> Result<Bot> {
    Ok(Bot {
        id: row.text(0)?,
        user_id: row.text(1)?,
        bot_type: row.text(2)?,
        additional_parameters: serde_json::from_str(&row.text(3)?).map_err(decode_error("bot parameters"))?,
        predefined: row.bool(4)?,
        infobase_user_name: row.text(5)?,
        created_at: row.int(6)?,
    })
}

fn bot_write_error(bot: &Bot, error: DbError) -> Error {
    let (code, message) = match &error {
        DbError::Unique { constraint } if constraint == "bots_user_uq" => {
            (ErrorCode::BotUserTaken, format!("user {} already speaks for another bot", bot.user_id))
        }
        DbError::Unique { constraint } if constraint == "bots_predefined_uq" => {
            (ErrorCode::AlreadyExists, format!("predefined bot of type {} exists", bot.bot_type))
        }
        DbError::Unique { constraint } if constraint == "bots_pkey" => {
            (ErrorCode::AlreadyExists, format!("bot {} exists", bot.id))
        }
        _ => return error.into(),
    };
    Error::new(code, message)
}

fn bot_not_found(bot_id: &str) -> Error {
    Error::new(ErrorCode::BotNotFound, format!("bot {bot_id} not found"))
}

fn integration_params(application_id: &str, integration: &Integration, with_created_at: bool) -> Result<Vec<Value>> {
    let parameters = serde_json::to_string(&integration.parameters).map_err(encode_error("integration parameters"))?;
    let members =
        serde_json::to_string(&integration.default_member_ids).map_err(encode_error("integration members"))?;
    let mut params: Vec<Value> = vec![
        application_id.into(),
        (&integration.id).into(),
        (&integration.system_type).into(),
        (&integration.key).into(),
        integration.enabled.into(),
        parameters.into(),
        (&integration.presentation).into(),
        members.into(),
        (&integration.connection_token).into(),
        integration.signing_secret.as_ref().into(),
        integration.own_user_id.as_ref().into(),
    ];
    if with_created_at {
        params.push(integration.created_at.into());
    }
    params.push(integration.strict_status_codes.into());
    Ok(params)
}

fn integration_from_row(row: &Row) -> Result<Integration> {
    Ok(Integration {
        id: row.text(0)?,
        system_type: row.text(1)?,
        key: row.text(2)?,
        enabled: row.bool(3)?,
        parameters: serde_json::from_str(&row.text(4)?).map_err(decode_error("integration parameters"))?,
        presentation: row.text(5)?,
        default_member_ids: serde_json::from_str(&row.text(6)?).map_err(decode_error("integration members"))?,
        connection_token: row.text(7)?,
        signing_secret: row.opt_text(8)?,
        own_user_id: row.opt_text(9)?,
        created_at: row.int(10)?,
        strict_status_codes: row.bool(11)?,
    })
}

fn integration_write_error(integration: &Integration, error: DbError) -> Error {
    let (code, message) = match &error {
        DbError::Unique { constraint } if constraint == "integrations_key_uq" => {
            (ErrorCode::IntegrationKeyTaken, format!("integration key {:?} is taken", integration.key))
        }
        DbError::Unique { constraint } if constraint == "integrations_token_uq" => {
            (ErrorCode::AlreadyExists, "another integration has this connection token".to_owned())
        }
        DbError::Unique { constraint } if constraint == "integrations_pkey" => {
            (ErrorCode::AlreadyExists, format!("integration {} exists", integration.id))
        }
        _ => return error.into(),
    };
    Error::new(code, message)
}

fn integration_not_found(integration_id: &str) -> Error {
    Error::new(ErrorCode::IntegrationNotFound, format!("integration {integration_id} not found"))
}

fn subscription_params(
    application_id: &str,
    subscription: &EventSubscription,
    with_created_at: bool,
) -> Result<Vec<Value>> {
    let kinds = serde_json::to_string(&subscription.event_kinds).map_err(encode_error("subscription event kinds"))?;
    let conversations =
        serde_json::to_string(&subscription.conversation_ids).map_err(encode_error("subscription conversations"))?;
    let mut params: Vec<Value> = vec![
        application_id.into(),
        (&subscription.id).into(),
        (&subscription.url).into(),
        (&subscription.secret).into(),
        kinds.into(),
        conversations.into(),
        subscription.enabled.into(),
    ];
    if with_created_at {
        params.push(subscription.created_at.into());
    }
    Ok(params)
}

fn subscription_from_row(row: &Row) -> Result<EventSubscription> {
    Ok(EventSubscription {
        id: row.text(0)?,
        url: row.text(1)?,
        secret: row.text(2)?,
        event_kinds: serde_json::from_str(&row.text(3)?).map_err(decode_error("subscription event kinds"))?,
        conversation_ids: serde_json::from_str(&row.text(4)?).map_err(decode_error("subscription conversations"))?,
        enabled: row.bool(5)?,
        created_at: row.int(6)?,
    })
}

fn subscription_not_found(subscription_id: &str) -> Error {
    Error::new(ErrorCode::SubscriptionNotFound, format!("event subscription {subscription_id} not found"))
}

fn delivery_from_row(row: &Row) -> Result<Delivery> {
    let consumer_kind = row.text(1)?;
    Ok(Delivery {
        id: row.int(0)?,
        consumer_kind: ConsumerKind::parse(&consumer_kind)
            .ok_or_else(|| Error::internal(format!("stored consumer kind {consumer_kind:?} is unknown")))?,
        consumer_id: row.text(2)?,
        kind: row.text(3)?,
        event: decode_event(&row.text(4)?)?,
        attempts: u32::try_from(row.uint(5)?).unwrap_or(u32::MAX),
        dead: row.bool(6)?,
        last_error: row.text(7)?,
        created_at: row.int(8)?,
    })
}
