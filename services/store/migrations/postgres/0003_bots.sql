-- Bots, integrations, outbound event subscriptions, the transactional outbox
-- and the delivery queue. Kept line for line in step with
-- ../sqlite/0003_bots.sql; the two differ only where DDL must (identity
-- columns; COLLATE "C" on the ids that break ties in listings).
--
-- Conventions as in 0001: JSON is TEXT, timestamps are BIGINT microseconds,
-- tenant-scoped keys start with application_id.

CREATE TABLE bots (
    application_id TEXT NOT NULL REFERENCES applications (id),
    id TEXT COLLATE "C" NOT NULL,
    user_id TEXT NOT NULL,
    bot_type TEXT NOT NULL,
    additional_parameters TEXT NOT NULL,
    predefined BOOLEAN NOT NULL,
    infobase_user_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (application_id, id)
);
CREATE UNIQUE INDEX bots_user_uq ON bots (application_id, user_id);
-- ExecuteBotProcessing declares predefined bots by type: one of each.
CREATE UNIQUE INDEX bots_predefined_uq ON bots (application_id, bot_type) WHERE predefined;

CREATE TABLE integrations (
    application_id TEXT NOT NULL REFERENCES applications (id),
    id TEXT COLLATE "C" NOT NULL,
    system_type TEXT NOT NULL,
    integration_key TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    parameters TEXT NOT NULL,
    presentation TEXT NOT NULL,
    default_member_ids TEXT NOT NULL,
    connection_token TEXT NOT NULL,
    signing_secret TEXT,
    own_user_id TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (application_id, id)
);
CREATE UNIQUE INDEX integrations_key_uq ON integrations (application_id, integration_key);
-- Global: the token alone names the tenant of a webhook request.
CREATE UNIQUE INDEX integrations_token_uq ON integrations (connection_token);

CREATE TABLE integration_users (
    application_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    ext_user_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (application_id, integration_id, ext_user_id),
    FOREIGN KEY (application_id, integration_id) REFERENCES integrations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE integration_conversations (
    application_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    ext_conversation_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    anonymous BOOLEAN NOT NULL,
    PRIMARY KEY (application_id, integration_id, ext_conversation_id),
    FOREIGN KEY (application_id, integration_id) REFERENCES integrations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE integration_messages (
    application_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    ext_conversation_id TEXT NOT NULL,
    ext_message_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (application_id, integration_id, ext_conversation_id, ext_message_id),
    FOREIGN KEY (application_id, integration_id) REFERENCES integrations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE event_subscriptions (
    application_id TEXT NOT NULL REFERENCES applications (id),
    id TEXT COLLATE "C" NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    event_kinds TEXT NOT NULL,
    conversation_ids TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (application_id, id)
);

-- Written in the transaction of each change; emptied by the relay. The id
-- is the commit order the relay preserves.
CREATE TABLE event_outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    application_id TEXT NOT NULL REFERENCES applications (id),
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    payload TEXT NOT NULL
);

-- One row per (event, consumer) until acknowledged; dead letters stay.
CREATE TABLE deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    application_id TEXT NOT NULL REFERENCES applications (id),
    consumer_kind TEXT NOT NULL,
    consumer_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    dead BOOLEAN NOT NULL,
    last_error TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- The head of each live queue (per consumer and conversation, the smallest
-- id): a claim reads one entry per conversation from here instead of
-- checking every waiting delivery for a predecessor.
CREATE INDEX deliveries_live_idx ON deliveries (application_id, consumer_kind, consumer_id, conversation_id, id)
    WHERE dead = FALSE;
-- The earliest due time of a consumer kind.
CREATE INDEX deliveries_due_idx ON deliveries (application_id, consumer_kind, dead, next_attempt_at);
-- Deliveries attempted before: the only ones a claim may turn into dead letters.
CREATE INDEX deliveries_attempted_idx ON deliveries (application_id, consumer_kind, next_attempt_at)
    WHERE dead = FALSE AND attempts > 0;

-- A replay across conversations reads the log by time.
CREATE INDEX conversation_events_at_idx ON conversation_events (application_id, at, conversation_id, seq);
