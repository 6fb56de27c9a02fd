-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Stripe's asynchronous verdicts and reconciliation (issue 11; DESIGN.md "Stripe's asynchronous
-- verdicts", deploy.sh `reconcile`; the definitions of agree and drift are in shared/reconcile.py).
--
-- Stripe validates a meter event after accepting it and reports the invalid ones in error reports
-- (thin events) that name SAMPLES of the rejected events, not all of them: the rows they name
-- become `failed` (apply_meter_error_report) and their cycles are marked for reconciliation,
-- which compares each cycle with Stripe's meter event summaries and so finds the rest.
--
-- A reconciliation run is three steps per cycle: begin_reconciliation (a lease on the cycle, so
-- two runs at once never both repair it, and our side of the comparison), Stripe's figures read
-- by Python, finish_reconciliation (the repairs Python decided, audited, the requeued events
-- claimed for delivery, the `reconciliations` row, the lease released), each one transaction.

-- Error reports name rows by identifier; reconciliation reads a customer's rows by the time their
-- meter events carry. Plain (non-concurrent) builds: dbmate runs each file in one transaction;
-- they hold off writes to usage_records while they run, bounded by the statement timeout above.
-- squawk-ignore require-concurrent-index-creation
create index usage_records_meter_identifier_idx
  on public.usage_records (meter_identifier) where meter_identifier is not null;
-- squawk-ignore require-concurrent-index-creation
create index usage_records_meter_customer_idx
  on public.usage_records (meter_customer_id, metered_at) where meter_customer_id is not null;

-- When reconciliation last re-sent the row under a new identifier: within Stripe's 24 hours that
-- event may still be canceled (a meter event adjustment) should its predecessor show up after all.
alter table public.usage_records add column meter_resent_at timestamptz;

-- One row per cycle checked (source `reconcile`), and one per cycle an error report named
-- (source `error_report`, status drift: checked by the next run, whatever its --since).
create table public.reconciliations (
  id bigint generated always as identity primary key,
  organisation_id uuid not null references public.organisations (id) on delete cascade,
  billing_cycle_id uuid not null references public.billing_cycles (id) on delete cascade,
  checked_at timestamptz not null default now(),
  usage_minutes integer not null,
  cycle_minutes integer not null,
  stripe_minutes integer,
  invoiced_minutes integer,
  status text not null check (status in ('agree', 'drift', 'repaired')),
  source text not null default 'reconcile' check (source in ('reconcile', 'error_report')),
  details jsonb not null default '{}'::jsonb
);
create index reconciliations_billing_cycle_id_idx
  on public.reconciliations (billing_cycle_id, checked_at desc);
create index reconciliations_organisation_id_idx
  on public.reconciliations (organisation_id, checked_at desc);

-- The lease of the run checking a cycle now.
create table public.reconciliation_claims (
  billing_cycle_id uuid primary key references public.billing_cycles (id) on delete cascade,
  token uuid not null,
  claimed_until timestamptz not null
);

alter table public.reconciliations enable row level security;
alter table public.reconciliation_claims enable row level security;
-- Operators' records of Stripe's figures and our repairs: the service role's business only.
create policy reconciliations_no_end_user_access on public.reconciliations
  as restrictive for all to anon, authenticated using (false) with check (false);
create policy reconciliation_claims_no_end_user_access on public.reconciliation_claims
  as restrictive for all to anon, authenticated using (false) with check (false);
revoke all on table public.reconciliations, public.reconciliation_claims from anon, authenticated;
grant all on table public.reconciliations, public.reconciliation_claims to service_role;

-- ------------------------------------------------------------------ our side of a comparison

-- The window Stripe is asked about for a cycle: its period widened to whole minutes (summaries
-- take start_time and end_time on minute boundaries): start floored, end ceiled, so the window
-- holds the whole period. Our side counts exactly the same window, so both sides count the same
-- events, those of a neighbouring period in the widened seconds included.
create function private.reconciliation_window(p_cycle public.billing_cycles)
returns tstzrange
language sql stable
set search_path = ''
set timezone = 'UTC'
as $$
  select tstzrange(
    date_trunc('minute', p_cycle.period_start),
    date_trunc('minute', p_cycle.period_end)
      + case when date_trunc('minute', p_cycle.period_end) < p_cycle.period_end
             then interval '1 minute' else interval '0' end,
    '[)')
