-- Unread counts kept as counters, so that appending a message costs the
-- same however many notifications its recipients have not read yet (the
-- count of `notifications` rows is only taken again when a user reads).
CREATE TABLE unread_counters (
    application_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    unread BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

-- `notifications` holds only unread rows (marking read deletes the rest).
INSERT INTO unread_counters (application_id, user_id, conversation_id, unread)
SELECT application_id, user_id, conversation_id, COUNT(*)
FROM notifications
GROUP BY application_id, user_id, conversation_id;
