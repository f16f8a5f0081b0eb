-- The order a notification is about, so an order's notifications can be
-- read by it. Notifications logged before this migration have none.
ALTER TABLE notifications ADD COLUMN order_id TEXT;

CREATE INDEX notifications_by_order ON notifications (order_id);
