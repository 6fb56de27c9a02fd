-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- The Stripe customer portal: which customer an owner or admin may manage.

-- 403/404/422 as billing_organisation_for; 409 not_subscribed unless the organisation has a Stripe
-- customer and has had a subscription (any status: a canceled one still has invoices to see).
create function public.portal_context(p_user_id uuid, p_organisation_id uuid)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_organisation jsonb := public.billing_organisation_for(p_user_id, p_organisation_id);
begin
  if v_organisation ->> 'stripe_customer_id' is null or not exists (
    select 1 from public.subscriptions s
     where s.organisation_id = (v_organisation ->> 'id')::uuid
  ) then
    raise exception 'This organisation has no subscription to manage yet; buy a plan first.'
      using errcode = 'MB409', hint = 'not_subscribed';
  end if;
  return jsonb_build_object(
    'organisation_id', v_organisation ->> 'id',
    'stripe_customer_id', v_organisation ->> 'stripe_customer_id'
  );
end;
$$;

revoke all on function public.portal_context(uuid, uuid) from public, anon, authenticated;
grant execute on function public.portal_context(uuid, uuid) to service_role;

-- migrate:down
