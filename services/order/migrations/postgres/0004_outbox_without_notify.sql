-- The relay of the replica that writes an event is woken in-process, and when another
-- replica's relay holds the relay lock it tries again shortly (events/outbox.rs), so the
-- announcement on every insert is no longer needed. It cost every committing
-- transaction a NOTIFY: a signal to each listening session of the database, and a
-- commit serialized on PostgreSQL's notification queue (measured: 130 us of the
-- server's CPU per order, about 13% of the PostgreSQL order throughput).
DROP TRIGGER IF EXISTS outbox_announce ON outbox;
DROP FUNCTION IF EXISTS announce_outbox();
