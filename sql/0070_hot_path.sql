-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- The hot path (issue 12; DESIGN.md, POST report-usage "Delivery to Stripe is the outbox's job").
--
-- A report is one call of public.record_usage, one transaction, and nothing waits for Stripe: the
-- meter event is written due at once and unclaimed, and the flush (shared/meter_flush.py) claims
-- due events a hundred at a time for Stripe's v2 meter event stream.
--
-- record_usage's common case (a live subscription whose cycle containing the call Stripe can
-- still bill) is one statement: add the minutes to that cycle and insert the usage row with the
-- cycle's new totals. The cycle row is the only row it locks: the usage row no longer references
-- organisations and subscriptions with foreign keys (each check took a key-share lock on the two
-- rows every report of an organisation shares; with concurrent reports those locks became
-- multixacts: without them the database takes a quarter more reports a second). The organisation and subscription it names are
-- those of the cycle, which references both, and only these functions write usage rows; the
-- cycle foreign key stays (its row is already locked by the update). Taking no other lock, the
-- fast path cannot deadlock with apply_subscription_state (subscription, then cycles). A repeat
-- of a call is found by the insert, and its minutes are taken back in the same transaction
-- (nobody saw them: the cycle row stays locked until commit). Everything else (no cycle yet,
-- late usage, no or an ended subscription) takes the general path of 0040/0050, unchanged, then
-- leaves its event due and unclaimed.

alter table public.usage_records
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_organisation_id_fkey,
  -- squawk-ignore ban-drop-constraint
  drop constraint usage_records_subscription_id_fkey;

