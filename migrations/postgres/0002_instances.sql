-- Several qrgate instances share the database (docs/decisions.md, "Several
-- instances").

-- Who serves the database, one row per instance by its name (its MQTT client
-- id): written by the instance that holds its name's lock, read by one
-- refused for the same name, to name the holder.
DROP TABLE qrgate_instance;
CREATE TABLE instances (
    name               TEXT PRIMARY KEY,
    pid                BIGINT NOT NULL,
    host               TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    http_listen        TEXT NOT NULL
);

-- The singletons' leader. `term` grows each time an instance becomes the
-- leader; a write the singletons make is refused unless its term is still
-- the current one, so a leader that was paused past its lease and resumed
-- cannot act on what it believed before.
CREATE TABLE leadership (
    id                 BIGINT PRIMARY KEY CHECK (id = 1),
    term               BIGINT NOT NULL,
    holder             TEXT NOT NULL,
    since              BIGINT NOT NULL
);
INSERT INTO leadership (id, term, holder, since) VALUES (1, 0, '', 0);

-- What a stored change owes its device: written in the change's
-- transaction, published by the instance that committed it, then marked.
-- A row still unmarked past its lease (its instance died, or lost the
-- broker) is published by the leader's sweep.
CREATE TABLE outbox (
    pos                TEXT NOT NULL,
    version            BIGINT NOT NULL,
    owner              TEXT NOT NULL,
    lease_until        BIGINT NOT NULL,
    published_at       BIGINT,
    PRIMARY KEY (pos, version)
);
CREATE INDEX outbox_unpublished ON outbox (lease_until) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
