-- The tables the k6 scripts use, with the row-level security a JWT tenant runs under. Run as a superuser
-- on the primary: psql -d app -f bench/k6/schema.sql. Proxy login user: app (server_user of the JWT user).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tenant_user') THEN
        CREATE ROLE tenant_user NOLOGIN;
    END IF;
END $$;
GRANT tenant_user TO app;
DROP TABLE IF EXISTS k6_events;
DROP TABLE IF EXISTS k6_items;
CREATE TABLE k6_items (id bigint PRIMARY KEY, tenant_id text NOT NULL, value int NOT NULL DEFAULT 0);
CREATE TABLE k6_events (id bigserial PRIMARY KEY, tenant_id text NOT NULL, item_id bigint NOT NULL,
                        at timestamptz NOT NULL DEFAULT now());
-- tenant of row n: t<n % 10> (lib.js rowOf picks ids this way)
INSERT INTO k6_items (id, tenant_id) SELECT n, 't' || (n % 10) FROM generate_series(1, 10000) AS n;
ALTER TABLE k6_items ENABLE ROW LEVEL SECURITY;
ALTER TABLE k6_items FORCE ROW LEVEL SECURITY;
ALTER TABLE k6_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE k6_events FORCE ROW LEVEL SECURITY;
CREATE POLICY k6_items_tenant ON k6_items
    USING (tenant_id = current_setting('request.jwt.claim.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('request.jwt.claim.tenant_id', true));
CREATE POLICY k6_events_tenant ON k6_events
    USING (tenant_id = current_setting('request.jwt.claim.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('request.jwt.claim.tenant_id', true));
GRANT SELECT, INSERT, UPDATE ON k6_items, k6_events TO tenant_user;
GRANT USAGE ON SEQUENCE k6_events_id_seq TO tenant_user;
ANALYZE k6_items;
