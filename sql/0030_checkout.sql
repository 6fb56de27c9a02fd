-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Checkout: who may buy for which organisation, one Stripe customer per organisation, and the
-- Checkout Sessions we opened (so a double click returns the same session).

-- One row per Checkout Session we meant to open. The row is claimed before Stripe is called and
-- its id is the Stripe idempotency key, so concurrent clicks converge on one session; the Stripe
-- session id and url are filled in once Stripe answered. Service role only: it holds payment URLs.
create table public.checkout_sessions (
  id uuid primary key default gen_random_uuid(),
  organisation_id uuid not null references public.organisations (id) on delete cascade,
  plan_id uuid not null references public.billing_plans (id),
  billing_period text not null check (billing_period in ('monthly', 'yearly')),
  created_by uuid not null,
  success_url text not null,
  cancel_url text not null,
  stripe_session_id text unique,
  url text,
  expires_at timestamptz,
  created_at timestamptz not null default now(),
  -- open (as far as we know), expired (by us, or found expired at Stripe), complete (found paid
  -- at Stripe, or completed by its webhook; stripe_subscription_id is what it made)
  status text not null default 'open'
    constraint checkout_sessions_status_check check (status in ('open', 'expired', 'complete')),
  closed_at timestamptz,
  stripe_subscription_id text
);
create index checkout_sessions_choice_idx
  on public.checkout_sessions (organisation_id, plan_id, billing_period, created_at desc);

alter table public.checkout_sessions enable row level security;
create policy checkout_sessions_no_end_user_access on public.checkout_sessions
  as restrictive for all to anon, authenticated using (false) with check (false);
revoke all on table public.checkout_sessions from anon, authenticated;
grant all on table public.checkout_sessions to service_role;

-- The organisation a user may manage billing for: p_organisation_id, or the user's only
-- membership. 403 for anyone but its owner or admins, and the same 403 when it does not exist,
-- so an outsider learns nothing about other organisations. SECURITY DEFINER only to read the
-- owner's email from auth.users, which Supabase's service_role may not select.
create function public.billing_organisation_for(p_user_id uuid, p_organisation_id uuid)
returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_organisation_id uuid := p_organisation_id;
  v_memberships integer;
  v_role text;
  v_organisation jsonb;
begin
  if v_organisation_id is null then
    select count(*), (array_agg(m.organisation_id))[1]
      into v_memberships, v_organisation_id
      from public.organisation_members m
     where m.user_id = p_user_id;
    if v_memberships = 0 then
      raise exception 'You do not belong to any organisation yet.'
        using errcode = 'MB404', hint = 'organisation_not_found';
    elsif v_memberships > 1 then
      raise exception 'organisation_id: you belong to several organisations; say which one.'
        using errcode = 'MB422', hint = 'organisation_id_required';
    end if;
  end if;

  select m.role into v_role
    from public.organisation_members m
   where m.organisation_id = v_organisation_id and m.user_id = p_user_id;
  if v_role is null or v_role not in ('owner', 'admin') then
    raise exception 'Only an owner or admin of the organisation can manage its billing.'
      using errcode = 'MB403', hint = 'forbidden';
  end if;

  select jsonb_build_object(
           'id', o.id,
           'name', o.name,
           'stripe_customer_id', o.stripe_customer_id,
           'owner_email', u.email
         )
    into v_organisation
    from public.organisations o
    left join auth.users u on u.id = o.owner_id
   where o.id = v_organisation_id;
  return v_organisation;
end;
$$;

-- Validate a purchase and claim its Checkout Session, in one transaction:
-- 403/404/422 from billing_organisation_for; 404 plan_not_found unless the plan is active;
-- 422 yearly_not_offered; 409 plan_not_ready when the Stripe catalog is not synced;
-- 409 already_subscribed when a subscription is live. Then, under a per-organisation lock, the
-- newest session for the same (organisation, plan, period) opened less than p_reuse_seconds ago
-- (and not expired) is returned, whether Stripe already answered for it or not; otherwise a new
-- row is claimed. The window runs from the first click, not from clock buckets, so two clicks a
-- second apart always meet, whatever the time of day.
-- One open Checkout Session per organisation (paying two would make two live subscriptions
-- and charge the setup fee twice); all under the per-organisation lock:
-- - 409 checkout_completed while a session found paid has no subscription row yet (its webhook
--   is on its way: a new checkout would charge the organisation twice);
-- - 409 checkout_in_progress while another choice (plan or period) of the organisation has a
--   claim younger than p_reuse_seconds that Stripe has not answered yet: its session could not be
--   expired, since its id is not known (the browser retries);
-- - a session is reused only while open, and `open_sessions` lists the organisation's other
--   sessions open at Stripe, which the caller expires before opening the claimed one.
create function public.begin_checkout(
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

-- Keep the organisation's first Stripe customer: set only while empty; returns the stored one.
create function public.set_organisation_customer(p_organisation_id uuid, p_customer_id text)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_customer_id text;
begin
  update public.organisations o
     set stripe_customer_id = p_customer_id, updated_at = now()
   where o.id = p_organisation_id and o.stripe_customer_id is null;
  select o.stripe_customer_id into v_customer_id
    from public.organisations o where o.id = p_organisation_id;
  if not found then
    raise exception 'The organisation does not exist.'
      using errcode = 'MB404', hint = 'organisation_not_found';
  end if;
  return jsonb_build_object('stripe_customer_id', v_customer_id);
end;
$$;

-- Store Stripe's answer on the claimed row and audit the creation, once: a concurrent click that
-- got the same session (same idempotency key) finds it stored and writes nothing more.
create function public.record_checkout_session(
  p_checkout_id uuid,
  p_stripe_session_id text,
  p_url text,
  p_expires_at bigint
)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_session public.checkout_sessions%rowtype;
begin
  update public.checkout_sessions c
     set stripe_session_id = p_stripe_session_id,
         url = p_url,
         expires_at = to_timestamp(p_expires_at)
   where c.id = p_checkout_id and c.stripe_session_id is null
  returning * into v_session;
  if found then
    insert into public.audit_log (organisation_id, actor, action, details)
    values (
      v_session.organisation_id,
      v_session.created_by::text,
      'checkout.created',
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
  return jsonb_build_object('session_id', v_session.stripe_session_id, 'checkout_url', v_session.url);
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

revoke all on function public.billing_organisation_for(uuid, uuid) from public, anon, authenticated;
revoke all on function public.begin_checkout(uuid, uuid, uuid, text, text, text, integer)
  from public, anon, authenticated;
revoke all on function public.set_organisation_customer(uuid, text) from public, anon, authenticated;
revoke all on function public.record_checkout_session(uuid, text, text, bigint)
  from public, anon, authenticated;
grant execute on function public.billing_organisation_for(uuid, uuid) to service_role;
grant execute on function public.begin_checkout(uuid, uuid, uuid, text, text, text, integer)
  to service_role;
grant execute on function public.set_organisation_customer(uuid, text) to service_role;
grant execute on function public.record_checkout_session(uuid, text, text, bigint) to service_role;
revoke all on function public.record_checkout_closed(uuid, text, text, uuid)
  from public, anon, authenticated;
grant execute on function public.record_checkout_closed(uuid, text, text, uuid) to service_role;

-- migrate:down
