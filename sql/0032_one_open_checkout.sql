-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- One open Checkout Session per organisation: paying two would make two live subscriptions and
-- charge the setup fee twice. Before a new session is opened, every other session of the
-- organisation still open at Stripe is expired there (shared/checkout.py); these rows remember
-- what became of each session, and begin_checkout refuses what could open a second one.

-- status: open (as far as we know), expired (by us, or found expired at Stripe), complete (found
-- paid at Stripe when we tried to expire it; stripe_subscription_id is the subscription it made).
alter table public.checkout_sessions
  add column status text not null default 'open'
    constraint checkout_sessions_status_check check (status in ('open', 'expired', 'complete')),
  add column closed_at timestamptz,
  add column stripe_subscription_id text;

-- As 0030, with three more rules, all under the per-organisation lock:
-- - 409 checkout_completed while a session found paid has no subscription row yet (its webhook
--   is on its way: a new checkout would charge the organisation twice);
-- - 409 checkout_in_progress while another choice (plan or period) of the organisation has a
--   claim younger than p_reuse_seconds that Stripe has not answered yet: its session could not be
--   expired, since its id is not known (the browser retries);
-- - a session is reused only while open, and `open_sessions` lists the organisation's other
--   sessions open at Stripe, which the caller expires before opening the claimed one.
create or replace function public.begin_checkout(
  p_user_id uuid,
  p_organisation_id uuid,
  p_plan_id uuid,
  p_billing_period text,
  p_success_url text,
  p_cancel_url text,
  p_reuse_seconds integer
)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_organisation jsonb := public.billing_organisation_for(p_user_id, p_organisation_id);
  v_organisation_id uuid := (v_organisation ->> 'id')::uuid;
  v_plan public.billing_plans%rowtype;
  v_session public.checkout_sessions%rowtype;
  v_has_had_subscription boolean;
  v_open_sessions jsonb;
begin
  if p_billing_period is null or p_billing_period not in ('monthly', 'yearly') then
    raise exception 'billing_period: must be monthly or yearly.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;

  select * into v_plan from public.billing_plans p where p.id = p_plan_id and p.active;
  if not found then
    raise exception 'This plan does not exist or is no longer on sale.'
      using errcode = 'MB404', hint = 'plan_not_found';
  end if;
  if p_billing_period = 'yearly' and v_plan.stripe_yearly_price_id is null then
    raise exception 'billing_period: this plan has no yearly price; choose monthly.'
      using errcode = 'MB422', hint = 'yearly_not_offered';
  end if;
  if v_plan.stripe_price_id is null or v_plan.stripe_metered_price_id is null then
    raise exception 'This plan cannot be bought yet; try again later.'
      using errcode = 'MB409', hint = 'plan_not_ready';
  end if;

  if exists (
    select 1 from public.subscriptions s
     where s.organisation_id = v_organisation_id
       and s.status in ('active', 'trialing', 'past_due', 'unpaid')
  ) then
    raise exception 'This organisation already has a subscription; change it in the billing portal.'
      using errcode = 'MB409', hint = 'already_subscribed';
  end if;
  -- The setup fee is for a first subscription: one that never started (its first payment
  -- failed: incomplete, incomplete_expired) charged nothing and does not count.
  v_has_had_subscription := exists (
    select 1 from public.subscriptions s
     where s.organisation_id = v_organisation_id
       and s.status not in ('incomplete', 'incomplete_expired')
  );

  -- Concurrent clicks for one organisation queue here for the few statements below.
  perform pg_advisory_xact_lock(hashtextextended('checkout:' || v_organisation_id::text, 0));
  if exists (
    select 1 from public.checkout_sessions c
     where c.organisation_id = v_organisation_id
       and c.status = 'complete'
       and not exists (
         select 1 from public.subscriptions s
          where s.stripe_subscription_id = c.stripe_subscription_id
       )
  ) then
    raise exception 'A payment for this organisation has just completed; wait a moment and reload.'
      using errcode = 'MB409', hint = 'checkout_completed';
  end if;
  if exists (
    select 1 from public.checkout_sessions c
     where c.organisation_id = v_organisation_id
       and c.status = 'open'
       and c.stripe_session_id is null
       and c.created_at > now() - make_interval(secs => p_reuse_seconds)
       and (c.plan_id, c.billing_period) is distinct from (p_plan_id, p_billing_period)
  ) then
    raise exception 'Another checkout for this organisation is being opened; try again in a moment.'
      using errcode = 'MB409', hint = 'checkout_in_progress';
  end if;

  select * into v_session
    from public.checkout_sessions c
   where c.organisation_id = v_organisation_id
     and c.plan_id = p_plan_id
     and c.billing_period = p_billing_period
     and c.status = 'open'
     and c.created_at > now() - make_interval(secs => p_reuse_seconds)
     and (c.expires_at is null or c.expires_at > now())
   order by c.created_at desc
   limit 1;
  if not found then
    insert into public.checkout_sessions
      (organisation_id, plan_id, billing_period, created_by, success_url, cancel_url)
    values
      (v_organisation_id, p_plan_id, p_billing_period, p_user_id, p_success_url, p_cancel_url)
    returning * into v_session;
  end if;

  select coalesce(
           jsonb_agg(
             jsonb_build_object('id', c.id, 'stripe_session_id', c.stripe_session_id)
             order by c.created_at
           ),
           '[]'::jsonb
         )
    into v_open_sessions
    from public.checkout_sessions c
   where c.organisation_id = v_organisation_id
     and c.id <> v_session.id
     and c.status = 'open'
     and c.stripe_session_id is not null
     and (c.expires_at is null or c.expires_at > now());

  return jsonb_build_object(
    'organisation', v_organisation,
    'plan', jsonb_build_object(
      'id', v_plan.id,
      'stripe_price_id', v_plan.stripe_price_id,
      'stripe_yearly_price_id', v_plan.stripe_yearly_price_id,
      'stripe_metered_price_id', v_plan.stripe_metered_price_id
    ),
    'has_had_subscription', v_has_had_subscription,
    'checkout', jsonb_build_object(
      'id', v_session.id,
      'idempotency_key', 'checkout-' || v_session.id::text,
      'success_url', v_session.success_url,
      'cancel_url', v_session.cancel_url,
      'stripe_session_id', v_session.stripe_session_id,
      'url', v_session.url
    ),
    'open_sessions', v_open_sessions
  );
