-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Money in 64 bits, as Stripe has it.
--
-- Amounts are minor units of the plan's currency, and 2^31 - 1 of them is not much in some:
-- Stripe counts IDR in hundredths (docs.stripe.com/currencies), so the int4 limit is
-- IDR 21.5 million, about USD 1,300. Past it a cycle's overage cost overflowed: every later
-- report of that organisation's cycle was a 500 and never recorded, whatever the retries. An
-- invoice past it was a 500 for every delivery of its event, until Stripe gave up. A plan priced
-- past it could not be written to the catalogue.
--
-- billing_cycles.overage_rate_cents becomes 64-bit too, so that minutes * rate is computed in
-- 64 bits wherever it is (record_usage's hot path, add_cycle_minutes, refigure_cycle) without
-- re-creating those functions. The rates in the catalogue stay int4: a cycle copies them.
--
-- Each column keeps its condition. usage_records is rewritten (its copy of the cycle's cost
-- widens), and reports wait while it is; billing_cycles, invoices, billing_plans and
-- billing_plan_prices are small. The rewrite took 8.1 s a million usage rows here (8.7 s for
-- 1.07 million, 645 MB with indexes), so past about 7 million it gives up at the 60 s limit and
-- changes nothing (README, Deploying).

-- As 0090's non_negative_integer (a domain's check is planned once per connection, a table's
-- for every statement that writes the table).
create domain private.non_negative_bigint as bigint
  -- squawk-ignore ban-create-domain-with-constraint
  constraint non_negative_bigint_check check (value >= 0);

alter table public.billing_cycles
  -- squawk-ignore changing-column-type
  alter column overage_cost_cents type private.non_negative_bigint,
  -- squawk-ignore changing-column-type
  alter column overage_rate_cents type private.non_negative_bigint;

alter table public.usage_records
  -- squawk-ignore changing-column-type
  alter column cycle_overage_cost_cents type bigint;

alter table public.invoices
  -- squawk-ignore changing-column-type
  alter column amount_due type bigint,
  -- squawk-ignore changing-column-type
  alter column amount_paid type bigint,
  -- squawk-ignore changing-column-type
  alter column amount_remaining type bigint,
  -- squawk-ignore changing-column-type
  alter column total type bigint;

alter table public.billing_plans
  -- squawk-ignore changing-column-type
  alter column monthly_price_cents type bigint,
  -- squawk-ignore changing-column-type
  alter column yearly_price_cents type bigint;

alter table public.billing_plan_prices
  -- squawk-ignore changing-column-type
  alter column unit_amount_cents type bigint;

-- 0060's store_invoice, reading the amounts as 64-bit.
create or replace function private.store_invoice(
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
    (p_invoice ->> 'amount_due')::bigint,
    (p_invoice ->> 'amount_paid')::bigint,
    (p_invoice ->> 'amount_remaining')::bigint,
    (p_invoice ->> 'total')::bigint,
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

-- migrate:down
