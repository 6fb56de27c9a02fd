-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- record_usage at the floor's pace (issue 12, "record_usage does what it must and no more").
--
-- Measured with Postgres under callgrind (instructions per call, deterministic): the SQL floor
-- (an idempotent insert and an atomic increment) costs 168k; 0070's record_usage 955k, a third
-- of it (326k) the CHECK constraints of usage_records and billing_cycles. Postgres reads a
-- table's CHECK constraints back from their stored text and plans them again for every
-- statement that writes the table, and an UPDATE checks all of them, whichever columns it sets.
-- A domain's constraints are planned once per connection (the type cache) and checked only
-- where a value of the domain is written. So the same conditions move to domains: 687k.
--
-- The move locks the two tables for a moment and rewrites nothing. A column changes to an
-- unconstrained domain over its own type (Postgres keeps its data and indexes), the domain then
-- gets its constraint NOT VALID (every write from then on is checked) and the table's CHECK
-- goes. Every stored row passed the very same condition as the table's CHECK, and all of it is
-- one transaction, so no row escapes both; validating would scan usage_records again under a
-- lock that holds off reports, to learn nothing. One index is rebuilt: usage_records_meter_due_idx
-- (pending rows only) names meter_status in its predicate; 0.24 s for a million usage rows here.
-- Left as table CHECKs: meter_identifier's length (cheap to check, and moving it would rebuild
-- its index of every row: 3.4 s more per million rows) and period_end > period_start (two
-- columns).
--
-- The counting statement is split in two: first find the cycle (no lock), then count in it by
-- its id. Every report of an organisation updates the same cycle row, so reports queue on that
-- row's lock, each holding it to its commit; a report that waited re-checks its update's
-- conditions on the row the previous one left, and with the cycle chosen inside the update
-- that re-check ran the whole lookup again while the others waited. Now it re-checks only the
-- cycle's own conditions (read committed, as before: an invoice or a split that lands in
-- between fails them, and the general path takes the call).

create domain private.non_negative_integer as integer;
create domain private.call_id as text;
create domain private.call_seconds as numeric;
create domain private.cycle_status as text;
create domain private.meter_status as text;

alter table public.billing_cycles
  -- squawk-ignore changing-column-type
  alter column included_minutes type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column minutes_used type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column overage_minutes type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column overage_cost_cents type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column overage_rate_cents type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column status type private.cycle_status,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_included_minutes_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_minutes_used_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_overage_minutes_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_overage_cost_cents_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_overage_rate_cents_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint billing_cycles_status_check;

alter table public.usage_records
  -- squawk-ignore changing-column-type
  alter column call_id type private.call_id,
  -- squawk-ignore changing-column-type
  alter column duration_seconds type private.call_seconds,
  -- squawk-ignore changing-column-type
  alter column billed_minutes type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column meter_status type private.meter_status,
  -- squawk-ignore changing-column-type
  alter column meter_attempts type private.non_negative_integer,
  -- squawk-ignore changing-column-type
  alter column meter_requeues type private.non_negative_integer,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_call_id_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_duration_seconds_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_billed_minutes_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_meter_status_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_meter_attempts_check,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_meter_requeues_check;

-- The tables' conditions, word for word (0003, 0004, 0040).
alter domain private.non_negative_integer
  -- squawk-ignore ban-alter-domain-with-add-constraint
  add constraint non_negative_integer_check check (value >= 0) not valid;
alter domain private.call_id
  -- squawk-ignore ban-alter-domain-with-add-constraint
  add constraint call_id_check check (length(value) between 1 and 200) not valid;
alter domain private.call_seconds
  -- squawk-ignore ban-alter-domain-with-add-constraint
  add constraint call_seconds_check check (value >= 0 and value <= 86400) not valid;
alter domain private.meter_status
  -- squawk-ignore ban-alter-domain-with-add-constraint
  add constraint meter_status_check
  check (value in ('pending', 'sent', 'failed', 'skipped', 'unconfirmed')) not valid;
alter domain private.cycle_status
  -- squawk-ignore ban-alter-domain-with-add-constraint
  add constraint cycle_status_check check (value in ('active', 'closed')) not valid;

-- 0070's record_usage (same answers, same locks), the lookup before the count.
create or replace function public.record_usage(
  p_org_id uuid, p_call_id text, p_duration_seconds numeric, p_ended_at timestamptz
) returns jsonb
language plpgsql
set search_path = ''
-- One plan for every report (a custom plan per call would be planned again each time).
set plan_cache_mode = force_generic_plan
as $$
declare
  v_at timestamptz := coalesce(p_ended_at, now());
  v_billed integer;
  v_cycle_id uuid;
  v_customer text;
  v_row record;
  v_repeat boolean := false;
  v_alerts jsonb := '[]'::jsonb;
  v_result jsonb;
