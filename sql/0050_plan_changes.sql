-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Plan changes (issue 10): change-plan, a downgrade pending until the period end, and cycles
-- that equal what Stripe invoices across a change of the metered price.
--
-- How Stripe bills a metered price replaced during a period (flexible billing mode, the default
-- for new subscriptions since API 2025-09-30; docs.stripe.com/billing/subscriptions/usage-based/
-- manage-billing-setup, "Update prices mid-cycle"): at the change Stripe creates an invoice item
-- for the usage reported so far in the period, at the OLD price (its graduated tiers from zero);
-- at the period end it bills the usage from the change on at the NEW price (its own tiers from
-- zero). Usage is assigned by its meter event's timestamp. So the cycle is split at the change:
-- [start, change) keeps the old price's included minutes and rate, [change, end) gets the new
-- price's. A change at the period boundary (a downgrade through a subscription schedule) needs
-- no split: the new period's cycle has the new price's terms, also when a call opened it first.
-- docs/plan-changes.md has the rule with its sources and examples.

-- The pending downgrade (DESIGN.md), the schedule carrying it, and each cycle's metered price.
alter table public.subscriptions
  add column pending_plan_id uuid,
  add column pending_billing_period text
    check (pending_billing_period in ('monthly', 'yearly')),
  add column pending_effective_at timestamptz,
  add column pending_set_at timestamptz,
  add column stripe_schedule_id text;
-- New and empty: nothing to validate, and new rows are checked.
alter table public.subscriptions
  add constraint subscriptions_pending_plan_id_fkey
    foreign key (pending_plan_id) references public.billing_plans (id) not valid;
-- stripe_metered_price_id: the price whose terms the cycle carries. confirmed_at: when the
-- webhook first saw the subscription on that price in this period (NULL: opened by a call, its
-- terms predicted); a change of price came after it. closed_by_change: a part ended by a price change, its usage invoiced then.
alter table public.billing_cycles
  add column stripe_metered_price_id text,
  add column confirmed_at timestamptz,
  add column closed_by_change boolean not null default false;
update public.billing_cycles c
   set stripe_metered_price_id = s.stripe_metered_price_id, confirmed_at = c.updated_at
  from public.subscriptions s
 where s.id = c.subscription_id;

-- One change at a time per organisation: the claim row (its id is every Stripe idempotency key
-- of the change) is `started` while Stripe is being asked; a claim older than two minutes was
-- abandoned by a process that died.
create table public.plan_changes (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id) on delete cascade,
  subscription_id uuid not null references public.subscriptions (id),
  requested_by uuid not null,
  kind text not null check (kind in ('upgrade', 'downgrade', 'cancel_pending')),
  from_plan_id uuid references public.billing_plans (id),
  from_billing_period text,
  to_plan_id uuid references public.billing_plans (id),
  to_billing_period text,
  status text not null default 'started'
    check (status in ('started', 'applied', 'scheduled', 'released', 'payment_failed',
                      'failed', 'abandoned')),
  error text,
  created_at timestamptz not null default now(),
  finished_at timestamptz
);
create unique index plan_changes_one_at_a_time
  on public.plan_changes (organisation_id) where status = 'started';
create index plan_changes_subscription_id_idx on public.plan_changes (subscription_id);

alter table public.plan_changes enable row level security;
create policy plan_changes_no_end_user_access on public.plan_changes
  as restrictive for all to anon, authenticated using (false) with check (false);
revoke all on table public.plan_changes from anon, authenticated;
grant all on table public.plan_changes to service_role;

-- ------------------------------------------------------------------ cycles across a change

-- A cycle opened by a call carries the price the subscription is on, unconfirmed.
create or replace function private.open_cycle(p_sub public.subscriptions, p_period tstzrange)
returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
begin
  insert into public.billing_cycles
    (organisation_id, subscription_id, period_start, period_end, included_minutes,
     overage_rate_cents, stripe_metered_price_id)
  select p_sub.organisation_id, p_sub.id, lower(p_period), upper(p_period), t.included_minutes,
         t.overage_rate_cents, p_sub.stripe_metered_price_id
    from private.subscription_terms(p_sub) t
  on conflict (subscription_id, period_start) do nothing;
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = p_sub.id and c.period_start = lower(p_period);
  return v_cycle;
end;
$$;

-- A part ended by a price change had its usage invoiced at the change: nothing more goes in.
create or replace function private.unbillable_reason(p_cycle public.billing_cycles, p_at timestamptz)
returns text
language sql stable
set search_path = ''
as $$
  select case
    when p_cycle.stripe_invoice_id is not null or p_cycle.closed_by_change then 'invoiced'
    when p_cycle.period_end + private.meter_grace() <= now() then 'grace_passed'
    when p_at < now() - interval '34 days' then 'too_old'
  end
$$;

-- The cycle's overage from its minutes and terms, and its alerts to match: a threshold no
-- longer reached is withdrawn, one reached is recorded for the report that crossed it.
create function private.refigure_cycle(p_cycle_id uuid)
returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
begin
  update public.billing_cycles c
     set overage_minutes = greatest(c.minutes_used - c.included_minutes, 0),
         overage_cost_cents = greatest(c.minutes_used - c.included_minutes, 0)
           * c.overage_rate_cents,
         updated_at = now()
   where c.id = p_cycle_id
  returning c.* into v_cycle;
  delete from public.usage_alerts a
   where a.billing_cycle_id = p_cycle_id
     and not (v_cycle.included_minutes > 0
              and a.threshold_percent::bigint * v_cycle.included_minutes
                  <= v_cycle.minutes_used::bigint * 100);
  insert into public.usage_alerts
    (organisation_id, billing_cycle_id, threshold_percent, usage_record_id)
  select v_cycle.organisation_id, v_cycle.id, t.pct, (
           select r.id
             from (select u.id, u.created_at,
                          sum(u.billed_minutes) over (order by u.created_at, u.id) as running
                     from public.usage_records u
                    where u.billing_cycle_id = p_cycle_id) r
            where r.running::bigint * 100 >= t.pct::bigint * v_cycle.included_minutes
            order by r.created_at, r.id
            limit 1)
    from unnest(array[80, 100, 120]) as t (pct)
   where v_cycle.included_minutes > 0
     and t.pct::bigint * v_cycle.included_minutes <= v_cycle.minutes_used::bigint * 100
  on conflict (billing_cycle_id, threshold_percent) do nothing;
  return v_cycle;
