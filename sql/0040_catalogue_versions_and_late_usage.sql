-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Money through change (issue 9): catalogue versions, late usage and Stripe's time windows.
--
-- Catalogue versions. Stripe prices are immutable: a new amount or a new number of included
-- minutes is a new price, and Stripe keeps billing every existing subscriber on the price they
-- are on. So a plan is resolved from ANY price ever issued for it (billing_plan_prices, written by
-- a trigger on billing_plans, whatever writes it), and a subscription's cycles take their
-- included minutes and overage rate from the metered price it is on (kept on the subscription
-- and on each cycle). billing_plans names the current prices: new checkouts only.
--
-- Late usage (DESIGN.md, POST report-usage). Stripe bills a period's usage on the invoice it
-- finalizes about an hour after the period ends (the grace hour); a meter event timestamped in
-- a period whose invoice is made is never billed, and one older than 35 days is refused. A call
-- whose own cycle can no longer be billed is therefore counted in the current cycle and metered
-- at the time of counting (`late`), never in the invoiced cycle. We rely on 55 minutes of the
-- grace hour (private.meter_grace): 5 minutes of margin for the attempt in flight.
--
-- Stripe's identifier window. Stripe refuses a repeated identifier for at least 24 hours, not
-- forever. An attempt whose outcome we never learned (no answer, a 5xx, a process killed while
-- it held the event) may have been recorded; after ~24 h a resend would be billed again. So an
-- event is never resent once its first unknown attempt is 23 hours old: it becomes
-- `unconfirmed`, for reconciliation. For the same reason an unknown event whose period's grace
-- ended is `unconfirmed`, not moved: Stripe may have billed it in its own period.

-- ------------------------------------------------------------------ catalogue versions

create table public.billing_plan_prices (
  stripe_price_id text primary key,
  plan_id uuid not null references public.billing_plans (id),
  kind text not null check (kind in ('monthly', 'yearly', 'metered')),
  currency text not null check (currency ~ '^[a-z]{3}$'),
  -- monthly / yearly: the flat fee; metered: the overage rate per minute (above the tier of
  -- included minutes, which cost 0).
  unit_amount_cents integer not null check (unit_amount_cents >= 0),
  included_minutes integer check (included_minutes >= 0),
  overage_rate_cents integer check (overage_rate_cents >= 0),
  -- one of the plan's current prices (billing_plans.*_price_id); false once replaced
  active boolean not null default true,
  created_at timestamptz not null default now(),
  check ((kind = 'metered') = (included_minutes is not null and overage_rate_cents is not null))
);
create index billing_plan_prices_plan_id_idx on public.billing_plan_prices (plan_id);

alter table public.billing_plan_prices enable row level security;
-- Prices of every plan ever sold, old ones included: the service role's business only.
create policy billing_plan_prices_no_end_user_access on public.billing_plan_prices
  as restrictive for all to anon, authenticated using (false) with check (false);
revoke all on table public.billing_plan_prices from anon, authenticated;
grant all on table public.billing_plan_prices to service_role;

-- Record the plan's current prices with the terms they carry; prices it no longer names become
-- inactive. A price's terms never change (Stripe's cannot): writing other terms under a known
-- price id, or giving a price to another plan, is refused, so our figures cannot drift from
-- what Stripe bills.
create function private.record_plan_prices() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_price record;
  v_known public.billing_plan_prices;
