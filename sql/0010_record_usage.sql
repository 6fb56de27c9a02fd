-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- report-usage: record a call's minutes exactly once (usage row, cycle totals, alerts and the
-- pending meter event in one transaction), claim due meter events for delivery to Stripe, keep
-- each delivery's outcome, and read an organisation's current cycle.
--
-- Subscription statuses: usage is metered for a live subscription (active, trialing, past_due,
-- unpaid: Stripe still invoices all four); new calls are `allowed` only for active, trialing and
-- past_due. past_due is Stripe's dunning window (payment retries still running), so one failed
-- card does not cut a customer off mid-retry; unpaid means the retries ran out.

-- meter_customer_id: the customer the meter event bills, fixed when the usage is recorded, so
-- every retry sends the same parameters under the same idempotency key.
-- cycle_*: the cycle's totals right after this report, so a repeated report answers as the first.
alter table public.usage_records
  add column meter_customer_id text,
  add column cycle_minutes_used integer,
  add column cycle_included_minutes integer,
  add column cycle_overage_minutes integer,
  add column cycle_overage_cost_cents integer;

-- The monthly metered period of a subscription that contains `p_at`, from the latest known
-- period (its latest cycle, else its current period, which is yearly on a yearly plan): that
-- period itself when it contains p_at and is at most a month long; else the grid anchor + n
-- months in UTC (like Stripe's billing anchor: Jan 31 -> Feb 28 -> Mar 31, no drift). The anchor
-- is that period's boundary with the later day of the month (a boundary in a short month may be
-- clamped, and of two consecutive months one has 31 days), or its end when the period is not
-- whole months on that grid (a trial, a reset anchor): the next period starts where it ended.
-- Null when nothing is known of its periods.
create function private.metered_period(p_subscription_id uuid, p_at timestamptz)
returns tstzrange
language plpgsql stable
set search_path = ''
as $$
declare
  v_start timestamp;
  v_end timestamp;
  v_anchor timestamp;
  v_at timestamp := p_at at time zone 'UTC';
  v_months integer;
begin
  select c.period_start at time zone 'UTC', c.period_end at time zone 'UTC'
    into v_start, v_end
    from public.billing_cycles c
   where c.subscription_id = p_subscription_id
   order by c.period_end desc
   limit 1;
  if v_end is null then
    select s.current_period_start at time zone 'UTC', s.current_period_end at time zone 'UTC'
      into v_start, v_end
      from public.subscriptions s
     where s.id = p_subscription_id and s.current_period_start < s.current_period_end;
  end if;
  if v_end is null then
    return null;
  end if;
  if v_start <= v_at and v_at < v_end and v_end <= v_start + interval '1 month' then
    return tstzrange(v_start at time zone 'UTC', v_end at time zone 'UTC', '[)');
  end if;
  v_anchor := case when extract(day from v_start) > extract(day from v_end) then v_start
                   else v_end end;
  v_months := (extract(year from v_end) - extract(year from v_anchor)) * 12
    + extract(month from v_end) - extract(month from v_anchor);
  if v_anchor + make_interval(months => v_months) <> v_end then
    v_anchor := v_end;
  end if;
  v_months := (extract(year from v_at) - extract(year from v_anchor)) * 12
    + extract(month from v_at) - extract(month from v_anchor);
  if v_anchor + make_interval(months => v_months) > v_at then
    v_months := v_months - 1;
  end if;
  return tstzrange(
    (v_anchor + make_interval(months => v_months)) at time zone 'UTC',
    (v_anchor + make_interval(months => v_months + 1)) at time zone 'UTC',
    '[)'
  );
end;
$$;

-- What Python needs to send one meter event (POST /v1/billing/meter_events).
create function private.meter_event(p_record public.usage_records)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'usage_record_id', p_record.id,
    'identifier', p_record.meter_identifier,
    'customer', p_record.meter_customer_id,
    'value', p_record.billed_minutes,
    'timestamp', floor(extract(epoch from p_record.ended_at))::bigint,
    'attempt', p_record.meter_attempts
  )
$$;

-- The answer to a report, the same for the first report and every repeat: the cycle totals as
-- they were right after the first, the alerts it crossed, and where its meter event is now.
create function private.usage_result(p_record public.usage_records, p_duplicate boolean)
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
    'duplicate', p_duplicate
  )
$$;

