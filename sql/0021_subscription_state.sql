-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Subscriptions follow Stripe: every webhook (and every repair) fetches the subscription's
-- CURRENT state from Stripe and applies it here in one call, with its billing cycles, its audit
-- rows and the event's `processed` mark.

-- When the stored state was fetched from Stripe (the moment the fetch began). A state fetched
-- earlier never overwrites one fetched later: two handlers racing (fetch A begins, fetch B
-- begins, B is applied first) leave B's state, whatever order they commit in.
alter table public.subscriptions add column stripe_state_at timestamptz;

-- When Stripe created the subscription: the older of two live ones is kept.
alter table public.subscriptions add column stripe_created timestamptz;

-- The plan a subscription's price ids belong to: its flat price (monthly or yearly) decides the
-- plan and the billing period. NULL when no plan has any of the prices. p_price_ids: a jsonb
-- array of price ids (lists travel as jsonb through both database transports).
create function public.plan_for_stripe_prices(p_price_ids jsonb) returns jsonb
language sql stable
as $$
  with given as (
    select array(select jsonb_array_elements_text(coalesce(p_price_ids, '[]'::jsonb))) as ids
  )
  select jsonb_build_object(
           'plan_id', p.id,
           'name', p.name,
           'billing_period',
             case when p.stripe_yearly_price_id = any (g.ids) then 'yearly' else 'monthly' end,
           'flat_price_id',
             case when p.stripe_yearly_price_id = any (g.ids)
                  then p.stripe_yearly_price_id else p.stripe_price_id end,
           'stripe_metered_price_id', p.stripe_metered_price_id,
           'included_minutes', p.included_minutes
         )
    from public.billing_plans p, given g
   where p.stripe_price_id = any (g.ids) or p.stripe_yearly_price_id = any (g.ids)
   order by p.sort_order, p.id
   limit 1;
$$;

-- The moment a Stripe fetch begins, as the stamp apply_subscription_state orders states by.
create function public.stripe_fetch_started_at() returns jsonb
language sql volatile
as $$
  select to_jsonb(clock_timestamp());
$$;

