-- Each user's address and name, from identity's `user.registered` and
-- `user.updated` events, so that a notification needs no call to identity.
-- `as_of` is the event's publication time: events of the two topics can
-- arrive in either order, and the newer one wins.
CREATE TABLE contacts (
    user_id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    as_of BIGINT NOT NULL
);