$$;

-- Where a row's meter event stands for a comparison with Stripe (shared/reconcile.py):
--   sent        Stripe acknowledged it (more than p_settle ago): Stripe must count it
--   recent      acknowledged within p_settle: Stripe's summaries may not count it yet
--   owed        unconfirmed, or failed after an attempt whose outcome we never learned: it may or
--               may not be at Stripe, and must be there exactly once
--   refused     failed: Stripe refused it (at once, or in an error report); not at Stripe
--   in_flight   pending with an attempt under way or of unknown outcome: the outbox resends the
--               same identifier (Stripe dedupes it), so it may or may not be counted yet
--   on_the_way  pending, never sent: the outbox delivers it; not at Stripe
--   skipped     never metered
create function private.usage_kind(p_record public.usage_records, p_settle interval)
returns text
language sql stable
set search_path = ''
as $$
  select case
    when p_record.meter_status = 'sent' and p_record.meter_sent_at > now() - p_settle then 'recent'
    when p_record.meter_status = 'sent' then 'sent'
    when p_record.meter_status = 'unconfirmed' then 'owed'
    when p_record.meter_status = 'failed' and p_record.meter_outcome_unknown_at is not null
      then 'owed'
    when p_record.meter_status = 'failed' then 'refused'
    when p_record.meter_status = 'pending'
         and (p_record.meter_outcome_unknown_at is not null or p_record.meter_claimed_at is not null)
      then 'in_flight'
    when p_record.meter_status = 'pending' then 'on_the_way'
    else 'skipped'
  end
$$;

-- The rows a comparison of p_cycle reads: those counted in the cycle, and the customer's rows
-- metered in its window (what Stripe's summary counts); skipped rows never reach Stripe.
create function private.reconciliation_rows(
  p_cycle public.billing_cycles, p_customer text, p_settle interval
) returns jsonb
language sql stable
set search_path = ''
as $$
  with w as (
    select private.reconciliation_window(p_cycle) as win
  ), picked as (
    select u.id from public.usage_records u where u.billing_cycle_id = p_cycle.id
    union
    select u.id
      from public.usage_records u, w
     where u.meter_customer_id = p_customer
       and u.metered_at >= lower(w.win) and u.metered_at < upper(w.win)
  )
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', u.id,
           'call_id', u.call_id,
           'minutes', u.billed_minutes,
           'status', u.meter_status,
           'kind', private.usage_kind(u, p_settle),
           'identifier', u.meter_identifier,
           'in_window', coalesce(u.meter_customer_id = p_customer, false) and u.metered_at <@ w.win,
           'in_cycle', coalesce(u.billing_cycle_id = p_cycle.id, false),
           'in_period', u.metered_at >= p_cycle.period_start and u.metered_at < p_cycle.period_end,
           'billable', c.id is not null and private.unbillable_reason(c, u.metered_at) is null,
           'sent_at', extract(epoch from u.meter_sent_at),
           -- re-sent by reconciliation and received by Stripe less than 24 h ago (1 h of margin)
           'cancellable', u.meter_resent_at is not null and u.meter_status = 'sent'
             and u.meter_sent_at > now() - interval '23 hours'
         ) order by u.metered_at, u.id), '[]'::jsonb)
    from picked p
    join public.usage_records u on u.id = p.id
    left join public.billing_cycles c on c.id = u.billing_cycle_id
   cross join w
   where u.meter_status <> 'skipped'
$$;