begin
  if p_duration_seconds is null or p_duration_seconds < 0 or p_duration_seconds > 86400 then
    raise exception 'The call duration must be between 0 and 86400 seconds.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  -- ceil(seconds / 60) without a rounded division: 60 n >= s exactly when 60 n >= ceil(s).
  v_billed := (ceil(p_duration_seconds)::integer + 59) / 60;

  -- The cycle containing the call of the live subscription (0070's choice), read without a lock.
  select (select c.id
            from public.billing_cycles c
           where c.subscription_id = s.id
             and c.period_start <= v_at and v_at < c.period_end
           order by c.period_start desc
           limit 1),
         s.stripe_customer_id
    into v_cycle_id, v_customer
    from public.subscriptions s
   where s.organisation_id = p_org_id
     and s.status in ('active', 'trialing', 'past_due', 'unpaid')
   order by s.created_at desc
   limit 1;

  if v_cycle_id is not null then
    -- Count the call in that cycle while Stripe can still bill it (the conditions are checked
    -- again on the row a concurrent report, split or invoice left), and insert the usage row
    -- with the cycle's new totals. A repeat is found by the insert.
    with counted as (
      update public.billing_cycles c
         set minutes_used = c.minutes_used + v_billed,
             overage_minutes = greatest(c.minutes_used + v_billed - c.included_minutes, 0),
             overage_cost_cents = greatest(c.minutes_used + v_billed - c.included_minutes, 0)
               * c.overage_rate_cents,
             updated_at = now()
       where c.id = v_cycle_id
         and c.period_start <= v_at and v_at < c.period_end
         and c.stripe_invoice_id is null and not c.closed_by_change
         and c.period_end + interval '55 minutes' > now()  -- private.meter_grace()
         and v_at >= now() - interval '34 days'
      returning c.id, c.subscription_id, c.minutes_used,
                c.included_minutes, c.overage_minutes, c.overage_cost_cents
    ), recorded as (
      insert into public.usage_records as u
        (organisation_id, call_id, duration_seconds, billed_minutes, ended_at, metered_at,
         subscription_id, billing_cycle_id, late, cycle_minutes_used, cycle_included_minutes,
         cycle_overage_minutes, cycle_overage_cost_cents, meter_status, meter_identifier,
         meter_customer_id, meter_attempts, meter_next_attempt_at)
      select p_org_id, p_call_id, p_duration_seconds, v_billed, v_at, v_at,
             counted.subscription_id, counted.id, false, counted.minutes_used,
             counted.included_minutes, counted.overage_minutes, counted.overage_cost_cents,
             case when v_billed > 0 then 'pending' else 'skipped' end,
             -- private.meter_identifier(p_org_id, p_call_id, 0), written out (0070).
             case when v_billed > 0 then 'mb_' || encode(sha256(convert_to(
               p_org_id::text || ':' || p_call_id, 'UTF8')), 'hex') end,
             case when v_billed > 0 then v_customer end,
             0,
             case when v_billed > 0 then now() end
        from counted
      on conflict (organisation_id, call_id) do nothing
      returning u.id, u.meter_status
    )
    select counted.*, recorded.id as usage_record_id, recorded.meter_status
      into v_row
      from counted
      left join recorded on true;

    if v_row.usage_record_id is not null then
      -- The thresholds it crossed (usage before it below t% of the included minutes, after it
      -- at or above), recorded once per cycle. No included minutes: nothing to warn about.
      if v_row.included_minutes > 0 and v_billed > 0
         and (v_row.minutes_used - v_billed)::bigint * 100 < 120::bigint * v_row.included_minutes
         and 80::bigint * v_row.included_minutes <= v_row.minutes_used::bigint * 100 then
        with crossed as (
          insert into public.usage_alerts
            (organisation_id, billing_cycle_id, threshold_percent, usage_record_id)
          select p_org_id, v_row.id, t.pct, v_row.usage_record_id
            from unnest(array[80, 100, 120]) as t (pct)
           where (v_row.minutes_used - v_billed)::bigint * 100
                   < t.pct::bigint * v_row.included_minutes
             and t.pct::bigint * v_row.included_minutes <= v_row.minutes_used::bigint * 100
          on conflict (billing_cycle_id, threshold_percent) do nothing
          returning threshold_percent
        )
        select coalesce(jsonb_agg(c.threshold_percent order by c.threshold_percent), '[]'::jsonb)
          into v_alerts
          from crossed c;
      end if;
      return jsonb_build_object(
        'usage_record_id', v_row.usage_record_id,
        'billed_minutes', v_billed,
        'minutes_used', v_row.minutes_used,
        'included_minutes', v_row.included_minutes,
        'overage_minutes', v_row.overage_minutes,
        'overage_cost_cents', v_row.overage_cost_cents,
        'meter_status', v_row.meter_status,
        'alerts', v_alerts,
        'late', false,
        'duplicate', false
      );
    end if;
    if v_row.id is not null then
      v_repeat := true;
      -- A repeat: its minutes go back (the cycle row stayed locked, nobody saw them); the
      -- general path answers it.
      update public.billing_cycles c
         set minutes_used = c.minutes_used - v_billed,
             overage_minutes = greatest(c.minutes_used - v_billed - c.included_minutes, 0),
             overage_cost_cents = greatest(c.minutes_used - v_billed - c.included_minutes, 0)
               * c.overage_rate_cents
       where c.id = v_row.id;
    end if;
  end if;
  -- The general path (no cycle yet, late usage, no or an ended subscription, a repeat), then
  -- the event due now and unclaimed.
  if not v_repeat and not exists (select 1 from public.organisations o where o.id = p_org_id) then
    raise exception 'No organisation has id %.', p_org_id
      using errcode = 'MB404', hint = 'organisation_not_found';
  end if;
  v_result := public.record_usage(p_org_id, p_call_id, p_duration_seconds, p_ended_at, 0)
    - 'meter';
  if not (v_result ->> 'duplicate')::boolean and v_result ->> 'meter_status' = 'pending' then
    update public.usage_records u
       set meter_attempts = 0, meter_claimed_at = null, meter_next_attempt_at = now()
     where u.id = (v_result ->> 'usage_record_id')::uuid;
  end if;
  return v_result;
end;
$$;

-- migrate:down
