-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Subscriptions mirror Stripe's; billing cycles are the monthly usage periods of the metered price.

create table public.subscriptions (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id),
  plan_id uuid references public.billing_plans (id),
  stripe_subscription_id text not null unique,
  stripe_customer_id text not null,
  status text not null check (status in (
    'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid',
    'paused'
  )),
  billing_period text not null check (billing_period in ('monthly', 'yearly')),
  current_period_start timestamptz,
  current_period_end timestamptz,
  cancel_at_period_end boolean not null default false,
  canceled_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index subscriptions_organisation_id_idx on public.subscriptions (organisation_id);
create index subscriptions_stripe_customer_id_idx on public.subscriptions (stripe_customer_id);

create table public.billing_cycles (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id),
  subscription_id uuid not null references public.subscriptions (id),
  period_start timestamptz not null,
  period_end timestamptz not null,
  included_minutes integer not null check (included_minutes >= 0),
  minutes_used integer not null default 0 check (minutes_used >= 0),
  overage_minutes integer not null default 0 check (overage_minutes >= 0),
  overage_cost_cents integer not null default 0 check (overage_cost_cents >= 0),
  status text not null default 'active' check (status in ('active', 'closed')),
  stripe_invoice_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check (period_end > period_start),
  unique (subscription_id, period_start)
);
create index billing_cycles_organisation_id_idx
  on public.billing_cycles (organisation_id, period_start desc);

alter table public.subscriptions enable row level security;
alter table public.billing_cycles enable row level security;

create policy subscriptions_members_read on public.subscriptions
  for select to authenticated using ((select private.is_org_member(organisation_id)));
create policy billing_cycles_members_read on public.billing_cycles
  for select to authenticated using ((select private.is_org_member(organisation_id)));

revoke all on table public.subscriptions, public.billing_cycles from anon, authenticated;
grant select on table public.subscriptions, public.billing_cycles to authenticated;
grant all on table public.subscriptions, public.billing_cycles to service_role;

-- migrate:down
