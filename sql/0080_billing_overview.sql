-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- GET billing-overview (issue 13): everything a member's billing page shows, in one read, for
-- the user p_user_id (the JWT's sub, checked here against the memberships).
--
-- - Who: any member (owner, admin or member) of p_organisation_id, or of the user's only
--   organisation when it is null: 404 organisation_not_found for a user of none, 422
--   organisation_id_required for a user of several, 403 forbidden for anyone else, also for an
--   organisation that does not exist (as billing_organisation_for, which admits owners and
--   admins only), so an outsider learns nothing about other organisations.
-- - subscription: the one usage_summary reads (a live one first, else the newest), with its
--   plan and the pending downgrade (null when none); null before the first subscription.
-- - cycle: public.usage_summary itself, so it is GET report-usage's answer, whatever it becomes.
-- - daily_usage: every UTC day of the cycle's billing period from its first day to today (or to
--   its last day), zeros included, so a chart needs no gap-filling. Minutes go to the UTC day of
--   each usage row's metered_at (the timestamp its meter event carries, by which Stripe bills it;
--   for a late row, when it was counted). A period split by a mid-period plan change counts all
--   its parts (the cycle is the latest part): the chart is the whole period the customer pays
--   for, so after an upgrade its sum is more than cycle.minutes_used, which counts from the
--   change. Empty when the cycle has no period.
-- - alerts: the thresholds (80, 100, 120) reached in the cycle shown, lowest first, each with
--   when it was reached; each part of a split period has its own, like its included minutes.
-- - invoices: the 24 newest, newest first, with Stripe's hosted page and PDF links (members read
--   them under RLS too; only the webhook ledger's copies of events drop them).
-- - plans: the plans on sale (active), in sort order. A plan object is {id, name, currency,
--   included_minutes, monthly_price_cents, yearly_price_cents (null: no yearly price),
--   overage_rate_cents, active}: the catalogue's current terms; the cycle carries the terms a
--   subscriber on older prices is billed at.
create function public.billing_overview(p_user_id uuid, p_organisation_id uuid)
returns jsonb
language plpgsql stable
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_org_id uuid := p_organisation_id;
  v_memberships integer;
  v_role text;
  v_sub public.subscriptions;
  v_cycle jsonb;
  v_start timestamptz;
  v_end timestamptz;
  v_earlier timestamptz;
  v_first date;
  v_last date;
begin
  if v_org_id is null then
    select count(*), (array_agg(m.organisation_id))[1] into v_memberships, v_org_id
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
   where m.organisation_id = v_org_id and m.user_id = p_user_id;
  if v_role is null then
    raise exception 'Only a member of the organisation can see its billing.'
      using errcode = 'MB403', hint = 'forbidden';
  end if;

  v_cycle := public.usage_summary(v_org_id);
  select s.* into v_sub
    from public.subscriptions s
   where s.organisation_id = v_org_id
   order by s.status in ('active', 'trialing', 'past_due', 'unpaid') desc, s.created_at desc
   limit 1;
  v_start := (v_cycle ->> 'period_start')::timestamptz;
  v_end := (v_cycle ->> 'period_end')::timestamptz;
  loop  -- back to the first part of a period split by plan changes
    select c.period_start into v_earlier
      from public.billing_cycles c
     where c.subscription_id = v_sub.id and c.closed_by_change and c.period_end = v_start
       and c.period_start < v_start;
    exit when v_earlier is null;
    v_start := v_earlier;
  end loop;
  v_first := (v_start at time zone 'UTC')::date;
  v_last := (least(now(), v_end - interval '1 microsecond') at time zone 'UTC')::date;

  return (
    with plan as (
      select p.id, p.active, p.sort_order, p.name, jsonb_build_object(
               'id', p.id, 'name', p.name, 'currency', p.currency,
               'included_minutes', p.included_minutes,
               'monthly_price_cents', p.monthly_price_cents,
               'yearly_price_cents', p.yearly_price_cents,
               'overage_rate_cents', p.overage_rate_cents, 'active', p.active) as json
        from public.billing_plans p
    )
    select jsonb_build_object(
      'organisation', (select jsonb_build_object('id', o.id, 'name', o.name, 'role', v_role)
                         from public.organisations o where o.id = v_org_id),
      'subscription', case when v_sub.id is not null then jsonb_build_object(
        'status', v_sub.status,
        'plan', (select p.json from plan p where p.id = v_sub.plan_id),
        'billing_period', v_sub.billing_period,
        'current_period_end', v_sub.current_period_end,
        'cancel_at_period_end', v_sub.cancel_at_period_end,
        'pending', case when v_sub.pending_plan_id is not null then jsonb_build_object(
          'plan', (select p.json from plan p where p.id = v_sub.pending_plan_id),
          'billing_period', v_sub.pending_billing_period,
          'effective_at', v_sub.pending_effective_at) end) end,
      'cycle', v_cycle,
      'daily_usage', (
        select coalesce(jsonb_agg(
                 jsonb_build_object('date', d.day, 'minutes', coalesce(u.minutes, 0))
                 order by d.day), '[]'::jsonb)
          from (select g::date as day
                  from generate_series(v_first::timestamp, v_last::timestamp, interval '1 day') g
               ) d
          left join (
            -- a row metered outside the days shown (at most minutes ahead) goes to the nearest
            select greatest(least((coalesce(r.metered_at, r.ended_at) at time zone 'UTC')::date,
                                  v_last), v_first) as day,
                   sum(r.billed_minutes) as minutes
              from public.usage_records r
              join public.billing_cycles c on c.id = r.billing_cycle_id
             where c.subscription_id = v_sub.id and c.period_start >= v_start
               and c.period_start < v_end
             group by 1
          ) u on u.day = d.day),
      'alerts', (
        select coalesce(jsonb_agg(jsonb_build_object(
                  'threshold_percent', a.threshold_percent, 'reached_at', a.created_at)
                 order by a.threshold_percent), '[]'::jsonb)
          from public.usage_alerts a
          join public.billing_cycles c on c.id = a.billing_cycle_id
         where c.subscription_id = v_sub.id
           and c.period_start = (v_cycle ->> 'period_start')::timestamptz),
      'invoices', (
        select coalesce(jsonb_agg(jsonb_build_object(
                  'id', i.id, 'number', i.number, 'status', i.status,
                  'billing_reason', i.billing_reason, 'total', i.total,
                  'amount_due', i.amount_due, 'amount_remaining', i.amount_remaining,
                  'currency', i.currency, 'created', i.created, 'period_start', i.period_start,
                  'period_end', i.period_end, 'hosted_invoice_url', i.hosted_invoice_url,
                  'invoice_pdf', i.invoice_pdf)
                 order by i.created desc, i.id desc), '[]'::jsonb)
          from (select * from public.invoices i
                 where i.organisation_id = v_org_id
                 order by i.created desc, i.id desc
                 limit 24) i),
      'plans', (
        select coalesce(jsonb_agg(p.json order by p.sort_order, p.name), '[]'::jsonb)
          from plan p
         where p.active)
    )
  );
end;
$$;

revoke all on function public.billing_overview(uuid, uuid) from public, anon, authenticated;
grant execute on function public.billing_overview(uuid, uuid) to service_role;

-- migrate:down
