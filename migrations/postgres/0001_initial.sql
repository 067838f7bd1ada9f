-- qrgate's record on PostgreSQL: the tables of the SQLite store, with the
-- same names and meanings (src/store/sqlite.rs), in PostgreSQL's types.
--
-- - Times are unix milliseconds (BIGINT), as qrgate's clock gives them.
-- - Money is TEXT, the exact decimal qrgate wrote: never floating point,
--   never rounded by the database.
-- - Mercado Pago ids are TEXT: numbers in its classic APIs, text in its
--   Orders API; qrgate reads them back as it wrote them.
-- - `seq` columns keep the order rows were first written in (SQLite's rowid):
--   a POS's latest sale, a sale's merchant orders in the order they came.

-- Every POS's version: how many changes to its sales are stored. A change
-- is written only if it was decided on the current one, under this row's lock.
CREATE TABLE pos_heads (
    pos                TEXT PRIMARY KEY,
    version            BIGINT NOT NULL
);

CREATE TABLE sales (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    external_reference TEXT PRIMARY KEY,
    pos                TEXT NOT NULL,
    sale_id            TEXT NOT NULL,
    state              TEXT NOT NULL,
    accepted_at        BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    served_at          BIGINT,
    -- true while reconciliation must search for the sale's payments.
    unsettled          BOOLEAN NOT NULL DEFAULT FALSE,
    body               TEXT NOT NULL,
    -- 1 while its ledger owes money back (2: some of it qrgate refunds itself).
    owes               BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sales_by_pos ON sales (pos, accepted_at);
CREATE INDEX sales_latest ON sales (pos, seq);
CREATE INDEX sales_unsettled ON sales (served_at) WHERE unsettled;
CREATE INDEX sales_owing ON sales (owes) WHERE owes > 0;
CREATE INDEX sales_by_update ON sales (updated_at, seq);
-- A device's sale id names one open sale of its POS: a device reuses ids
-- after a reset, so only sales still in process or pending are unique.
CREATE UNIQUE INDEX sales_open_sale_id ON sales (pos, sale_id)
    WHERE state IN ('in_process', 'pending');

CREATE TABLE sale_events (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_reference TEXT NOT NULL,
    at                 BIGINT NOT NULL,
    event              TEXT NOT NULL,
    detail             TEXT NOT NULL
);
CREATE INDEX sale_events_by_sale ON sale_events (external_reference, seq);

-- One row per closed sale: the unique key behind "paid exactly once".
CREATE TABLE closings (
    external_reference TEXT PRIMARY KEY,
    payment_id         TEXT NOT NULL,
    merchant_order     TEXT NOT NULL,
    at                 BIGINT NOT NULL
);

-- Every approved payment, once, with the sale whose ledger holds it.
CREATE TABLE ledger_payments (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    payment_id         TEXT PRIMARY KEY,
    external_reference TEXT NOT NULL,
    merchant_order     TEXT NOT NULL,
    amount             TEXT NOT NULL,
    seen_at            BIGINT NOT NULL
);
CREATE INDEX ledger_payments_by_sale ON ledger_payments (external_reference);

-- Every refund Mercado Pago made for us, once.
CREATE TABLE ledger_refunds (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    refund_id          TEXT PRIMARY KEY,
    payment_id         TEXT NOT NULL,
    external_reference TEXT NOT NULL,
    amount             TEXT NOT NULL,
    "of"               TEXT NOT NULL,
    "by"               TEXT NOT NULL,
    at                 BIGINT NOT NULL
);
CREATE INDEX ledger_refunds_by_sale ON ledger_refunds (external_reference);

-- Payments as the merchant orders that carry them say (an audit trail).
CREATE TABLE payments (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                 TEXT PRIMARY KEY,
    merchant_order     TEXT NOT NULL,
    external_reference TEXT,
    status             TEXT NOT NULL,
    amount             TEXT NOT NULL,
    currency           TEXT,
    seen_at            BIGINT NOT NULL
);
CREATE INDEX payments_by_sale ON payments (external_reference);
CREATE INDEX payments_by_merchant_order ON payments (merchant_order, seq);

CREATE TABLE merchant_orders (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                 TEXT PRIMARY KEY,
    external_reference TEXT,
    status             TEXT NOT NULL,
    body               TEXT NOT NULL,
    seen_at            BIGINT NOT NULL
);
CREATE INDEX merchant_orders_by_sale ON merchant_orders (external_reference, seq);

-- Notifications answered 200 and not applied yet.
CREATE TABLE inbox (
    topic              TEXT NOT NULL,
    id                 TEXT NOT NULL,
    received_at        BIGINT NOT NULL,
    generation         BIGINT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_at            BIGINT NOT NULL,
    done_at            BIGINT,
    outcome            TEXT,
    last_error         TEXT,
    PRIMARY KEY (topic, id)
);
CREATE INDEX inbox_pending ON inbox (received_at) WHERE done_at IS NULL;
CREATE INDEX inbox_done ON inbox (done_at) WHERE done_at IS NOT NULL;

-- The operator's refund requests by Idempotency-Key, with their answers.
CREATE TABLE refund_requests (
    key                TEXT PRIMARY KEY,
    external_reference TEXT NOT NULL,
    plan               TEXT NOT NULL,
    status             BIGINT,
    answer             TEXT,
    at                 BIGINT NOT NULL
);
CREATE INDEX refund_requests_by_sale ON refund_requests (external_reference);

-- Paid sales to search again for payments nobody notified.
CREATE TABLE rechecks (
    external_reference TEXT PRIMARY KEY,
    paid_at            BIGINT NOT NULL,
    done               BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX rechecks_due ON rechecks (done, paid_at);

CREATE TABLE device_rejections (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pos                TEXT NOT NULL,
    sale_id            TEXT,
    code               TEXT NOT NULL,
    message            TEXT NOT NULL,
    at                 BIGINT NOT NULL
);
CREATE INDEX device_rejections_by_pos ON device_rejections (pos, seq);

-- Readiness writes here (a real write, not a ping).
CREATE TABLE health (
    id                 BIGINT PRIMARY KEY CHECK (id = 1),
    at                 BIGINT NOT NULL
);

-- POS registration at Mercado Pago (`qrgate pos register`): one row per POS.
CREATE TABLE mp_registrations (
    pos                  TEXT PRIMARY KEY,
    mp_external_id       TEXT NOT NULL,
    store                TEXT NOT NULL,
    mp_pos_id            BIGINT NOT NULL,
    url                  TEXT,
    qr_image             TEXT,
    qr_template_document TEXT,
    qr_template_image    TEXT,
    action               TEXT NOT NULL,
    at                   BIGINT NOT NULL
);

-- Who serves this database: written by the qrgate that holds the
-- single-instance lock, read by one refused, to name the holder.
CREATE TABLE qrgate_instance (
    id                 BIGINT PRIMARY KEY CHECK (id = 1),
    pid                BIGINT NOT NULL,
    host               TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    http_listen        TEXT NOT NULL
);