-- Apply a subscription state fetched from Stripe at p_state_at:
-- p_state = {stripe_subscription_id, stripe_customer_id, status, organisation_id (metadata, may be
--   null), cancel_at_period_end, canceled_at (unix s), items: [{price_id, usage_type,
--   current_period_start, current_period_end (unix s)}]}
-- p_invoice (invoice.paid) = {id, created, lines: [{price_id, period_start, period_end}]}: its
--   usage lines of subscription items; the cycle each metered line billed gets its id and closes
--   (the invoice-level period is not a service period and is not used).
-- Rules:
-- - a state fetched no later than the stored one, or a live state over an ended subscription
--   (canceled / incomplete_expired are terminal in Stripe), changes nothing;
-- - a subscription we have no row for belongs to p_organisation_id (checkout), else to its
--   organisation_id metadata, else to the organisation with its customer; with none of these it
--   is not ours: the event is `ignored` with the reason (no retry could change that);
-- - no plan with its prices: 503 unknown_price (the catalog needs fixing; the event is retried);
-- - the metered item's current period is the billing cycle: opened once per (subscription,
--   period_start), also when a usage report opened it first; older active cycles are closed; an
--   ended subscription closes its active cycle. minutes_used is never touched;
-- - a status or plan change writes an audit_log row with before and after;
-- - p_event_id is marked processed in the same transaction;
-- - one organisation, one live subscription: a subscription live while the organisation has
--   another live one is a duplicate when Stripe created it later (stripe_created, else our
--   created_at). The result names it (`duplicate`: {kept, newer}) and the event stays unprocessed;
--   shared/subscriptions.py cancels the newer one at Stripe and applies its canceled state. A
--   newer one being applied now is not written at all, so it is never the organisation's live
--   subscription;
-- - a canceled state whose cancellation comment names the kept subscription (p_state ->
--   duplicate_of) writes subscription.duplicate_canceled once, with the invoices to refund;
-- - p_checkout_session_id: the Checkout Session that made the subscription is marked complete.
-- p_state also carries created (unix s), latest_invoice and duplicate_of.
create function public.apply_subscription_state(
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
  c_uuid constant text := '^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$';
  v_stripe_id text := p_state ->> 'stripe_subscription_id';
  v_customer text := p_state ->> 'stripe_customer_id';
  v_status text := p_state ->> 'status';
  v_items jsonb := coalesce(p_state -> 'items', '[]'::jsonb);
  v_metadata_org text := p_state ->> 'organisation_id';
  v_hint uuid;
  v_exists boolean;
  v_fresh boolean;
  v_before public.subscriptions;
  v_after public.subscriptions;
  v_org uuid;
  v_org_customer text;
  v_reason text;
  v_prices jsonb;
  v_plan jsonb;
  v_flat_start timestamptz;
  v_flat_end timestamptz;
  v_metered_start timestamptz;
  v_metered_end timestamptz;
  v_changed text[] := '{}';
  v_invoiced integer := 0;
  v_org_id uuid;
  v_created timestamptz;
  v_kept text;
  v_newer text;
begin
  if v_stripe_id is null or v_customer is null or v_status is null or p_state_at is null then
    raise exception 'A subscription state needs stripe_subscription_id, stripe_customer_id, status and the time it was fetched.'
      using errcode = 'MB422', hint = 'invalid_subscription_state';
  end if;
  v_hint := coalesce(
    p_organisation_id,
    case when v_metadata_org ~ c_uuid then v_metadata_org::uuid end
  );

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
    if v_hint is not null then
      select o.id, o.stripe_customer_id into v_org, v_org_customer
        from public.organisations o where o.id = v_hint;
      v_reason := format('organisation %s does not exist', v_hint);
    else
      select o.id, o.stripe_customer_id into v_org, v_org_customer
        from public.organisations o where o.stripe_customer_id = v_customer;
      v_reason := format(
        'subscription %s has no organisation_id metadata and customer %s belongs to no organisation',
        v_stripe_id, v_customer);
    end if;
    if v_org is null then
      if p_event_id is not null then
        update public.stripe_events e
           set status = 'ignored', error = v_reason, processed_at = now()
         where e.id = p_event_id;
      end if;
      return jsonb_build_object('status', 'ignored', 'reason', v_reason);
    end if;
  end if;

  -- Live while the organisation has another live subscription: the one Stripe created first is
  -- kept, the other is the accident (a second checkout paid, one made in the Dashboard) and
  -- Python cancels it at Stripe. The organisation lock makes applies of its subscriptions take
  -- turns, so two racing (created A, created B) see each other: whichever commits second finds
  -- the first, and both orders name the same newer one.
  if (v_fresh and v_status = any (c_live)) or (not v_fresh and v_before.status = any (c_live)) then
    v_org_id := coalesce(v_before.organisation_id, v_org);
    perform pg_advisory_xact_lock(
      hashtextextended('organisation_subscriptions:' || v_org_id::text, 0));
    v_created := coalesce(to_timestamp((p_state ->> 'created')::bigint), v_before.stripe_created,
                          v_before.created_at, now());
    with candidates (stripe_subscription_id, born, created_at) as (
      select s.stripe_subscription_id, coalesce(s.stripe_created, s.created_at), s.created_at
        from public.subscriptions s
       where s.organisation_id = v_org_id
         and s.stripe_subscription_id <> v_stripe_id
         and s.status = any (c_live)
      union all
      select v_stripe_id, v_created, coalesce(v_before.created_at, now())
    ), ranked as (
      select c.stripe_subscription_id,
             row_number() over (order by c.born, c.created_at, c.stripe_subscription_id) as n
        from candidates c
    )
    select (select r.stripe_subscription_id from ranked r where r.n = 1),
           (select r.stripe_subscription_id from ranked r where r.n > 1
             order by r.stripe_subscription_id = v_stripe_id desc, r.n limit 1)
      into v_kept, v_newer;
    -- The one applied now is the newer: it never becomes the organisation's live subscription
    -- here (record_usage would meter against it). Nothing is written and the event stays
    -- unprocessed until its canceled state is applied.
    if v_newer = v_stripe_id then
      return jsonb_build_object(
        'status', 'duplicate',
        'duplicate', jsonb_build_object('kept', v_kept, 'newer', v_newer),
        'subscription_id', v_before.id,
        'organisation_id', v_org_id,
        'subscription_status', v_before.status,
        'plan_id', v_before.plan_id,
        'billing_period', v_before.billing_period,
        'created', false,
        'applied', false,
        'changed', '[]'::jsonb,
        'invoiced_cycles', 0
      );
    end if;
  end if;

  if v_fresh then
    select coalesce(jsonb_agg(i -> 'price_id'), '[]'::jsonb) into v_prices
      from jsonb_array_elements(v_items) i;
    v_plan := public.plan_for_stripe_prices(v_prices);
    if v_plan is null then
      raise exception 'Subscription % has no price of a billing plan (prices %): add them to billing_plans, then run python -m ops.repair failed-events.',
        v_stripe_id, v_prices
        using errcode = 'MB503', hint = 'unknown_price';
    end if;

    select to_timestamp((i ->> 'current_period_start')::bigint),
           to_timestamp((i ->> 'current_period_end')::bigint)
      into v_flat_start, v_flat_end
      from jsonb_array_elements(v_items) i
     where i ->> 'price_id' = v_plan ->> 'flat_price_id'
     limit 1;
    -- The metered item: the plan's metered price, else any metered price (a plan change in flight).
    select to_timestamp((i ->> 'current_period_start')::bigint),
           to_timestamp((i ->> 'current_period_end')::bigint)
      into v_metered_start, v_metered_end
      from jsonb_array_elements(v_items) i
     where i ->> 'price_id' = v_plan ->> 'stripe_metered_price_id'
        or i ->> 'usage_type' = 'metered'
     order by (i ->> 'price_id' = v_plan ->> 'stripe_metered_price_id') desc
     limit 1;

    if not v_exists then
      insert into public.subscriptions as s (
        organisation_id, plan_id, stripe_subscription_id, stripe_customer_id, status,
        billing_period, current_period_start, current_period_end, cancel_at_period_end,
        canceled_at, stripe_state_at, stripe_created
      ) values (
        v_org, (v_plan ->> 'plan_id')::uuid, v_stripe_id, v_customer, v_status,
        v_plan ->> 'billing_period', v_flat_start, v_flat_end,
        coalesce((p_state ->> 'cancel_at_period_end')::boolean, false),
        to_timestamp((p_state ->> 'canceled_at')::bigint), p_state_at,
        to_timestamp((p_state ->> 'created')::bigint)
      )
      returning s.* into v_after;

      insert into public.audit_log (organisation_id, actor, action, details)
      values (v_org, p_actor, 'subscription.created', jsonb_build_object(
        'stripe_subscription_id', v_stripe_id, 'event_id', p_event_id, 'before', null,
        'after', jsonb_build_object('status', v_after.status, 'plan_id', v_after.plan_id,
                                    'billing_period', v_after.billing_period)));

      -- The organisation's customer: set when it has none. Our checkout always passes the
      -- organisation's own customer, so a different one is recorded for a person to look at
      -- and left as it is (meter events go to the subscription's customer).
      if v_org_customer is null then
        update public.organisations o
           set stripe_customer_id = v_customer, updated_at = now()
         where o.id = v_org and o.stripe_customer_id is null
           and not exists (
             select 1 from public.organisations x where x.stripe_customer_id = v_customer);
      elsif v_org_customer <> v_customer then
        insert into public.audit_log (organisation_id, actor, action, details)
        values (v_org, p_actor, 'organisation.customer_mismatch', jsonb_build_object(
          'stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
          'organisation_customer', v_org_customer, 'subscription_customer', v_customer));
      end if;
    else
      update public.subscriptions s
         set plan_id = (v_plan ->> 'plan_id')::uuid,
             billing_period = v_plan ->> 'billing_period',
             status = v_status,
             stripe_customer_id = v_customer,
             current_period_start = v_flat_start,
             current_period_end = v_flat_end,
             cancel_at_period_end = coalesce((p_state ->> 'cancel_at_period_end')::boolean, false),
             canceled_at = to_timestamp((p_state ->> 'canceled_at')::bigint),
             stripe_state_at = p_state_at,
             stripe_created = coalesce(to_timestamp((p_state ->> 'created')::bigint),
                                       s.stripe_created),
             updated_at = now()
       where s.id = v_before.id
      returning s.* into v_after;

      select coalesce(array_agg(a.key order by a.key), '{}') into v_changed
        from jsonb_each(to_jsonb(v_after)) a
        join jsonb_each(to_jsonb(v_before)) b using (key)
       where a.key in ('status', 'plan_id', 'billing_period', 'stripe_customer_id',
                       'current_period_start', 'current_period_end', 'cancel_at_period_end',
                       'canceled_at')
         and a.value is distinct from b.value;

      if v_before.status is distinct from v_after.status then
        insert into public.audit_log (organisation_id, actor, action, details)
        values (v_after.organisation_id, p_actor, 'subscription.status_changed',
          jsonb_build_object('stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
            'before', jsonb_build_object('status', v_before.status),
            'after', jsonb_build_object('status', v_after.status)));
      end if;
      if v_before.plan_id is distinct from v_after.plan_id
         or v_before.billing_period is distinct from v_after.billing_period then
        insert into public.audit_log (organisation_id, actor, action, details)
        values (v_after.organisation_id, p_actor, 'subscription.plan_changed',
          jsonb_build_object('stripe_subscription_id', v_stripe_id, 'event_id', p_event_id,
            'before', jsonb_build_object('plan_id', v_before.plan_id,
                                         'billing_period', v_before.billing_period),
            'after', jsonb_build_object('plan_id', v_after.plan_id,
                                        'billing_period', v_after.billing_period)));
      end if;
    end if;

    if v_status = any (c_terminal) then
      update public.billing_cycles c
         set status = 'closed', updated_at = now()
       where c.subscription_id = v_after.id and c.status = 'active';
    elsif v_metered_end > v_metered_start then
      insert into public.billing_cycles as c
        (organisation_id, subscription_id, period_start, period_end, included_minutes)
      values (v_after.organisation_id, v_after.id, v_metered_start, v_metered_end,
              (v_plan ->> 'included_minutes')::integer)
      on conflict (subscription_id, period_start) do update
        set period_end = excluded.period_end, updated_at = now()
        where c.period_end is distinct from excluded.period_end;
      update public.billing_cycles c
         set status = 'closed', updated_at = now()
       where c.subscription_id = v_after.id and c.status = 'active'
         and c.period_start < v_metered_start;
    end if;

  end if;

  -- An invoice bills a cycle's metered usage in arrears: its usage lines (Python keeps the
  -- subscription-item lines that are not prorations) of a plan's metered price, whose period
  -- ended by the time the invoice was made, name the cycle their period starts in. The invoice's
  -- own period_start/period_end are not a service period (the window in which invoice items
  -- were collected): an invoice made mid-cycle (a plan change invoiced at once) names none.
  -- Valid whatever the state's age.
  if p_invoice is not null then
    update public.billing_cycles c
       set stripe_invoice_id = p_invoice ->> 'id', status = 'closed', updated_at = now()
     where c.subscription_id = v_after.id
       and c.stripe_invoice_id is null
       and exists (
         select 1
           from jsonb_array_elements(coalesce(p_invoice -> 'lines', '[]'::jsonb)) l
          where (l ->> 'period_end')::bigint <= (p_invoice ->> 'created')::bigint
            and (l ->> 'period_end')::bigint > (l ->> 'period_start')::bigint
            and to_timestamp((l ->> 'period_start')::bigint) >= c.period_start
            and to_timestamp((l ->> 'period_start')::bigint) < c.period_end
            and exists (
              select 1 from public.billing_plans p
               where p.stripe_metered_price_id = l ->> 'price_id')
       );
    get diagnostics v_invoiced = row_count;
  end if;

  -- A duplicate we canceled (our cancellation comment names the kept one, parsed by Python into
  -- duplicate_of): recorded once, for a person. Refunds are NOT made here: whether and how much
  -- to refund the duplicate's payments is a person's decision; the row lists what it paid.
  if v_after.status = any (c_terminal) and p_state ->> 'duplicate_of' is not null
     and not exists (
       select 1 from public.audit_log a
        where a.organisation_id = v_after.organisation_id
          and a.action = 'subscription.duplicate_canceled'
          and a.details ->> 'canceled' = v_stripe_id
     ) then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (v_after.organisation_id, p_actor, 'subscription.duplicate_canceled',
      jsonb_build_object(
        'kept', p_state ->> 'duplicate_of',
        'canceled', v_stripe_id,
        'invoices_to_refund', (
          select coalesce(jsonb_agg(i.id order by i.id), '[]'::jsonb)
            from (
              select p_state ->> 'latest_invoice'
              union
              select c.stripe_invoice_id from public.billing_cycles c
               where c.subscription_id = v_after.id
            ) as i (id)
           where i.id is not null),
        'event_id', p_event_id));
  end if;

  -- The Checkout Session that made this subscription is complete: the next click is refused
  -- (already_subscribed, or checkout_completed) without asking Stripe. The table comes with a
  -- later migration (0030); until it exists there is nothing to mark.
  if p_checkout_session_id is not null
     and to_regclass('public.checkout_sessions') is not null then
    update public.checkout_sessions c
       set status = 'complete',
           closed_at = coalesce(c.closed_at, now()),
           stripe_subscription_id = v_stripe_id
     where c.stripe_session_id = p_checkout_session_id
       and (c.status <> 'complete' or c.stripe_subscription_id is distinct from v_stripe_id);
  end if;

  -- Not while a newer duplicate is still live: the event is done once Python canceled it.
  if p_event_id is not null and v_newer is null then
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
    'duplicate', case when v_newer is not null
                      then jsonb_build_object('kept', v_kept, 'newer', v_newer) end
  );
end;
$$;

-- The Stripe ids `python -m ops.repair resync --all` re-syncs: every subscription that has not
-- ended (an ended one cannot change in Stripe any more).
create function public.subscriptions_to_resync() returns jsonb
language sql stable
as $$
  select coalesce(jsonb_agg(s.stripe_subscription_id order by s.created_at), '[]'::jsonb)
    from public.subscriptions s
   where s.status not in ('canceled', 'incomplete_expired');
$$;

revoke all on function public.plan_for_stripe_prices(jsonb) from public, anon, authenticated;
revoke all on function public.stripe_fetch_started_at() from public, anon, authenticated;
revoke all on function
  public.apply_subscription_state(jsonb, timestamptz, text, uuid, jsonb, text, text)
  from public, anon, authenticated;
revoke all on function public.subscriptions_to_resync() from public, anon, authenticated;
grant execute on function public.plan_for_stripe_prices(jsonb) to service_role;
grant execute on function public.stripe_fetch_started_at() to service_role;
grant execute on function
  public.apply_subscription_state(jsonb, timestamptz, text, uuid, jsonb, text, text)
  to service_role;
grant execute on function public.subscriptions_to_resync() to service_role;

-- migrate:down
