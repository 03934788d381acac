DROP TABLE idempotency_keys;
DROP TABLE link_outbox;
DROP TABLE links;
DROP TABLE api_keys;
