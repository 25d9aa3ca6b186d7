-- The read-only role of docs/bi.md, for Grafana, as a psql script that can run again
-- and again (compose runs it at every `up --profile dashboards`, after the migration).
--
--   POSTGRES_BI_PASSWORD=… psql -v ON_ERROR_STOP=1 -h db -U smspartner -d smspartner \
--       [-v bi_role=smspartner_bi] -f bi-role.sql
--
-- Connect as the daemon's role (the one in SMSPARTNER_DATABASE_URL, which owns the tables
-- its migrations create, and may create roles): the default privileges below are that
-- role's, so tables and views of later migrations are readable too. The password comes
-- from the environment (psql 15 or newer), never from the command line.

\if :{?bi_role}
\else
    \set bi_role smspartner_bi
\endif
\getenv bi_password POSTGRES_BI_PASSWORD
\if :{?bi_password}
\else
    \set bi_password ''
\endif
SELECT :'bi_password' = '' AS no_bi_password \gset
\if :no_bi_password
    DO $$ BEGIN RAISE EXCEPTION 'POSTGRES_BI_PASSWORD is empty or unset'; END $$;
\endif

SELECT format('CREATE ROLE %I LOGIN', :'bi_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'bi_role') \gexec
ALTER ROLE :"bi_role" PASSWORD :'bi_password';
-- Belt and braces: every transaction of this role is read-only, and a runaway
-- dashboard query is cancelled after a minute.
ALTER ROLE :"bi_role" SET default_transaction_read_only = on;
ALTER ROLE :"bi_role" SET statement_timeout = '60s';
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'bi_role') \gexec
GRANT USAGE ON SCHEMA public TO :"bi_role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"bi_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO :"bi_role";
