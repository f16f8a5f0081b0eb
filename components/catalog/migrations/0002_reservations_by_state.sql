-- Every reservation looks for unconfirmed ones past their timeout
-- (`expire_unconfirmed`): without this index, a scan of every reservation
-- ever made, which grows with each order.
CREATE INDEX reservations_by_state ON reservations (state, created_at);