end;
$$;

-- Split p_part at p_at: it ends there (its usage invoiced at the change), and a new part on
-- p_price's terms runs to the period end with the usage metered from p_at on (Stripe assigns
-- usage by the event's timestamp).
create function private.split_cycle(
  p_part public.billing_cycles, p_at timestamptz, p_price text, p_included integer,
  p_rate integer, p_seen_at timestamptz
) returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_new public.billing_cycles;
  v_moved integer;
begin
  update public.billing_cycles c
     set period_end = p_at, status = 'closed', closed_by_change = true, updated_at = now()
   where c.id = p_part.id;
  insert into public.billing_cycles
    (organisation_id, subscription_id, period_start, period_end, included_minutes,
     overage_rate_cents, stripe_metered_price_id, confirmed_at)
  values (p_part.organisation_id, p_part.subscription_id, p_at, p_part.period_end, p_included,
          p_rate, p_price, p_seen_at)
  returning * into v_new;
  with moved as (
    update public.usage_records u
       set billing_cycle_id = v_new.id
     where u.billing_cycle_id = p_part.id and u.metered_at >= p_at
    returning u.billed_minutes
  )
  select coalesce(sum(m.billed_minutes), 0) into v_moved from moved m;
  update public.billing_cycles c set minutes_used = c.minutes_used - v_moved
   where c.id = p_part.id;
  update public.billing_cycles c set minutes_used = c.minutes_used + v_moved
   where c.id = v_new.id;
  perform private.refigure_cycle(p_part.id);
  return private.refigure_cycle(v_new.id);
end;
$$;

-- Move the change point of a split period to p_at, a better-known moment of the change (the
-- price change's own event, or the invoice item that billed the old price's usage up to it):
-- the usage moves between the two parts by its metered_at, and both parts are refigured. A
-- moment outside the two parts, or before the old price was last confirmed, is not the change.
create function private.move_split(p_part public.billing_cycles, p_at timestamptz)
returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_prev public.billing_cycles;
  v_forward integer;
  v_back integer;
begin
  select c.* into v_prev
    from public.billing_cycles c
   where c.subscription_id = p_part.subscription_id and c.closed_by_change
     and c.period_end = p_part.period_start
     for update;
  if v_prev.id is null or p_at = p_part.period_start or p_at >= p_part.period_end
     or p_at <= greatest(v_prev.period_start, v_prev.confirmed_at) then
    return p_part;
  end if;
  update public.billing_cycles c set period_end = p_at where c.id = v_prev.id;
  update public.billing_cycles c set period_start = p_at where c.id = p_part.id;
  with moved as (
    update public.usage_records u set billing_cycle_id = p_part.id
     where u.billing_cycle_id = v_prev.id and u.metered_at >= p_at
    returning u.billed_minutes
  )
  select coalesce(sum(m.billed_minutes), 0) into v_forward from moved m;
  with moved as (
    update public.usage_records u set billing_cycle_id = v_prev.id
     where u.billing_cycle_id = p_part.id and u.metered_at < p_at
    returning u.billed_minutes
  )
  select coalesce(sum(m.billed_minutes), 0) into v_back from moved m;
  update public.billing_cycles c set minutes_used = c.minutes_used - v_forward + v_back
   where c.id = v_prev.id;
  update public.billing_cycles c set minutes_used = c.minutes_used + v_forward - v_back
   where c.id = p_part.id;
  perform private.refigure_cycle(v_prev.id);
  return private.refigure_cycle(p_part.id);
end;
$$;

-- The cycles of a live subscription after a state fetched at p_seen_at: the metered item's
-- current period is the cycle (its latest part when split), opened once, confirmed on its price;
-- a call-opened part on another price takes this one's terms; a confirmed part on another price
-- is split at the change (p_changed_at when the caller knows it, else the fetch; never before the
-- part was confirmed), and a split moves when a later call knows the change better. Older active
-- cycles close. An ended subscription closes its active cycles.
create function private.sync_cycles(
  p_sub public.subscriptions, p_plan jsonb, p_seen_at timestamptz, p_changed_at timestamptz
) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_start timestamptz := to_timestamp((p_plan ->> 'metered_start')::bigint);
  v_end timestamptz := to_timestamp((p_plan ->> 'metered_end')::bigint);
  v_price text := p_plan ->> 'metered_price_id';
  v_included integer := (p_plan ->> 'included_minutes')::integer;
  v_rate integer := (p_plan ->> 'overage_rate_cents')::integer;
  v_part public.billing_cycles;
  v_at timestamptz;
