-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- End users hold nothing on sequences, and nothing by default on what later migrations create.
--
-- Supabase's default privileges give anon and authenticated USAGE, SELECT and UPDATE on every
-- sequence the migrations create: the identity sequences of audit_log and reconciliations
-- included. With them any signed-in member (or anon) could read how many audit rows exist across
-- all organisations and setval() the sequence back, after which every audited write (webhook
-- state changes, checkouts, plan changes, late usage) failed on a duplicate id. PostgREST does
-- not expose setval, but a leaked end-user database session would. No table grant was affected:
-- every migration revoked those and granted what members need.
--
-- Later migrations get no end-user privilege by default either: a table, sequence or function
-- members need is granted where it is created, as every one so far is.

revoke all on all sequences in schema public from anon, authenticated;

alter default privileges in schema public revoke all on tables from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
alter default privileges in schema public revoke all on functions from anon, authenticated;

-- migrate:down
