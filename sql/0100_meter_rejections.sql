-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- A rejection by Stripe's error report is final (issue 12's flusher, found in review).
--
-- Stripe's v2 meter event stream answers a batch before it validates its events; an event it
-- then refuses comes back in an error report (v1.billing.meter.error_report_triggered), and
-- apply_meter_error_report makes its row `failed`. The flusher saves a batch's outcomes after
-- Stripe answered; if its thread stalls in between (Cloud Run throttles a background thread's
-- CPU between requests) the error report can land first, and the late `sent` turned the
-- rejected row back into `sent`: minutes shown as billed that Stripe never counted, and that
-- requeue-usage (failed rows only) would never send again.
--
-- Now the row remembers which identifier Stripe rejected (meter_rejected_identifier), and a
-- `sent` outcome no longer applies to it. A `sent` still overrides other failures: a 400 in one
-- attempt while another attempt of the same identifier was accepted leaves the event on the
-- meter. requeue-usage and reconcile --repair send under a new identifier, which a later `sent`
-- applies to again. The flusher now says which identifier each `sent` was for, so a stale
-- outcome of an old identifier cannot mark the row's new, never sent one as sent (without it,
-- from an older flusher during a rolling deploy, the rule is as before).
--
-- The column is nullable without a default: adding it rewrites nothing.

alter table public.usage_records add column meter_rejected_identifier text;

comment on column public.usage_records.meter_rejected_identifier is
  'The meter identifier Stripe''s error report refused; a sent outcome for it is ignored.';

create or replace function public.apply_meter_error_report(
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
      update public.usage_records u
         set meter_rejected_identifier = u.meter_identifier
       where u.id = v_row.id;
    elsif v_row.meter_status in ('sent', 'pending', 'unconfirmed') then
      update public.usage_records u
         set meter_status = 'failed',
             meter_rejected_identifier = u.meter_identifier,
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
          or (p_outcome = 'sent' and u.meter_status in ('pending', 'failed', 'unconfirmed')
              and u.meter_rejected_identifier is distinct from u.meter_identifier))
  returning u.meter_status into v_status;
  if not found then
    select u.meter_status into v_status from public.usage_records u where u.id = p_usage_record_id;
  end if;
  return jsonb_build_object('meter_status', v_status);
end;
$$;

create or replace function public.record_meter_results(p_results jsonb)
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
    from jsonb_to_recordset(p_results) as r (usage_record_id uuid, outcome text, identifier text)
   where r.outcome = 'sent' and u.id = r.usage_record_id
     and u.meter_status in ('pending', 'failed', 'unconfirmed')
     and u.meter_identifier = coalesce(r.identifier, u.meter_identifier)
     and u.meter_rejected_identifier is distinct from u.meter_identifier;
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

-- migrate:down
