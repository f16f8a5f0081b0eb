CREATE TABLE payments (
    order_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    reference TEXT,
    created_at BIGINT NOT NULL
);