begin
  for v_price in
    select p.price_id, p.kind, p.amount, p.included, p.rate
      from (values
        (new.stripe_price_id, 'monthly', new.monthly_price_cents, null::integer, null::integer),
        (new.stripe_yearly_price_id, 'yearly', new.yearly_price_cents, null, null),
        (new.stripe_metered_price_id, 'metered', new.overage_rate_cents, new.included_minutes,
         new.overage_rate_cents)
      ) as p (price_id, kind, amount, included, rate)
     where p.price_id is not null
  loop
    select pp.* into v_known
      from public.billing_plan_prices pp
     where pp.stripe_price_id = v_price.price_id
       for update;
    if not found then
      insert into public.billing_plan_prices
        (stripe_price_id, plan_id, kind, currency, unit_amount_cents, included_minutes,
         overage_rate_cents)
      values (v_price.price_id, new.id, v_price.kind, new.currency, coalesce(v_price.amount, 0),
              v_price.included, v_price.rate);
    elsif (v_known.plan_id, v_known.kind, v_known.currency, v_known.unit_amount_cents,
           v_known.included_minutes, v_known.overage_rate_cents)
          is distinct from (new.id, v_price.kind, new.currency, coalesce(v_price.amount, 0),
                            v_price.included, v_price.rate) then
      raise exception 'Stripe price % already carries other terms (plan %, %, % % , % included minutes, overage %): Stripe prices never change, so new terms need a new price (./deploy.sh stripe-catalog makes one).',
        v_price.price_id, v_known.plan_id, v_known.kind, v_known.unit_amount_cents,
        v_known.currency, v_known.included_minutes, v_known.overage_rate_cents
        using errcode = 'MB409', hint = 'price_terms_changed';
    elsif not v_known.active then
      update public.billing_plan_prices pp set active = true
       where pp.stripe_price_id = v_price.price_id;
    end if;
  end loop;
  update public.billing_plan_prices pp
     set active = false
   where pp.plan_id = new.id and pp.active
     and not coalesce(pp.stripe_price_id = any (array[
       new.stripe_price_id, new.stripe_yearly_price_id, new.stripe_metered_price_id]), false);
  return null;
end;
$$;

create trigger billing_plans_record_prices
  after insert or update on public.billing_plans
  for each row execute function private.record_plan_prices();

-- The prices existing plans name today: the only terms known of them.
insert into public.billing_plan_prices
  (stripe_price_id, plan_id, kind, currency, unit_amount_cents, included_minutes,
   overage_rate_cents)
select x.price_id, p.id, x.kind, p.currency, coalesce(x.amount, 0), x.included, x.rate
  from public.billing_plans p
 cross join lateral (values
   (p.stripe_price_id, 'monthly', p.monthly_price_cents, null::integer, null::integer),
   (p.stripe_yearly_price_id, 'yearly', p.yearly_price_cents, null, null),
   (p.stripe_metered_price_id, 'metered', p.overage_rate_cents, p.included_minutes,
    p.overage_rate_cents)
 ) as x (price_id, kind, amount, included, rate)
 where x.price_id is not null
on conflict (stripe_price_id) do nothing;

