-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Meter identifiers that no two calls can share.
--
-- A call's identifier is 'mb_' || sha256 of its organisation and call id, and after N requeues
-- (requeue-usage, reconcile --repair's resend) of the same with ':requeue:N' appended. Call ids
-- are free text, so the encoding was not one-to-one: call 'X' requeued once had the identifier of
-- a call named 'X:requeue:1' reported once. Stripe keeps one event per identifier (24 h at
-- least), so one of the two calls was never billed while both rows said sent.
--
-- Now a requeued identifier hashes 'requeue:N:' || organisation || ':' || call id. The first
-- identifier of a call (the hot path writes it inline, sql/0090) is unchanged: it hashes the
-- organisation's uuid first, whose text begins with a hex digit, never with 'r', so no first
-- identifier equals a requeued one; among requeued ones N ends at the first ':' and the uuid has
-- a fixed length, so (N, organisation, call) is read back from the text. No stored identifier
-- changes (an event already at Stripe keeps its identifier), and identifiers made before this
-- migration begin with a uuid, so no new requeued one equals any of them either.
--
-- reconcile's cancel (its re-sent event canceled at Stripe) put back the predecessor's
-- identifier by computing it again from meter_requeues - 1; with two encodings that would be
-- wrong for a row requeued before this migration. So each requeue and resend now keeps the
-- identifier it replaces (meter_previous_identifier), and cancel puts that back. Rows requeued
-- before this migration get it here, computed with the encoding that made it (one pass over
-- usage_records, updating only requeued rows).

alter table public.usage_records add column meter_previous_identifier text;

comment on column public.usage_records.meter_previous_identifier is
  'The identifier the last requeue or resend replaced; reconcile''s cancel puts it back.';

update public.usage_records u
   set meter_previous_identifier = private.meter_identifier(
         u.organisation_id, u.call_id, u.meter_requeues - 1)
 where u.meter_requeues > 0;

create or replace function private.meter_identifier(
  p_org_id uuid, p_call_id text, p_requeues integer
) returns text
language sql immutable
set search_path = ''
as $$
  select 'mb_' || encode(sha256(convert_to(
    case when p_requeues > 0
         then 'requeue:' || p_requeues || ':' || p_org_id::text || ':' || p_call_id
         else p_org_id::text || ':' || p_call_id end,
    'UTF8')), 'hex')
$$;

create or replace function public.requeue_failed_usage(
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
             meter_previous_identifier = u.meter_identifier,
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

create or replace function private.apply_reconciliation_repair(p_cycle public.billing_cycles, p_repair jsonb)
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
         set meter_identifier = coalesce(u.meter_previous_identifier, u.meter_identifier),
             meter_resent_at = null
       where u.id = v_before.id
      returning u.* into v_record;
      v_outcome := 'canceled';
    elsif v_action in ('resend', 'late') then
      v_record := v_before;
      if v_action = 'resend' then
        update public.usage_records u
           set meter_status = 'pending', meter_requeues = u.meter_requeues + 1,
               meter_previous_identifier = u.meter_identifier,
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

-- migrate:down
