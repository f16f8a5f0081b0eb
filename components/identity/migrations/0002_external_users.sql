-- Users who sign in at a trusted OpenID Connect provider. Kept apart from
-- `users`, whose emails are login names: a provider's claim to an email
-- must never reach the local account that has it.
CREATE TABLE external_users (
    id TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    email TEXT,
    email_verified BOOLEAN NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
