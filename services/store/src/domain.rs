//! The domain operations of [`Store`](crate::Store), written once over the
//! [`Engine`] abstraction so that SQLite and PostgreSQL cannot drift apart.
//! Every statement on tenant data carries `application_id = $1`; paging,
//! uniqueness and sequence numbers are the database's job (indexes and row
//! locks), not this code's, so they hold under concurrency.

use std::collections::{HashMap, HashSet};

use beseda_core::bots::{ApplicationEvent, ApplicationEventKind};
use beseda_core::model::*;
use beseda_core::{Error, ErrorCode, Result};

use crate::bots_sql::{application_event, insert_outbox};
use crate::engine::{
    Autocommit, DbError, Engine, Executor, Finish, Row, SqlBuilder, Value, contains_pattern, transaction,
};
use crate::{
    AppendOutcome, ConversationChange, ConversationQuery, DoNotDisturbState, MessageQuery, NewMessage,
    NotificationAudience, UnreadAfterAppend, UserQuery,
};

/// Bound parameters per `IN (...)` list or multi-row `INSERT`: far below
/// both engines' limits (SQLite 32766, PostgreSQL 65535).
pub(crate) const CHUNK: usize = 500;

const SUBSCRIBER_COLUMNS: &str = "id, email, administration_key_hash, created_at";
const APPLICATION_COLUMNS: &str = "id, subscriber_id, name, application_key, state, created_at";
const ACTIVATION_COLUMNS: &str = "email, application_name, application_id, code_hash, expires_at";
const USER_COLUMNS: &str = "u.id, u.kind, u.name, u.full_name, u.picture, u.phone, u.email, u.matching_key, \
    u.infobase_user_id, u.blocked, u.subscriber_administrator, u.external_system_type, \
    u.external_system_user_id, u.authentication_email, u.created_at";
const CONVERSATION_COLUMNS: &str = "c.id, c.conversation_key, c.title, c.displayed, c.read_only, c.is_group, \
    c.context_object_type, c.context_object_id, c.context_presentation, c.all_application_users, \
    c.integration_id, c.created_at, c.last_message_at, c.last_seq";
const MESSAGE_COLUMNS: &str = "m.id, m.conversation_id, m.seq, m.author_id, m.sent_at, m.body, m.text_format, \
    m.data_mime_type, m.data_content, m.recipient_ids, m.buttons, m.client_message_id, m.edited_at, m.deleted";

/// Allocates the conversation's next seq. The row lock this UPDATE takes is
/// what serializes concurrent writers of one conversation in PostgreSQL
/// (SQLite's writers are serialized by `BEGIN IMMEDIATE`).
const BUMP_SEQ: &str =
    "UPDATE conversations SET last_seq = last_seq + 1 WHERE application_id = $1 AND id = $2 RETURNING last_seq";

/// What the transaction of `append_message` produced.
enum Appended {
    Done(Box<AppendOutcome>),
    /// The message's client id was taken by a concurrent append: look the
    /// stored message up after the rollback.
    ClientIdTaken,
}

/// [`Store`](crate::Store) over an SQL engine: the one implementation of
/// every domain operation. [`SqliteStore`](crate::sqlite::SqliteStore) and
/// [`PostgresStore`](crate::postgres::PostgresStore) name this type with
/// their engine's constructors.
pub struct SqlStore {
    engine: Box<dyn Engine>,
}

impl SqlStore {
    pub(crate) fn new(engine: Box<dyn Engine>) -> Self {
        SqlStore { engine }
    }

    pub(crate) fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    pub(crate) fn auto(&self) -> Autocommit<'_> {
        Autocommit(self.engine.as_ref())
    }

    /// The statements of `append_message`, as one transaction job: the
    /// output, and whether to commit.
    async fn append_in_transaction(
        tx: &mut dyn Executor,
        application_id: &str,
        new_message: &NewMessage,
    ) -> Result<(Appended, Finish)> {
        let message = &new_message.message;
        let conversation_id = message.conversation_id.as_str();
        // Seq first: the row lock it takes makes a concurrent retry with the
        // same client message id wait here and then see the stored message.
        let rows = tx
            .query(
                "UPDATE conversations SET last_seq = last_seq + 1, last_message_at = $3, last_activity_at = $3 \
                 WHERE application_id = $1 AND id = $2 \
                 RETURNING last_seq, notify_count, context_object_type, all_application_users",
                &[application_id.into(), conversation_id.into(), message.date.into()],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(conversation_not_found(conversation_id));
        };
        let seq = row.uint(0)?;
        let notify_count = row.uint(1)?;
        let members_audience = row.opt_text(2)?.is_none() && !row.bool(3)?;
        if let Some(client_message_id) = &message.client_message_id
            && let Some(existing) = find_by_client_id(&mut *tx, application_id, message, client_message_id).await?
        {
            tracing::debug!(application_id, message_id = %existing.id, "append retried; returning stored message");
            return Ok((
                Appended::Done(Box::new(AppendOutcome { message: existing, event: None, unread: Vec::new() })),
                Finish::Rollback,
            ));
        }

        let mut seen = HashSet::new();
        let notify: Vec<String> =
            new_message.notify_user_ids.iter().filter(|id| seen.insert(id.as_str())).cloned().collect();
        // Only the members' audience of an ordinary conversation can be
        // derived from member rows; context conversations and conversations
        // of all users notify whoever routing names, one row per user.
        let members = if members_audience {
            member_counts(&mut *tx, application_id, conversation_id).await?
        } else {
            HashMap::new()
        };
        let plan = if members_audience {
            let audience: HashSet<String> = members
                .iter()
                .filter(|(user_id, member)| **user_id != message.author_id && member.in_audience())
                .map(|(user_id, _)| user_id.clone())
                .collect();
            NotifyPlan::choose(&audience, &notify)
        } else {
            NotifyPlan::per_user(&notify)
        };
        let notify_count = if plan.broadcast {
            let rows = tx
                .query(
                    "UPDATE conversations SET notify_count = notify_count + 1 WHERE application_id = $1 AND id = $2 \
                     RETURNING notify_count",
                    &[application_id.into(), conversation_id.into()],
                )
                .await?;
            rows.first().ok_or_else(|| conversation_not_found(conversation_id))?.uint(0)?
        } else {
            notify_count
        };

        let stored = Message { seq, ..message.clone() };
        match insert_message(&mut *tx, application_id, &stored, plan.broadcast, notify_count).await {
            Ok(()) => {}
            Err(error) if error.is_unique("messages_client_id_uq") => {
                // Unreachable while the seq row lock serializes appends; kept
                // so that a retry is still answered if that ever changes.
                return Ok((Appended::ClientIdTaken, Finish::Rollback));
            }
            Err(error) => return Err(error.into()),
        }
        let event = ConversationEvent {
            conversation_id: stored.conversation_id.clone(),
            seq,
            at: stored.date,
            kind: EventKind::MessageCreated(stored.clone()),
        };
        insert_event(&mut *tx, application_id, &event).await?;
        insert_outbox(&mut *tx, application_id, &application_event(event.clone())).await?;

        if plan.broadcast {
            // The broadcast counts for every member row; whoever it must not
            // count for skips it. The author (one row) never has their own
            // message unread, and a muted member's count is frozen anyway.
            tx.execute(
                "UPDATE conversation_members SET skipped = skipped + 1 WHERE application_id = $1 \
                 AND conversation_id = $2 AND user_id = $3 AND muted_at IS NULL",
                &[application_id.into(), conversation_id.into(), (&stored.author_id).into()],
            )
            .await?;
            for chunk in plan.excluded.chunks(CHUNK) {
                let mut sql = SqlBuilder::new(
                    "INSERT INTO notification_exclusions (application_id, conversation_id, seq, user_id) VALUES ",
                );
                push_user_rows(&mut sql, application_id, conversation_id, seq, chunk);
                sql.push(" ON CONFLICT (application_id, user_id, conversation_id, seq) DO NOTHING");
                tx.execute(&sql.sql, &sql.params).await?;
                let mut sql =
                    SqlBuilder::new("UPDATE conversation_members SET skipped = skipped + 1 WHERE application_id = ");
                sql.push_bind(application_id).push(" AND conversation_id = ").push_bind(conversation_id);
                sql.push(" AND muted_at IS NULL AND user_id IN ").push_in_list(chunk);
                tx.execute(&sql.sql, &sql.params).await?;
            }
        }
        let mut per_user_counts = HashMap::new();
        for chunk in plan.per_user.chunks(CHUNK) {
            let mut sql =
                SqlBuilder::new("INSERT INTO notifications (application_id, conversation_id, seq, user_id) VALUES ");
            push_user_rows(&mut sql, application_id, conversation_id, seq, chunk);
            sql.push(" ON CONFLICT (application_id, user_id, conversation_id, seq) DO NOTHING");
            tx.execute(&sql.sql, &sql.params).await?;

            let mut sql = SqlBuilder::new(
                "INSERT INTO unread_counters (application_id, user_id, conversation_id, unread) VALUES ",
            );
            let (app, conversation) = (sql.bind(application_id), sql.bind(conversation_id));
            for (index, user_id) in chunk.iter().enumerate() {
                let user = sql.bind(user_id);
                let separator = if index == 0 { "" } else { ", " };
                sql.push(&format!("{separator}({app}, {user}, {conversation}, 1)"));
            }
            sql.push(
                " ON CONFLICT (application_id, user_id, conversation_id) \
                 DO UPDATE SET unread = unread_counters.unread + 1 RETURNING user_id, unread",
            );
            for row in tx.query(&sql.sql, &sql.params).await? {
                per_user_counts.insert(row.text(0)?, row.uint(1)?);
            }
        }
        // The notified users' new counts, from what was read and written
        // above: no further query, whatever the audience.
        let excluded: HashSet<&str> = plan.excluded.iter().map(String::as_str).collect();
        let unread = notify
            .iter()
            .map(|user_id| {
                let skipped_now =
                    plan.broadcast && (*user_id == stored.author_id || excluded.contains(user_id.as_str()));
                let member = members.get(user_id);
                let per_user = match per_user_counts.get(user_id) {
                    Some(count) => *count,
                    None => member.map_or(0, |member| member.per_user),
                };
                let broadcasts = member.map_or(0, |member| member.unread_broadcasts(notify_count, skipped_now));
                UnreadAfterAppend { unread_in_conversation: saturate(per_user + broadcasts), user_id: user_id.clone() }
            })
            .collect();
        tracing::debug!(
            application_id,
            conversation_id,
            seq,
            broadcast = plan.broadcast,
            per_user_rows = plan.per_user.len() + plan.excluded.len(),
            "message appended"
        );
        Ok((Appended::Done(Box::new(AppendOutcome { message: stored, event: Some(event), unread })), Finish::Commit))
    }
}