-- The general path is the five-argument record_usage of 0040, unchanged: the functions of the
-- previous release still call it while a deploy rolls out (it makes their inline attempt's claim);
-- the new one below calls it with no lease and leaves the event due and unclaimed.

-- Record a call once and count its minutes; the response body (usage_result's shape). Its meter
-- event, when it has one, is `pending`, due now, for the flush.
create function public.record_usage(
  p_org_id uuid,
  p_call_id text,
  p_duration_seconds numeric,
  p_ended_at timestamptz
) returns jsonb
language plpgsql
set search_path = ''
-- One plan for every report (a custom plan per call would be planned again each time).
set plan_cache_mode = force_generic_plan
as $$
declare
  v_at timestamptz := coalesce(p_ended_at, now());
  v_billed integer;
  v_row record;
  v_alerts jsonb := '[]'::jsonb;
  v_result jsonb;
begin
  if p_duration_seconds is null or p_duration_seconds < 0 or p_duration_seconds > 86400 then
    raise exception 'The call duration must be between 0 and 86400 seconds.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  -- ceil(seconds / 60) without a rounded division: 60 n >= s exactly when 60 n >= ceil(s).
  v_billed := (ceil(p_duration_seconds)::integer + 59) / 60;

  -- The common case in one statement: the live subscription's cycle containing the call gets
  -- the minutes while Stripe can still bill it (its conditions are checked again on the row a
  -- concurrent split or invoice left: read committed re-reads an updated row), and the usage
  -- row is inserted with the cycle's new totals.
  with live as (
    select s.id, s.stripe_customer_id
      from public.subscriptions s
     where s.organisation_id = p_org_id
       and s.status in ('active', 'trialing', 'past_due', 'unpaid')
     order by s.created_at desc
     limit 1
  ), counted as (
    update public.billing_cycles c
       set minutes_used = c.minutes_used + v_billed,
           overage_minutes = greatest(c.minutes_used + v_billed - c.included_minutes, 0),
           overage_cost_cents = greatest(c.minutes_used + v_billed - c.included_minutes, 0)
             * c.overage_rate_cents,
           updated_at = now()
      from live
     where c.id = (
             select c2.id
               from public.billing_cycles c2
              where c2.subscription_id = live.id
                and c2.period_start <= v_at and v_at < c2.period_end
              order by c2.period_start desc
              limit 1)
       and c.period_start <= v_at and v_at < c.period_end
       and c.stripe_invoice_id is null and not c.closed_by_change
       and c.period_end + interval '55 minutes' > now()  -- private.meter_grace()
       and v_at >= now() - interval '34 days'
    returning c.id, c.subscription_id, live.stripe_customer_id, c.minutes_used,
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
           -- private.meter_identifier(p_org_id, p_call_id, 0), written out: a function with
           -- its own search_path is never inlined, and calling it cost a tenth of the report.
           case when v_billed > 0 then 'mb_' || encode(sha256(convert_to(
             p_org_id::text || ':' || p_call_id, 'UTF8')), 'hex') end,
           case when v_billed > 0 then counted.stripe_customer_id end,
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
    -- The thresholds it crossed (usage before it below t% of the included minutes, after it at
    -- or above), recorded once per cycle. No included minutes: nothing to warn about.
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
    -- A repeat: its minutes go back (the cycle row stayed locked, nobody saw them); the general
    -- path answers it.
    update public.billing_cycles c
       set minutes_used = c.minutes_used - v_billed,
           overage_minutes = greatest(c.minutes_used - v_billed - c.included_minutes, 0),
           overage_cost_cents = greatest(c.minutes_used - v_billed - c.included_minutes, 0)
             * c.overage_rate_cents
     where c.id = v_row.id;
  elsif not exists (select 1 from public.organisations o where o.id = p_org_id) then
    raise exception 'No organisation has id %.', p_org_id
      using errcode = 'MB404', hint = 'organisation_not_found';
  end if;
  -- The general path (no cycle yet, late usage, no or an ended subscription, a repeat), then
  -- the event due now and unclaimed.
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

revoke all on function public.record_usage(uuid, text, numeric, timestamptz)
  from public, anon, authenticated;
grant execute on function public.record_usage(uuid, text, numeric, timestamptz) to service_role;

-- Take up to p_limit due pending meter events for delivery, oldest due first: each gets its
-- attempt counted and a lease of p_lease_seconds, so a concurrent flush skips it (skip locked)
-- and, once committed, no longer finds it due; a flusher that dies leaves it due again when the
-- lease ends (its attempt's outcome unknown). Of the rows taken, those Stripe can no longer bill
-- in their cycle are counted late first (and sent in this batch), and those whose earlier
-- attempt may have reached Stripe past the identifier window become `unconfirmed` (0040's
-- rules). The work is proportional to p_limit, not to the backlog: 0040 looked for the rows to
-- settle among every due row first.
-- p_organisation_id: only that organisation's (change-plan delivers its queued usage before it
-- asks Stripe to change the price). The two-argument calls of the previous release resolve here.
-- squawk-ignore ban-drop-function
drop function public.claim_meter_events(integer, integer);
create function public.claim_meter_events(
  p_limit integer, p_lease_seconds integer, p_organisation_id uuid default null
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_ids uuid[];
  v_row record;
  v_events jsonb;
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception 'limit must be between 1 and 1000.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  select array_agg(u.id) into v_ids
    from (select u.id
            from public.usage_records u
           where u.meter_status = 'pending'
             and u.meter_next_attempt_at <= now()
             and u.meter_identifier is not null
             and (p_organisation_id is null or u.organisation_id = p_organisation_id)
           order by u.meter_next_attempt_at
           limit p_limit
             for update skip locked) u;
  if v_ids is null then
    return '[]'::jsonb;
  end if;

  for v_row in
    select u as record, c as cycle,
           coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at) as unknown_at
      from public.usage_records u
      left join public.billing_cycles c on c.id = u.billing_cycle_id
     where u.id = any (v_ids)
       and (coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at)
              <= now() - interval '23 hours'
            or private.unbillable_reason(c, u.metered_at) is not null)
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

  with claimed as (
    update public.usage_records u
       set meter_attempts = u.meter_attempts + 1,
           meter_next_attempt_at = now() + make_interval(secs => p_lease_seconds),
           -- the previous claim never reported: its attempt may have reached Stripe
           meter_outcome_unknown_at = coalesce(u.meter_outcome_unknown_at, u.meter_claimed_at),
           meter_claimed_at = now()
     where u.id = any (v_ids) and u.meter_status = 'pending'
    returning u
  )
  select coalesce(jsonb_agg(private.meter_event(claimed.u)), '[]'::jsonb)
    into v_events
    from claimed;
  return v_events;
end;
$$;

-- The outcomes of one batch's attempts, in one round trip: p_results is a list of
-- {usage_record_id, attempt, outcome, error}. `sent` is kept for the whole batch in one update
-- (record_meter_result's rule: a row still pending, failed or unconfirmed becomes sent); any
-- other outcome row by row by record_meter_result (an outcome of an older attempt changes
-- nothing). Returns how many of the rows have each status now.
create function public.record_meter_results(p_results jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_item record;
  v_counts jsonb;
begin
  if p_results is null or jsonb_typeof(p_results) <> 'array' then
    raise exception 'results must be a list.' using errcode = 'MB422', hint = 'validation_error';
  end if;
  update public.usage_records u
     set meter_status = 'sent',
         meter_error = null,
         meter_sent_at = now(),
         meter_claimed_at = null,
         meter_next_attempt_at = null
    from jsonb_to_recordset(p_results) as r (usage_record_id uuid, outcome text)
   where r.outcome = 'sent' and u.id = r.usage_record_id
     and u.meter_status in ('pending', 'failed', 'unconfirmed');
  for v_item in
    select r.*
      from jsonb_to_recordset(p_results)
             as r (usage_record_id uuid, attempt integer, outcome text, error text)
     where r.outcome is distinct from 'sent'
  loop
    perform public.record_meter_result(
      v_item.usage_record_id, v_item.attempt, v_item.outcome, v_item.error);
  end loop;
  select coalesce(jsonb_object_agg(c.meter_status, c.n), '{}'::jsonb) into v_counts
    from (select u.meter_status, count(*) as n
            from jsonb_to_recordset(p_results) as r (usage_record_id uuid)
            join public.usage_records u on u.id = r.usage_record_id
           group by u.meter_status) c;
  return v_counts;
end;
$$;

revoke all on function public.claim_meter_events(integer, integer, uuid)
  from public, anon, authenticated;
grant execute on function public.claim_meter_events(integer, integer, uuid) to service_role;
revoke all on function public.record_meter_results(jsonb) from public, anon, authenticated;
grant execute on function public.record_meter_results(jsonb) to service_role;

-- migrate:down
