-- Beseda schema, SQLite flavour. Kept line for line in step with
-- ../postgres/0001_initial.sql; the two differ only where DDL must
-- (BLOB for BYTEA, no COLLATE "C": SQLite's default BINARY collation already
-- orders text by code point).
--
-- Conventions: ids are TEXT; timestamps are BIGINT microseconds since the
-- Unix epoch; JSON is TEXT; *_lower columns hold Rust-lower-cased copies for
-- case-insensitive search. Every tenant-scoped table starts its primary key
-- and unique indexes with application_id.

CREATE TABLE subscribers (
    id TEXT NOT NULL PRIMARY KEY,
    email TEXT NOT NULL,
    administration_key_hash TEXT,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX subscribers_email_uq ON subscribers (email);

CREATE TABLE temporary_codes (
    subscriber_id TEXT NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, code_hash)
);

CREATE TABLE pending_activations (
    email TEXT NOT NULL,
    application_name TEXT NOT NULL,
    application_id TEXT,
    code_hash TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (email, application_name)
);

CREATE TABLE applications (
    id TEXT NOT NULL PRIMARY KEY,
    subscriber_id TEXT NOT NULL REFERENCES subscribers (id),
    name TEXT NOT NULL,
    application_key TEXT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX applications_subscriber_idx ON applications (subscriber_id);

CREATE TABLE users (
    application_id TEXT NOT NULL REFERENCES applications (id),
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    name_lower TEXT NOT NULL,
    full_name TEXT NOT NULL,
    full_name_lower TEXT NOT NULL,
    picture BLOB NOT NULL,
    phone TEXT NOT NULL,
    email TEXT NOT NULL,
    matching_key TEXT NOT NULL,
    infobase_user_id TEXT,
    blocked BOOLEAN NOT NULL,
    subscriber_administrator BOOLEAN NOT NULL,
    external_system_type TEXT NOT NULL,
    external_system_user_id TEXT NOT NULL,
    authentication_email TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (application_id, id)
);
CREATE UNIQUE INDEX users_infobase_uq ON users (application_id, infobase_user_id);
CREATE UNIQUE INDEX users_external_uq ON users (application_id, external_system_type, external_system_user_id)
    WHERE external_system_user_id <> '';
CREATE INDEX users_name_idx ON users (application_id, name, id);

CREATE TABLE conversations (
    application_id TEXT NOT NULL REFERENCES applications (id),
    id TEXT NOT NULL,
    conversation_key TEXT,
    title TEXT NOT NULL,
    title_lower TEXT NOT NULL,
    displayed BOOLEAN NOT NULL,
    read_only BOOLEAN NOT NULL,
    is_group BOOLEAN NOT NULL,
    context_object_type TEXT,
    context_object_id TEXT,
    context_presentation TEXT,
    all_application_users BOOLEAN NOT NULL,
    integration_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_message_at BIGINT,
    -- COALESCE(last_message_at, created_at), kept as a column so that the
    -- listing order has an index.
    last_activity_at BIGINT NOT NULL,
    -- The last event seq; messages take their seq from the same counter.
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (application_id, id)
);
CREATE UNIQUE INDEX conversations_key_uq ON conversations (application_id, conversation_key);
CREATE UNIQUE INDEX conversations_context_uq ON conversations (application_id, context_object_type, context_object_id);
CREATE INDEX conversations_activity_idx ON conversations (application_id, last_activity_at, id);

CREATE TABLE conversation_members (
    application_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (application_id, conversation_id, user_id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);
CREATE INDEX conversation_members_user_idx ON conversation_members (application_id, user_id, conversation_id);

CREATE TABLE context_access (
    application_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (application_id, conversation_id, user_id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);
CREATE INDEX context_access_user_idx ON context_access (application_id, user_id, conversation_id);

CREATE TABLE messages (
    application_id TEXT NOT NULL,
    id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    author_id TEXT NOT NULL,
    sent_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    body_lower TEXT NOT NULL,
    text_format TEXT NOT NULL,
    data_mime_type TEXT,
    data_content BLOB,
    recipient_ids TEXT NOT NULL,
    buttons TEXT,
    client_message_id TEXT,
    edited_at BIGINT,
    deleted BOOLEAN NOT NULL,
    PRIMARY KEY (application_id, id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX messages_seq_uq ON messages (application_id, conversation_id, seq);
CREATE UNIQUE INDEX messages_client_id_uq ON messages (application_id, conversation_id, author_id, client_message_id);

CREATE TABLE conversation_events (
    application_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (application_id, conversation_id, seq),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE notifications (
    application_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id, seq),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE read_marks (
    application_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    read_seq BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

CREATE TABLE watch_modes (
    application_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    watch BOOLEAN NOT NULL,
    PRIMARY KEY (application_id, conversation_id, user_id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

-- conversation_id = '' is the user-wide setting (a primary key column cannot be NULL).
CREATE TABLE do_not_disturb (
    application_id TEXT NOT NULL REFERENCES applications (id),
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    until_at BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id)
);