#[async_trait::async_trait]
impl crate::Store for SqlStore {
    // ---- subscribers and applications

    async fn upsert_subscriber(&self, email: &str) -> Result<Subscriber> {
        let email = email.to_lowercase();
        self.engine
            .execute(
                "INSERT INTO subscribers (id, email, administration_key_hash, created_at) VALUES ($1, $2, NULL, $3) \
                 ON CONFLICT (email) DO NOTHING",
                &[new_id().into(), (&email).into(), now_micros().into()],
            )
            .await?;
        self.get_subscriber_by_email(&email)
            .await?
            .ok_or_else(|| Error::internal("subscriber vanished right after its upsert"))
    }

    async fn get_subscriber(&self, subscriber_id: &str) -> Result<Option<Subscriber>> {
        let sql = format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE id = $1");
        let rows = self.engine.query(&sql, &[subscriber_id.into()]).await?;
        rows.first().map(subscriber_from_row).transpose()
    }

    async fn get_subscriber_by_email(&self, email: &str) -> Result<Option<Subscriber>> {
        let sql = format!("SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE email = $1");
        let rows = self.engine.query(&sql, &[email.to_lowercase().into()]).await?;
        rows.first().map(subscriber_from_row).transpose()
    }

    async fn set_administration_key_hash(&self, subscriber_id: &str, key_hash: &str) -> Result<()> {
        let changed = self
            .engine
            .execute(
                "UPDATE subscribers SET administration_key_hash = $2 WHERE id = $1",
                &[subscriber_id.into(), key_hash.into()],
            )
            .await?;
        if changed == 0 {
            return Err(Error::internal(format!("subscriber {subscriber_id} not found")));
        }
        Ok(())
    }

