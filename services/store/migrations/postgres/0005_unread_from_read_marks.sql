-- Unread counts derived from read positions (issue 11): appending a message
-- to an ordinary conversation writes a constant number of rows whatever its
-- audience. Kept line for line in step with the other engine's 0005.
--
-- A message that notifies "the members" (a broadcast) bumps the
-- conversation's notify_count and records the value it reached; each member
-- row keeps `skipped`, the broadcasts that do not count for that member
-- (before joining, read, their own, excluded); while watching is off,
-- `muted_at` freezes the member's count at the notify_count it had then.
-- A member's broadcast unread is COALESCE(muted_at, notify_count) - skipped.
-- Messages with per-user audiences (context conversations, conversations of
-- all users, lists that differ much from the members) keep writing
-- `notifications` and `unread_counters` rows as before.
ALTER TABLE conversations ADD COLUMN notify_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN broadcast BOOLEAN NOT NULL DEFAULT FALSE;
-- The conversation's notify_count right after this message: the ordinal of a
-- broadcast, and for any message the number of broadcasts up to it.
ALTER TABLE messages ADD COLUMN notify_count BIGINT NOT NULL DEFAULT 0;
-- The seq at which the member joined: earlier messages never count for them.
ALTER TABLE conversation_members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversation_members ADD COLUMN skipped BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversation_members ADD COLUMN muted_at BIGINT;
-- FALSE for integration users, who are never notified (§29.3.4); a user's
-- kind never changes, so it is copied here when they join instead of being
-- looked up in `users` on every message.
ALTER TABLE conversation_members ADD COLUMN notifiable BOOLEAN NOT NULL DEFAULT TRUE;
-- Per-user counts of one conversation, read by each append (one range scan).
CREATE INDEX unread_counters_conversation_idx ON unread_counters (application_id, conversation_id, user_id);

-- Members a broadcast did not notify although they were in its audience
-- (blocked users): one row per such member and message, so that a partial
-- MarkRead can count exactly what stays unread after it.
CREATE TABLE notification_exclusions (
    application_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id, seq),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

-- Past periods with watching off, as notify_count ranges (from_count, to_count]:
-- broadcasts in them never count for the member (a partial MarkRead needs them).
CREATE TABLE watch_gaps (
    application_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    from_count BIGINT NOT NULL,
    to_count BIGINT NOT NULL,
    PRIMARY KEY (application_id, user_id, conversation_id, from_count),
    FOREIGN KEY (application_id, conversation_id) REFERENCES conversations (application_id, id) ON DELETE CASCADE
);

-- Existing data: every stored message was written with per-user rows, which
-- stay and keep counting (broadcast = FALSE, every counter 0). Members who
-- switched watching off start muted, so new broadcasts do not count for them.
UPDATE conversation_members SET muted_at = 0
WHERE EXISTS (
    SELECT 1 FROM watch_modes w
    WHERE w.application_id = conversation_members.application_id
      AND w.conversation_id = conversation_members.conversation_id
      AND w.user_id = conversation_members.user_id
      AND w.watch = FALSE
);
UPDATE conversation_members SET notifiable = FALSE
WHERE EXISTS (
    SELECT 1 FROM users k
    WHERE k.application_id = conversation_members.application_id
      AND k.id = conversation_members.user_id
      AND k.kind = 'integration'
);