begin
  if p_sub.status in ('canceled', 'incomplete_expired') then
    update public.billing_cycles c
       set status = 'closed', updated_at = now()
     where c.subscription_id = p_sub.id and c.status = 'active';
    return;
  end if;
  if v_end is null or v_end <= v_start then
    return;
  end if;
  select c.* into v_part
    from public.billing_cycles c
   where c.subscription_id = p_sub.id and c.period_start >= v_start and c.period_start < v_end
   order by c.period_start desc
   limit 1
     for update;
  if v_part.id is null then
    insert into public.billing_cycles
      (organisation_id, subscription_id, period_start, period_end, included_minutes,
       overage_rate_cents, stripe_metered_price_id, confirmed_at)
    values (p_sub.organisation_id, p_sub.id, v_start, v_end, v_included, v_rate, v_price,
            p_seen_at)
    returning * into v_part;
  elsif (v_part.included_minutes, v_part.overage_rate_cents) is not distinct from (v_included, v_rate)
        and (v_part.stripe_metered_price_id is null or v_price is null
             or v_part.stripe_metered_price_id = v_price) then
    update public.billing_cycles c
       set period_end = v_end,
           stripe_metered_price_id = coalesce(v_price, c.stripe_metered_price_id),
           confirmed_at = coalesce(c.confirmed_at, p_seen_at),
           updated_at = now()
     where c.id = v_part.id
       and (c.period_end, c.stripe_metered_price_id, c.confirmed_at is null)
           is distinct from (v_end, coalesce(v_price, c.stripe_metered_price_id), false);
    if p_changed_at is not null then
      v_part := private.move_split(v_part, p_changed_at);
    end if;
  elsif v_part.confirmed_at is null then
    -- Opened by a call before the webhook said which price this period is on (a change at the
    -- boundary): its terms are this price's, its overage and alerts follow.
    update public.billing_cycles c
       set included_minutes = v_included, overage_rate_cents = v_rate,
           stripe_metered_price_id = v_price, period_end = v_end, confirmed_at = p_seen_at
     where c.id = v_part.id;
    perform private.refigure_cycle(v_part.id);
  else
    v_at := greatest(coalesce(p_changed_at, p_seen_at), v_part.confirmed_at);
    if v_at > v_part.period_start and v_at < v_part.period_end then
      v_part := private.split_cycle(v_part, v_at, v_price, v_included, v_rate, p_seen_at);
    else
      update public.billing_cycles c
         set included_minutes = v_included, overage_rate_cents = v_rate,
             stripe_metered_price_id = v_price, confirmed_at = p_seen_at
       where c.id = v_part.id;
      perform private.refigure_cycle(v_part.id);
    end if;
  end if;
  update public.billing_cycles c
     set status = 'closed', updated_at = now()
   where c.subscription_id = p_sub.id and c.status = 'active'
     and c.period_start < v_part.period_start;
end;
$$;

-- ------------------------------------------------------------------ apply_subscription_state in steps