    async fn change_subscriber_email(&self, subscriber_id: &str, new_email: &str) -> Result<()> {
        let result = self
            .engine
            .execute(
                "UPDATE subscribers SET email = $2 WHERE id = $1",
                &[subscriber_id.into(), new_email.to_lowercase().into()],
            )
            .await;
        match result {
            Ok(0) => Err(Error::internal(format!("subscriber {subscriber_id} not found"))),
            Ok(_) => Ok(()),
            Err(error) if error.is_unique("subscribers_email_uq") => {
                Err(Error::invalid("newEmail", "another subscriber already has this e-mail"))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn put_temporary_code(&self, subscriber_id: &str, code_hash: &str, expires_at: Micros) -> Result<()> {
        let mut tx = self.engine.begin().await?;
        // Expired codes are useless; dropping them here keeps the table small
        // without a background job.
        tx.execute(
            "DELETE FROM temporary_codes WHERE subscriber_id = $1 AND expires_at <= $2",
            &[subscriber_id.into(), now_micros().into()],
        )
        .await?;
        tx.execute(
            "INSERT INTO temporary_codes (subscriber_id, code_hash, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (subscriber_id, code_hash) DO UPDATE SET expires_at = excluded.expires_at",
            &[subscriber_id.into(), code_hash.into(), expires_at.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn consume_temporary_code(&self, subscriber_id: &str, code_hash: &str, now: Micros) -> Result<bool> {
        // One DELETE is atomic in both engines: of two concurrent consumers
        // only one sees a deleted row.
        let deleted = self
            .engine
            .execute(
                "DELETE FROM temporary_codes WHERE subscriber_id = $1 AND code_hash = $2 AND expires_at > $3",
                &[subscriber_id.into(), code_hash.into(), now.into()],
            )
            .await?;
        Ok(deleted == 1)
    }

    async fn put_pending_activation(&self, activation: &PendingActivation) -> Result<()> {
        let mut tx = self.engine.begin().await?;
        tx.execute("DELETE FROM pending_activations WHERE expires_at <= $1", &[now_micros().into()]).await?;
        tx.execute(
            "INSERT INTO pending_activations (email, application_name, application_id, code_hash, expires_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email, application_name) DO UPDATE SET \
             application_id = excluded.application_id, code_hash = excluded.code_hash, expires_at = excluded.expires_at",
            &[
                (&activation.email).into(),
                (&activation.application_name).into(),
                activation.application_id.as_ref().into(),
                (&activation.code_hash).into(),
                activation.expires_at.into(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn take_pending_activation(
        &self,
        email: &str,
        code_hash: &str,
        now: Micros,
    ) -> Result<Option<PendingActivation>> {
        let mut tx = self.engine.begin().await?;
        let sql = format!(
            "SELECT {ACTIVATION_COLUMNS} FROM pending_activations WHERE email = $1 AND code_hash = $2 \
             AND expires_at > $3 ORDER BY application_name LIMIT 1"
        );
        let rows = tx.query(&sql, &[email.into(), code_hash.into(), now.into()]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let activation = PendingActivation {
            email: row.text(0)?,
            application_name: row.text(1)?,
            application_id: row.opt_text(2)?,
            code_hash: row.text(3)?,
            expires_at: row.int(4)?,
        };
        // The code condition is repeated so that a concurrent replacement
        // (new code) or take makes this DELETE match nothing.
        let deleted = tx
            .execute(
                "DELETE FROM pending_activations WHERE email = $1 AND application_name = $2 AND code_hash = $3",
                &[email.into(), (&activation.application_name).into(), code_hash.into()],
            )
            .await?;
        if deleted != 1 {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(activation))
    }

    async fn insert_application(&self, application: &Application) -> Result<()> {
        self.engine
            .execute(
                "INSERT INTO applications (id, subscriber_id, name, application_key, state, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    (&application.id).into(),
                    (&application.subscriber_id).into(),
                    (&application.name).into(),
                    application.key.as_ref().into(),
                    application.state.as_str().into(),
                    application.created_at.into(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn get_application(&self, application_id: &str) -> Result<Option<Application>> {
        let sql = format!("SELECT {APPLICATION_COLUMNS} FROM applications WHERE id = $1");
        let rows = self.engine.query(&sql, &[application_id.into()]).await?;
        rows.first().map(application_from_row).transpose()
    }

    async fn update_application(&self, application: &Application) -> Result<()> {
        let changed = self
            .engine
            .execute(
                "UPDATE applications SET subscriber_id = $2, name = $3, application_key = $4, state = $5 WHERE id = $1",
                &[
                    (&application.id).into(),
                    (&application.subscriber_id).into(),
                    (&application.name).into(),
                    application.key.as_ref().into(),
                    application.state.as_str().into(),
                ],
            )
            .await?;
        if changed == 0 {
            return Err(Error::new(
                ErrorCode::ApplicationNotFound,
                format!("application {} not found", application.id),
            ));
        }
        Ok(())
    }

    // ---- users

    async fn insert_user(&self, application_id: &str, user: &User) -> Result<()> {
        let result = self
            .engine
            .execute(
                "INSERT INTO users (application_id, id, kind, name, name_lower, full_name, full_name_lower, picture, \
                 phone, email, matching_key, infobase_user_id, blocked, subscriber_administrator, \
                 external_system_type, external_system_user_id, authentication_email, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
                &user_params(application_id, user, true),
            )
            .await;
        result.map(drop).map_err(user_write_error)
    }

    async fn get_user(&self, application_id: &str, user_id: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users u WHERE u.application_id = $1 AND u.id = $2");
        let rows = self.engine.query(&sql, &[application_id.into(), user_id.into()]).await?;
        rows.first().map(user_from_row).transpose()
    }

    async fn get_users(&self, application_id: &str, user_ids: &[String]) -> Result<Vec<User>> {
        let mut found = HashMap::new();
        for chunk in user_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new(&format!("SELECT {USER_COLUMNS} FROM users u WHERE u.application_id = "));
            sql.push_bind(application_id).push(" AND u.id IN ").push_in_list(chunk);
            for row in self.engine.query(&sql.sql, &sql.params).await? {
                let user = user_from_row(&row)?;
                found.insert(user.id.clone(), user);
            }
        }
        // In the order asked for, each user once, unknown ids skipped.
        Ok(user_ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    async fn get_user_by_infobase_id(&self, application_id: &str, infobase_user_id: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users u WHERE u.application_id = $1 AND u.infobase_user_id = $2");
        let rows = self.engine.query(&sql, &[application_id.into(), infobase_user_id.into()]).await?;
        rows.first().map(user_from_row).transpose()
    }

    async fn update_user(&self, application_id: &str, user: &User) -> Result<()> {
        let result = self
            .engine
            .execute(
                "UPDATE users SET kind = $3, name = $4, name_lower = $5, full_name = $6, full_name_lower = $7, \
                 picture = $8, phone = $9, email = $10, matching_key = $11, infobase_user_id = $12, blocked = $13, \
                 subscriber_administrator = $14, external_system_type = $15, external_system_user_id = $16, \
                 authentication_email = $17 WHERE application_id = $1 AND id = $2",
                &user_params(application_id, user, false),
            )
            .await;
        match result.map_err(user_write_error)? {
            0 => Err(Error::new(ErrorCode::UserNotFound, format!("user {} not found", user.id))),
            _ => Ok(()),
        }
    }

    async fn list_users(&self, application_id: &str, query: &UserQuery) -> Result<Vec<User>> {
        let mut sql = SqlBuilder::new(&format!("SELECT {USER_COLUMNS} FROM users u WHERE u.application_id = "));
        let app = sql.bind(application_id);
        sql.push(&app);
        if !query.include_blocked {
            sql.push(" AND u.blocked = FALSE");
        }
        if query.exclude_guests {
            sql.push(" AND u.kind <> ").push_bind(UserKind::Guest.as_str());
        }
        if !query.ids.is_empty() {
            sql.push(" AND u.id IN ").push_in_list(&query.ids);
        }
        if let Some(needle) = &query.name_contains {
            let pattern = sql.bind(contains_pattern(needle));
            sql.push(&format!(
                " AND (u.name_lower LIKE {pattern} ESCAPE '\\' OR u.full_name_lower LIKE {pattern} ESCAPE '\\')"
            ));
        }
        if let Some(kind) = query.kind {
            sql.push(" AND u.kind = ").push_bind(kind.as_str());
        }
        if let Some(conversation_id) = &query.conversation_id {
            sql.push(&format!(
                " AND EXISTS (SELECT 1 FROM conversation_members cm WHERE cm.application_id = {app} \
                 AND cm.user_id = u.id AND cm.conversation_id = "
            ))
            .push_bind(conversation_id)
            .push(")");
        }
        if let Some(infobase_user_id) = &query.infobase_user_id {
            sql.push(" AND u.infobase_user_id = ").push_bind(infobase_user_id);
        }
        if let Some(matching_key) = &query.matching_key {
            sql.push(" AND u.matching_key = ").push_bind(matching_key);
        }
        let (cmp, dir) = direction_sql(query.direction);
        if let Some(after) = &query.after {
            let anchor = self
                .engine
                .query(
                    "SELECT name, id FROM users WHERE application_id = $1 AND id = $2",
                    &[application_id.into(), after.into()],
                )
                .await?;
            // An unknown anchor cannot be placed in the order: an empty page
            // is safer than restarting from the beginning (a client loop).
            let Some(anchor) = anchor.first() else {
                return Ok(Vec::new());
            };
            let name = sql.bind(anchor.text(0)?);
            let id = sql.bind(anchor.text(1)?);
            sql.push(&format!(" AND (u.name {cmp} {name} OR (u.name = {name} AND u.id {cmp} {id}))"));
        }
        sql.push(&format!(" ORDER BY u.name {dir}, u.id {dir} LIMIT ")).push_bind(i64::from(query.limit));
        let rows = self.engine.query(&sql.sql, &sql.params).await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn count_users(&self, application_id: &str) -> Result<u64> {
        let rows =
            self.engine.query("SELECT COUNT(*) FROM users WHERE application_id = $1", &[application_id.into()]).await?;
        rows.first().map_or(Ok(0), |row| row.uint(0))
    }

    async fn set_subscriber_administrator(
        &self,
        application_id: &str,
        user_id: &str,
        administrator: bool,
    ) -> Result<()> {
        let updated = self
            .engine
            .execute(
                "UPDATE users SET subscriber_administrator = $3 WHERE application_id = $1 AND id = $2",
                &[application_id.into(), user_id.into(), administrator.into()],
            )
            .await?;
        match updated {
            0 => Err(Error::new(ErrorCode::UserNotFound, format!("user {user_id} not found"))),
            _ => Ok(()),
        }
    }

    async fn set_subscriber_administrators(&self, application_id: &str, user_ids: &[String]) -> Result<()> {
        let mut tx = self.engine.begin().await?;
        tx.execute(
            "UPDATE users SET subscriber_administrator = FALSE \
             WHERE application_id = $1 AND subscriber_administrator = TRUE",
            &[application_id.into()],
        )
        .await?;
        for chunk in user_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("UPDATE users SET subscriber_administrator = TRUE WHERE application_id = ");
            sql.push_bind(application_id).push(" AND id IN ").push_in_list(chunk);
            tx.execute(&sql.sql, &sql.params).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- conversations

    async fn insert_conversation(&self, application_id: &str, conversation: &Conversation) -> Result<()> {
        let mut tx = self.engine.begin().await?;
        let context = conversation.context.as_ref();
        let result = tx
            .execute(
                "INSERT INTO conversations (application_id, id, conversation_key, title, title_lower, displayed, \
                 read_only, is_group, context_object_type, context_object_id, context_presentation, \
                 all_application_users, integration_id, created_at, last_message_at, last_activity_at, last_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                &[
                    application_id.into(),
                    (&conversation.id).into(),
                    conversation.key.as_ref().into(),
                    (&conversation.title).into(),
                    conversation.title.to_lowercase().into(),
                    conversation.displayed.into(),
                    conversation.read_only.into(),
                    conversation.group.into(),
                    context.map(|context| &context.object_type).into(),
                    context.map(|context| &context.object_id).into(),
                    context.map(|context| &context.presentation).into(),
                    conversation.all_application_users.into(),
                    (&conversation.integration_id).into(),
                    conversation.created_at.into(),
                    conversation.last_message_at.into(),
                    conversation.last_message_at.unwrap_or(conversation.created_at).into(),
                    conversation.last_seq.into(),
                ],
            )
            .await;
        match result {
            Ok(_) => {}
            Err(error) if error.is_unique("conversations_key_uq") => {
                return Err(Error::new(
                    ErrorCode::ConversationKeyTaken,
                    format!("conversation key {:?} is taken", conversation.key.as_deref().unwrap_or_default()),
                ));
            }
            Err(error) if error.is_unique("conversations_context_uq") => {
                return Err(Error::new(
                    ErrorCode::ContextConversationExists,
                    "the context object already has a conversation",
                ));
            }
            Err(error) => return Err(error.into()),
        }
        insert_members(
            tx.as_mut(),
            application_id,
            &conversation.id,
            &conversation.member_ids,
            conversation.last_seq,
            0,
        )
        .await?;
        let created = ApplicationEvent {
            conversation_id: conversation.id.clone(),
            seq: conversation.last_seq,
            at: conversation.created_at,
            kind: ApplicationEventKind::ConversationCreated { conversation: conversation.clone() },
        };
        insert_outbox(tx.as_mut(), application_id, &created).await?;
        tx.commit().await?;
        tracing::debug!(application_id, conversation_id = %conversation.id, "conversation inserted");
        Ok(())
    }

    async fn get_conversation(&self, application_id: &str, conversation_id: &str) -> Result<Option<Conversation>> {
        fetch_conversation(&mut self.auto(), application_id, conversation_id).await
    }

    async fn get_conversation_by_key(&self, application_id: &str, key: &str) -> Result<Option<Conversation>> {
        let mut sql = conversation_select(application_id);
        sql.push(" AND c.conversation_key = ").push_bind(key);
        Ok(fetch_conversations(&mut self.auto(), application_id, sql).await?.pop())
    }

    async fn get_conversation_by_context(
        &self,
        application_id: &str,
        object_type: &str,
        object_id: &str,
    ) -> Result<Option<Conversation>> {
        let mut sql = conversation_select(application_id);
        sql.push(" AND c.context_object_type = ").push_bind(object_type);
        sql.push(" AND c.context_object_id = ").push_bind(object_id);
        Ok(fetch_conversations(&mut self.auto(), application_id, sql).await?.pop())
    }

    async fn update_conversation(
        &self,
        application_id: &str,
        conversation_id: &str,
        change: &ConversationChange,
    ) -> Result<(Conversation, ConversationEvent)> {
        let mut tx = self.engine.begin().await?;
        let seq = bump_seq(tx.as_mut(), application_id, conversation_id).await?;
        // Read under the seq row lock, so the deltas below are exact.
        let members_before = member_ids(tx.as_mut(), application_id, conversation_id).await?;
        let ids: [Value; 2] = [application_id.into(), conversation_id.into()];
        if let Some(title) = &change.title {
            tx.execute(
                "UPDATE conversations SET title = $3, title_lower = $4 WHERE application_id = $1 AND id = $2",
                &[ids[0].clone(), ids[1].clone(), title.into(), title.to_lowercase().into()],
            )
            .await?;
        }
        if let Some(displayed) = change.displayed {
            tx.execute(
                "UPDATE conversations SET displayed = $3 WHERE application_id = $1 AND id = $2",
                &[ids[0].clone(), ids[1].clone(), displayed.into()],
            )
            .await?;
        }
        // New members start with nothing unread: every broadcast so far is
        // skipped for them, and those who switched watching off start muted.
        let rows = tx
            .query(
                "SELECT notify_count FROM conversations WHERE application_id = $1 AND id = $2",
                &[ids[0].clone(), ids[1].clone()],
            )
            .await?;
        let notify_count = rows.first().ok_or_else(|| conversation_not_found(conversation_id))?.uint(0)?;
        insert_members(tx.as_mut(), application_id, conversation_id, &change.add_member_ids, seq, notify_count).await?;
        if !change.add_member_ids.is_empty() {
            tx.execute(
                "UPDATE conversation_members SET muted_at = skipped WHERE application_id = $1 AND conversation_id = $2 \
                 AND joined_seq = $3 AND muted_at IS NULL AND user_id IN (SELECT w.user_id FROM watch_modes w \
                 WHERE w.application_id = $1 AND w.conversation_id = $2 AND w.watch = FALSE)",
                &[ids[0].clone(), ids[1].clone(), seq.into()],
            )
            .await?;
        }
        // A removed member's unread counts vanish with their membership.
        for table in
            ["conversation_members", "notifications", "unread_counters", "notification_exclusions", "watch_gaps"]
        {
            for chunk in change.remove_member_ids.chunks(CHUNK) {
                let mut sql = SqlBuilder::new(&format!("DELETE FROM {table} WHERE application_id = "));
                sql.push_bind(application_id).push(" AND conversation_id = ").push_bind(conversation_id);
                sql.push(" AND user_id IN ").push_in_list(chunk);
                tx.execute(&sql.sql, &sql.params).await?;
            }
        }
        let conversation = fetch_conversation(tx.as_mut(), application_id, conversation_id)
            .await?
            .ok_or_else(|| Error::internal("conversation vanished inside its own update"))?;
        let event = ConversationEvent {
            conversation_id: conversation_id.to_owned(),
            seq,
            at: now_micros(),
            kind: EventKind::ConversationChanged(conversation.clone()),
        };
        insert_event(tx.as_mut(), application_id, &event).await?;
        let (added_member_ids, removed_member_ids) = membership_delta(&members_before, &conversation, change);
        let changed = ApplicationEvent {
            conversation_id: conversation_id.to_owned(),
            seq,
            at: event.at,
            kind: ApplicationEventKind::ConversationChanged {
                conversation: conversation.clone(),
                added_member_ids,
                removed_member_ids,
            },
        };
        insert_outbox(tx.as_mut(), application_id, &changed).await?;
        tx.commit().await?;
        tracing::debug!(application_id, conversation_id, seq, "conversation changed");
        Ok((conversation, event))
    }

    async fn list_conversations(&self, application_id: &str, query: &ConversationQuery) -> Result<Vec<Conversation>> {
        let mut sql = conversation_select(application_id);
        if !query.ids.is_empty() {
            sql.push(" AND c.id IN ").push_in_list(&query.ids);
        }
        if let Some(needle) = &query.title_contains {
            sql.push(" AND c.title_lower LIKE ").push_bind(contains_pattern(needle)).push(" ESCAPE '\\'");
        }
        if let Some(user_id) = &query.accessible_to {
            push_accessible_to(&mut sql, user_id);
        }
        if let Some((object_type, object_id)) = &query.context {
            sql.push(" AND c.context_object_type = ").push_bind(object_type);
            sql.push(" AND c.context_object_id = ").push_bind(object_id);
        }
        if let Some(group) = query.group {
            sql.push(" AND c.is_group = ").push_bind(group);
        }
        if let Some(displayed) = query.displayed {
            sql.push(" AND c.displayed = ").push_bind(displayed);
        }
        if let Some(read_only) = query.read_only {
            sql.push(" AND c.read_only = ").push_bind(read_only);
        }
        match query.has_context {
            Some(true) => {
                sql.push(" AND c.context_object_type IS NOT NULL");
            }
            Some(false) => {
                sql.push(" AND c.context_object_type IS NULL");
            }
            None => {}
        }
        let (cmp, dir) = direction_sql(query.direction);
        let start_date = match (query.start_date, &query.after_id) {
            (Some(start_date), _) => Some(start_date),
            (None, Some(after_id)) => {
                // Paging by id alone: the anchor conversation supplies the date.
                let anchor = self
                    .engine
                    .query(
                        "SELECT last_activity_at FROM conversations WHERE application_id = $1 AND id = $2",
                        &[application_id.into(), after_id.into()],
                    )
                    .await?;
                let Some(anchor) = anchor.first() else {
                    return Ok(Vec::new());
                };
                Some(anchor.int(0)?)
            }
            (None, None) => None,
        };
        if let Some(start_date) = start_date {
            let date = sql.bind(start_date);
            match &query.after_id {
                Some(after_id) => {
                    let id = sql.bind(after_id);
                    sql.push(&format!(
                        " AND (c.last_activity_at {cmp} {date} OR (c.last_activity_at = {date} AND c.id {cmp} {id}))"
                    ));
                }
                None => {
                    sql.push(&format!(" AND c.last_activity_at {cmp} {date}"));
                }
            }
        }
        sql.push(&format!(" ORDER BY c.last_activity_at {dir}, c.id {dir} LIMIT ")).push_bind(i64::from(query.limit));
        fetch_conversations(&mut self.auto(), application_id, sql).await
    }

    async fn conversation_list(&self, application_id: &str, user_id: &str, pad_to: usize) -> Result<Vec<Conversation>> {
        let build = |unread: bool| {
            let mut sql = conversation_select(application_id);
            // The list is what the user sees: API-only (not displayed) conversations stay out.
            sql.push(" AND c.context_object_type IS NULL AND c.displayed = TRUE");
            let user = push_accessible_to(&mut sql, user_id);
            let app = "$1";
            sql.push(if unread { " AND " } else { " AND NOT " });
            sql.push(&format!(
                "(EXISTS (SELECT 1 FROM unread_counters u WHERE u.application_id = {app} AND u.user_id = {user} \
                 AND u.conversation_id = c.id AND u.unread > 0) \
                 OR EXISTS (SELECT 1 FROM conversation_members m WHERE m.application_id = {app} \
                 AND m.conversation_id = c.id AND m.user_id = {user} AND {BROADCAST_UNREAD} > 0 \
                 AND {NOTIFIABLE_MEMBER}))"
            ));
            sql.push(" ORDER BY c.last_activity_at DESC, c.id DESC");
            sql
        };
        let mut list = fetch_conversations(&mut self.auto(), application_id, build(true)).await?;
        if list.len() < pad_to {
            let mut rest = build(false);
            rest.push(" LIMIT ").push_bind(i64::try_from(pad_to - list.len()).unwrap_or(i64::MAX));
            list.extend(fetch_conversations(&mut self.auto(), application_id, rest).await?);
        }
        Ok(list)
    }

    async fn set_context_access(
        &self,
        application_id: &str,
        conversation_id: &str,
        grant_user_ids: &[String],
        revoke_user_ids: &[String],
        all_application_users: Option<bool>,
    ) -> Result<Option<ConversationEvent>> {
        let mut tx = self.engine.begin().await?;
        let ids: [Value; 2] = [application_id.into(), conversation_id.into()];
        let rows = tx
            .query(
                "SELECT context_object_type, all_application_users FROM conversations \
                 WHERE application_id = $1 AND id = $2",
                &ids,
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(conversation_not_found(conversation_id));
        };
        if row.opt_text(0)?.is_none() {
            return Err(Error::invalid("conversationId", "access rights apply to context conversations only"));
        }
        let everyone_before = row.bool(1)?;
        for chunk in grant_user_ids.chunks(CHUNK) {
            let mut sql =
                SqlBuilder::new("INSERT INTO context_access (application_id, conversation_id, user_id) VALUES ");
            push_pair_rows(&mut sql, application_id, conversation_id, chunk);
            sql.push(" ON CONFLICT (application_id, conversation_id, user_id) DO NOTHING");
            tx.execute(&sql.sql, &sql.params).await?;
        }
        let mut revoked = 0;
        for chunk in revoke_user_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("DELETE FROM context_access WHERE application_id = ");
            sql.push_bind(application_id).push(" AND conversation_id = ").push_bind(conversation_id);
            sql.push(" AND user_id IN ").push_in_list(chunk);
            revoked += tx.execute(&sql.sql, &sql.params).await?;
        }
        if let Some(all) = all_application_users {
            tx.execute(
                "UPDATE conversations SET all_application_users = $3 WHERE application_id = $1 AND id = $2",
                &[ids[0].clone(), ids[1].clone(), all.into()],
            )
            .await?;
        }
        // Losing access is logged like a membership change: gateways see it
        // on the conversation's topic in seq order with the messages, and end
        // the subscriptions of users who lost access before the next event.
        let lost_access = revoked > 0 || (everyone_before && all_application_users == Some(false));
        if !lost_access {
            tx.commit().await?;
            return Ok(None);
        }
        let seq = bump_seq(tx.as_mut(), application_id, conversation_id).await?;
        let conversation = fetch_conversation(tx.as_mut(), application_id, conversation_id)
            .await?
            .ok_or_else(|| Error::internal("conversation vanished inside its own access change"))?;
        let event = ConversationEvent {
            conversation_id: conversation_id.to_owned(),
            seq,
            at: now_micros(),
            kind: EventKind::ConversationChanged(conversation.clone()),
        };
        insert_event(tx.as_mut(), application_id, &event).await?;
        let changed = ApplicationEvent {
            conversation_id: conversation_id.to_owned(),
            seq,
            at: event.at,
            kind: ApplicationEventKind::ConversationChanged {
                conversation,
                added_member_ids: Vec::new(),
                removed_member_ids: Vec::new(),
            },
        };
        insert_outbox(tx.as_mut(), application_id, &changed).await?;
        tx.commit().await?;
        tracing::debug!(application_id, conversation_id, seq, "context access revoked");
        Ok(Some(event))
    }

    async fn has_context_access(&self, application_id: &str, conversation_id: &str, user_id: &str) -> Result<bool> {
        let rows = self
            .engine
            .query(
                "SELECT c.all_application_users, EXISTS (SELECT 1 FROM context_access a WHERE a.application_id = $1 \
                 AND a.conversation_id = $2 AND a.user_id = $3) FROM conversations c \
                 WHERE c.application_id = $1 AND c.id = $2",
                &[application_id.into(), conversation_id.into(), user_id.into()],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(row.bool(0)? || row.bool(1)?),
            None => Ok(false),
        }
    }

    // ---- messages and the event log

    async fn append_message(&self, application_id: &str, new_message: &NewMessage) -> Result<AppendOutcome> {
        // One job: on SQLite the whole append, all its statements, runs inside
        // the writer thread in one hand-over and is group-committed with its
        // neighbours in a savepoint of its own (`Engine::run_job`).
        let (owned_application_id, owned_message) = (application_id.to_owned(), new_message.clone());
        let appended = transaction(self.engine(), move |tx| {
            Box::pin(async move { Self::append_in_transaction(tx, &owned_application_id, &owned_message).await })
        })
        .await?;
        match appended {
            Appended::Done(outcome) => Ok(*outcome),
            Appended::ClientIdTaken => {
                let message = &new_message.message;
                let client_message_id = message.client_message_id.as_deref().unwrap_or_default();
                let existing = find_by_client_id(&mut self.auto(), application_id, message, client_message_id)
                    .await?
                    .ok_or_else(|| Error::internal("message with this client message id vanished"))?;
                Ok(AppendOutcome { message: existing, event: None, unread: Vec::new() })
            }
        }
    }

    async fn edit_message(&self, application_id: &str, message: &Message) -> Result<(Message, ConversationEvent)> {
        let edited_at = message.edited_at.unwrap_or_else(now_micros);
        let mut tx = self.engine.begin().await?;
        let changed = tx
            .execute(
                "UPDATE messages SET body = $3, body_lower = $4, text_format = $5, data_mime_type = $6, \
                 data_content = $7, buttons = $8, edited_at = $9 \
                 WHERE application_id = $1 AND id = $2 AND deleted = FALSE",
                &[
                    application_id.into(),
                    (&message.id).into(),
                    (&message.text).into(),
                    message.text.to_lowercase().into(),
                    text_format_str(message.text_format).into(),
                    message.data.as_ref().map(|data| &data.mime_type).into(),
                    message.data.as_ref().map(|data| data.content.as_slice()).into(),
                    encode_buttons(message.buttons.as_ref())?.into(),
                    edited_at.into(),
                ],
            )
            .await?;
        let (stored, event) = finish_message_change(
            tx.as_mut(),
            application_id,
            &message.id,
            changed,
            edited_at,
            EventKind::MessageEdited,
        )
        .await?;
        tx.commit().await?;
        Ok((stored, event))
    }

    async fn delete_message(
        &self,
        application_id: &str,
        message_id: &str,
        at: Micros,
    ) -> Result<(Message, ConversationEvent)> {
        let mut tx = self.engine.begin().await?;
        let changed = tx
            .execute(
                "UPDATE messages SET deleted = TRUE, body = '', body_lower = '', data_mime_type = NULL, \
                 data_content = NULL, buttons = NULL WHERE application_id = $1 AND id = $2 AND deleted = FALSE",
                &[application_id.into(), message_id.into()],
            )
            .await?;
        let (stored, event) =
            finish_message_change(tx.as_mut(), application_id, message_id, changed, at, EventKind::MessageDeleted)
                .await?;
        tx.commit().await?;
        Ok((stored, event))
    }

    async fn get_message(&self, application_id: &str, message_id: &str) -> Result<Option<Message>> {
        fetch_message(&mut self.auto(), application_id, message_id).await
    }

    async fn list_messages(&self, application_id: &str, query: &MessageQuery) -> Result<Vec<Message>> {
        let mut sql = SqlBuilder::new(&format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.application_id = "));
        let app = sql.bind(application_id);
        let conversation = sql.bind(&query.conversation_id);
        sql.push(&format!("{app} AND m.conversation_id = {conversation}"));
        if !query.include_deleted {
            sql.push(" AND m.deleted = FALSE");
        }
        if let Some(author_id) = &query.author_id {
            sql.push(" AND m.author_id = ").push_bind(author_id);
        }
        if let Some(start_date) = query.start_date {
            sql.push(" AND m.sent_at >= ").push_bind(start_date);
        }
        if let Some(end_date) = query.end_date {
            sql.push(" AND m.sent_at <= ").push_bind(end_date);
        }
        if let Some(needle) = &query.text_contains {
            sql.push(" AND m.body_lower LIKE ").push_bind(contains_pattern(needle)).push(" ESCAPE '\\'");
        }
        let (cmp, dir) = direction_sql(query.direction);
        if let Some(after) = &query.after {
            // An unknown anchor makes the comparison NULL: an empty page.
            let after = sql.bind(after);
            sql.push(&format!(
                " AND m.seq {cmp} (SELECT a.seq FROM messages a WHERE a.application_id = {app} \
                 AND a.conversation_id = {conversation} AND a.id = {after})"
            ));
        }
        sql.push(&format!(" ORDER BY m.seq {dir} LIMIT ")).push_bind(i64::from(query.limit));
        let rows = self.engine.query(&sql.sql, &sql.params).await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn events_after(
        &self,
        application_id: &str,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ConversationEvent>> {
        let rows = self
            .engine
            .query(
                "SELECT seq, at, payload FROM conversation_events WHERE application_id = $1 AND conversation_id = $2 \
                 AND seq > $3 ORDER BY seq LIMIT $4",
                &[application_id.into(), conversation_id.into(), after_seq.into(), i64::from(limit).into()],
            )
            .await?;
        events_from_rows(conversation_id, &rows)
    }

    async fn events_after_within(
        &self,
        application_id: &str,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<ConversationEvent>> {
        // The running total is computed by the database, so rows past the
        // budget are never handed to this process. `octet_length` is the
        // same function in SQLite (3.43+) and PostgreSQL.
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = self
            .engine
            .query(
                "SELECT seq, at, payload FROM (SELECT seq, at, payload, \
                 SUM(octet_length(payload)) OVER (ORDER BY seq) - octet_length(payload) AS before \
                 FROM conversation_events WHERE application_id = $1 AND conversation_id = $2 \
                 AND seq > $3 ORDER BY seq LIMIT $4) page WHERE before = 0 OR before + octet_length(payload) <= $5 \
                 ORDER BY seq",
                &[
                    application_id.into(),
                    conversation_id.into(),
                    after_seq.into(),
                    i64::from(limit).into(),
                    max_bytes.into(),
                ],
            )
            .await?;
        events_from_rows(conversation_id, &rows)
    }

    // ---- notifications

    async fn set_watch_mode(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_id: &str,
        watch: bool,
    ) -> Result<()> {
        let mut tx = self.engine.begin().await?;
        // The row lock orders the change with appends: a broadcast counts for
        // the member exactly when it committed before watching was switched off
        // or after it was switched back on.
        let rows = tx
            .query(
                "UPDATE conversations SET notify_count = notify_count WHERE application_id = $1 AND id = $2 \
                 RETURNING notify_count",
                &[application_id.into(), conversation_id.into()],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(conversation_not_found(conversation_id));
        };
        let notify_count = row.uint(0)?;
        let key: [Value; 3] = [application_id.into(), conversation_id.into(), user_id.into()];
        tx.execute(
            "INSERT INTO watch_modes (application_id, conversation_id, user_id, watch) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (application_id, conversation_id, user_id) DO UPDATE SET watch = excluded.watch",
            &[key[0].clone(), key[1].clone(), key[2].clone(), watch.into()],
        )
        .await?;
        let with_count = [key[0].clone(), key[1].clone(), key[2].clone(), notify_count.into()];
        if watch {
            // The muted period becomes a gap, so that a later partial MarkRead
            // still leaves its broadcasts out.
            tx.execute(
                "INSERT INTO watch_gaps (application_id, user_id, conversation_id, from_count, to_count) \
                 SELECT m.application_id, m.user_id, m.conversation_id, m.muted_at, $4 FROM conversation_members m \
                 WHERE m.application_id = $1 AND m.conversation_id = $2 AND m.user_id = $3 \
                 AND m.muted_at IS NOT NULL AND m.muted_at < $4 \
                 ON CONFLICT (application_id, user_id, conversation_id, from_count) \
                 DO UPDATE SET to_count = excluded.to_count",
                &with_count,
            )
            .await?;
            tx.execute(
                "UPDATE conversation_members SET skipped = skipped + ($4 - muted_at), muted_at = NULL \
                 WHERE application_id = $1 AND conversation_id = $2 AND user_id = $3 AND muted_at IS NOT NULL",
                &with_count,
            )
            .await?;
        } else {
            tx.execute(
                "UPDATE conversation_members SET muted_at = $4 \
                 WHERE application_id = $1 AND conversation_id = $2 AND user_id = $3 AND muted_at IS NULL",
                &with_count,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_watch_mode(&self, application_id: &str, conversation_id: &str, user_id: &str) -> Result<Option<bool>> {
        let rows = self
            .engine
            .query(
                "SELECT watch FROM watch_modes WHERE application_id = $1 AND conversation_id = $2 AND user_id = $3",
                &[application_id.into(), conversation_id.into(), user_id.into()],
            )
            .await?;
        rows.first().map(|row| row.bool(0)).transpose()
    }

    async fn notification_audience(&self, application_id: &str, conversation_id: &str) -> Result<NotificationAudience> {
        let rows = self
            .engine
            .query(
                "SELECT user_id, watch FROM watch_modes WHERE application_id = $1 AND conversation_id = $2",
                &[application_id.into(), conversation_id.into()],
            )
            .await?;
        let mut watch_modes = rows.iter().map(|row| Ok((row.text(0)?, row.bool(1)?))).collect::<Result<Vec<_>>>()?;
        watch_modes.sort();
        Ok(NotificationAudience { watch_modes })
    }

    async fn set_do_not_disturb(
        &self,
        application_id: &str,
        user_id: &str,
        conversation_id: Option<&str>,
        until: Option<Micros>,
    ) -> Result<()> {
        let scope = conversation_id.unwrap_or_default();
        match until {
            Some(until) => {
                self.engine
                    .execute(
                        "INSERT INTO do_not_disturb (application_id, user_id, conversation_id, until_at) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (application_id, user_id, conversation_id) \
                         DO UPDATE SET until_at = excluded.until_at",
                        &[application_id.into(), user_id.into(), scope.into(), until.into()],
                    )
                    .await?;
            }
            None => {
                self.engine
                    .execute(
                        "DELETE FROM do_not_disturb WHERE application_id = $1 AND user_id = $2 AND conversation_id = $3",
                        &[application_id.into(), user_id.into(), scope.into()],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn get_do_not_disturb(
        &self,
        application_id: &str,
        user_id: &str,
        conversation_id: Option<&str>,
    ) -> Result<DoNotDisturbState> {
        let rows = self
            .engine
            .query(
                "SELECT conversation_id, until_at FROM do_not_disturb WHERE application_id = $1 AND user_id = $2 \
                 AND conversation_id IN ('', $3)",
                &[application_id.into(), user_id.into(), conversation_id.unwrap_or_default().into()],
            )
            .await?;
        let mut state = DoNotDisturbState::default();
        for row in &rows {
            let until = row.int(1)?;
            if row.text(0)?.is_empty() {
                state.user_until = Some(until);
            } else {
                state.conversation_until = Some(until);
            }
        }
        Ok(state)
    }

    async fn silenced_users(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_ids: &[String],
        now: Micros,
    ) -> Result<Vec<String>> {
        let mut silenced = HashSet::new();
        for chunk in user_ids.chunks(CHUNK) {
            let mut sql = SqlBuilder::new("SELECT DISTINCT user_id FROM do_not_disturb WHERE application_id = ");
            sql.push_bind(application_id).push(" AND conversation_id IN ('', ");
            sql.push_bind(conversation_id).push(") AND until_at > ");
            sql.push_bind(now).push(" AND user_id IN ").push_in_list(chunk);
            for row in self.engine.query(&sql.sql, &sql.params).await? {
                silenced.insert(row.text(0)?);
            }
        }
        Ok(user_ids.iter().filter(|id| silenced.contains(*id)).cloned().collect())
    }

    async fn mark_read(
        &self,
        application_id: &str,
        conversation_id: &str,
        user_id: &str,
        up_to_seq: u64,
    ) -> Result<u32> {
        let mut tx = self.engine.begin().await?;
        let ids: [Value; 3] = [application_id.into(), user_id.into(), conversation_id.into()];
        // A no-op UPDATE for the row lock: an append to this conversation
        // cannot commit between reading its notify_count and recounting.
        let rows = tx
            .query(
                "UPDATE conversations SET notify_count = notify_count WHERE application_id = $1 AND id = $2 \
                 RETURNING last_seq, notify_count",
                &[ids[0].clone(), ids[2].clone()],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(conversation_not_found(conversation_id));
        };
        let notify_count = row.uint(1)?;
        // A mark beyond the last seq would silently pre-read messages that
        // do not exist yet.
        let mark = up_to_seq.min(row.uint(0)?);
        tx.execute(
            "INSERT INTO read_marks (application_id, user_id, conversation_id, read_seq) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (application_id, user_id, conversation_id) DO UPDATE SET read_seq = \
             CASE WHEN read_marks.read_seq < excluded.read_seq THEN excluded.read_seq ELSE read_marks.read_seq END",
            &[ids[0].clone(), ids[1].clone(), ids[2].clone(), mark.into()],
        )
        .await?;
        // Notifications at or below the mark can never count again.
        tx.execute(
            "DELETE FROM notifications WHERE application_id = $1 AND user_id = $2 AND conversation_id = $3 \
             AND seq <= (SELECT r.read_seq FROM read_marks r WHERE r.application_id = $1 AND r.user_id = $2 \
             AND r.conversation_id = $3)",
            &ids,
        )
        .await?;
        let rows = tx
            .query(
                "SELECT COUNT(*) FROM notifications WHERE application_id = $1 AND user_id = $2 AND conversation_id = $3",
                &ids,
            )
            .await?;
        let unread = rows.first().map_or(Ok(0), |row| row.uint(0))?;
        tx.execute(
            "INSERT INTO unread_counters (application_id, user_id, conversation_id, unread) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (application_id, user_id, conversation_id) DO UPDATE SET unread = excluded.unread",
            &[ids[0].clone(), ids[1].clone(), ids[2].clone(), unread.into()],
        )
        .await?;
        let broadcasts =
            recount_member_broadcasts(tx.as_mut(), application_id, conversation_id, user_id, notify_count).await?;
        tx.commit().await?;
        Ok(saturate(unread + broadcasts))
    }

    async fn unread_counts(&self, application_id: &str, user_id: &str) -> Result<Vec<(String, u32)>> {
        let rows = self
            .engine
            .query(
                &format!(
                    "SELECT x.conversation_id, CAST(SUM(x.n) AS BIGINT) FROM (\
                     SELECT conversation_id, unread AS n FROM unread_counters \
                     WHERE application_id = $1 AND user_id = $2 \
                     UNION ALL SELECT m.conversation_id, {BROADCAST_UNREAD} AS n FROM conversation_members m \
                     JOIN conversations c ON c.application_id = m.application_id AND c.id = m.conversation_id \
                     WHERE m.application_id = $1 AND m.user_id = $2 AND {NOTIFIABLE_MEMBER}) x \
                     GROUP BY x.conversation_id HAVING SUM(x.n) > 0"
                ),
                &[application_id.into(), user_id.into()],
            )
            .await?;
        let mut counts =
            rows.iter().map(|row| Ok((row.text(0)?, saturate(row.uint(1)?)))).collect::<Result<Vec<_>>>()?;
        counts.sort();
        Ok(counts)
    }
}

// ---- helpers shared by transactions and autocommit reads

/// The parameters of the users table in column order: `$1` application id,
/// `$2` id, then every property ($3..$17), then creation time ($18) when
/// inserting. Insert and update bind the same list so they cannot disagree.
fn user_params(application_id: &str, user: &User, with_created_at: bool) -> Vec<Value> {
    let mut params: Vec<Value> = vec![
        application_id.into(),
        (&user.id).into(),
        user.kind.as_str().into(),
        (&user.name).into(),
        user.name.to_lowercase().into(),
        (&user.full_name).into(),
        user.full_name.to_lowercase().into(),
        user.picture.as_slice().into(),
        (&user.phone).into(),
        (&user.email).into(),
        (&user.matching_key).into(),
        user.infobase_user_id.as_ref().into(),
        user.blocked.into(),
        user.subscriber_administrator.into(),
        (&user.external_system_type).into(),
        (&user.external_system_user_id).into(),
        (&user.authentication_email).into(),
    ];
    if with_created_at {
        params.push(user.created_at.into());
    }
    params
}

fn saturate(count: u64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn conversation_not_found(conversation_id: &str) -> Error {
    Error::new(ErrorCode::ConversationNotFound, format!("conversation {conversation_id} not found"))
}

fn user_write_error(error: DbError) -> Error {
    let message = match &error {
        DbError::Unique { constraint } if constraint == "users_infobase_uq" => {
            "a user with this infobase user id already exists in the application"
        }
        DbError::Unique { constraint } if constraint == "users_external_uq" => {
            "a user with this external system user id already exists in the application"
        }
        DbError::Unique { constraint } if constraint == "users_pkey" => "a user with this id already exists",
        _ => return error.into(),
    };
    Error::new(ErrorCode::UserExists, message)
}

/// The comparison and ORDER BY keyword for a direction.
fn direction_sql(direction: SortDirection) -> (&'static str, &'static str) {
    match direction {
        SortDirection::Ascending => (">", "ASC"),
        SortDirection::Descending => ("<", "DESC"),
    }
}

fn conversation_select(application_id: &str) -> SqlBuilder {
    let mut sql =
        SqlBuilder::new(&format!("SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = "));
    // $1 is the application id in every conversation query built here.
    sql.push_bind(application_id);
    sql
}

/// Appends the access rule for `user_id` and returns its placeholder.
fn push_accessible_to(sql: &mut SqlBuilder, user_id: &str) -> String {
    let user = sql.bind(user_id);
    sql.push(&format!(
        " AND (c.all_application_users = TRUE \
         OR EXISTS (SELECT 1 FROM conversation_members cm WHERE cm.application_id = $1 \
         AND cm.conversation_id = c.id AND cm.user_id = {user}) \
         OR (c.context_object_type IS NOT NULL AND EXISTS (SELECT 1 FROM context_access ca \
         WHERE ca.application_id = $1 AND ca.conversation_id = c.id AND ca.user_id = {user})))"
    ));
    user
}

/// Appends `($app, $conversation, $user), ...` rows for a multi-row INSERT.
fn push_pair_rows(sql: &mut SqlBuilder, application_id: &str, conversation_id: &str, user_ids: &[String]) {
    let app = sql.bind(application_id);
    let conversation = sql.bind(conversation_id);
    for (index, user_id) in user_ids.iter().enumerate() {
        let user = sql.bind(user_id);
        let separator = if index == 0 { "" } else { ", " };
        sql.push(&format!("{separator}({app}, {conversation}, {user})"));
    }
}

/// Integration users are never notified (§29.3.4), so broadcasts never
/// count for them: their member rows (`notifiable = FALSE`, copied from the
/// user's kind when they join; a kind never changes) are left out of every
/// unread count instead of being written to on each message.
const NOTIFIABLE_MEMBER: &str = "m.notifiable = TRUE";

/// A member's unread broadcasts (`m` a conversation_members row, `c` its
/// conversation): frozen while watching is off.
const BROADCAST_UNREAD: &str = "COALESCE(m.muted_at, c.notify_count) - m.skipped";

/// How the notifications of one new message are stored.
#[derive(Debug, Default, PartialEq, Eq)]
struct NotifyPlan {
    /// The message notifies the members' audience: it bumps the
    /// conversation's notify_count instead of writing a row per member.
    broadcast: bool,
    /// Members of that audience it does not notify after all (blocked users):
    /// one exclusion row each.
    excluded: Vec<String>,
    /// Users notified outside it: one notification row each.
    per_user: Vec<String>,
}

impl NotifyPlan {
    fn per_user(notify: &[String]) -> Self {
        NotifyPlan { broadcast: false, excluded: Vec::new(), per_user: notify.to_vec() }
    }

    /// Whichever way writes fewer rows: a broadcast with its differences
    /// from the members' audience (none when routing notified exactly the
    /// watching members, the usual case), or one row per notified user.
    fn choose(audience: &HashSet<String>, notify: &[String]) -> Self {
        let notified: HashSet<&str> = notify.iter().map(String::as_str).collect();
        let mut excluded: Vec<String> = audience.iter().filter(|id| !notified.contains(id.as_str())).cloned().collect();
        excluded.sort();
        let outside: Vec<String> = notify.iter().filter(|id| !audience.contains(*id)).cloned().collect();
        if excluded.len() + outside.len() < notify.len() {
            NotifyPlan { broadcast: true, excluded, per_user: outside }
        } else {
            Self::per_user(notify)
        }
    }
}

/// What a member row says about a member's counts before a new message.
struct MemberCounts {
    skipped: u64,
    muted_at: Option<u64>,
    /// An integration user: never notified, never counted.
    integration: bool,
    /// Unread per-user notifications in this conversation.
    per_user: u64,
}

impl MemberCounts {
    /// Whether a broadcast counts for them (the author aside): watching,
    /// and of a kind that is notified at all. Users unknown to the users
    /// table are kept; routing never names them, so they are excluded.
    fn in_audience(&self) -> bool {
        self.muted_at.is_none() && !self.integration
    }

    /// Unread broadcasts once the conversation's counter is `notify_count`,
    /// `skipped_now` if the new message was skipped for them.
    fn unread_broadcasts(&self, notify_count: u64, skipped_now: bool) -> u64 {
        if self.integration {
            return 0;
        }
        let skipped = self.skipped + u64::from(skipped_now && self.muted_at.is_none());
        self.muted_at.unwrap_or(notify_count).saturating_sub(skipped)
    }
}

/// Every member row of the conversation with its per-user count: two range
/// scans without a list of users, so their plans do not depend on the
/// audience (and no join whose plan could, on a table without statistics).
async fn member_counts<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    conversation_id: &str,
) -> Result<HashMap<String, MemberCounts>> {
    let key: [Value; 2] = [application_id.into(), conversation_id.into()];
    let rows = ex
        .query(
            "SELECT user_id, skipped, muted_at, notifiable FROM conversation_members \
             WHERE application_id = $1 AND conversation_id = $2",
            &key,
        )
        .await?;
    let mut members = rows
        .iter()
        .map(|row| {
            let muted_at = row.opt_int(2)?.map(i64::unsigned_abs);
            let member = MemberCounts { skipped: row.uint(1)?, muted_at, integration: !row.bool(3)?, per_user: 0 };
            Ok((row.text(0)?, member))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let rows = ex
        .query(
            "SELECT user_id, unread FROM unread_counters WHERE application_id = $1 AND conversation_id = $2 \
             AND unread > 0",
            &key,
        )
        .await?;
    for row in &rows {
        if let Some(member) = members.get_mut(&row.text(0)?) {
            member.per_user = row.uint(1)?;
        }
    }
    Ok(members)
}

/// Rows `(application, conversation, seq, user)` for a multi-row INSERT.
fn push_user_rows(sql: &mut SqlBuilder, application_id: &str, conversation_id: &str, seq: u64, user_ids: &[String]) {
    let (app, conversation, seq) = (sql.bind(application_id), sql.bind(conversation_id), sql.bind(seq));
    for (index, user_id) in user_ids.iter().enumerate() {
        let user = sql.bind(user_id);
        let separator = if index == 0 { "" } else { ", " };
        sql.push(&format!("{separator}({app}, {conversation}, {seq}, {user})"));
    }
}

/// After a MarkRead: recounts the user's unread broadcasts from their read
/// mark (if they are a notified member) and stores the matching `skipped`.
/// It reads only messages after the mark, so marking everything read reads
/// none; exclusions at or below the mark can never matter again.
async fn recount_member_broadcasts<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    conversation_id: &str,
    user_id: &str,
    notify_count: u64,
) -> Result<u64> {
    let key: [Value; 3] = [application_id.into(), conversation_id.into(), user_id.into()];
    let sql = format!(
        "SELECT m.joined_seq, m.muted_at, r.read_seq FROM conversation_members m JOIN read_marks r \
         ON r.application_id = m.application_id AND r.conversation_id = m.conversation_id AND r.user_id = m.user_id \
         WHERE m.application_id = $1 AND m.conversation_id = $2 AND m.user_id = $3 AND {NOTIFIABLE_MEMBER}"
    );
    let rows = ex.query(&sql, &key).await?;
    let Some(row) = rows.first() else {
        return Ok(0);
    };
    let from_seq = row.uint(0)?.max(row.uint(2)?);
    let muted_at = row.opt_int(1)?;
    let mut sql = SqlBuilder::new("SELECT COUNT(*) FROM messages x WHERE x.application_id = ");
    let (app, conversation, user) = (sql.bind(application_id), sql.bind(conversation_id), sql.bind(user_id));
    sql.push(&format!(
        "{app} AND x.conversation_id = {conversation} AND x.broadcast = TRUE AND x.author_id <> {user} AND x.seq > "
    ));
    sql.push_bind(from_seq);
    if let Some(muted_at) = muted_at {
        sql.push(" AND x.notify_count <= ").push_bind(muted_at);
    }
    sql.push(&format!(
        " AND NOT EXISTS (SELECT 1 FROM notification_exclusions e WHERE e.application_id = {app} \
         AND e.conversation_id = {conversation} AND e.user_id = {user} AND e.seq = x.seq) \
         AND NOT EXISTS (SELECT 1 FROM watch_gaps g WHERE g.application_id = {app} \
         AND g.conversation_id = {conversation} AND g.user_id = {user} \
         AND x.notify_count > g.from_count AND x.notify_count <= g.to_count)"
    ));
    let rows = ex.query(&sql.sql, &sql.params).await?;
    let remaining = rows.first().map_or(Ok(0), |row| row.uint(0))?;
    let frozen_at =
        muted_at.map_or(Ok(notify_count), u64::try_from).map_err(|_| Error::internal("negative muted_at"))?;
    ex.execute(
        "UPDATE conversation_members SET skipped = $4 WHERE application_id = $1 AND conversation_id = $2 AND user_id = $3",
        &[key[0].clone(), key[1].clone(), key[2].clone(), frozen_at.saturating_sub(remaining).into()],
    )
    .await?;
    ex.execute(
        "DELETE FROM notification_exclusions WHERE application_id = $1 AND conversation_id = $2 AND user_id = $3 \
         AND seq <= $4",
        &[key[0].clone(), key[1].clone(), key[2].clone(), from_seq.into()],
    )
    .await?;
    Ok(remaining)
}

async fn insert_members<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    conversation_id: &str,
    user_ids: &[String],
    joined_seq: u64,
    skipped: u64,
) -> Result<()> {
    for chunk in user_ids.chunks(CHUNK) {
        let mut sql = SqlBuilder::new(
            "INSERT INTO conversation_members (application_id, conversation_id, user_id, joined_seq, skipped) VALUES ",
        );
        let (app, conversation) = (sql.bind(application_id), sql.bind(conversation_id));
        let (joined, skipped) = (sql.bind(joined_seq), sql.bind(skipped));
        for (index, user_id) in chunk.iter().enumerate() {
            let user = sql.bind(user_id);
            let separator = if index == 0 { "" } else { ", " };
            sql.push(&format!("{separator}({app}, {conversation}, {user}, {joined}, {skipped})"));
        }
        // Someone already a member keeps their row and counts.
        sql.push(" ON CONFLICT (application_id, conversation_id, user_id) DO NOTHING");
        ex.execute(&sql.sql, &sql.params).await?;
        let mut sql = SqlBuilder::new("UPDATE conversation_members SET notifiable = FALSE WHERE application_id = ");
        sql.push_bind(application_id).push(" AND conversation_id = ").push_bind(conversation_id);
        sql.push(" AND user_id IN ").push_in_list(chunk);
        sql.push(
            " AND EXISTS (SELECT 1 FROM users k WHERE k.application_id = conversation_members.application_id \
             AND k.id = conversation_members.user_id AND k.kind = 'integration')",
        );
        ex.execute(&sql.sql, &sql.params).await?;
    }
    Ok(())
}

async fn member_ids<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    conversation_id: &str,
) -> Result<HashSet<String>> {
    let rows = ex
        .query(
            "SELECT user_id FROM conversation_members WHERE application_id = $1 AND conversation_id = $2",
            &[application_id.into(), conversation_id.into()],
        )
        .await?;
    rows.iter().map(|row| row.text(0)).collect()
}

/// The members a change really added and really removed, in the order the
/// change named them: asking to add a member or remove a stranger is no change.
fn membership_delta(
    before: &HashSet<String>,
    after: &Conversation,
    change: &ConversationChange,
) -> (Vec<String>, Vec<String>) {
    let after: HashSet<&str> = after.member_ids.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    let added = change
        .add_member_ids
        .iter()
        .filter(|id| !before.contains(*id) && after.contains(id.as_str()) && seen.insert(id.as_str()))
        .cloned()
        .collect();
    let mut seen = HashSet::new();
    let removed = change
        .remove_member_ids
        .iter()
        .filter(|id| before.contains(*id) && !after.contains(id.as_str()) && seen.insert(id.as_str()))
        .cloned()
        .collect();
    (added, removed)
}

async fn bump_seq<E: Executor + ?Sized>(ex: &mut E, application_id: &str, conversation_id: &str) -> Result<u64> {
    let rows = ex.query(BUMP_SEQ, &[application_id.into(), conversation_id.into()]).await?;
    match rows.first() {
        Some(row) => row.uint(0),
        None => Err(conversation_not_found(conversation_id)),
    }
}

async fn insert_event<E: Executor + ?Sized>(ex: &mut E, application_id: &str, event: &ConversationEvent) -> Result<()> {
    let payload = serde_json::to_string(&event.kind)
        .map_err(|error| Error::internal(format!("event does not serialize: {error}")))?;
    ex.execute(
        "INSERT INTO conversation_events (application_id, conversation_id, seq, at, payload) VALUES ($1, $2, $3, $4, $5)",
        &[application_id.into(), (&event.conversation_id).into(), event.seq.into(), event.at.into(), payload.into()],
    )
    .await?;
    Ok(())
}

/// Rows of one conversation query, with their members.
async fn fetch_conversations<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    sql: SqlBuilder,
) -> Result<Vec<Conversation>> {
    let rows = ex.query(&sql.sql, &sql.params).await?;
    let mut conversations = rows.iter().map(conversation_from_row).collect::<Result<Vec<_>>>()?;
    if conversations.is_empty() {
        return Ok(conversations);
    }
    let ids: Vec<String> = conversations.iter().map(|conversation| conversation.id.clone()).collect();
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in ids.chunks(CHUNK) {
        let mut sql =
            SqlBuilder::new("SELECT conversation_id, user_id FROM conversation_members WHERE application_id = ");
        sql.push_bind(application_id).push(" AND conversation_id IN ").push_in_list(chunk);
        for row in ex.query(&sql.sql, &sql.params).await? {
            members.entry(row.text(0)?).or_default().push(row.text(1)?);
        }
    }
    for conversation in &mut conversations {
        let mut ids = members.remove(&conversation.id).unwrap_or_default();
        ids.sort();
        conversation.member_ids = ids;
    }
    Ok(conversations)
}

async fn fetch_conversation<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    conversation_id: &str,
) -> Result<Option<Conversation>> {
    let mut sql = conversation_select(application_id);
    sql.push(" AND c.id = ").push_bind(conversation_id);
    Ok(fetch_conversations(ex, application_id, sql).await?.pop())
}

async fn fetch_message<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    message_id: &str,
) -> Result<Option<Message>> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.application_id = $1 AND m.id = $2");
    let rows = ex.query(&sql, &[application_id.into(), message_id.into()]).await?;
    rows.first().map(message_from_row).transpose()
}

async fn find_by_client_id<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    message: &Message,
    client_message_id: &str,
) -> Result<Option<Message>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.application_id = $1 AND m.conversation_id = $2 \
         AND m.author_id = $3 AND m.client_message_id = $4"
    );
    let rows = ex
        .query(
            &sql,
            &[
                application_id.into(),
                (&message.conversation_id).into(),
                (&message.author_id).into(),
                client_message_id.into(),
            ],
        )
        .await?;
    rows.first().map(message_from_row).transpose()
}

async fn insert_message<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    message: &Message,
    broadcast: bool,
    notify_count: u64,
) -> std::result::Result<(), DbError> {
    let recipients = serde_json::to_string(&message.recipient_ids)
        .map_err(|error| DbError::Other(format!("recipient ids do not serialize: {error}")))?;
    let buttons = encode_buttons(message.buttons.as_ref()).map_err(|error| DbError::Other(error.message))?;
    ex.execute(
        "INSERT INTO messages (application_id, id, conversation_id, seq, author_id, sent_at, body, body_lower, \
         text_format, data_mime_type, data_content, recipient_ids, buttons, client_message_id, edited_at, deleted, \
         broadcast, notify_count) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        &[
            application_id.into(),
            (&message.id).into(),
            (&message.conversation_id).into(),
            message.seq.into(),
            (&message.author_id).into(),
            message.date.into(),
            (&message.text).into(),
            message.text.to_lowercase().into(),
            text_format_str(message.text_format).into(),
            message.data.as_ref().map(|data| &data.mime_type).into(),
            message.data.as_ref().map(|data| data.content.as_slice()).into(),
            recipients.into(),
            buttons.into(),
            message.client_message_id.as_ref().into(),
            message.edited_at.into(),
            message.deleted.into(),
            broadcast.into(),
            notify_count.into(),
        ],
    )
    .await?;
    Ok(())
}

/// After an edit or delete UPDATE of `changed` rows: explains a miss, takes
/// the next seq and logs the event carrying the message's new state.
async fn finish_message_change<E: Executor + ?Sized>(
    ex: &mut E,
    application_id: &str,
    message_id: &str,
    changed: u64,
    at: Micros,
    kind: fn(Message) -> EventKind,
) -> Result<(Message, ConversationEvent)> {
    let stored = fetch_message(ex, application_id, message_id)
        .await?
        .ok_or_else(|| Error::new(ErrorCode::MessageNotFound, format!("message {message_id} not found")))?;
    if changed == 0 {
        return Err(Error::new(ErrorCode::MessageDeleted, format!("message {message_id} was deleted")));
    }
    let seq = bump_seq(ex, application_id, &stored.conversation_id).await?;
    let event =
        ConversationEvent { conversation_id: stored.conversation_id.clone(), seq, at, kind: kind(stored.clone()) };
    insert_event(ex, application_id, &event).await?;
    insert_outbox(ex, application_id, &application_event(event.clone())).await?;
    tracing::debug!(application_id, message_id, seq, "message changed");
    Ok((stored, event))
}

fn text_format_str(format: TextFormat) -> &'static str {
    match format {
        TextFormat::Plain => "plain",
        TextFormat::Formatted => "formatted",
    }
}

fn encode_buttons(buttons: Option<&ButtonPanel>) -> Result<Option<String>> {
    buttons
        .map(serde_json::to_string)
        .transpose()
        .map_err(|error| Error::internal(format!("button panel does not serialize: {error}")))
}

fn subscriber_from_row(row: &Row) -> Result<Subscriber> {
    Ok(Subscriber {
        id: row.text(0)?,
        email: row.text(1)?,
        administration_key_hash: row.opt_text(2)?,
        created_at: row.int(3)?,
    })
}

fn application_from_row(row: &Row) -> Result<Application> {
    let state = row.text(4)?;
    Ok(Application {
        id: row.text(0)?,
        subscriber_id: row.text(1)?,
        name: row.text(2)?,
        key: row.opt_text(3)?,
        state: ApplicationState::parse(&state)
            .ok_or_else(|| Error::internal(format!("stored application state {state:?} is unknown")))?,
        created_at: row.int(5)?,
    })
}

fn user_from_row(row: &Row) -> Result<User> {
    let kind = row.text(1)?;
    Ok(User {
        id: row.text(0)?,
        kind: UserKind::parse(&kind).ok_or_else(|| Error::internal(format!("stored user kind {kind:?} is unknown")))?,
        name: row.text(2)?,
        full_name: row.text(3)?,
        picture: row.bytes(4)?,
        phone: row.text(5)?,
        email: row.text(6)?,
        matching_key: row.text(7)?,
        infobase_user_id: row.opt_text(8)?,
        blocked: row.bool(9)?,
        subscriber_administrator: row.bool(10)?,
        external_system_type: row.text(11)?,
        external_system_user_id: row.text(12)?,
        authentication_email: row.text(13)?,
        created_at: row.int(14)?,
    })
}

fn conversation_from_row(row: &Row) -> Result<Conversation> {
    let context = match (row.opt_text(6)?, row.opt_text(7)?) {
        (Some(object_type), Some(object_id)) => {
            Some(ContextRef { object_type, object_id, presentation: row.opt_text(8)?.unwrap_or_default() })
        }
        _ => None,
    };
    Ok(Conversation {
        id: row.text(0)?,
        key: row.opt_text(1)?,
        title: row.text(2)?,
        displayed: row.bool(3)?,
        read_only: row.bool(4)?,
        group: row.bool(5)?,
        context,
        member_ids: Vec::new(),
        all_application_users: row.bool(9)?,
        integration_id: row.text(10)?,
        created_at: row.int(11)?,
        last_message_at: row.opt_int(12)?,
        last_seq: row.uint(13)?,
    })
}

/// Rows of `seq, at, payload` from `conversation_events`.
fn events_from_rows(conversation_id: &str, rows: &[Row]) -> Result<Vec<ConversationEvent>> {
    rows.iter()
        .map(|row| {
            let kind: EventKind = serde_json::from_str(&row.text(2)?)
                .map_err(|error| Error::internal(format!("stored event payload does not parse: {error}")))?;
            Ok(ConversationEvent {
                conversation_id: conversation_id.to_owned(),
                seq: row.uint(0)?,
                at: row.int(1)?,
                kind,
            })
        })
        .collect()
}

fn message_from_row(row: &Row) -> Result<Message> {
    let text_format = match row.text(6)?.as_str() {
        "plain" => TextFormat::Plain,
        "formatted" => TextFormat::Formatted,
        other => return Err(Error::internal(format!("stored text format {other:?} is unknown"))),
    };
    let data = match (row.opt_text(7)?, row.opt_bytes(8)?) {
        (Some(mime_type), Some(content)) => Some(MessageData { mime_type, content }),
        _ => None,
    };
    let recipient_ids = serde_json::from_str(&row.text(9)?)
        .map_err(|error| Error::internal(format!("stored recipient ids do not parse: {error}")))?;
    let buttons = row
        .opt_text(10)?
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|error| Error::internal(format!("stored button panel does not parse: {error}")))?;
    Ok(Message {
        id: row.text(0)?,
        conversation_id: row.text(1)?,
        seq: row.uint(2)?,
        author_id: row.text(3)?,
        date: row.int(4)?,
        text: row.text(5)?,
        text_format,
        data,
        recipient_ids,
        buttons,
        client_message_id: row.opt_text(11)?,
        edited_at: row.opt_int(12)?,
        deleted: row.bool(13)?,
    })
}