-- The metered price a subscription is on (its cycles' terms), and each cycle's overage rate.
alter table public.subscriptions add column stripe_metered_price_id text;
alter table public.billing_cycles
  add column overage_rate_cents integer not null default 0 check (overage_rate_cents >= 0);
update public.subscriptions s
   set stripe_metered_price_id = p.stripe_metered_price_id
  from public.billing_plans p
 where p.id = s.plan_id and s.stripe_metered_price_id is null;
update public.billing_cycles c
   set overage_rate_cents = p.overage_rate_cents
  from public.subscriptions s
  join public.billing_plans p on p.id = s.plan_id
 where s.id = c.subscription_id;
-- From now on every writer names the rate: a cycle silently billing 0 a minute is a bug.
-- squawk-ignore ban-drop-default
alter table public.billing_cycles alter column overage_rate_cents drop default;

-- The plan and terms of a subscription's price ids: the flat price (monthly or yearly) decides
-- the plan and the billing period, current or old; the metered price on the subscription decides
-- the included minutes and the overage rate (the plan's current metered price while it has
-- none, e.g. a yearly checkout before its metered item is added). NULL when no plan ever had its
-- flat price. p_price_ids: a jsonb array of price ids.
create or replace function public.plan_for_stripe_prices(p_price_ids jsonb) returns jsonb
language sql stable
as $$
  with given as (
    select jsonb_array_elements_text(coalesce(p_price_ids, '[]'::jsonb)) as id
  ), flat as (
    select pp.*
      from public.billing_plan_prices pp
      join given g on g.id = pp.stripe_price_id
     where pp.kind in ('monthly', 'yearly')
     order by pp.kind = 'yearly' desc, pp.active desc, pp.stripe_price_id
     limit 1
  )
  select jsonb_build_object(
           'plan_id', p.id,
           'name', p.name,
           'billing_period', f.kind,
           'flat_price_id', f.stripe_price_id,
           'stripe_metered_price_id', coalesce(m.stripe_price_id, p.stripe_metered_price_id),
           'included_minutes', coalesce(m.included_minutes, p.included_minutes),
           'overage_rate_cents', coalesce(m.overage_rate_cents, p.overage_rate_cents)
         )
    from flat f
    join public.billing_plans p on p.id = f.plan_id
    left join lateral (
      select pp.*
        from public.billing_plan_prices pp
        join given g on g.id = pp.stripe_price_id
       where pp.kind = 'metered'
       order by pp.plan_id = f.plan_id desc, pp.active desc, pp.stripe_price_id
       limit 1
    ) m on true;
$$;

-- The terms a subscription's cycles carry: those of the metered price it is on, else of its
-- plan's current metered price.
create function private.subscription_terms(p_subscription public.subscriptions)
returns table (included_minutes integer, overage_rate_cents integer)
language sql stable
set search_path = ''
as $$
  select coalesce(pp.included_minutes, p.included_minutes, 0),
         coalesce(pp.overage_rate_cents, p.overage_rate_cents, 0)
    from (select 1) as one
    left join public.billing_plans p on p.id = p_subscription.plan_id
    left join public.billing_plan_prices pp
      on pp.stripe_price_id = p_subscription.stripe_metered_price_id and pp.kind = 'metered';
$$;

-- apply_subscription_state stores the metered price a subscription is on and opens its cycles
-- with that price's terms: sql/0050_plan_changes.sql (the next migration, applied with this one).

-- ------------------------------------------------------------------ late usage and windows

-- late: counted in a later cycle than the one the call ended in. metered_at: the timestamp its
-- meter event carries (ended_at, or the moment it was counted late). meter_claimed_at: when the
-- attempt now under way began (cleared by its result: one still set at the next claim means
-- the process died mid-attempt, its outcome unknown). meter_outcome_unknown_at: the first attempt
-- that may have reached Stripe without us learning it (Stripe's identifier window counts from
-- it). meter_requeues: how often requeue-usage put the row back (each time a new identifier).
alter table public.usage_records
  add column late boolean not null default false,
  add column metered_at timestamptz,
  add column meter_claimed_at timestamptz,
  add column meter_outcome_unknown_at timestamptz,
  add column meter_requeues integer not null default 0 check (meter_requeues >= 0);
update public.usage_records u set metered_at = u.ended_at where u.metered_at is null;
-- The check widens (every stored row passes it): replaced, and not revalidated.
alter table public.usage_records
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_meter_status_check,
  add constraint usage_records_meter_status_check
    check (meter_status in ('pending', 'sent', 'failed', 'skipped', 'unconfirmed')) not valid;

-- The part of Stripe's invoice grace hour we rely on (5 minutes of margin for an attempt in flight).
create function private.meter_grace() returns interval
language sql immutable
set search_path = ''
as $$ select interval '55 minutes' $$;

-- The meter event identifier of a call: derived from (organisation, call), never random; a row
-- put back by requeue-usage gets a new one per requeue (Stripe may keep the refused one).
create function private.meter_identifier(p_org_id uuid, p_call_id text, p_requeues integer)
returns text
language sql immutable
set search_path = ''
as $$
  select 'mb_' || encode(sha256(convert_to(
    p_org_id::text || ':' || p_call_id
      || case when p_requeues > 0 then ':requeue:' || p_requeues else '' end,
    'UTF8')), 'hex')
$$;

-- The period of p_sub's cycle that contains p_at: its cycle's, else the monthly grid's; NULL
-- when its periods are unknown or p_at is before its first period (not this subscription's).
create function private.cycle_period(p_sub public.subscriptions, p_at timestamptz)
returns tstzrange
language plpgsql stable
set search_path = ''
as $$
declare
  v_period tstzrange;
begin
  select tstzrange(c.period_start, c.period_end, '[)') into v_period
    from public.billing_cycles c
   where c.subscription_id = p_sub.id and c.period_start <= p_at and p_at < c.period_end
   order by c.period_start desc
   limit 1;
  if v_period is not null then
    return v_period;
  end if;
  v_period := private.metered_period(p_sub.id, p_at);
  if lower(v_period) < (
    select least(min(c.period_start), p_sub.current_period_start)
      from public.billing_cycles c
     where c.subscription_id = p_sub.id
  ) then
    return null;
  end if;
  return v_period;
end;
$$;

-- p_sub's cycle for p_period, opened with the terms of the metered price it is on when missing.
-- period_start is the key the webhook uses too: it confirms this cycle, never adds one.
create function private.open_cycle(p_sub public.subscriptions, p_period tstzrange)
returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
begin
  insert into public.billing_cycles
    (organisation_id, subscription_id, period_start, period_end, included_minutes,
     overage_rate_cents)
  select p_sub.organisation_id, p_sub.id, lower(p_period), upper(p_period), t.included_minutes,
         t.overage_rate_cents
    from private.subscription_terms(p_sub) t
  on conflict (subscription_id, period_start) do nothing;
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = p_sub.id and c.period_start = lower(p_period);
  return v_cycle;
end;
$$;

-- The organisation's current cycle: the first cycle of its live subscription that has not ended
-- and whose invoice is not made (the one containing now, or, when that one was invoiced early,
-- the next), opened when missing; NULL without a live subscription. Locks the subscription (key
-- share) before its cycle, the order apply_subscription_state takes too.
create function private.current_cycle(p_org_id uuid)
returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_sub public.subscriptions;
  v_cycle public.billing_cycles;
  v_period tstzrange;
begin
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = p_org_id
     and s.status in ('active', 'trialing', 'past_due', 'unpaid')
   order by s.created_at desc
   limit 1
     for key share;
  if v_sub.id is null then
    return null;
  end if;
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = v_sub.id and c.period_end > now() and c.stripe_invoice_id is null
   order by c.period_start
   limit 1;
  if v_cycle.id is not null then
    return v_cycle;
  end if;
  v_period := private.cycle_period(v_sub, now());
  if v_period is null then
    return null;
  end if;
  v_cycle := private.open_cycle(v_sub, v_period);
  if v_cycle.stripe_invoice_id is not null then  -- invoiced early: the period after it
    v_cycle := private.open_cycle(v_sub, private.metered_period(v_sub.id, upper(v_period)));
  end if;
  return v_cycle;
end;
$$;

-- Add p_minutes (negative: take them back) to a cycle at its own terms; the alerts a positive
-- amount crosses (old usage below t% of the included minutes, new usage at or above) are
-- recorded once per cycle, for p_usage_record_id. No included minutes: nothing to warn about.
create function private.add_cycle_minutes(
  p_cycle_id uuid, p_minutes integer, p_usage_record_id uuid
) returns public.billing_cycles
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
begin
  update public.billing_cycles c
     set minutes_used = c.minutes_used + p_minutes,
         overage_minutes = greatest(c.minutes_used + p_minutes - c.included_minutes, 0),
         overage_cost_cents = greatest(c.minutes_used + p_minutes - c.included_minutes, 0)
           * c.overage_rate_cents,
         updated_at = now()
   where c.id = p_cycle_id
  returning c.* into v_cycle;
  if p_minutes > 0 then
    insert into public.usage_alerts
      (organisation_id, billing_cycle_id, threshold_percent, usage_record_id)
    select v_cycle.organisation_id, v_cycle.id, t.pct, p_usage_record_id
      from unnest(array[80, 100, 120]) as t (pct)
     where (v_cycle.minutes_used - p_minutes)::bigint * 100
             < t.pct::bigint * v_cycle.included_minutes
       and t.pct::bigint * v_cycle.included_minutes <= v_cycle.minutes_used::bigint * 100
    on conflict (billing_cycle_id, threshold_percent) do nothing;
  end if;
  return v_cycle;
end;
$$;

-- Why Stripe can no longer bill usage of p_cycle metered at p_at: 'invoiced', 'grace_passed',
-- 'too_old' (Stripe refuses timestamps older than 35 days), or NULL while it still can.
create function private.unbillable_reason(p_cycle public.billing_cycles, p_at timestamptz)
returns text
language sql stable
set search_path = ''
as $$
  select case
    when p_cycle.stripe_invoice_id is not null then 'invoiced'
    when p_cycle.period_end + private.meter_grace() <= now() then 'grace_passed'
    when p_at < now() - interval '34 days' then 'too_old'
  end
$$;

-- Count an undelivered usage row late: its minutes leave the cycle Stripe can no longer bill and
-- join the current one, metered now under the same identifier (nothing of it reached Stripe);
-- without a live subscription it is counted nowhere (`skipped`). Audited as usage.late.
create function private.count_late(p_record public.usage_records, p_reason text)
returns public.usage_records
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
  v_sub public.subscriptions;
  v_record public.usage_records;
begin
  -- The live subscription first (current_cycle locks it), then the old cycle: the lock order of
  -- apply_subscription_state (subscription, then cycles).
  v_cycle := private.current_cycle(p_record.organisation_id);
  if p_record.billing_cycle_id is not null then
    perform 1 from public.subscriptions s where s.id = p_record.subscription_id for key share;
    perform private.add_cycle_minutes(
      p_record.billing_cycle_id, -p_record.billed_minutes, p_record.id);
  end if;
  if v_cycle.id is not null then
    v_cycle := private.add_cycle_minutes(v_cycle.id, p_record.billed_minutes, p_record.id);
    select s.* into v_sub from public.subscriptions s where s.id = v_cycle.subscription_id;
  end if;
  update public.usage_records u
     set late = true,
         metered_at = now(),
         subscription_id = coalesce(v_sub.id, u.subscription_id),
         billing_cycle_id = v_cycle.id,
         meter_customer_id = coalesce(v_sub.stripe_customer_id, u.meter_customer_id),
         meter_status = case when v_cycle.id is not null and u.billed_minutes > 0
                             then 'pending' else 'skipped' end,
         meter_error = case when v_cycle.id is null
                            then 'late usage: no live subscription to bill it in' end,
         meter_next_attempt_at = now(),
         meter_claimed_at = null
   where u.id = p_record.id
  returning u.* into v_record;
  insert into public.audit_log (organisation_id, actor, action, details)
  values (p_record.organisation_id, 'report-usage', 'usage.late', jsonb_build_object(
    'usage_record_id', p_record.id, 'call_id', p_record.call_id,
    'ended_at', p_record.ended_at, 'billed_minutes', p_record.billed_minutes,
    'reason', p_reason, 'from_cycle', p_record.billing_cycle_id, 'to_cycle', v_cycle.id));
  return v_record;
end;
$$;

-- What Python needs to send one meter event; its timestamp is metered_at.
create or replace function private.meter_event(p_record public.usage_records)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'usage_record_id', p_record.id,
    'identifier', p_record.meter_identifier,
    'customer', p_record.meter_customer_id,
    'value', p_record.billed_minutes,
    'timestamp', floor(extract(epoch from coalesce(p_record.metered_at, p_record.ended_at)))::bigint,
    'attempt', p_record.meter_attempts
  )
$$;

create or replace function private.usage_result(p_record public.usage_records, p_duplicate boolean)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'usage_record_id', p_record.id,
    'billed_minutes', p_record.billed_minutes,
    'minutes_used', p_record.cycle_minutes_used,
    'included_minutes', p_record.cycle_included_minutes,
    'overage_minutes', p_record.cycle_overage_minutes,
    'overage_cost_cents', p_record.cycle_overage_cost_cents,
    'meter_status', p_record.meter_status,
    'alerts', (
      select coalesce(jsonb_agg(a.threshold_percent order by a.threshold_percent), '[]'::jsonb)
        from public.usage_alerts a
       where a.usage_record_id = p_record.id
    ),
    'late', p_record.late,
    'duplicate', p_duplicate
  )
