"""What `./deploy.sh local` prints once everything runs: the URLs, the demo owner's token and
the service key, and copy-paste curl lines for a customer's whole life."""

from __future__ import annotations

import uuid

import psycopg

from devtools.local import DEMO_ORG_ID, FUNCTIONS, Stack, local_secrets, owner_token


def plan_ids(database_url: str) -> tuple[str, str]:
    """The ids of the two cheapest active plans (Starter, Growth in plans.toml)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select id from public.billing_plans where active order by sort_order limit 2"
        ).fetchall()
    ids = [str(row[0]) for row in rows]
    starter, growth, *_ = [*ids, *["<no plan: run ./deploy.sh stripe-catalog>"] * 2]
    return starter, growth


def print_guide(stack: Stack) -> None:
    keys = local_secrets(stack.data)
    token = owner_token(keys["jwt_secret"])
    plan, growth = plan_ids(stack.env["DATABASE_URL"])
    checkout, webhook, usage, portal, change, overview = (stack.urls[name] for name in FUNCTIONS)
    standin = stack.stripe_base
    call = str(uuid.uuid4())[:8]
    print(f"""
Billing pages (signed in as the demo owner): {stack.web_url}  (dashboard: {stack.web_url}dashboard.html)

metered-billing is running locally. Ctrl-C stops everything. Data (Stripe's side too) stays in
{stack.data} between runs, so a second run continues where this one stops (step 1 then answers
409 already_subscribed); `./deploy.sh local --reset` starts from scratch.

  create-checkout-session  {checkout}
  stripe-webhook-handler   {webhook}
  report-usage             {usage}
  create-portal-session    {portal}
  change-plan              {change}
  billing-overview         {overview}
  Stripe                   {standin or "real Stripe (test mode)"}
  Postgres                 {stack.env["DATABASE_URL"]}

Demo owner token (24 h):  export TOKEN={token}
Service key:              export SERVICE_KEY={keys["service_key"]}
Demo organisation:        {DEMO_ORG_ID}
Starter plan:             {plan}
Growth plan:              {growth}

# 1. the owner buys the Starter plan (monthly)
curl -s -X POST {checkout} -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"plan_id": "{plan}", "billing_period": "monthly"}}'
""")
    if standin:
        print(f"""# 2. the customer pays (the stand-in plays Stripe and sends the signed webhooks)
export SESSION=cs_...   # session_id from step 1
curl -s -X POST {standin}/_standin/checkout_sessions/$SESSION/complete
""")
    else:
        print(f"""# 2. forward Stripe's events here (keep it running), then pay at checkout_url
stripe listen --forward-to {webhook}
""")
    print(f"""# 3. the voice agent checks the balance, then reports a 12-minute call, then a long one
curl -s "{usage}?org_id={DEMO_ORG_ID}" -H "Authorization: Bearer $SERVICE_KEY"
curl -s -X POST {usage} -H "Authorization: Bearer $SERVICE_KEY" -H 'Content-Type: application/json' \\
  -d '{{"org_id": "{DEMO_ORG_ID}", "call_id": "call-{call}-1", "call_duration_seconds": 700}}'
curl -s -X POST {usage} -H "Authorization: Bearer $SERVICE_KEY" -H 'Content-Type: application/json' \\
  -d '{{"org_id": "{DEMO_ORG_ID}", "call_id": "call-{call}-2", "call_duration_seconds": 36000}}'
# (each answers 202: recorded, its meter event queued; report-usage sends queued events to
#  Stripe in batches within seconds, and this run also flushes every minute as Cloud Scheduler
#  does; a repeat gives the same answer with "duplicate": true, nothing counted twice)
curl -s -X POST {usage} -H "Authorization: Bearer $SERVICE_KEY" -H 'Content-Type: application/json' \
  -d '{{"action": "flush"}}'   # deliver what is due now: {{"sent": ..., "requests": ...}}

# 4. the owner opens the billing portal
curl -s -X POST {portal} -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{{}}'

# 5. the owner changes plans: an upgrade takes effect now (flat fee prorated and charged at once,
#    the minutes so far invoiced at Starter's price); a downgrade waits for the end of the paid
#    period (the answer says "effective": "period_end"); cancel_pending keeps the current plan
#    (leave the last one out to see step 6's renewal switch to Starter)
curl -s -X POST {change} -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"plan_id": "{growth}", "billing_period": "monthly"}}'
curl -s -X POST {change} -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"plan_id": "{plan}", "billing_period": "monthly"}}'
curl -s -X POST {change} -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"cancel_pending": true}}'
# (yearly: "billing_period": "yearly" is an upgrade now; from yearly back to monthly waits)

# the billing page's one read (any member): plan, cycle, daily usage, alerts, invoices, plans
curl -s "{overview}" -H "Authorization: Bearer $TOKEN" | python3 -m json.tool
""")
    if standin:
        print(f"""# 6. renewal (overage invoiced, a pending downgrade applied), a failed payment,
#    recovery, cancellation
export SUB=sub_...      # from step 2's answer (also change-plan's "subscription_id")
curl -s -X POST {standin}/_standin/subscriptions/$SUB/advance
curl -s -X POST {standin}/_standin/subscriptions/$SUB/advance -H 'Content-Type: application/json' -d '{{"fail": true}}'
curl -s -X POST {standin}/_standin/invoices/$INVOICE/pay      # INVOICE from the failed advance
curl -s -X POST {standin}/_standin/subscriptions/$SUB/cancel
curl -s {standin}/_standin/state | python3 -m json.tool | less   # Stripe's side: invoices, meter events

# the rows (what the dashboard reads under RLS), with psql if you have it
psql "{stack.env["DATABASE_URL"]}" -c 'table subscriptions' -c 'table billing_cycles'
""")
