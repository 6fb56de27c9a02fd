-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- The webhook ledger (service role only) and the audit trail (owners and admins may read theirs).

create table public.stripe_events (
  id text primary key check (id like 'evt\_%'),
  type text not null,
  created timestamptz not null,
  payload jsonb not null,
  status text not null default 'processing'
    check (status in ('processing', 'processed', 'failed', 'ignored')),
  error text,
  attempts integer not null default 0 check (attempts >= 0),
  received_at timestamptz not null default now(),
  processed_at timestamptz
);
create index stripe_events_failed_idx on public.stripe_events (received_at) where status = 'failed';

create table public.audit_log (
  id bigint generated always as identity primary key,
  organisation_id uuid references public.organisations (id) on delete set null,
  actor text not null,
  action text not null,
  details jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now()
);
create index audit_log_organisation_id_idx on public.audit_log (organisation_id, created_at desc);

alter table public.stripe_events enable row level security;
alter table public.audit_log enable row level security;

-- Stripe's payloads hold customer data of every organisation: no end user reads any of it.
create policy stripe_events_no_end_user_access on public.stripe_events
  as restrictive for all to anon, authenticated using (false) with check (false);

create policy audit_log_owner_admin_read on public.audit_log
  for select to authenticated
  using ((select private.has_org_role(organisation_id, array['owner', 'admin'])));

revoke all on table public.stripe_events, public.audit_log from anon, authenticated;
grant select on table public.audit_log to authenticated;
grant all on table public.stripe_events, public.audit_log to service_role;

-- migrate:down
