-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- The plans on sale. Money is integer minor units of `currency`; the metered price is monthly.

create table public.billing_plans (
  id uuid primary key default gen_random_uuid(),
  name text not null unique check (length(name) between 1 and 100),
  currency text not null default 'eur' check (currency ~ '^[a-z]{3}$'),
  included_minutes integer not null check (included_minutes >= 0),
  monthly_price_cents integer not null check (monthly_price_cents >= 0),
  yearly_price_cents integer check (yearly_price_cents >= 0),
  overage_rate_cents integer not null check (overage_rate_cents >= 0),
  stripe_price_id text unique,
  stripe_yearly_price_id text unique,
  stripe_metered_price_id text,
  sort_order integer not null default 0,
  active boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index billing_plans_stripe_metered_price_id_idx on public.billing_plans (stripe_metered_price_id);

alter table public.billing_plans enable row level security;

-- Anyone, signed in or not, may see what is on sale; nobody but the service role sees the rest.
create policy billing_plans_active_read on public.billing_plans
  for select to anon, authenticated using (active);

revoke all on table public.billing_plans from anon, authenticated;
grant select on table public.billing_plans to anon, authenticated;
grant all on table public.billing_plans to service_role;

-- migrate:down
