-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- A subscription whose prices are in no plan is never named a duplicate.
--
-- apply_subscription_state looked for a second live subscription of the organisation before it
-- resolved the state's plan. A subscription to something else the account sells (an add-on made
-- in the Dashboard, a payment link) on one of our customers was matched to the organisation by
-- its customer, named the newer duplicate, and canceled at Stripe (shared/subscriptions.py);
-- the customer lost what they had bought, and applying its canceled state then failed with
-- 503 unknown_price for Stripe's three days of retries. Now the plan is resolved first: such a
-- state is 503 unknown_price before anything is decided (as any state with an unknown price,
-- since a catalogue fix and a retry may apply it) and nothing is canceled. Two live
-- subscriptions of our plans are still one kept and one canceled.
--
-- 0050's apply_subscription_state, with private.resolve_plan moved before the duplicate check.
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

  -- The plan first: a state none of our plans sells (503 unknown_price) is nobody's duplicate.
  if v_fresh then
    v_plan := private.resolve_plan(p_state);
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

-- migrate:down