$$;

-- Record a call once: its own cycle (of the live subscription, else of an ended one that
-- contains it) while Stripe can still bill that cycle, else the current cycle as late usage.
create or replace function public.record_usage(
  p_org_id uuid,
  p_call_id text,
  p_duration_seconds numeric,
  p_ended_at timestamptz,
  p_lease_seconds integer
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_billed integer;
  v_record public.usage_records;
  v_sub public.subscriptions;
  v_cycle public.billing_cycles;
  v_period tstzrange;
  v_late text;
  v_metered boolean;
  v_result jsonb;
begin
  if p_duration_seconds is null or p_duration_seconds < 0 or p_duration_seconds > 86400 then
    raise exception 'The call duration must be between 0 and 86400 seconds.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  if not exists (select 1 from public.organisations o where o.id = p_org_id) then
    raise exception 'No organisation has id %.', p_org_id
      using errcode = 'MB404', hint = 'organisation_not_found';
  end if;
  -- ceil(seconds / 60) without a rounded division: 60 n >= s exactly when 60 n >= ceil(s).
  v_billed := (ceil(p_duration_seconds)::integer + 59) / 60;

  insert into public.usage_records as u
    (organisation_id, call_id, duration_seconds, billed_minutes, ended_at, metered_at,
     meter_status)
  values (p_org_id, p_call_id, p_duration_seconds, v_billed, coalesce(p_ended_at, now()),
          coalesce(p_ended_at, now()), 'skipped')
  on conflict (organisation_id, call_id) do nothing
  returning u.* into v_record;
  if not found then
    select u.* into v_record
      from public.usage_records u
     where u.organisation_id = p_org_id and u.call_id = p_call_id;
    return private.usage_result(v_record, true);
  end if;

  -- The call's own period: of the live subscription (locked first, see current_cycle) ...
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = p_org_id
     and s.status in ('active', 'trialing', 'past_due', 'unpaid')
   order by s.created_at desc
   limit 1
     for key share;
  if v_sub.id is not null then
    v_period := private.cycle_period(v_sub, v_record.ended_at);
    select c.* into v_cycle
      from public.billing_cycles c
     where c.subscription_id = v_sub.id and c.period_start = lower(v_period);
  end if;
  -- ... else a cycle of an ended subscription that contains it (reported after a cancellation).
  if v_period is null then
    select c.* into v_cycle
      from public.billing_cycles c
     where c.organisation_id = p_org_id
       and c.period_start <= v_record.ended_at and v_record.ended_at < c.period_end
     order by c.period_start desc
     limit 1;
    select s.* into v_sub from public.subscriptions s where s.id = v_cycle.subscription_id
       for key share;
    v_period := case when v_cycle.id is not null
                     then tstzrange(v_cycle.period_start, v_cycle.period_end, '[)') end;
  end if;

  if v_period is not null then
    v_cycle.period_end := upper(v_period);
    v_late := private.unbillable_reason(v_cycle, v_record.ended_at);
    if v_late is not null then
      v_cycle := private.current_cycle(p_org_id);
      select s.* into v_sub from public.subscriptions s where s.id = v_cycle.subscription_id;
    elsif v_cycle.id is null then
      v_cycle := private.open_cycle(v_sub, v_period);
    end if;
  end if;
  if v_cycle.id is not null then
    v_cycle := private.add_cycle_minutes(v_cycle.id, v_billed, v_record.id);
  end if;

  v_metered := v_cycle.id is not null and v_billed > 0;
  update public.usage_records u
     set subscription_id = v_sub.id,
         billing_cycle_id = v_cycle.id,
         late = v_late is not null,
         metered_at = case when v_late is not null then now() else u.ended_at end,
         cycle_minutes_used = v_cycle.minutes_used,
         cycle_included_minutes = v_cycle.included_minutes,
         cycle_overage_minutes = v_cycle.overage_minutes,
         cycle_overage_cost_cents = v_cycle.overage_cost_cents,
         meter_status = case when v_metered then 'pending' else 'skipped' end,
         meter_identifier = case when v_metered
           then private.meter_identifier(p_org_id, p_call_id, 0) end,
         meter_customer_id = case when v_metered then v_sub.stripe_customer_id end,
         meter_error = case when v_late is not null and v_cycle.id is null
                            then 'late usage: no live subscription to bill it in' end,
         meter_attempts = case when v_metered then 1 else 0 end,
         meter_claimed_at = case when v_metered then now() end,
         meter_next_attempt_at = case when v_metered
           then now() + make_interval(secs => p_lease_seconds)
         end
   where u.id = v_record.id
  returning u.* into v_record;
  if v_late is not null then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (p_org_id, 'report-usage', 'usage.late', jsonb_build_object(
      'usage_record_id', v_record.id, 'call_id', p_call_id, 'ended_at', v_record.ended_at,
      'billed_minutes', v_billed, 'reason', v_late, 'from_cycle', null,
      'to_cycle', v_cycle.id));
  end if;

  v_result := private.usage_result(v_record, false);
  if v_metered then
    v_result := v_result || jsonb_build_object('meter', private.meter_event(v_record));
  end if;
  return v_result;
end;
$$;

-- Take up to p_limit due pending meter events for delivery: each gets its attempt counted and a
-- lease of p_lease_seconds, so a concurrent flush skips it (skip locked) and, once committed, no
-- longer finds it due; a flusher that dies leaves it due again when the lease ends (and its
-- attempt's outcome unknown). Settled first, never sent as they are: events Stripe can no longer
-- bill in their cycle (counted late, or `unconfirmed` when an earlier attempt may have reached
-- Stripe) and unknown ones past the identifier window (`unconfirmed`).
create or replace function public.claim_meter_events(p_limit integer, p_lease_seconds integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_row record;
  v_unknown timestamptz;
  v_events jsonb;
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception 'limit must be between 1 and 1000.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  for v_row in
    select u as record, c as cycle,
           coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at) as unknown_at
      from public.usage_records u
      left join public.billing_cycles c on c.id = u.billing_cycle_id
     where u.meter_status = 'pending'
       and u.meter_next_attempt_at <= now()
       and u.meter_identifier is not null
       and (coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at)
              <= now() - interval '23 hours'
            or private.unbillable_reason(c, u.metered_at) is not null)
     order by u.meter_next_attempt_at
     limit p_limit
       for update of u skip locked
  loop
    if v_row.unknown_at is not null then
      update public.usage_records u
         set meter_status = 'unconfirmed',
             meter_outcome_unknown_at = v_row.unknown_at,
             meter_claimed_at = null,
             meter_next_attempt_at = null,
             meter_error = 'an attempt''s outcome was never learned and resending could bill it'
               || ' twice: reconciliation settles it'
       where u.id = (v_row.record).id;
    else
      perform private.count_late(
        v_row.record, private.unbillable_reason(v_row.cycle, (v_row.record).metered_at));
    end if;
  end loop;

  with due as (
    select u.id
      from public.usage_records u
     where u.meter_status = 'pending'
       and u.meter_next_attempt_at <= now()
       and u.meter_identifier is not null
     order by u.meter_next_attempt_at
     limit p_limit
       for update skip locked
  ), claimed as (
    update public.usage_records u
       set meter_attempts = u.meter_attempts + 1,
           meter_next_attempt_at = now() + make_interval(secs => p_lease_seconds),
           -- the previous claim never reported: its attempt may have reached Stripe
           meter_outcome_unknown_at = coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at),
           meter_claimed_at = now()
      from due
     where u.id = due.id
    returning u
  )
  select coalesce(jsonb_agg(private.meter_event(claimed.u)), '[]'::jsonb)
    into v_events
    from claimed;
  return v_events;
