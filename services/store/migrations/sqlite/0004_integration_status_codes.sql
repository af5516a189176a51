-- Per integration: answer webhooks with only the status codes of the 1C
-- contract (200, 404, 409, 500) instead of Beseda's finer ones (docs/webhooks.md,
-- "Status codes"). Existing integrations keep the codes they answered with.
ALTER TABLE integrations ADD COLUMN strict_status_codes BOOLEAN NOT NULL DEFAULT FALSE;
