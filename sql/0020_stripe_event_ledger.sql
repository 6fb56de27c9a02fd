-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- The webhook ledger's life cycle: each Stripe event is claimed by one delivery at a time, and
-- ends `processed` (in the same transaction as its effect, see apply_subscription_state),
-- `ignored` (a type we do not handle, or nothing of ours to apply it to) or `failed` (error and
-- attempt count kept; Stripe's retry or `python -m ops.repair failed-events` claims it again).

-- When the current claim was taken: a `processing` row older than the lease belongs to a process
-- that died mid-way, and may be claimed again.
alter table public.stripe_events add column claimed_at timestamptz;

-- Record the event once and claim it for processing.
--   {"status": "claimed", "attempts": n}  new (attempts 1), or a failed / abandoned claim taken again
--   {"status": "ignored"}                 a type nobody handles, recorded as such
--   {"status": "duplicate"}               already processed or ignored: nothing to do
-- A row another delivery claimed less than p_lease_seconds ago raises 503 event_in_progress: a
-- 200 now would tell Stripe the event is done before its effect is stored, and if that delivery
-- then failed Stripe would never retry.
create function public.claim_stripe_event(
  p_id text,
  p_type text,
  p_created bigint,
  p_payload jsonb,
  p_handled boolean,
  p_lease_seconds integer default 120
) returns jsonb
language plpgsql
as $$
declare
  v_event public.stripe_events;
begin
  insert into public.stripe_events as e
    (id, type, created, payload, status, attempts, claimed_at, processed_at)
  values (
    p_id, p_type, to_timestamp(p_created), p_payload,
    case when p_handled then 'processing' else 'ignored' end,
    case when p_handled then 1 else 0 end,
    now(),
    case when p_handled then null else now() end
  )
  on conflict (id) do nothing
  returning e.* into v_event;
  if found then
    return jsonb_build_object(
      'status', case when p_handled then 'claimed' else 'ignored' end,
      'attempts', v_event.attempts
    );
  end if;

  select e.* into v_event from public.stripe_events e where e.id = p_id for update;
  if v_event.status in ('processed', 'ignored') then
    return jsonb_build_object('status', 'duplicate', 'attempts', v_event.attempts);
  end if;
  if v_event.status = 'processing'
     and v_event.claimed_at > now() - make_interval(secs => p_lease_seconds) then
    raise exception 'Event % is being processed by another delivery; retry shortly.', p_id
      using errcode = 'MB503', hint = 'event_in_progress';
  end if;

  if not p_handled then
    -- Failed under a release that handled its type, which this one does not: settle it.
    update public.stripe_events e
       set status = 'ignored', processed_at = now()
     where e.id = p_id;
    return jsonb_build_object('status', 'ignored', 'attempts', v_event.attempts);
  end if;
  update public.stripe_events e
     set status = 'processing', attempts = e.attempts + 1, claimed_at = now()
   where e.id = p_id
  returning e.* into v_event;
  return jsonb_build_object('status', 'claimed', 'attempts', v_event.attempts);
end;
$$;

-- A claimed event failed: keep the reason for operators; the row is claimable again.
create function public.fail_stripe_event(p_id text, p_error text) returns jsonb
language sql
as $$
  update public.stripe_events e
     set status = 'failed', error = left(p_error, 2000)
   where e.id = p_id and e.status = 'processing'
  returning jsonb_build_object('id', e.id, 'status', e.status, 'attempts', e.attempts);
$$;

-- A claimed event needs nothing from us (an invoice without a subscription, an organisation we
-- do not have): settled for good, with the reason kept.
create function public.ignore_stripe_event(p_id text, p_reason text) returns jsonb
language sql
as $$
  update public.stripe_events e
     set status = 'ignored', error = left(p_reason, 2000), processed_at = now()
   where e.id = p_id and e.status = 'processing'
  returning jsonb_build_object('id', e.id, 'status', e.status, 'attempts', e.attempts);
$$;

-- The events a repair run should process again: failed ones, and claims older than the lease.
create function public.stripe_events_to_retry(
  p_lease_seconds integer default 120,
  p_limit integer default 1000
) returns jsonb
language sql stable
as $$
  select coalesce(jsonb_agg(to_jsonb(t) order by t.received_at), '[]'::jsonb)
    from (
      select e.id, e.type, e.status, e.attempts, e.error, e.payload, e.received_at
        from public.stripe_events e
       where e.status = 'failed'
          or (e.status = 'processing'
              and e.claimed_at < now() - make_interval(secs => p_lease_seconds))
       order by e.received_at
       limit p_limit
    ) t;
$$;

revoke all on function public.claim_stripe_event(text, text, bigint, jsonb, boolean, integer)
  from public, anon, authenticated;
revoke all on function public.fail_stripe_event(text, text) from public, anon, authenticated;
revoke all on function public.ignore_stripe_event(text, text) from public, anon, authenticated;
revoke all on function public.stripe_events_to_retry(integer, integer)
  from public, anon, authenticated;
grant execute on function public.claim_stripe_event(text, text, bigint, jsonb, boolean, integer)
  to service_role;
grant execute on function public.fail_stripe_event(text, text) to service_role;
grant execute on function public.ignore_stripe_event(text, text) to service_role;
grant execute on function public.stripe_events_to_retry(integer, integer) to service_role;

-- migrate:down