-- The cycles a run checks: of organisations with a Stripe customer, started by now, ending on or
-- after p_since (default: 35 days ago, Stripe's meter horizon; the current ones end later), and
-- any cycle an error report named since its last check, whatever its end. Newest first within an
-- organisation: a repair counts usage late in the current cycle, so the current cycle is compared
-- before older ones move rows into it (those would still be settling at Stripe).
create function public.reconciliation_cycles(
  p_organisation_id uuid default null,
  p_since date default null
) returns jsonb
language sql stable
set search_path = ''
as $$
  select coalesce(jsonb_agg(jsonb_build_object(
           'id', c.id, 'organisation_id', c.organisation_id, 'period_start', c.period_start,
           'period_end', c.period_end, 'requested', q.requested)
           order by o.name, o.id, c.period_start desc, c.id), '[]'::jsonb)
    from public.billing_cycles c
    join public.organisations o on o.id = c.organisation_id
    join public.subscriptions s on s.id = c.subscription_id
   cross join lateral (
     select exists (
       select 1 from public.reconciliations r
        where r.billing_cycle_id = c.id and r.source = 'error_report'
          and not exists (
            select 1 from public.reconciliations later
             where later.billing_cycle_id = c.id and later.source = 'reconcile'
               and later.checked_at >= r.checked_at)
     ) as requested
   ) q
   where o.stripe_customer_id is not null and s.stripe_customer_id is not null
     and (p_organisation_id is null or c.organisation_id = p_organisation_id)
     and c.period_start <= now()
     and (c.period_end >= coalesce(p_since::timestamp at time zone 'UTC',
                                   now() - interval '35 days')
          or q.requested)
$$;

-- Our side of the comparison of one cycle, and (p_claim) a lease on it for p_lease_seconds:
-- {claimed: false} while another run holds one. The rows are classified with p_settle_seconds.
create function public.begin_reconciliation(
  p_cycle_id uuid,
  p_settle_seconds integer,
  p_lease_seconds integer,
  p_claim boolean default true
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
  v_customer text;
  v_name text;
  v_token uuid;
  v_window tstzrange;
begin
  select c.* into v_cycle from public.billing_cycles c where c.id = p_cycle_id;
  if v_cycle.id is null then
    raise exception 'No billing cycle has id %.', p_cycle_id
      using errcode = 'MB404', hint = 'cycle_not_found';
  end if;
  select s.stripe_customer_id into v_customer
    from public.subscriptions s where s.id = v_cycle.subscription_id;
  select o.name into v_name from public.organisations o where o.id = v_cycle.organisation_id;
  if p_claim then
    insert into public.reconciliation_claims as rc (billing_cycle_id, token, claimed_until)
    values (p_cycle_id, gen_random_uuid(), now() + make_interval(secs => p_lease_seconds))
    on conflict (billing_cycle_id) do update
      set token = excluded.token, claimed_until = excluded.claimed_until
      where rc.claimed_until <= now()
    returning rc.token into v_token;
    if v_token is null then
      return jsonb_build_object('claimed', false);
    end if;
  end if;
  v_window := private.reconciliation_window(v_cycle);
  return jsonb_build_object(
    'claimed', p_claim,
    'token', v_token,
    'cycle', jsonb_build_object(
      'id', v_cycle.id,
      'organisation_id', v_cycle.organisation_id,
      'organisation_name', v_name,
      'customer', v_customer,
      'period_start', v_cycle.period_start,
      'period_end', v_cycle.period_end,
      'window_start', floor(extract(epoch from lower(v_window)))::bigint,
      'window_end', floor(extract(epoch from upper(v_window)))::bigint,
      'minutes_used', v_cycle.minutes_used,
      'included_minutes', v_cycle.included_minutes,
      'overage_rate_cents', v_cycle.overage_rate_cents,
      'stripe_invoice_id', v_cycle.stripe_invoice_id,
      'stripe_metered_price_id', v_cycle.stripe_metered_price_id),
    'rows', private.reconciliation_rows(v_cycle, v_customer, make_interval(secs => p_settle_seconds)),
    'credited_minutes', (
      select coalesce(sum((r.details ->> 'credited_minutes')::numeric), 0)
        from public.reconciliations r where r.billing_cycle_id = p_cycle_id),
    'error_windows', (
      select coalesce(jsonb_agg(jsonb_build_array(
               r.details ->> 'validation_start', r.details ->> 'validation_end')), '[]'::jsonb)
        from public.reconciliations r
       where r.billing_cycle_id = p_cycle_id and r.source = 'error_report'
         and r.checked_at > now() - interval '35 days'));
end;
$$;

-- ------------------------------------------------------------------ repairs

-- One repair Python decided (shared/reconcile.py), on a row still as it was compared:
--   resend  a new identifier (the refused or lost one may be kept by Stripe): pending in its own
--           cycle while Stripe bills it, else counted late in the current cycle
--   late    a pending row whose cycle Stripe no longer bills, counted late (never sent: same
--           identifier)
--   settle  an `owed` row Stripe's figure shows it holds: sent
--   cancel  its re-sent event was canceled at Stripe (its predecessor is there): the identifier
--           goes back to the predecessor's
--   credit  minutes at Stripe that are not ours: recorded for a person to credit
-- Audited as reconciliation.repair. Outcome: pending, late, nowhere (no live subscription to
-- count it in), sent, canceled, credited, or stale (the row changed since: nothing done).
create function private.apply_reconciliation_repair(p_cycle public.billing_cycles, p_repair jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_action text := p_repair ->> 'action';
  v_before public.usage_records;
  v_record public.usage_records;
  v_own public.billing_cycles;
  v_reason text;
  v_outcome text;
  v_result jsonb;
begin
  if v_action = 'credit' then
    v_result := jsonb_build_object('action', 'credit', 'outcome', 'credited',
      'minutes', p_repair -> 'minutes', 'cents', p_repair -> 'cents');
  else
    select u.* into v_before
      from public.usage_records u where u.id = (p_repair ->> 'usage_record_id')::uuid;
    if v_before.id is null or v_before.meter_status is distinct from p_repair ->> 'status'
       or v_before.meter_identifier is distinct from p_repair ->> 'identifier' then
      return jsonb_build_object('action', v_action, 'usage_record_id', p_repair -> 'usage_record_id',
        'outcome', 'stale', 'minutes', v_before.billed_minutes);
    end if;
    select c.* into v_own from public.billing_cycles c where c.id = v_before.billing_cycle_id;
    v_reason := case when v_own.id is null then 'no_cycle'
                     else private.unbillable_reason(v_own, v_before.metered_at) end;
    if v_action = 'settle' then
      update public.usage_records u
         set meter_status = 'sent', meter_error = null,
             meter_sent_at = coalesce(u.meter_outcome_unknown_at, u.meter_sent_at, now()),
             meter_outcome_unknown_at = null, meter_claimed_at = null, meter_next_attempt_at = null
       where u.id = v_before.id
      returning u.* into v_record;
      v_outcome := 'sent';
    elsif v_action = 'cancel' then
      update public.usage_records u
         set meter_identifier = private.meter_identifier(
               u.organisation_id, u.call_id, greatest(u.meter_requeues - 1, 0)),
             meter_resent_at = null
       where u.id = v_before.id
      returning u.* into v_record;
      v_outcome := 'canceled';
    elsif v_action in ('resend', 'late') then
      v_record := v_before;
      if v_action = 'resend' then
        update public.usage_records u
           set meter_status = 'pending', meter_requeues = u.meter_requeues + 1,
               meter_identifier = private.meter_identifier(
                 u.organisation_id, u.call_id, u.meter_requeues + 1),
               meter_resent_at = now(), meter_error = null, meter_outcome_unknown_at = null,
               meter_claimed_at = null, meter_next_attempt_at = now()
         where u.id = v_before.id
        returning u.* into v_record;
      end if;
      if v_reason is null then
        v_outcome := 'pending';
      else
        v_record := private.count_late(v_record, v_reason);
        v_outcome := case when v_record.meter_status = 'pending' then 'late' else 'nowhere' end;
      end if;
    else
      raise exception 'Unknown reconciliation repair %.', v_action
        using errcode = 'MB422', hint = 'validation_error';
    end if;
    v_result := jsonb_build_object(
      'action', v_action, 'outcome', v_outcome, 'usage_record_id', v_before.id,
      'call_id', v_before.call_id, 'minutes', v_before.billed_minutes, 'reason', v_reason,
      'from_identifier', v_before.meter_identifier, 'to_identifier', v_record.meter_identifier,
      'to_cycle', v_record.billing_cycle_id);
  end if;
  insert into public.audit_log (organisation_id, actor, action, details)
  values (p_cycle.organisation_id, 'ops-reconcile', 'reconciliation.repair',
          v_result || jsonb_build_object('billing_cycle_id', p_cycle.id,
                                         'why', p_repair -> 'why'));
  return v_result;
end;
$$;

-- Finish a run's check of a cycle: the repairs (in the order given, rows locked by id first, so a
-- flush or an error report waits instead of deadlocking), the requeued events claimed for
-- delivery now (their meter events returned, as claim_meter_events does; should the run die, the
-- flush delivers them when the lease ends), the `reconciliations` row, the lease released.
-- p_report: {status, usage_minutes, cycle_minutes, stripe_minutes, invoiced_minutes, details}.
-- A `repaired` status becomes `drift` when a repair found its row changed meanwhile.
create function public.finish_reconciliation(
  p_cycle_id uuid,
  p_token uuid,
  p_report jsonb,
  p_repairs jsonb,
  p_lease_seconds integer
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_cycle public.billing_cycles;
  v_repair jsonb;
  v_done jsonb := '[]'::jsonb;
  v_result jsonb;
  v_requeued uuid[] := '{}';
  v_status text := p_report ->> 'status';
  v_credited numeric := 0;
  v_events jsonb;
  v_id bigint;
begin
  delete from public.reconciliation_claims rc
   where rc.billing_cycle_id = p_cycle_id and rc.token = p_token;
  if not found then
    raise exception 'Another reconcile run took over cycle % when this run''s lease ran out; this run changed nothing there.', p_cycle_id
      using errcode = 'MB409', hint = 'reconciliation_claim_lost';
  end if;
  select c.* into v_cycle from public.billing_cycles c where c.id = p_cycle_id;
  perform 1
     from public.usage_records u
    where u.id in (select (r ->> 'usage_record_id')::uuid
                     from jsonb_array_elements(coalesce(p_repairs, '[]'::jsonb)) r
                    where r ? 'usage_record_id')
    order by u.id
      for update;
  for v_repair in select r from jsonb_array_elements(coalesce(p_repairs, '[]'::jsonb)) r loop
    v_result := private.apply_reconciliation_repair(v_cycle, v_repair);
    v_done := v_done || jsonb_build_array(v_result);
    if v_result ->> 'outcome' in ('pending', 'late') then
      v_requeued := v_requeued || (v_result ->> 'usage_record_id')::uuid;
    elsif v_result ->> 'outcome' = 'credited' then
      v_credited := v_credited + (v_result ->> 'minutes')::numeric;
    elsif v_result ->> 'outcome' = 'stale' and v_status = 'repaired' then
      v_status := 'drift';
    end if;
  end loop;

  with claimed as (
    update public.usage_records u
       set meter_attempts = u.meter_attempts + 1,
           meter_claimed_at = now(),
           meter_next_attempt_at = now() + make_interval(secs => p_lease_seconds)
     where u.id = any (v_requeued) and u.meter_status = 'pending'
    returning u
  )
  select coalesce(jsonb_agg(private.meter_event(claimed.u)), '[]'::jsonb) into v_events
    from claimed;

  insert into public.reconciliations
    (organisation_id, billing_cycle_id, usage_minutes, cycle_minutes, stripe_minutes,
     invoiced_minutes, status, source, details)
  values (
    v_cycle.organisation_id, v_cycle.id, (p_report ->> 'usage_minutes')::integer,
    (p_report ->> 'cycle_minutes')::integer, (p_report ->> 'stripe_minutes')::integer,
    (p_report ->> 'invoiced_minutes')::integer, v_status, 'reconcile',
    coalesce(p_report -> 'details', '{}'::jsonb)
      || jsonb_build_object('repairs', v_done, 'credited_minutes', v_credited))
  returning id into v_id;
  return jsonb_build_object('id', v_id, 'status', v_status, 'repairs', v_done, 'events', v_events);
end;
$$;

-- A run that could not finish a cycle (Stripe out of reach) gives its lease back.
create function public.release_reconciliation(p_cycle_id uuid, p_token uuid)
returns jsonb
language sql
set search_path = ''
as $$
  with released as (
    delete from public.reconciliation_claims rc
     where rc.billing_cycle_id = p_cycle_id and rc.token = p_token
    returning rc.billing_cycle_id
  )
  select jsonb_build_object('released', exists (select 1 from released))
$$;

-- ------------------------------------------------------------------ Stripe's error reports

-- An error report (v1.billing.meter.error_report_triggered or .no_meter_found), once per event:
-- the rows its samples name (by meter identifier, or by an idempotency key of ours,
-- identifier-attempt) become `failed` with Stripe's reason, unless failed already; a row that was
-- sent keeps its minutes counted (requeue-usage or reconcile --repair sends it again), and the
-- outcome of its attempts is known now (refused). Each audited (usage.meter_rejected). The
-- samples are not every rejected event, so every cycle they touch (the named rows' cycles, and
-- the cycles of their customers overlapping the validation window) gets a `drift` row for the
-- next reconcile, which finds the rest. The event is marked processed with the fetched event in
-- its payload. p_samples: [{identifier, code, message}].
create function public.apply_meter_error_report(
  p_event_id text,
  p_event jsonb,
  p_samples jsonb,
  p_validation_start timestamptz,
  p_validation_end timestamptz
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  c_suffix constant text := '-[0-9]+$';
  v_ids text[];
  v_row record;
  v_failed jsonb := '[]'::jsonb;
  v_already integer := 0;
  v_matched text[] := '{}';
  v_customers text[] := '{}';
  v_cycle_ids uuid[] := '{}';
  v_cycle public.billing_cycles;
  v_cycles jsonb := '[]'::jsonb;
begin
  select coalesce(array_agg(distinct x.id), '{}') into v_ids
    from jsonb_array_elements(coalesce(p_samples, '[]'::jsonb)) s
   cross join lateral (values (s ->> 'identifier'),
                              (regexp_replace(s ->> 'identifier', c_suffix, ''))) as x (id)
   where s ->> 'identifier' is not null;

  for v_row in
    select u.id, u.organisation_id, u.call_id, u.meter_status, u.meter_identifier,
           u.billed_minutes, u.billing_cycle_id, u.meter_customer_id,
           (select s from jsonb_array_elements(p_samples) s
             where s ->> 'identifier' = u.meter_identifier
                or regexp_replace(s ->> 'identifier', c_suffix, '') = u.meter_identifier
             limit 1) as sample
      from public.usage_records u
     where u.meter_identifier = any (v_ids)
     order by u.id
       for update of u
  loop
    v_matched := v_matched || (v_row.sample ->> 'identifier');
    v_customers := v_customers || v_row.meter_customer_id;
    v_cycle_ids := v_cycle_ids || v_row.billing_cycle_id;
    if v_row.meter_status = 'failed' then
      v_already := v_already + 1;
    elsif v_row.meter_status in ('sent', 'pending', 'unconfirmed') then
      update public.usage_records u
         set meter_status = 'failed',
             meter_error = left(coalesce(v_row.sample ->> 'code', 'meter_event_invalid') || ': '
                                || coalesce(v_row.sample ->> 'message', 'rejected by Stripe'), 1000),
             meter_outcome_unknown_at = null, meter_claimed_at = null, meter_next_attempt_at = null
       where u.id = v_row.id;
      insert into public.audit_log (organisation_id, actor, action, details)
      values (v_row.organisation_id, 'stripe-webhook', 'usage.meter_rejected', jsonb_build_object(
        'usage_record_id', v_row.id, 'call_id', v_row.call_id, 'event_id', p_event_id,
        'identifier', v_row.meter_identifier, 'previous_status', v_row.meter_status,
        'billed_minutes', v_row.billed_minutes, 'code', v_row.sample ->> 'code',
        'message', v_row.sample ->> 'message', 'billing_cycle_id', v_row.billing_cycle_id));
      v_failed := v_failed || jsonb_build_array(v_row.id);
    end if;
  end loop;

  for v_cycle in
    select c.*
      from public.billing_cycles c
     where c.id = any (v_cycle_ids)
        or (p_validation_start is not null and p_validation_end is not null
            and c.period_start < p_validation_end and c.period_end > p_validation_start
            and c.subscription_id in (
              select s.id from public.subscriptions s
               where s.stripe_customer_id = any (v_customers)))
     order by c.period_start, c.id
  loop
    insert into public.reconciliations
      (organisation_id, billing_cycle_id, usage_minutes, cycle_minutes, status, source, details)
    values (
      v_cycle.organisation_id, v_cycle.id,
      (select coalesce(sum(u.billed_minutes), 0)
         from public.usage_records u where u.billing_cycle_id = v_cycle.id),
      v_cycle.minutes_used, 'drift', 'error_report',
      jsonb_build_object(
        'event_id', p_event_id, 'type', p_event ->> 'type',
        'validation_start', p_validation_start, 'validation_end', p_validation_end,
        'error_count', p_event #> '{data,reason,error_count}',
        'failed', (select coalesce(jsonb_agg(u.id), '[]'::jsonb)
                     from public.usage_records u
                    where u.billing_cycle_id = v_cycle.id
                      and to_jsonb(u.id) <@ v_failed)));
    v_cycles := v_cycles || jsonb_build_array(v_cycle.id);
  end loop;

  update public.stripe_events e
     set status = 'processed', processed_at = now(), error = null,
         payload = e.payload || jsonb_build_object('event', p_event)
   where e.id = p_event_id;
  return jsonb_build_object(
    'status', 'processed',
    'failed', v_failed,
    'already_failed', v_already,
    'unknown_identifiers', (
      select coalesce(jsonb_agg(distinct s ->> 'identifier'), '[]'::jsonb)
        from jsonb_array_elements(coalesce(p_samples, '[]'::jsonb)) s
       where not (s ->> 'identifier' = any (v_matched))),
    'cycles', v_cycles);
end;
$$;

revoke all on function private.reconciliation_window(public.billing_cycles)
  from public, anon, authenticated;
revoke all on function private.usage_kind(public.usage_records, interval)
  from public, anon, authenticated;
revoke all on function private.reconciliation_rows(public.billing_cycles, text, interval)
  from public, anon, authenticated;
revoke all on function public.reconciliation_cycles(uuid, date) from public, anon, authenticated;
revoke all on function public.begin_reconciliation(uuid, integer, integer, boolean)
  from public, anon, authenticated;
revoke all on function private.apply_reconciliation_repair(public.billing_cycles, jsonb)
  from public, anon, authenticated;
revoke all on function public.finish_reconciliation(uuid, uuid, jsonb, jsonb, integer)
  from public, anon, authenticated;
revoke all on function public.release_reconciliation(uuid, uuid) from public, anon, authenticated;
revoke all on function public.apply_meter_error_report(text, jsonb, jsonb, timestamptz, timestamptz)
  from public, anon, authenticated;
grant execute on function private.reconciliation_window(public.billing_cycles) to service_role;
grant execute on function private.usage_kind(public.usage_records, interval) to service_role;
grant execute on function private.reconciliation_rows(public.billing_cycles, text, interval)
  to service_role;
grant execute on function public.reconciliation_cycles(uuid, date) to service_role;
grant execute on function public.begin_reconciliation(uuid, integer, integer, boolean)
  to service_role;
grant execute on function private.apply_reconciliation_repair(public.billing_cycles, jsonb)
  to service_role;
grant execute on function public.finish_reconciliation(uuid, uuid, jsonb, jsonb, integer)
  to service_role;
grant execute on function public.release_reconciliation(uuid, uuid) to service_role;
grant execute on function public.apply_meter_error_report(text, jsonb, jsonb, timestamptz, timestamptz)
  to service_role;

-- migrate:down