create function public.record_usage(
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
  v_live constant text[] := array['active', 'trialing', 'past_due', 'unpaid'];
  v_billed integer;
  v_record public.usage_records;
  v_sub public.subscriptions;
  v_plan public.billing_plans;
  v_cycle public.billing_cycles;
  v_period tstzrange;
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
    (organisation_id, call_id, duration_seconds, billed_minutes, ended_at, meter_status)
  values (p_org_id, p_call_id, p_duration_seconds, v_billed, coalesce(p_ended_at, now()), 'skipped')
  on conflict (organisation_id, call_id) do nothing
  returning u.* into v_record;
  if not found then
    select u.* into v_record
      from public.usage_records u
     where u.organisation_id = p_org_id and u.call_id = p_call_id;
    return private.usage_result(v_record, true);
  end if;

  -- The cycle of the organisation's live subscription that contains the call, opened from the
  -- plan when the subscription has none there yet.
  -- Locked (key share, what the usage row's foreign key takes anyway) before its cycle is
  -- touched: apply_subscription_state locks the subscription, then the cycle; the same order
  -- here makes one wait for the other instead of a deadlock.
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = p_org_id and s.status = any (v_live)
   order by s.created_at desc
   limit 1
     for key share;
  select p.* into v_plan from public.billing_plans p where p.id = v_sub.plan_id;
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = v_sub.id
     and c.period_start <= v_record.ended_at and v_record.ended_at < c.period_end
   order by c.period_start desc
   limit 1;
  if v_sub.id is not null and v_cycle.id is null then
    v_period := private.metered_period(v_sub.id, v_record.ended_at);
    if lower(v_period) < (
      select least(min(c.period_start), v_sub.current_period_start)
        from public.billing_cycles c
       where c.subscription_id = v_sub.id
    ) then
      v_sub := null;  -- the call ended before this subscription's first period
    elsif v_period is not null then
      -- period_start is the key the webhook uses too: it confirms this cycle, never adds one.
      insert into public.billing_cycles
        (organisation_id, subscription_id, period_start, period_end, included_minutes)
      values (
        p_org_id, v_sub.id, lower(v_period), upper(v_period), coalesce(v_plan.included_minutes, 0)
      )
      on conflict (subscription_id, period_start) do nothing;
      select c.* into v_cycle
        from public.billing_cycles c
       where c.subscription_id = v_sub.id and c.period_start = lower(v_period);
    end if;
  end if;
  -- Otherwise a cycle of an ended subscription that contains the call: a call reported late,
  -- after its subscription was cancelled, still counts in the period it happened in.
  if v_sub.id is null then
    select c.* into v_cycle
      from public.billing_cycles c
     where c.organisation_id = p_org_id
       and c.period_start <= v_record.ended_at and v_record.ended_at < c.period_end
     order by c.period_start desc
     limit 1;
    select s.* into v_sub from public.subscriptions s where s.id = v_cycle.subscription_id
       for key share;
    select p.* into v_plan from public.billing_plans p where p.id = v_sub.plan_id;
  end if;

  if v_cycle.id is not null then
    update public.billing_cycles c
       set minutes_used = c.minutes_used + v_billed,
           overage_minutes = greatest(c.minutes_used + v_billed - c.included_minutes, 0),
           overage_cost_cents = greatest(c.minutes_used + v_billed - c.included_minutes, 0)
             * coalesce(v_plan.overage_rate_cents, 0),
           updated_at = now()
     where c.id = v_cycle.id
    returning c.* into v_cycle;

    -- Crossed by this report: old usage below t% of the included minutes, new usage at or above.
    -- With no included minutes there is nothing to warn about: no alert.
    insert into public.usage_alerts
      (organisation_id, billing_cycle_id, threshold_percent, usage_record_id)
    select p_org_id, v_cycle.id, t.pct, v_record.id
      from unnest(array[80, 100, 120]) as t (pct)
     where (v_cycle.minutes_used - v_billed)::bigint * 100 < t.pct::bigint * v_cycle.included_minutes
       and t.pct::bigint * v_cycle.included_minutes <= v_cycle.minutes_used::bigint * 100
    on conflict (billing_cycle_id, threshold_percent) do nothing;
  end if;

  v_metered := v_sub.id is not null and v_billed > 0;
  update public.usage_records u
     set subscription_id = v_sub.id,
         billing_cycle_id = v_cycle.id,
         cycle_minutes_used = v_cycle.minutes_used,
         cycle_included_minutes = v_cycle.included_minutes,
         cycle_overage_minutes = v_cycle.overage_minutes,
         cycle_overage_cost_cents = v_cycle.overage_cost_cents,
         meter_status = case when v_metered then 'pending' else 'skipped' end,
         meter_identifier = case when v_metered then
           'mb_' || encode(sha256(convert_to(p_org_id::text || ':' || p_call_id, 'UTF8')), 'hex')
         end,
         meter_customer_id = case when v_metered then v_sub.stripe_customer_id end,
         meter_attempts = case when v_metered then 1 else 0 end,
         meter_next_attempt_at = case when v_metered
           then now() + make_interval(secs => p_lease_seconds)
         end
   where u.id = v_record.id
  returning u.* into v_record;

  v_result := private.usage_result(v_record, false);
  if v_metered then
    v_result := v_result || jsonb_build_object('meter', private.meter_event(v_record));
  end if;
  return v_result;
end;
$$;

-- Take up to p_limit due pending meter events for delivery: each gets its attempt counted and a
-- lease of p_lease_seconds, so a concurrent flush skips it (skip locked) and, once committed, no
-- longer finds it due; a flusher that dies leaves it due again when the lease ends.
create function public.claim_meter_events(p_limit integer, p_lease_seconds integer)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_events jsonb;
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception 'limit must be between 1 and 1000.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
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
           meter_next_attempt_at = now() + make_interval(secs => p_lease_seconds)
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

create function public.record_meter_result(
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
begin
  if p_outcome is null or p_outcome not in ('sent', 'retry', 'failed') then
    raise exception 'outcome must be sent, retry or failed.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  update public.usage_records u
     set meter_status = case when p_outcome = 'retry' then 'pending' else p_outcome end,
         meter_error = case when p_outcome = 'sent' then null else left(p_error, 1000) end,
         meter_sent_at = case when p_outcome = 'sent' then now() end,
         meter_next_attempt_at = case when p_outcome = 'retry'
           -- 2^8 x 15 s is past the hour already; a larger power overflows at 1023 attempts.
           then now()
             + make_interval(secs => least(15 * power(2, least(u.meter_attempts, 8)), 3600))
         end
   where u.id = p_usage_record_id
     and ((u.meter_status = 'pending' and u.meter_attempts = p_attempt)
          or (p_outcome = 'sent' and u.meter_status in ('pending', 'failed')))
  returning u.meter_status into v_status;
  if not found then
    select u.meter_status into v_status from public.usage_records u where u.id = p_usage_record_id;
  end if;
  return jsonb_build_object('meter_status', v_status);
end;
$$;

-- The organisation's current cycle, for the agent to check before placing a call. Reads only:
-- a live subscription without a cycle for now yet shows the period it will open, unused.
create function public.usage_summary(p_org_id uuid)
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
  select c.* into v_cycle
    from public.billing_cycles c
   where c.subscription_id = v_sub.id and c.period_start <= now() and now() < c.period_end
   order by c.period_start desc
   limit 1;
  if v_cycle.id is null and v_sub.status = any (v_live) then
    v_period := private.metered_period(v_sub.id, now());
    if v_period is not null then
      v_cycle.period_start := lower(v_period);
      v_cycle.period_end := upper(v_period);
      v_cycle.included_minutes := coalesce(v_plan.included_minutes, 0);
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

revoke all on function private.metered_period(uuid, timestamptz) from public, anon, authenticated;
revoke all on function private.meter_event(public.usage_records) from public, anon, authenticated;
revoke all on function private.usage_result(public.usage_records, boolean)
  from public, anon, authenticated;
revoke all on function public.record_usage(uuid, text, numeric, timestamptz, integer)
  from public, anon, authenticated;
revoke all on function public.claim_meter_events(integer, integer) from public, anon, authenticated;
revoke all on function public.record_meter_result(uuid, integer, text, text)
  from public, anon, authenticated;
revoke all on function public.usage_summary(uuid) from public, anon, authenticated;
grant execute on function private.metered_period(uuid, timestamptz) to service_role;
grant execute on function private.meter_event(public.usage_records) to service_role;
grant execute on function private.usage_result(public.usage_records, boolean) to service_role;
grant execute on function public.record_usage(uuid, text, numeric, timestamptz, integer)
  to service_role;
grant execute on function public.claim_meter_events(integer, integer) to service_role;
grant execute on function public.record_meter_result(uuid, integer, text, text) to service_role;
grant execute on function public.usage_summary(uuid) to service_role;

-- migrate:down