end;
$$;

-- An attempt's outcome: sent; retry (Stripe did not record it: no connection, 429, our key
-- refused); unknown (no answer or a 5xx: it may have been recorded); failed (refused for good).
-- A retry waits 15 s doubling to an hour, but at most 5 minutes across its cycle's end, so an
-- outage at a period end is retried within the grace hour.
create or replace function public.record_meter_result(
  p_usage_record_id uuid,
  p_attempt integer,
  p_outcome text,
  p_error text
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_status text;
  v_period_end timestamptz;
begin
  if p_outcome is null or p_outcome not in ('sent', 'retry', 'unknown', 'failed') then
    raise exception 'outcome must be sent, retry, unknown or failed.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  select c.period_end into v_period_end
    from public.usage_records u
    join public.billing_cycles c on c.id = u.billing_cycle_id
   where u.id = p_usage_record_id;
  update public.usage_records u
     set meter_status = case when p_outcome in ('retry', 'unknown') then 'pending'
                             else p_outcome end,
         meter_error = case when p_outcome = 'sent' then null else left(p_error, 1000) end,
         meter_sent_at = case when p_outcome = 'sent' then now() end,
         meter_outcome_unknown_at = case when p_outcome = 'unknown'
           then coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at, now())
           else u.meter_outcome_unknown_at end,
         meter_claimed_at = null,
         -- 2^8 x 15 s is past the hour already; a larger power overflows at 1023 attempts.
         meter_next_attempt_at = case when p_outcome in ('retry', 'unknown') then now()
           + make_interval(secs => least(
               15 * power(2, least(u.meter_attempts, 8)),
               case when now() + make_interval(secs => 15 * power(2, least(u.meter_attempts, 8)))
                         >= v_period_end
                    then 300 else 3600 end))
         end
   where u.id = p_usage_record_id
     and ((u.meter_status = 'pending' and u.meter_attempts = p_attempt)
          or (p_outcome = 'sent' and u.meter_status in ('pending', 'failed', 'unconfirmed')))
  returning u.meter_status into v_status;
  if not found then
    select u.meter_status into v_status from public.usage_records u where u.id = p_usage_record_id;
  end if;
  return jsonb_build_object('meter_status', v_status);
