-- Schema version 12: HTTP endpoints (notifyq.endpoints), served by notifyq serve.
-- schema.sql holds the same objects for new databases.

-- HTTP endpoints: tasks whose handler is a web endpoint that `notifyq serve`
-- POSTs each job to (docs/http.md has the delivery contract).  A row names
-- the task, its URL and how to call it; the signing secret is only named here
-- (its value lives in the dispatcher's environment or secrets file, never in the
-- database).  Only the schema owner writes this table, and whoever it grants
-- INSERT, UPDATE, DELETE to (an admin role): a role that could write it could
-- point every dispatcher at any address its network reaches (server-side request
-- forgery), so neither the producer nor the worker role may.
CREATE TABLE IF NOT EXISTS notifyq.endpoints (
    task            text             PRIMARY KEY,
    url             text             NOT NULL,
    timeout         double precision NOT NULL DEFAULT 30,
    max_concurrency integer,
    headers         jsonb            NOT NULL DEFAULT '{}',
    secret          text,
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT endpoints_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT endpoints_url_scheme CHECK (url ~* '^https?://[^/?#]+' AND length(url) <= 2048),
    CONSTRAINT endpoints_timeout_range CHECK (timeout > 0 AND timeout <= 86400),
    CONSTRAINT endpoints_max_concurrency_range CHECK (max_concurrency >= 1),
    CONSTRAINT endpoints_headers_object CHECK (pg_catalog.jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoints_secret_format CHECK (secret ~ '^[A-Z0-9_]{1,64}$')
);
COMMENT ON TABLE notifyq.endpoints IS
    'HTTP tasks: notifyq serve POSTs each job of the task to url (docs/http.md). Written by '
    'the schema owner or an admin role only; secret names a signing secret the dispatcher '
    'reads from NOTIFYQ_SECRET_<secret>, never its value.';
COMMENT ON CONSTRAINT endpoints_task_format ON notifyq.endpoints IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT endpoints_url_scheme ON notifyq.endpoints IS
    'url: an http:// or https:// URL with a host, at most 2048 characters';
COMMENT ON CONSTRAINT endpoints_timeout_range ON notifyq.endpoints IS
    'timeout: seconds, more than 0 and at most 86400';
COMMENT ON CONSTRAINT endpoints_max_concurrency_range ON notifyq.endpoints IS
    'max_concurrency: NULL (no cap) or at least 1 request at once per dispatcher';
COMMENT ON CONSTRAINT endpoints_headers_object ON notifyq.endpoints IS
    'headers: a JSON object of header names to string values (checked by the dispatcher too)';
COMMENT ON CONSTRAINT endpoints_secret_format ON notifyq.endpoints IS
    'secret: the NAME of a signing secret, 1-64 characters of A-Z, 0-9 and _';

-- Any change tells the dispatchers to read the table again, on notifyq_internal
-- (only dispatchers listen there), payload "endpoints".  Per statement: one
-- message however many rows changed.
CREATE OR REPLACE FUNCTION notifyq.notify_endpoints_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_internal', 'endpoints');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER endpoints_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON notifyq.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_endpoints_changed();

REVOKE ALL ON notifyq.endpoints FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_endpoints_changed() FROM PUBLIC;

-- The roles that may claim (notifyq roles gave them EXECUTE on claim_room) may
-- read the endpoints they serve; run `notifyq roles` again to be exact.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'notifyq.claim_room(text, integer)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT SELECT ON notifyq.endpoints TO %s', r.role);
    END LOOP;
END
$$;