-- The plan, terms and item periods of a fetched state (plan_for_stripe_prices plus the flat and
-- metered items' periods and the metered price); 503 unknown_price when no plan has its prices.
create function private.resolve_plan(p_state jsonb)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_items jsonb := coalesce(p_state -> 'items', '[]'::jsonb);
  v_prices jsonb;
  v_plan jsonb;
  v_flat jsonb;
  v_metered jsonb;
begin
  select coalesce(jsonb_agg(i -> 'price_id'), '[]'::jsonb) into v_prices
    from jsonb_array_elements(v_items) i;
  v_plan := public.plan_for_stripe_prices(v_prices);
  if v_plan is null then
    raise exception 'Subscription % has no price of a billing plan (prices %): add them to billing_plans, then run ./deploy.sh repair-events.',
      p_state ->> 'stripe_subscription_id', v_prices
      using errcode = 'MB503', hint = 'unknown_price';
  end if;
  select i into v_flat
    from jsonb_array_elements(v_items) i
   where i ->> 'price_id' = v_plan ->> 'flat_price_id'
   limit 1;
  -- The metered item: the plan's metered price, else any metered price (a change in flight).
  select i into v_metered
    from jsonb_array_elements(v_items) i
   where i ->> 'price_id' = v_plan ->> 'stripe_metered_price_id' or i ->> 'usage_type' = 'metered'
   order by (i ->> 'price_id' = v_plan ->> 'stripe_metered_price_id') desc
   limit 1;
  return v_plan || jsonb_build_object(
    'flat_start', v_flat -> 'current_period_start',
    'flat_end', v_flat -> 'current_period_end',
    'metered_price_id', v_metered ->> 'price_id',
    'metered_start', v_metered -> 'current_period_start',
    'metered_end', v_metered -> 'current_period_end');
end;
$$;

-- The organisation a subscription we have no row for belongs to: p_organisation_id (a checkout
-- of ours), else its organisation_id metadata, else the organisation with its customer. Returns
-- {organisation_id, customer} or {reason} when it is not ours.
create function private.subscription_owner(p_state jsonb, p_organisation_id uuid)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  c_uuid constant text := '^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$';
  v_hint uuid := coalesce(
    p_organisation_id,
    case when p_state ->> 'organisation_id' ~ c_uuid then (p_state ->> 'organisation_id')::uuid end);
  v_org public.organisations;
begin
  if v_hint is not null then
    select o.* into v_org from public.organisations o where o.id = v_hint;
    if v_org.id is null then
      return jsonb_build_object('reason', format('organisation %s does not exist', v_hint));
    end if;
  else
    select o.* into v_org
      from public.organisations o where o.stripe_customer_id = p_state ->> 'stripe_customer_id';
    if v_org.id is null then
      return jsonb_build_object('reason', format(
        'subscription %s has no organisation_id metadata and customer %s belongs to no organisation',
        p_state ->> 'stripe_subscription_id', p_state ->> 'stripe_customer_id'));
    end if;
  end if;
  return jsonb_build_object('organisation_id', v_org.id, 'customer', v_org.stripe_customer_id);
end;
$$;

-- One organisation, one live subscription: of its live ones and p_stripe_id (born p_created),
-- the one Stripe created first is kept, the other is the accident (a second checkout paid, one
-- made in the Dashboard) that Python cancels at Stripe. {kept, newer}; newer is NULL when there
-- is only one. The organisation lock makes applies of its subscriptions take turns, so two
-- racing (created A, created B) see each other and both name the same newer one.
create function private.live_duplicate(
  p_org_id uuid, p_stripe_id text, p_created timestamptz, p_created_at timestamptz
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_kept text;
  v_newer text;
begin
  perform pg_advisory_xact_lock(hashtextextended('organisation_subscriptions:' || p_org_id::text, 0));
  with candidates (stripe_subscription_id, born, created_at) as (
    select s.stripe_subscription_id, coalesce(s.stripe_created, s.created_at), s.created_at
      from public.subscriptions s
     where s.organisation_id = p_org_id
       and s.stripe_subscription_id <> p_stripe_id
       and s.status in ('active', 'trialing', 'past_due', 'unpaid')
    union all
    select p_stripe_id, p_created, p_created_at
  ), ranked as (
    select c.stripe_subscription_id,
           row_number() over (order by c.born, c.created_at, c.stripe_subscription_id) as n
      from candidates c
  )
  select (select r.stripe_subscription_id from ranked r where r.n = 1),
         (select r.stripe_subscription_id from ranked r where r.n > 1
           order by r.stripe_subscription_id = p_stripe_id desc, r.n limit 1)
    into v_kept, v_newer;
  return jsonb_build_object('kept', v_kept, 'newer', v_newer);
end;
$$;

-- Write a fresh state (insert or newer-only update) with its audit rows: created, status and
-- plan changes (with from and to), the organisation's customer. A pending change is cleared once
-- the subscription is on it, or when no schedule carries it any more.
create function private.store_subscription(
  p_before public.subscriptions, p_org jsonb, p_state jsonb, p_state_at timestamptz,
  p_plan jsonb, p_event_id text, p_actor text
) returns public.subscriptions
language plpgsql
set search_path = ''
as $$
declare
  v_stripe_id text := p_state ->> 'stripe_subscription_id';
  v_customer text := p_state ->> 'stripe_customer_id';
  v_org_id uuid := coalesce(p_before.organisation_id, (p_org ->> 'organisation_id')::uuid);
  v_after public.subscriptions;
  v_plan_id uuid := (p_plan ->> 'plan_id')::uuid;
  v_period text := p_plan ->> 'billing_period';
  v_schedule text := p_state ->> 'schedule';
  -- The pending change is over once the subscription is on it, or when a state fetched after it
  -- was recorded has no schedule any more (released, here or in the Dashboard). A state fetched
  -- before it was recorded says nothing about it.
  v_pending_done boolean := p_before.pending_plan_id is not null and (
    (p_before.pending_plan_id, p_before.pending_billing_period)
      is not distinct from (v_plan_id, v_period)
    or (v_schedule is null and p_state_at > p_before.pending_set_at));
begin
  if p_before.id is null then
    insert into public.subscriptions as s (
      organisation_id, plan_id, stripe_subscription_id, stripe_customer_id, status,
      billing_period, current_period_start, current_period_end, cancel_at_period_end,
      canceled_at, stripe_state_at, stripe_created, stripe_metered_price_id, stripe_schedule_id
    ) values (
      v_org_id, v_plan_id, v_stripe_id, v_customer, p_state ->> 'status', v_period,
      to_timestamp((p_plan ->> 'flat_start')::bigint), to_timestamp((p_plan ->> 'flat_end')::bigint),
      coalesce((p_state ->> 'cancel_at_period_end')::boolean, false),
      to_timestamp((p_state ->> 'canceled_at')::bigint), p_state_at,
      to_timestamp((p_state ->> 'created')::bigint), p_plan ->> 'metered_price_id', v_schedule
    )
    returning s.* into v_after;
    insert into public.audit_log (organisation_id, actor, action, details)
    values (v_org_id, p_actor, 'subscription.created', jsonb_build_object(
      'stripe_subscription_id', v_stripe_id, 'event_id', p_event_id, 'before', null,
      'after', jsonb_build_object('status', v_after.status, 'plan_id', v_after.plan_id,
                                  'billing_period', v_after.billing_period)));
    -- The organisation's customer: set when it has none. Our checkout always passes the
    -- organisation's own customer, so a different one is recorded for a person to look at and
    -- left as it is (meter events go to the subscription's customer).
    if p_org ->> 'customer' is null then
      update public.organisations o
         set stripe_customer_id = v_customer, updated_at = now()
       where o.id = v_org_id and o.stripe_customer_id is null
         and not exists (
           select 1 from public.organisations x where x.stripe_customer_id = v_customer);
    elsif p_org ->> 'customer' <> v_customer then
      insert into public.audit_log (organisation_id, actor, action, details)
      values (v_org_id, p_actor, 'organisation.customer_mismatch', jsonb_build_object(
        'stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
        'organisation_customer', p_org ->> 'customer', 'subscription_customer', v_customer));
    end if;
    return v_after;
  end if;

  update public.subscriptions s
     set plan_id = v_plan_id,
         billing_period = v_period,
         status = p_state ->> 'status',
         stripe_customer_id = v_customer,
         current_period_start = to_timestamp((p_plan ->> 'flat_start')::bigint),
         current_period_end = to_timestamp((p_plan ->> 'flat_end')::bigint),
         cancel_at_period_end = coalesce((p_state ->> 'cancel_at_period_end')::boolean, false),
         canceled_at = to_timestamp((p_state ->> 'canceled_at')::bigint),
         stripe_state_at = p_state_at,
         stripe_created = coalesce(to_timestamp((p_state ->> 'created')::bigint),
                                   s.stripe_created),
         stripe_metered_price_id = p_plan ->> 'metered_price_id',
         stripe_schedule_id = case when v_pending_done or p_state_at > s.pending_set_at
                                     or s.pending_set_at is null
                                   then v_schedule else s.stripe_schedule_id end,
         pending_plan_id = case when v_pending_done then null else s.pending_plan_id end,
         pending_billing_period = case when v_pending_done then null
                                       else s.pending_billing_period end,
         pending_effective_at = case when v_pending_done then null
                                     else s.pending_effective_at end,
         pending_set_at = case when v_pending_done then null else s.pending_set_at end,
         updated_at = now()
   where s.id = p_before.id
  returning s.* into v_after;

  if p_before.status is distinct from v_after.status then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (v_after.organisation_id, p_actor, 'subscription.status_changed',
      jsonb_build_object('stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
        'before', jsonb_build_object('status', p_before.status),
        'after', jsonb_build_object('status', v_after.status)));
  end if;
  if (p_before.plan_id, p_before.billing_period)
     is distinct from (v_after.plan_id, v_after.billing_period) then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (v_after.organisation_id, p_actor, 'subscription.plan_changed',
      jsonb_build_object('stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
        'from', jsonb_build_object(
          'plan_id', p_before.plan_id, 'billing_period', p_before.billing_period,
          'plan', (select p.name from public.billing_plans p where p.id = p_before.plan_id)),
        'to', jsonb_build_object(
          'plan_id', v_after.plan_id, 'billing_period', v_after.billing_period,
          'plan', (select p.name from public.billing_plans p where p.id = v_after.plan_id)),
        'before', jsonb_build_object('plan_id', p_before.plan_id,
                                     'billing_period', p_before.billing_period),
        'after', jsonb_build_object('plan_id', v_after.plan_id,
                                    'billing_period', v_after.billing_period)));
  end if;
  return v_after;
end;
$$;

-- An invoice bills a cycle's metered usage in arrears: its usage lines of a metered price
-- (Python keeps the subscription-item lines that are not prorations, and the invoice items
-- billing metered usage at a price change), whose period ended by the time the invoice was made,
-- name the cycle their period starts in. The number of cycles it closed.
create function private.close_invoiced_cycles(p_subscription_id uuid, p_invoice jsonb)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_invoiced integer;
begin
  update public.billing_cycles c
     set stripe_invoice_id = p_invoice ->> 'id', status = 'closed', updated_at = now()
   where c.subscription_id = p_subscription_id
     and c.stripe_invoice_id is null
     and exists (
       select 1
         from jsonb_array_elements(coalesce(p_invoice -> 'lines', '[]'::jsonb)) l
        where (l ->> 'period_end')::bigint <= (p_invoice ->> 'created')::bigint
          and (l ->> 'period_end')::bigint > (l ->> 'period_start')::bigint
          -- The line bills the cycle (or the part of a split one) it starts in, to its end.
          -- Stripe's times are whole seconds; ours split at a change within a second, and
          -- Stripe's change may follow our request by a few seconds.
          and to_timestamp((l ->> 'period_start')::bigint) >= date_trunc('second', c.period_start)
          and to_timestamp((l ->> 'period_start')::bigint) < c.period_end
          and to_timestamp((l ->> 'period_end')::bigint)
              between date_trunc('second', c.period_end) and c.period_end + interval '5 seconds'
          and exists (
            select 1 from public.billing_plan_prices pp
             where pp.kind = 'metered' and pp.stripe_price_id = l ->> 'price_id')
     );
  get diagnostics v_invoiced = row_count;
  return v_invoiced;
end;
$$;

-- A duplicate we canceled (our cancellation comment names the kept one, parsed by Python into
-- duplicate_of): recorded once, for a person. Refunds are NOT made here: whether and how much to
-- refund the duplicate's payments is a person's decision; the row lists what it paid.
create function private.audit_duplicate_canceled(
  p_sub public.subscriptions, p_state jsonb, p_actor text, p_event_id text
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_sub.status not in ('canceled', 'incomplete_expired') or p_state ->> 'duplicate_of' is null
     or exists (
       select 1 from public.audit_log a
        where a.organisation_id = p_sub.organisation_id
          and a.action = 'subscription.duplicate_canceled'
          and a.details ->> 'canceled' = p_sub.stripe_subscription_id) then
    return;
  end if;
  insert into public.audit_log (organisation_id, actor, action, details)
  values (p_sub.organisation_id, p_actor, 'subscription.duplicate_canceled', jsonb_build_object(
    'kept', p_state ->> 'duplicate_of',
    'canceled', p_sub.stripe_subscription_id,
    'invoices_to_refund', (
      select coalesce(jsonb_agg(i.id order by i.id), '[]'::jsonb)
        from (
          select p_state ->> 'latest_invoice'
          union
          select c.stripe_invoice_id from public.billing_cycles c
           where c.subscription_id = p_sub.id
        ) as i (id)
       where i.id is not null),
    'event_id', p_event_id));
end;
$$;

-- Apply a subscription state fetched from Stripe at p_state_at (contract as in sql/0021, in
-- named steps): p_state = {stripe_subscription_id, stripe_customer_id, status, organisation_id,
-- cancel_at_period_end, canceled_at, created, latest_invoice, duplicate_of, schedule,
-- changed_at (unix s, when a price change happened if known), items: [{price_id, usage_type,
-- current_period_start, current_period_end}]}.
-- - not fresher than the stored state, or live over an ended one: nothing changes;
-- - a subscription we have no row for and no organisation owns: `ignored` with the reason;
-- - the newer of two live subscriptions of an organisation: not written, named as `duplicate`;
-- - else stored (private.store_subscription), its cycles synced (private.sync_cycles), the
--   invoice's cycles closed, a duplicate we canceled audited, our Checkout Session marked
--   complete and p_event_id marked processed, all in this one transaction.
create or replace function public.apply_subscription_state(
  p_state jsonb,
  p_state_at timestamptz,
  p_event_id text default null,
  p_organisation_id uuid default null,
  p_invoice jsonb default null,
  p_actor text default 'stripe-webhook',
  p_checkout_session_id text default null
) returns jsonb
language plpgsql
as $$
declare
  c_terminal constant text[] := array['canceled', 'incomplete_expired'];
  c_live constant text[] := array['active', 'trialing', 'past_due', 'unpaid'];
  v_stripe_id text := p_state ->> 'stripe_subscription_id';
  v_status text := p_state ->> 'status';
  v_before public.subscriptions;
  v_after public.subscriptions;
  v_exists boolean;
  v_fresh boolean;
  v_owner jsonb;
  v_duplicate jsonb;
  v_plan jsonb;
  v_changed text[] := '{}';
  v_invoiced integer := 0;
begin
  if v_stripe_id is null or p_state ->> 'stripe_customer_id' is null or v_status is null
     or p_state_at is null then
    raise exception 'A subscription state needs stripe_subscription_id, stripe_customer_id, status and the time it was fetched.'
      using errcode = 'MB422', hint = 'invalid_subscription_state';
  end if;

  -- Applies for one subscription run one after another, its first insert included.
  perform pg_advisory_xact_lock(hashtextextended('stripe_subscription:' || v_stripe_id, 0));
  select s.* into v_before
    from public.subscriptions s
   where s.stripe_subscription_id = v_stripe_id
     for update;
  v_exists := found;
  v_after := v_before;
  v_fresh := not v_exists or not (
    (v_before.stripe_state_at is not null and p_state_at <= v_before.stripe_state_at)
    or (v_before.status = any (c_terminal) and not v_status = any (c_terminal))
  );

  if not v_exists then
    v_owner := private.subscription_owner(p_state, p_organisation_id);
    if v_owner ? 'reason' then
      if p_event_id is not null then
        update public.stripe_events e
           set status = 'ignored', error = v_owner ->> 'reason', processed_at = now()
         where e.id = p_event_id;
      end if;
      return jsonb_build_object('status', 'ignored', 'reason', v_owner ->> 'reason');
    end if;
  end if;

  if (v_fresh and v_status = any (c_live)) or (not v_fresh and v_before.status = any (c_live)) then
    v_duplicate := private.live_duplicate(
      coalesce(v_before.organisation_id, (v_owner ->> 'organisation_id')::uuid), v_stripe_id,
      coalesce(to_timestamp((p_state ->> 'created')::bigint), v_before.stripe_created,
               v_before.created_at, now()),
      coalesce(v_before.created_at, now()));
    -- The one applied now is the newer: it never becomes the organisation's live subscription
    -- here (record_usage would meter against it). Nothing is written and the event stays
    -- unprocessed until its canceled state is applied.
    if v_duplicate ->> 'newer' = v_stripe_id then
      return jsonb_build_object(
        'status', 'duplicate', 'duplicate', v_duplicate, 'subscription_id', v_before.id,
        'organisation_id', coalesce(v_before.organisation_id,
                                    (v_owner ->> 'organisation_id')::uuid),
        'subscription_status', v_before.status, 'plan_id', v_before.plan_id,
        'billing_period', v_before.billing_period, 'created', false, 'applied', false,
        'changed', '[]'::jsonb, 'invoiced_cycles', 0);
    end if;
  end if;

  if v_fresh then
    v_plan := private.resolve_plan(p_state);
    v_after := private.store_subscription(
      v_before, v_owner, p_state, p_state_at, v_plan, p_event_id, p_actor);
    if v_exists then
      select coalesce(array_agg(a.key order by a.key), '{}') into v_changed
        from jsonb_each(to_jsonb(v_after)) a
        join jsonb_each(to_jsonb(v_before)) b using (key)
       where a.key in ('status', 'plan_id', 'billing_period', 'stripe_customer_id',
                       'current_period_start', 'current_period_end', 'cancel_at_period_end',
                       'canceled_at')
         and a.value is distinct from b.value;
    end if;
    perform private.sync_cycles(
      v_after, v_plan, p_state_at, to_timestamp((p_state ->> 'changed_at')::double precision));
  end if;

  -- Valid whatever the state's age.
  if p_invoice is not null then
    v_invoiced := private.close_invoiced_cycles(v_after.id, p_invoice);
  end if;
  perform private.audit_duplicate_canceled(v_after, p_state, p_actor, p_event_id);

  -- The Checkout Session that made this subscription is complete: the next click is refused
  -- (already_subscribed, or checkout_completed) without asking Stripe.
  if p_checkout_session_id is not null then
    update public.checkout_sessions c
       set status = 'complete',
           closed_at = coalesce(c.closed_at, now()),
           stripe_subscription_id = v_stripe_id
     where c.stripe_session_id = p_checkout_session_id
       and (c.status <> 'complete' or c.stripe_subscription_id is distinct from v_stripe_id);
  end if;

  -- Not while a newer duplicate is still live: the event is done once Python canceled it.
  if p_event_id is not null and v_duplicate ->> 'newer' is null then
    update public.stripe_events e
       set status = 'processed', processed_at = now(), error = null
     where e.id = p_event_id;
  end if;

  return jsonb_build_object(
    'status', 'processed',
    'subscription_id', v_after.id,
    'organisation_id', v_after.organisation_id,
    'subscription_status', v_after.status,
    'plan_id', v_after.plan_id,
    'billing_period', v_after.billing_period,
    'created', not v_exists,
    'applied', v_fresh,
    'changed', to_jsonb(v_changed),
    'invoiced_cycles', v_invoiced,
    'duplicate', case when v_duplicate ->> 'newer' is not null then v_duplicate end
  );
end;
$$;

-- GET report-usage shows the cycle a call would be counted in now (the late-usage rule).
create or replace function public.usage_summary(p_org_id uuid)
returns jsonb
language plpgsql stable
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_live constant text[] := array['active', 'trialing', 'past_due', 'unpaid'];
  v_sub public.subscriptions;
  v_plan public.billing_plans;
  v_cycle public.billing_cycles;
  v_period tstzrange;
begin
  if not exists (select 1 from public.organisations o where o.id = p_org_id) then
    raise exception 'No organisation has id %.', p_org_id
      using errcode = 'MB404', hint = 'organisation_not_found';
  end if;
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = p_org_id
   order by s.status = any (v_live) desc, s.created_at desc
   limit 1;
  select p.* into v_plan from public.billing_plans p where p.id = v_sub.plan_id;
  -- The cycle calls are counted in now (private.current_cycle's rule): the first of the
  -- subscription's that has not ended and whose usage is not invoiced yet.
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = v_sub.id and now() < c.period_end
     and c.stripe_invoice_id is null and not c.closed_by_change
   order by c.period_start
   limit 1;
  if v_cycle.id is null and v_sub.status = any (v_live) then
    v_period := private.metered_period(v_sub.id, now());
    if v_period is not null then
      v_cycle.period_start := lower(v_period);
      v_cycle.period_end := upper(v_period);
      v_cycle.included_minutes := (select t.included_minutes
                                     from private.subscription_terms(v_sub) t);
      v_cycle.minutes_used := 0;
      v_cycle.overage_minutes := 0;
      v_cycle.overage_cost_cents := 0;
    end if;
  end if;
  return jsonb_build_object(
    'org_id', p_org_id,
    'plan', case when v_plan.id is not null
      then jsonb_build_object('id', v_plan.id, 'name', v_plan.name) end,
    'subscription_status', v_sub.status,
    'period_start', v_cycle.period_start,
    'period_end', v_cycle.period_end,
    'included_minutes', v_cycle.included_minutes,
    'minutes_used', v_cycle.minutes_used,
    'overage_minutes', v_cycle.overage_minutes,
    'overage_cost_cents', v_cycle.overage_cost_cents,
    'currency', v_plan.currency,
    'allowed', coalesce(v_sub.status in ('active', 'trialing', 'past_due'), false)
  );
end;
$$;

-- ------------------------------------------------------------------ change-plan

-- Validate a plan change and claim it, in one transaction (DESIGN.md, POST change-plan):
-- 403/404/422 from billing_organisation_for; 409 no_subscription without a live subscription,
-- payment_past_due while past_due or unpaid, checkout_in_progress while a Checkout Session of
-- the organisation is open; for cancel_pending, 409 nothing_pending; else 404 plan_not_found
-- unless the plan is on sale, 422 yearly_not_offered, 409 same_plan for the current plan and
-- period with nothing pending (with a pending change, choosing the current plan cancels it). A
-- downgrade already pending to the same target is answered as it is (`already_scheduled`).
-- An upgrade is a higher flat price in the same period, or monthly to yearly; anything else is a
-- downgrade. The claim: one `started` plan_changes row per organisation (409 change_in_progress);
-- its id is the Stripe idempotency key of every call of the change.
create function public.begin_plan_change(
  p_user_id uuid,
  p_organisation_id uuid,
  p_plan_id uuid,
  p_billing_period text,
  p_cancel_pending boolean
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_organisation jsonb := public.billing_organisation_for(p_user_id, p_organisation_id);
  v_organisation_id uuid := (v_organisation ->> 'id')::uuid;
  v_sub public.subscriptions;
  v_current public.billing_plans;
  v_target public.billing_plans;
  v_kind text;
  v_change public.plan_changes;
begin
  perform pg_advisory_xact_lock(hashtextextended('plan_change:' || v_organisation_id::text, 0));
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = v_organisation_id
     and s.status in ('active', 'trialing', 'past_due', 'unpaid')
   order by s.created_at desc
   limit 1;
  if v_sub.id is null then
    raise exception 'This organisation has no live subscription to change; buy a plan first.'
      using errcode = 'MB409', hint = 'no_subscription';
  end if;
  if v_sub.status in ('past_due', 'unpaid') then
    raise exception 'The last payment failed; update the payment method (Manage billing) before changing plans.'
      using errcode = 'MB409', hint = 'payment_past_due';
  end if;
  if exists (
    select 1 from public.checkout_sessions c
     where c.organisation_id = v_organisation_id and c.status = 'open'
       and (c.expires_at is null or c.expires_at > now())
  ) then
    raise exception 'A checkout for this organisation is still open; finish or cancel it first.'
      using errcode = 'MB409', hint = 'checkout_in_progress';
  end if;
  select p.* into v_current from public.billing_plans p where p.id = v_sub.plan_id;

  if p_cancel_pending then
    if v_sub.pending_plan_id is null then
      raise exception 'No plan change is pending.'
        using errcode = 'MB409', hint = 'nothing_pending';
    end if;
    v_kind := 'cancel_pending';
    v_target := v_current;
  else
    if p_billing_period is null or p_billing_period not in ('monthly', 'yearly') then
      raise exception 'billing_period: must be monthly or yearly.'
        using errcode = 'MB422', hint = 'validation_error';
    end if;
    select p.* into v_target from public.billing_plans p where p.id = p_plan_id and p.active;
    if v_target.id is null then
      raise exception 'This plan does not exist or is no longer on sale.'
        using errcode = 'MB404', hint = 'plan_not_found';
    end if;
    if p_billing_period = 'yearly' and v_target.stripe_yearly_price_id is null then
      raise exception 'billing_period: this plan has no yearly price; choose monthly.'
        using errcode = 'MB422', hint = 'yearly_not_offered';
    end if;
    if v_target.stripe_price_id is null or v_target.stripe_metered_price_id is null then
      raise exception 'This plan is not ready for sale yet (its Stripe prices are missing).'
        using errcode = 'MB409', hint = 'plan_not_ready';
    end if;
    if (v_sub.pending_plan_id, v_sub.pending_billing_period)
       is not distinct from (v_target.id, p_billing_period) then
      return jsonb_build_object(
        'kind', 'already_scheduled', 'subscription', to_jsonb(v_sub),
        'organisation_id', v_organisation_id);
    end if;
    if (v_sub.plan_id, v_sub.billing_period) = (v_target.id, p_billing_period) then
      if v_sub.pending_plan_id is null then
        raise exception 'The organisation is already on this plan and period.'
          using errcode = 'MB409', hint = 'same_plan';
      end if;
      v_kind := 'cancel_pending';
    elsif v_sub.billing_period = 'monthly' and p_billing_period = 'yearly' then
      v_kind := 'upgrade';
    elsif v_sub.billing_period = 'yearly' and p_billing_period = 'monthly' then
      v_kind := 'downgrade';
    elsif (case when p_billing_period = 'yearly' then v_target.yearly_price_cents
                else v_target.monthly_price_cents end)
          > (case when p_billing_period = 'yearly' then v_current.yearly_price_cents
                  else v_current.monthly_price_cents end) then
      v_kind := 'upgrade';
    else
      v_kind := 'downgrade';
    end if;
  end if;

  -- A claim older than two minutes belongs to a process that died: the change it was making is
  -- either at Stripe (the webhook applies it) or not made at all.
  update public.plan_changes c
     set status = 'abandoned', finished_at = now()
   where c.organisation_id = v_organisation_id and c.status = 'started'
     and c.created_at < now() - interval '2 minutes';
  begin
    insert into public.plan_changes
      (organisation_id, subscription_id, requested_by, kind, from_plan_id, from_billing_period,
       to_plan_id, to_billing_period)
    values (v_organisation_id, v_sub.id, p_user_id, v_kind, v_sub.plan_id, v_sub.billing_period,
            v_target.id, coalesce(p_billing_period, v_sub.billing_period))
    returning * into v_change;
  exception when unique_violation then
    raise exception 'Another plan change for this organisation is in progress; try again in a moment.'
      using errcode = 'MB409', hint = 'change_in_progress';
  end;

  return jsonb_build_object(
    'kind', v_kind,
    'change_id', v_change.id,
    'organisation_id', v_organisation_id,
    'subscription', to_jsonb(v_sub),
    'target', jsonb_build_object(
      'plan_id', v_target.id,
      'billing_period', v_change.to_billing_period,
      'flat_price_id', case when v_change.to_billing_period = 'yearly'
                            then v_target.stripe_yearly_price_id else v_target.stripe_price_id end,
      'metered_price_id', v_target.stripe_metered_price_id));
end;
$$;

-- The end of a claimed change: applied (an upgrade, its state applied by apply_subscription_state),
-- scheduled (a downgrade: pending_* set from p_effective_at and the schedule), released (the
-- pending change canceled), payment_failed or failed (nothing changed). Audited.
create function public.finish_plan_change(
  p_change_id uuid,
  p_status text,
  p_schedule_id text default null,
  p_effective_at timestamptz default null,
  p_error text default null
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_change public.plan_changes;
  v_sub public.subscriptions;
begin
  if p_status is null
     or p_status not in ('applied', 'scheduled', 'released', 'payment_failed', 'failed') then
    raise exception 'status must be applied, scheduled, released, payment_failed or failed.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  update public.plan_changes c
     set status = p_status, error = left(p_error, 1000), finished_at = now()
   where c.id = p_change_id and c.status in ('started', 'abandoned')
  returning * into v_change;
  if v_change.id is null then
    select c.* into v_change from public.plan_changes c where c.id = p_change_id;
    return jsonb_build_object('status', v_change.status);
  end if;
  if p_status = 'scheduled' then
    update public.subscriptions s
       set pending_plan_id = v_change.to_plan_id,
           pending_billing_period = v_change.to_billing_period,
           pending_effective_at = p_effective_at,
           pending_set_at = now(),
           stripe_schedule_id = p_schedule_id,
           updated_at = now()
     where s.id = v_change.subscription_id
    returning * into v_sub;
  elsif p_status = 'released' then
    update public.subscriptions s
       set pending_plan_id = null, pending_billing_period = null, pending_effective_at = null,
           pending_set_at = null, stripe_schedule_id = null, updated_at = now()
     where s.id = v_change.subscription_id
    returning * into v_sub;
  end if;
  insert into public.audit_log (organisation_id, actor, action, details)
  values (v_change.organisation_id, 'change-plan:' || v_change.requested_by,
    case p_status
      when 'scheduled' then 'subscription.plan_change_scheduled'
      when 'released' then 'subscription.plan_change_canceled'
      when 'applied' then 'subscription.plan_change_requested'
      else 'subscription.plan_change_failed' end,
    jsonb_build_object(
      'change_id', v_change.id, 'kind', v_change.kind, 'status', p_status,
      'from', jsonb_build_object('plan_id', v_change.from_plan_id,
                                 'billing_period', v_change.from_billing_period),
      'to', jsonb_build_object('plan_id', v_change.to_plan_id,
                               'billing_period', v_change.to_billing_period),
      'effective_at', p_effective_at, 'error', left(p_error, 1000)));
  return jsonb_build_object('status', p_status);
end;
$$;

revoke all on function private.refigure_cycle(uuid) from public, anon, authenticated;
revoke all on function private.move_split(public.billing_cycles, timestamptz)
  from public, anon, authenticated;
revoke all on function private.split_cycle(
  public.billing_cycles, timestamptz, text, integer, integer, timestamptz)
  from public, anon, authenticated;
revoke all on function private.sync_cycles(public.subscriptions, jsonb, timestamptz, timestamptz)
  from public, anon, authenticated;
revoke all on function private.resolve_plan(jsonb) from public, anon, authenticated;
revoke all on function private.subscription_owner(jsonb, uuid) from public, anon, authenticated;
revoke all on function private.live_duplicate(uuid, text, timestamptz, timestamptz)
  from public, anon, authenticated;
revoke all on function private.store_subscription(
  public.subscriptions, jsonb, jsonb, timestamptz, jsonb, text, text)
  from public, anon, authenticated;
revoke all on function private.close_invoiced_cycles(uuid, jsonb) from public, anon, authenticated;
revoke all on function private.audit_duplicate_canceled(public.subscriptions, jsonb, text, text)
  from public, anon, authenticated;
revoke all on function public.begin_plan_change(uuid, uuid, uuid, text, boolean)
  from public, anon, authenticated;
revoke all on function public.finish_plan_change(uuid, text, text, timestamptz, text)
  from public, anon, authenticated;
grant execute on function private.refigure_cycle(uuid) to service_role;
grant execute on function private.move_split(public.billing_cycles, timestamptz) to service_role;
grant execute on function private.split_cycle(
  public.billing_cycles, timestamptz, text, integer, integer, timestamptz) to service_role;
grant execute on function private.sync_cycles(public.subscriptions, jsonb, timestamptz, timestamptz)
  to service_role;
grant execute on function private.resolve_plan(jsonb) to service_role;
grant execute on function private.subscription_owner(jsonb, uuid) to service_role;
grant execute on function private.live_duplicate(uuid, text, timestamptz, timestamptz)
  to service_role;
grant execute on function private.store_subscription(
  public.subscriptions, jsonb, jsonb, timestamptz, jsonb, text, text) to service_role;
grant execute on function private.close_invoiced_cycles(uuid, jsonb) to service_role;
grant execute on function private.audit_duplicate_canceled(public.subscriptions, jsonb, text, text)
  to service_role;
grant execute on function public.begin_plan_change(uuid, uuid, uuid, text, boolean)
  to service_role;
grant execute on function public.finish_plan_change(uuid, text, text, timestamptz, text)
  to service_role;

-- migrate:down