end;
$$;

-- usage_summary (GET report-usage) shows the cycle a call is counted in now: sql/0050.

-- requeue-usage: `failed` rows (of one organisation, ended since a date) whose cause was fixed
-- go back to pending under a new identifier (Stripe may keep the refused one): in their own
-- cycle while Stripe can still bill it, else counted late in the current cycle. A row whose
-- earlier attempt may have reached Stripe becomes `unconfirmed` instead (a resend could bill
-- twice). Each row audited (usage.requeued); p_dry_run says what would happen, changes nothing.
create function public.requeue_failed_usage(
  p_organisation_id uuid default null,
  p_since date default null,
  p_dry_run boolean default false
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_row record;
  v_record public.usage_records;
  v_reason text;
  v_outcome text;
  v_rows jsonb := '[]'::jsonb;
begin
  for v_row in
    select u as record, c as cycle
      from public.usage_records u
      left join public.billing_cycles c on c.id = u.billing_cycle_id
     where u.meter_status = 'failed'
       and (p_organisation_id is null or u.organisation_id = p_organisation_id)
       and (p_since is null or u.ended_at >= p_since::timestamp at time zone 'UTC')
     order by u.ended_at, u.id
       for update of u
  loop
    v_record := v_row.record;
    v_reason := private.unbillable_reason(v_row.cycle, v_record.metered_at);
    v_outcome := case when v_record.meter_outcome_unknown_at is not null then 'unconfirmed'
                      when v_reason is null then 'pending'
                      else 'late' end;
    if not p_dry_run then
      update public.usage_records u
         set meter_status = case when v_outcome = 'unconfirmed' then 'unconfirmed'
                                 else 'pending' end,
             meter_requeues = u.meter_requeues + 1,
             meter_identifier = private.meter_identifier(
               u.organisation_id, u.call_id, u.meter_requeues + 1),
             meter_error = null,
             meter_claimed_at = null,
             meter_next_attempt_at = case when v_outcome = 'unconfirmed' then null else now() end
       where u.id = v_record.id
      returning u.* into v_record;
      if v_outcome = 'late' then
        v_record := private.count_late(v_record, v_reason);
        v_outcome := case when v_record.meter_status = 'pending' then 'late' else 'skipped' end;
      end if;
      insert into public.audit_log (organisation_id, actor, action, details)
      values (v_record.organisation_id, 'ops-requeue-usage', 'usage.requeued', jsonb_build_object(
        'usage_record_id', v_record.id, 'call_id', v_record.call_id,
        'outcome', v_outcome, 'reason', v_reason, 'previous_error', (v_row.record).meter_error));
    end if;
    v_rows := v_rows || jsonb_build_object(
      'usage_record_id', v_record.id, 'organisation_id', v_record.organisation_id,
      'call_id', v_record.call_id, 'billed_minutes', v_record.billed_minutes,
      'outcome', v_outcome, 'meter_error', (v_row.record).meter_error);
  end loop;
  return jsonb_build_object(
    'requeued', (select count(*) from jsonb_array_elements(v_rows) r
                  where r ->> 'outcome' = 'pending'),
    'late', (select count(*) from jsonb_array_elements(v_rows) r where r ->> 'outcome' = 'late'),
    'rows', v_rows,
    'dry_run', p_dry_run);
end;
$$;

revoke all on function private.record_plan_prices() from public, anon, authenticated;
revoke all on function private.subscription_terms(public.subscriptions)
  from public, anon, authenticated;
revoke all on function private.meter_grace() from public, anon, authenticated;
revoke all on function private.meter_identifier(uuid, text, integer)
  from public, anon, authenticated;
revoke all on function private.cycle_period(public.subscriptions, timestamptz)
  from public, anon, authenticated;
revoke all on function private.open_cycle(public.subscriptions, tstzrange)
  from public, anon, authenticated;
revoke all on function private.current_cycle(uuid) from public, anon, authenticated;
revoke all on function private.add_cycle_minutes(uuid, integer, uuid)
  from public, anon, authenticated;
revoke all on function private.unbillable_reason(public.billing_cycles, timestamptz)
  from public, anon, authenticated;
revoke all on function private.count_late(public.usage_records, text)
  from public, anon, authenticated;
revoke all on function public.requeue_failed_usage(uuid, date, boolean)
  from public, anon, authenticated;
grant execute on function private.subscription_terms(public.subscriptions) to service_role;
grant execute on function private.meter_grace() to service_role;
grant execute on function private.meter_identifier(uuid, text, integer) to service_role;
grant execute on function private.cycle_period(public.subscriptions, timestamptz) to service_role;
grant execute on function private.open_cycle(public.subscriptions, tstzrange) to service_role;
grant execute on function private.current_cycle(uuid) to service_role;
grant execute on function private.add_cycle_minutes(uuid, integer, uuid) to service_role;
grant execute on function private.unbillable_reason(public.billing_cycles, timestamptz)
  to service_role;
grant execute on function private.count_late(public.usage_records, text) to service_role;
grant execute on function public.requeue_failed_usage(uuid, date, boolean) to service_role;

-- migrate:down