end;
$$;

-- Record what became of a session at Stripe (p_status: expired or complete, with the
-- subscription it made), once, with its audit row; p_user_id is the user whose click closed it.
-- A session already recorded closed is left as it is.
create function public.record_checkout_closed(
  p_checkout_id uuid,
  p_status text,
  p_stripe_subscription_id text,
  p_user_id uuid
)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_session public.checkout_sessions%rowtype;
begin
  if p_status is null or p_status not in ('expired', 'complete') then
    raise exception 'status: must be expired or complete.'
      using errcode = 'MB422', hint = 'validation_error';
  end if;
  update public.checkout_sessions c
     set status = p_status, closed_at = now(), stripe_subscription_id = p_stripe_subscription_id
   where c.id = p_checkout_id and c.status = 'open'
  returning * into v_session;
  if found then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (
      v_session.organisation_id,
      p_user_id::text,
      case p_status when 'expired' then 'checkout.expired' else 'checkout.completed' end,
      jsonb_build_object(
        'plan_id', v_session.plan_id,
        'billing_period', v_session.billing_period,
        'session_id', v_session.stripe_session_id
      )
    );
  else
    select * into v_session from public.checkout_sessions c where c.id = p_checkout_id;
    if not found then
      raise exception 'The checkout was not found.'
        using errcode = 'MB404', hint = 'checkout_not_found';
    end if;
  end if;
  return jsonb_build_object('session_id', v_session.stripe_session_id, 'status', v_session.status);
end;
$$;

revoke all on function public.begin_checkout(uuid, uuid, uuid, text, text, text, integer)
  from public, anon, authenticated;
revoke all on function public.record_checkout_closed(uuid, text, text, uuid)
  from public, anon, authenticated;
grant execute on function public.begin_checkout(uuid, uuid, uuid, text, text, text, integer)
  to service_role;
grant execute on function public.record_checkout_closed(uuid, text, text, uuid) to service_role;

-- migrate:down
