-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Whose Checkout Session a completed one is. A session on our Stripe account is not always one
-- we opened (a payment link, a pricing table), and its client_reference_id is whatever the buyer
-- or the page put there: the webhook links an organisation only from our own row (or from the
-- session's metadata, which only our server writes), never from client_reference_id.

-- The checkout_sessions row that opened Stripe session p_stripe_session_id:
-- {"checkout_id", "organisation_id", "status"}, or null when we did not open it (or its row was
-- deleted with its organisation).
create function public.checkout_session_organisation(p_stripe_session_id text)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
           'checkout_id', c.id,
           'organisation_id', c.organisation_id,
           'status', c.status
         )
    from public.checkout_sessions c
   where c.stripe_session_id = p_stripe_session_id;
$$;

revoke all on function public.checkout_session_organisation(text) from public, anon, authenticated;
grant execute on function public.checkout_session_organisation(text) to service_role;

-- migrate:down
