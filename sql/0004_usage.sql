-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- One row per reported call (the meter event outbox rides on it) and the alerts it triggered.

create table public.usage_records (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id),
  call_id text not null check (length(call_id) between 1 and 200),
  subscription_id uuid references public.subscriptions (id),
  billing_cycle_id uuid references public.billing_cycles (id),
  duration_seconds numeric not null check (duration_seconds >= 0 and duration_seconds <= 86400),
  billed_minutes integer not null check (billed_minutes >= 0),
  ended_at timestamptz not null,
  meter_status text not null check (meter_status in ('pending', 'sent', 'failed', 'skipped')),
  meter_identifier text check (length(meter_identifier) <= 100),
  meter_error text,
  meter_attempts integer not null default 0 check (meter_attempts >= 0),
  meter_next_attempt_at timestamptz,
  meter_sent_at timestamptz,
  created_at timestamptz not null default now(),
  unique (organisation_id, call_id)
);
create index usage_records_billing_cycle_id_idx on public.usage_records (billing_cycle_id);
create index usage_records_meter_due_idx
  on public.usage_records (meter_next_attempt_at) where meter_status = 'pending';

create table public.usage_alerts (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id),
  billing_cycle_id uuid not null references public.billing_cycles (id),
  threshold_percent integer not null check (threshold_percent in (80, 100, 120)),
  usage_record_id uuid references public.usage_records (id),
  created_at timestamptz not null default now(),
  unique (billing_cycle_id, threshold_percent)
);
create index usage_alerts_organisation_id_idx on public.usage_alerts (organisation_id);
create index usage_alerts_usage_record_id_idx on public.usage_alerts (usage_record_id);

alter table public.usage_records enable row level security;
alter table public.usage_alerts enable row level security;

create policy usage_records_members_read on public.usage_records
  for select to authenticated using ((select private.is_org_member(organisation_id)));
create policy usage_alerts_members_read on public.usage_alerts
  for select to authenticated using ((select private.is_org_member(organisation_id)));

revoke all on table public.usage_records, public.usage_alerts from anon, authenticated;
grant select on table public.usage_records, public.usage_alerts to authenticated;
grant all on table public.usage_records, public.usage_alerts to service_role;

-- migrate:down
