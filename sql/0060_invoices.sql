-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Invoices follow Stripe (issue 11): every invoice event, and every resync, fetches the invoice's
-- CURRENT state from Stripe and applies it here in one call, with the cycle it bills and the
-- event's mark. Members read their organisation's invoices (the dashboard's list, with the links
-- to Stripe's hosted page and PDF); only the service role writes.
--
-- A draft is never stored: it changes (usage of the ended period is still added to it in
-- Stripe's grace hour) and may be deleted, and it has no number, no hosted page and no PDF yet.
-- It is recorded when finalized (invoice.finalized, or the first later event or resync that
-- fetches it finalized).

create table public.invoices (
  id text primary key check (id like 'in\_%'),
  organisation_id uuid not null references public.organisations (id),
  subscription_id uuid references public.subscriptions (id),
  billing_cycle_id uuid references public.billing_cycles (id),
  stripe_customer_id text not null,
  number text,
  status text not null check (status in ('open', 'paid', 'uncollectible', 'void')),
  billing_reason text,
  currency text not null,
  amount_due integer not null,
  amount_paid integer not null,
  amount_remaining integer not null,
  total integer not null,
  period_start timestamptz,
  period_end timestamptz,
  hosted_invoice_url text,
  invoice_pdf text,
  created timestamptz not null,
  -- When the stored state was fetched from Stripe (the moment the fetch began): a state fetched
  -- earlier never overwrites one fetched later.
  stripe_state_at timestamptz not null,
  updated_at timestamptz not null default now()
);
create index invoices_organisation_id_idx on public.invoices (organisation_id, created desc);
create index invoices_subscription_id_idx on public.invoices (subscription_id);
create index invoices_billing_cycle_id_idx on public.invoices (billing_cycle_id);

alter table public.invoices enable row level security;

create policy invoices_members_read on public.invoices
  for select to authenticated using ((select private.is_org_member(organisation_id)));

revoke all on table public.invoices from anon, authenticated;
grant select on table public.invoices to authenticated;
grant all on table public.invoices to service_role;

-- Whose invoice p_invoice is: the organisation of our row of its subscription, else the
-- organisation whose Stripe customer it was sent to. {organisation_id, subscription_id (or
-- null)}, or {reason} when it is nobody's.
create function private.invoice_owner(p_invoice jsonb)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_subscription text := p_invoice ->> 'subscription';
  v_sub public.subscriptions;
  v_org uuid;
begin
  if v_subscription is not null then
    select s.* into v_sub
      from public.subscriptions s where s.stripe_subscription_id = v_subscription;
    if v_sub.id is not null then
      return jsonb_build_object(
        'organisation_id', v_sub.organisation_id, 'subscription_id', v_sub.id);
    end if;
  end if;
  select o.id into v_org
    from public.organisations o where o.stripe_customer_id = p_invoice ->> 'customer';
  if v_org is null then
    return jsonb_build_object('reason', format(
      'invoice %s: %s and customer %s belongs to no organisation', p_invoice ->> 'id',
      case when v_subscription is null then 'it has no subscription'
           else format('subscription %s is not ours', v_subscription) end,
      p_invoice ->> 'customer'));
  end if;
  return jsonb_build_object('organisation_id', v_org, 'subscription_id', null);
end;
$$;

-- Write a fresh state: a new row, or every Stripe field of the stored one (its organisation
-- never moves).
create function private.store_invoice(
  p_before public.invoices, p_invoice jsonb, p_state_at timestamptz, p_owner jsonb
) returns public.invoices
language plpgsql
set search_path = ''
as $$
declare
  v_after public.invoices;
begin
  insert into public.invoices as i (
    id, organisation_id, subscription_id, stripe_customer_id, number, status, billing_reason,
    currency, amount_due, amount_paid, amount_remaining, total, period_start, period_end,
    hosted_invoice_url, invoice_pdf, created, stripe_state_at
  ) values (
    p_invoice ->> 'id',
    coalesce(p_before.organisation_id, (p_owner ->> 'organisation_id')::uuid),
    coalesce(p_before.subscription_id, (p_owner ->> 'subscription_id')::uuid),
    p_invoice ->> 'customer',
    p_invoice ->> 'number',
    p_invoice ->> 'status',
    p_invoice ->> 'billing_reason',
    p_invoice ->> 'currency',
    (p_invoice ->> 'amount_due')::integer,
    (p_invoice ->> 'amount_paid')::integer,
    (p_invoice ->> 'amount_remaining')::integer,
    (p_invoice ->> 'total')::integer,
    to_timestamp((p_invoice ->> 'period_start')::bigint),
    to_timestamp((p_invoice ->> 'period_end')::bigint),
    p_invoice ->> 'hosted_invoice_url',
    p_invoice ->> 'invoice_pdf',
    to_timestamp((p_invoice ->> 'created')::bigint),
    p_state_at
  )
  on conflict (id) do update
     set stripe_customer_id = excluded.stripe_customer_id,
         number = excluded.number,
         status = excluded.status,
         billing_reason = excluded.billing_reason,
         currency = excluded.currency,
         amount_due = excluded.amount_due,
         amount_paid = excluded.amount_paid,
         amount_remaining = excluded.amount_remaining,
         total = excluded.total,
         period_start = excluded.period_start,
         period_end = excluded.period_end,
         hosted_invoice_url = excluded.hosted_invoice_url,
         invoice_pdf = excluded.invoice_pdf,
         created = excluded.created,
         stripe_state_at = excluded.stripe_state_at,
         updated_at = now()
  returning i.* into v_after;
  return v_after;
end;
$$;

-- The invoice's subscription once we have its row, and the cycle whose metered usage it bills
-- (private.close_invoiced_cycles' rule: that cycle also gets the invoice id and closes, so no
-- later call is counted in it). Valid whatever the age of the state, once it is finalized (its
-- lines no longer change):
-- - a renewal (billing_reason subscription_cycle) bills its cycle once finalized, paid or not:
--   Stripe adds no more usage to it (DESIGN, late usage: nothing is counted in a cycle whose
--   invoice is made);
-- - any other invoice only once paid: the invoice of a plan change made with
--   pending_if_incomplete bills the usage up to the change, but while its payment fails the
--   subscription cycles as if no change was asked for, and when the pending update expires the
--   invoice is voided and the usage is billed at the renewal (docs.stripe.com/billing/
--   subscriptions/pending-updates; devtools/stripe_standin/pending_updates.py).
create function private.link_invoice(p_row public.invoices, p_invoice jsonb, p_owner jsonb)
returns public.invoices
language plpgsql
set search_path = ''
as $$
declare
  v_subscription uuid := coalesce(
    p_row.subscription_id,
    case when (p_owner ->> 'organisation_id')::uuid = p_row.organisation_id
         then (p_owner ->> 'subscription_id')::uuid end);
  v_cycle uuid := p_row.billing_cycle_id;
  v_after public.invoices;
begin
  if v_subscription is not null and v_cycle is null
     and (p_invoice ->> 'billing_reason' = 'subscription_cycle' or p_invoice ->> 'status' = 'paid')
  then
    perform private.close_invoiced_cycles(v_subscription, p_invoice);
    -- Several parts of a split period may be billed on one invoice: the latest is the one its
    -- subscription item's own usage line bills.
    select c.id into v_cycle
      from public.billing_cycles c
     where c.subscription_id = v_subscription and c.stripe_invoice_id = p_row.id
     order by c.period_start desc
     limit 1;
  end if;
  if (v_subscription, v_cycle) is not distinct from (p_row.subscription_id, p_row.billing_cycle_id) then
    return p_row;
  end if;
  update public.invoices i
     set subscription_id = v_subscription, billing_cycle_id = v_cycle, updated_at = now()
   where i.id = p_row.id
  returning i.* into v_after;
  return v_after;
end;
$$;

-- Apply an invoice state fetched from Stripe at p_state_at (shared/invoices.py):
-- p_invoice = {id, customer, subscription (Stripe id or null), number, status, billing_reason,
--   currency, amount_due, amount_paid, amount_remaining, total, period_start, period_end,
--   created (unix s), hosted_invoice_url, invoice_pdf, lines: [{price_id, period_start,
--   period_end}] (its usage lines, as for apply_subscription_state's p_invoice)}.
-- Rules:
-- - a state fetched no later than the stored one, or a draft, or open over a terminal status
--   (paid, void, uncollectible: Stripe never reopens those), changes no field;
-- - an invoice we have no row for is not stored when it is a draft, or when it is nobody's
--   (private.invoice_owner): `ignored` with the reason, p_event_id marked ignored;
-- - else stored (private.store_invoice), then linked (private.link_invoice) and p_event_id marked
--   processed, all in this one transaction. `changed`: the columns whose values changed.
create function public.apply_invoice_state(
  p_invoice jsonb,
  p_state_at timestamptz,
  p_event_id text default null
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  c_terminal constant text[] := array['paid', 'void', 'uncollectible'];
  v_id text := p_invoice ->> 'id';
  v_status text := p_invoice ->> 'status';
  v_before public.invoices;
  v_after public.invoices;
  v_owner jsonb;
  v_reason text;
  v_fresh boolean;
  v_changed text[] := '{}';
begin
  if v_id is null or v_status is null or p_invoice ->> 'customer' is null
     or p_invoice ->> 'created' is null or p_state_at is null then
    raise exception 'An invoice state needs id, status, customer, created and the time it was fetched.'
      using errcode = 'MB422', hint = 'invalid_invoice_state';
  end if;

  -- Applies for one invoice run one after another, its first insert included.
  perform pg_advisory_xact_lock(hashtextextended('stripe_invoice:' || v_id, 0));
  select i.* into v_before from public.invoices i where i.id = v_id for update;
  v_owner := private.invoice_owner(p_invoice);

  if v_before.id is null then
    v_reason := case
      when v_status = 'draft' then format(
        'invoice %s is a draft: it is recorded once finalized', v_id)
      else v_owner ->> 'reason' end;
    if v_reason is not null then
      if p_event_id is not null then
        update public.stripe_events e
           set status = 'ignored', error = left(v_reason, 2000), processed_at = now()
         where e.id = p_event_id;
      end if;
      return jsonb_build_object('status', 'ignored', 'reason', v_reason, 'invoice_id', v_id);
    end if;
  end if;

  v_fresh := v_status <> 'draft' and (
    v_before.id is null or (
      p_state_at > v_before.stripe_state_at
      and not (v_before.status = any (c_terminal) and not v_status = any (c_terminal))));
  v_after := v_before;
  if v_fresh then
    v_after := private.store_invoice(v_before, p_invoice, p_state_at, v_owner);
  end if;
  if v_status <> 'draft' then
    v_after := private.link_invoice(v_after, p_invoice, v_owner);
  end if;
  if v_before.id is not null then
    select coalesce(array_agg(a.key order by a.key), '{}') into v_changed
      from jsonb_each(to_jsonb(v_after)) a
      join jsonb_each(to_jsonb(v_before)) b using (key)
     where a.key not in ('stripe_state_at', 'updated_at') and a.value is distinct from b.value;
  end if;

  if p_event_id is not null then
    update public.stripe_events e
       set status = 'processed', processed_at = now(), error = null
     where e.id = p_event_id;
  end if;

  return jsonb_build_object(
    'status', 'processed',
    'invoice_id', v_id,
    'organisation_id', v_after.organisation_id,
    'subscription_id', v_after.subscription_id,
    'billing_cycle_id', v_after.billing_cycle_id,
    'invoice_status', v_after.status,
    'created', v_before.id is null,
    'applied', v_fresh,
    'changed', to_jsonb(v_changed)
  );
end;
$$;

revoke all on function private.invoice_owner(jsonb) from public, anon, authenticated;
revoke all on function private.store_invoice(public.invoices, jsonb, timestamptz, jsonb)
  from public, anon, authenticated;
revoke all on function private.link_invoice(public.invoices, jsonb, jsonb)
  from public, anon, authenticated;
revoke all on function public.apply_invoice_state(jsonb, timestamptz, text)
  from public, anon, authenticated;
grant execute on function private.invoice_owner(jsonb) to service_role;
grant execute on function private.store_invoice(public.invoices, jsonb, timestamptz, jsonb)
  to service_role;
grant execute on function private.link_invoice(public.invoices, jsonb, jsonb) to service_role;
grant execute on function public.apply_invoice_state(jsonb, timestamptz, text) to service_role;

-- migrate:down
