"""POST stripe-webhook-handler: each handled event and what it sets, through the real function."""

from __future__ import annotations

import json
import urllib.parse

from shared.webhooks import without_secrets
from tests.test_webhook_support import (
    MONTH,
    T0,
    YEAR,
    Buyer,
    audit_rows,
    cycle_rows,
    deliver,
    event_object,
    event_row,
    invoice_object,
    month,
    new_id,
    subscribed,
    subscription_row,
    ts,
)

# The fixtures `webhook`, `stripe_api` and `buyer`.
pytest_plugins = ("tests.test_webhook_support",)


# --- checkout.session.completed ---------------------------------------------------------------


def test_checkout_gives_the_organisation_its_customer_subscription_and_first_cycle(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()

    response = deliver(webhook, event)

    assert response.status_code == 200
    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "processed"}
    org = db.execute("select * from organisations where id = %s", (buyer.org["id"],)).fetchone()
    assert org["stripe_customer_id"] == buyer.customer_id
    sub = subscription_row(db, buyer.sub_id)
    assert sub["organisation_id"] == buyer.org["id"]
    assert sub["plan_id"] == buyer.plan["id"]
    assert sub["stripe_customer_id"] == buyer.customer_id
    assert sub["status"] == "active"
    assert sub["billing_period"] == "monthly"
    assert (sub["current_period_start"], sub["current_period_end"]) == (ts(T0), ts(T0 + MONTH))
    assert sub["cancel_at_period_end"] is False and sub["canceled_at"] is None
    assert sub["stripe_state_at"] is not None
    [cycle] = cycle_rows(db, buyer.sub_id)
    assert (cycle["period_start"], cycle["period_end"]) == (ts(T0), ts(T0 + MONTH))
    assert cycle["status"] == "active" and cycle["organisation_id"] == buyer.org["id"]
    assert cycle["included_minutes"] == buyer.plan["included_minutes"]
    assert cycle["minutes_used"] == 0 and cycle["stripe_invoice_id"] is None
    [audit] = audit_rows(db, buyer.org["id"])
    assert audit["action"] == "subscription.created" and audit["actor"] == "stripe-webhook"
    assert audit["details"]["before"] is None
    assert audit["details"]["after"] == {
        "status": "active",
        "plan_id": str(buyer.plan["id"]),
        "billing_period": "monthly",
    }
    assert audit["details"]["event_id"] == event["id"]
    stored = event_row(db, event["id"])
    assert stored["status"] == "processed" and stored["attempts"] == 1 and stored["error"] is None
    assert stored["type"] == "checkout.session.completed"
    assert stored["created"] == ts(event["created"])
    assert stored["payload"] == without_secrets(event)  # the Checkout url is a bearer link
    assert stored["processed_at"] is not None
    # The state came from Stripe (the event only named the subscription), nothing expanded.
    [retrieve] = stripe_api.retrieves
    assert retrieve.url.path == f"/v1/subscriptions/{buyer.sub_id}" and not retrieve.url.query


def test_checkout_marks_our_checkout_session_complete(db, webhook, stripe_api, buyer):
    """So the organisation's next click is refused from our rows, without asking Stripe."""
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    session_id = event["data"]["object"]["id"]
    other_id = new_id("cs_test")
    for stripe_session_id in (session_id, other_id):
        db.execute(
            "insert into checkout_sessions (organisation_id, plan_id, billing_period, created_by,"
            " success_url, cancel_url, stripe_session_id)"
            " values (%s, %s, 'monthly', %s, 'https://app/ok', 'https://app/no', %s)",
            (buyer.org["id"], buyer.plan["id"], buyer.org["owner_id"], stripe_session_id),
        )

    assert deliver(webhook, event).get_json()["status"] == "processed"

    rows = {
        row["stripe_session_id"]: row
        for row in db.execute(
            "select * from checkout_sessions where organisation_id = %s", (buyer.org["id"],)
        ).fetchall()
    }
    assert rows[session_id]["status"] == "complete"
    assert rows[session_id]["stripe_subscription_id"] == buyer.sub_id
    assert rows[session_id]["closed_at"] is not None
    assert rows[other_id]["status"] == "open" and rows[other_id]["closed_at"] is None


def test_yearly_checkout_adds_the_monthly_metered_price_once(db, webhook, stripe_api, buyer):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        billing_period="yearly", with_metered=False
    )
    event = buyer.checkout_event("yearly")

    assert deliver(webhook, event).get_json()["status"] == "processed"

    [request] = stripe_api.item_requests
    assert urllib.parse.parse_qs(request.content.decode()) == {
        "subscription": [buyer.sub_id],
        "price": [buyer.plan["stripe_metered_price_id"]],
    }
    expected_key = f"add-metered-{buyer.sub_id}-{buyer.plan['stripe_metered_price_id']}"
    assert request.headers["Idempotency-Key"] == expected_key
    sub = subscription_row(db, buyer.sub_id)
    assert sub["billing_period"] == "yearly" and sub["plan_id"] == buyer.plan["id"]
    assert (sub["current_period_start"], sub["current_period_end"]) == (ts(T0), ts(T0 + YEAR))
    [cycle] = cycle_rows(db, buyer.sub_id)  # monthly, from the metered item
    assert (cycle["period_start"], cycle["period_end"]) == (ts(T0), ts(T0 + MONTH))

    # The same event again, and the same change sent as a second checkout event: no second item.
    assert deliver(webhook, event).get_json()["status"] == "duplicate"
    assert deliver(webhook, buyer.checkout_event("yearly")).get_json()["status"] == "processed"
    assert len(stripe_api.item_requests) == 1
    assert len(stripe_api.subscriptions[buyer.sub_id]["items"]["data"]) == 2
    assert len(cycle_rows(db, buyer.sub_id)) == 1


def test_yearly_checkout_interrupted_after_the_item_add_is_retried_without_a_second_item(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        billing_period="yearly", with_metered=False
    )
    stripe_api.fail_retrieves_after_item_add = 1  # the re-fetch after the add fails once
    event = buyer.checkout_event("yearly")

    response = deliver(webhook, event)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "stripe_unavailable"
    assert event_row(db, event["id"])["status"] == "failed"
    assert subscription_row(db, buyer.sub_id) is None

    stripe_api.fail_retrieves_after_item_add = 0
    assert deliver(webhook, event).get_json()["status"] == "processed"
    assert len(stripe_api.item_requests) == 1
    assert len(stripe_api.subscriptions[buyer.sub_id]["items"]["data"]) == 2
    assert len(cycle_rows(db, buyer.sub_id)) == 1


def test_checkout_for_an_organisation_with_another_customer_keeps_it_and_records_it(
    db, webhook, stripe_api, make_org, make_plan
):
    buyer = Buyer(
        make_org(stripe_customer_id=new_id("cus")), make_plan(), new_id("sub"), new_id("cus")
    )
    subscribed(buyer, stripe_api, webhook)

    org = db.execute("select * from organisations where id = %s", (buyer.org["id"],)).fetchone()
    assert org["stripe_customer_id"] == buyer.org["stripe_customer_id"]
    assert subscription_row(db, buyer.sub_id)["stripe_customer_id"] == buyer.customer_id
    actions = [row["action"] for row in audit_rows(db, buyer.org["id"])]
    assert actions == ["subscription.created", "organisation.customer_mismatch"]
    mismatch = audit_rows(db, buyer.org["id"])[1]["details"]
    assert mismatch["organisation_customer"] == buyer.org["stripe_customer_id"]
    assert mismatch["subscription_customer"] == buyer.customer_id


# --- customer.subscription.* ------------------------------------------------------------------


def test_subscription_created_before_checkout_finds_its_organisation_in_the_metadata(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()

    created = deliver(webhook, buyer.subscription_event("customer.subscription.created"))
    completed = deliver(webhook, buyer.checkout_event())

    assert created.get_json()["status"] == "processed"
    assert completed.get_json()["status"] == "processed"
    sub = subscription_row(db, buyer.sub_id)
    assert sub["organisation_id"] == buyer.org["id"] and sub["status"] == "active"
    assert len(cycle_rows(db, buyer.sub_id)) == 1
    assert [row["action"] for row in audit_rows(db, buyer.org["id"])] == ["subscription.created"]


def test_subscription_updated_applies_plan_change_and_cancel_at_period_end(
    db, webhook, stripe_api, buyer, make_plan
):
    subscribed(buyer, stripe_api, webhook)
    bigger = make_plan(included_minutes=2000)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        plan=bigger, month_index=0, cancel_at_period_end=True
    )

    response = deliver(webhook, buyer.subscription_event("customer.subscription.updated"))

    assert response.get_json()["status"] == "processed"
    sub = subscription_row(db, buyer.sub_id)
    assert sub["plan_id"] == bigger["id"] and sub["cancel_at_period_end"] is True
    assert sub["status"] == "active"
    plan_change = audit_rows(db, buyer.org["id"])[-1]
    assert plan_change["action"] == "subscription.plan_changed"
    assert plan_change["details"]["before"] == {
        "plan_id": str(buyer.plan["id"]),
        "billing_period": "monthly",
    }
    assert plan_change["details"]["after"] == {
        "plan_id": str(bigger["id"]),
        "billing_period": "monthly",
    }
    # Same metered period: the same cycle, minutes as counted.
    assert len(cycle_rows(db, buyer.sub_id)) == 1


def test_subscription_deleted_ends_it_and_closes_its_cycle_keeping_the_minutes(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    db.execute(
        "update billing_cycles set minutes_used = 42 where subscription_id ="
        " (select id from subscriptions where stripe_subscription_id = %s)",
        (buyer.sub_id,),
    )
    canceled_at = T0 + 10 * 86_400
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=canceled_at
    )

    response = deliver(webhook, buyer.subscription_event("customer.subscription.deleted"))

    assert response.get_json()["status"] == "processed"
    sub = subscription_row(db, buyer.sub_id)
    assert sub["status"] == "canceled" and sub["canceled_at"] == ts(canceled_at)
    [cycle] = cycle_rows(db, buyer.sub_id)
    assert cycle["status"] == "closed" and cycle["minutes_used"] == 42
    change = audit_rows(db, buyer.org["id"])[-1]
    assert change["action"] == "subscription.status_changed"
    assert change["details"]["before"] == {"status": "active"}
    assert change["details"]["after"] == {"status": "canceled"}


def test_a_late_update_never_resurrects_a_canceled_subscription(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    late_update = buyer.subscription_event("customer.subscription.updated")  # made while active
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=T0 + 5
    )
    deliver(webhook, buyer.subscription_event("customer.subscription.deleted"))

    assert deliver(webhook, late_update).get_json()["status"] == "processed"

    assert subscription_row(db, buyer.sub_id)["status"] == "canceled"
    assert [c["status"] for c in cycle_rows(db, buyer.sub_id)] == ["closed"]


# --- invoice.paid / invoice.payment_failed ----------------------------------------------------


def test_invoice_paid_at_renewal_opens_the_new_cycle_and_closes_the_billed_one(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    db.execute(
        "update billing_cycles set minutes_used = 120 where subscription_id ="
        " (select id from subscriptions where stripe_subscription_id = %s)",
        (buyer.sub_id,),
    )
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=1)
    event = buyer.invoice_event("invoice.paid", billed=month(0), created=month(1)[0])

    assert deliver(webhook, event).get_json()["status"] == "processed"

    first, second = cycle_rows(db, buyer.sub_id)
    assert (first["period_start"], first["period_end"]) == (ts(T0), ts(T0 + MONTH))
    assert first["status"] == "closed" and first["minutes_used"] == 120
    assert first["stripe_invoice_id"] == event["data"]["object"]["id"]
    assert (second["period_start"], second["period_end"]) == tuple(map(ts, month(1)))
    assert second["status"] == "active" and second["stripe_invoice_id"] is None
    assert second["minutes_used"] == 0
    sub = subscription_row(db, buyer.sub_id)
    assert (sub["current_period_start"], sub["current_period_end"]) == tuple(map(ts, month(1)))


def test_the_first_invoice_does_not_close_the_cycle_it_opens(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    first = invoice_object(
        new_id("in"),
        buyer.sub_id,
        buyer.customer_id,
        billed=(T0, T0),
        created=T0,
        billing_reason="subscription_create",
    )

    assert deliver(webhook, event_object("invoice.paid", first)).get_json()["status"] == "processed"

    [cycle] = cycle_rows(db, buyer.sub_id)
    assert cycle["status"] == "active" and cycle["stripe_invoice_id"] is None


def test_a_late_invoice_paid_still_names_the_cycle_it_billed(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    late = buyer.invoice_event("invoice.paid", billed=month(0), created=month(1)[0])
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=2)
    deliver(webhook, buyer.subscription_event("customer.subscription.updated"))

    assert deliver(webhook, late).get_json()["status"] == "processed"

    cycles = cycle_rows(db, buyer.sub_id)
    assert [c["period_start"] for c in cycles] == [ts(month(0)[0]), ts(month(2)[0])]
    assert cycles[0]["stripe_invoice_id"] == late["data"]["object"]["id"]
    assert [c["status"] for c in cycles] == ["closed", "active"]


def test_invoice_payment_failed_makes_the_subscription_past_due(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(status="past_due", month_index=1)
    event = buyer.invoice_event("invoice.payment_failed", billed=month(0), created=month(1)[0])

    assert deliver(webhook, event).get_json()["status"] == "processed"

    assert subscription_row(db, buyer.sub_id)["status"] == "past_due"
    change = audit_rows(db, buyer.org["id"])[-1]
    assert change["action"] == "subscription.status_changed"
    assert (change["details"]["before"], change["details"]["after"]) == (
        {"status": "active"},
        {"status": "past_due"},
    )
    # The renewal invoice was made (finalized), paid or not: the cycle it bills is invoiced, so
    # no later report is counted in it (DESIGN: late usage); the new cycle is not.
    first, second = cycle_rows(db, buyer.sub_id)
    assert first["stripe_invoice_id"] == event["data"]["object"]["id"]
    assert second["stripe_invoice_id"] is None


def test_a_cycle_a_usage_report_opened_first_is_confirmed_not_duplicated(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=0)
    subscribed(buyer, stripe_api, webhook)
    # As report-usage does when a call ends after the period Stripe has not renewed yet:
    # it opens the predicted next period, and counts minutes in it.
    db.execute(
        "insert into billing_cycles (organisation_id, subscription_id, period_start, period_end,"
        " included_minutes, overage_rate_cents, minutes_used)"
        " select organisation_id, id, %s, %s, 500, 50, 7"
        " from subscriptions where stripe_subscription_id = %s",
        (ts(month(1)[0]), ts(month(1)[0] + 31 * 86_400), buyer.sub_id),
    )
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=1)

    deliver(webhook, buyer.subscription_event("customer.subscription.updated"))

    first, second = cycle_rows(db, buyer.sub_id)
    assert first["status"] == "closed"
    assert (second["period_start"], second["period_end"]) == tuple(map(ts, month(1)))
    assert second["minutes_used"] == 7 and second["status"] == "active"


def mid_cycle_invoice(buyer: Buyer, at: int) -> dict[str, object]:
    """What Stripe sends when a plan change is invoiced at once (proration_behavior
    always_invoice) at `at`, inside the first cycle: proration lines for the flat prices and the
    metered usage so far as an invoice item; the invoice's own period is the window in which
    invoice items were collected (the last invoice until now), not a service period."""
    invoice = invoice_object(
        new_id("in"),
        buyer.sub_id,
        buyer.customer_id,
        billed=(T0, at),
        created=at,
        metered_price=buyer.plan["stripe_metered_price_id"],
        billing_reason="subscription_update",
    )
    [usage] = invoice["lines"]["data"]
    usage["parent"] = {
        "type": "invoice_item_details",
        "invoice_item_details": {
            "invoice_item": new_id("ii"),
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": buyer.sub_id,
        },
        "subscription_item_details": None,
    }
    proration = json.loads(json.dumps(usage))
    proration.update(id=new_id("il"), period={"start": at, "end": T0 + MONTH})
    proration["parent"] = {
        "type": "subscription_item_details",
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None,
            "proration": True,
            "proration_details": {"credited_items": None},
            "subscription": buyer.sub_id,
            "subscription_item": "si_flat",
        },
    }
    proration["pricing"]["price_details"]["price"] = buyer.plan["stripe_price_id"]
    invoice["lines"]["data"].append(proration)
    return event_object("invoice.paid", invoice, created=at)


def test_an_invoice_in_the_middle_of_a_cycle_neither_closes_nor_claims_it(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    middle = mid_cycle_invoice(buyer, T0 + 15 * 86_400)

    assert deliver(webhook, middle).get_json()["status"] == "processed"

    [cycle] = cycle_rows(db, buyer.sub_id)
    assert cycle["status"] == "active" and cycle["stripe_invoice_id"] is None

    # The renewal invoice bills the cycle's usage to its end: that one closes it.
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=1)
    renewal = buyer.invoice_event("invoice.paid", billed=month(0), created=month(1)[0])
    assert deliver(webhook, renewal).get_json()["status"] == "processed"
    first, _ = cycle_rows(db, buyer.sub_id)
    assert first["stripe_invoice_id"] == renewal["data"]["object"]["id"]


def test_only_the_metered_usage_line_names_the_cycle_an_invoice_billed(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=1)
    # A line of another price over the first month (say a one-off item billed in arrears):
    # not the usage of the cycle, so it does not name it.
    other = buyer.invoice_event("invoice.paid", billed=month(0), created=month(1)[0])
    other["data"]["object"]["lines"]["data"][0]["pricing"]["price_details"]["price"] = new_id(
        "price"
    )

    assert deliver(webhook, other).get_json()["status"] == "processed"

    first, second = cycle_rows(db, buyer.sub_id)
    assert first["stripe_invoice_id"] is None and second["stripe_invoice_id"] is None


# --- one organisation, several subscriptions --------------------------------------------------


def test_a_new_subscription_after_a_cancellation_starts_afresh(
    db, webhook, stripe_api, buyer, make_plan
):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=T0 + 86_400
    )
    deliver(webhook, buyer.subscription_event("customer.subscription.deleted"))
    again = Buyer(buyer.org, make_plan(), new_id("sub"), buyer.customer_id)
    stripe_api.subscriptions[again.sub_id] = again.subscription(month_index=2)

    assert deliver(webhook, again.checkout_event()).get_json()["status"] == "processed"
    # A late event of the old subscription changes neither.
    late = buyer.subscription_event("customer.subscription.updated", month_index=2)
    assert deliver(webhook, late).get_json()["status"] == "processed"

    assert subscription_row(db, buyer.sub_id)["status"] == "canceled"
    new = subscription_row(db, again.sub_id)
    assert new["status"] == "active" and new["plan_id"] == again.plan["id"]
    assert new["organisation_id"] == buyer.org["id"]
    [cycle] = cycle_rows(db, again.sub_id)
    assert cycle["status"] == "active" and cycle["period_start"] == ts(month(2)[0])
    assert cycle["included_minutes"] == again.plan["included_minutes"]
    actions = [row["action"] for row in audit_rows(db, buyer.org["id"])]
    assert actions == [
        "subscription.created",
        "subscription.status_changed",
        "subscription.created",
    ]


def test_after_a_metered_price_change_the_renewal_line_from_the_change_names_the_cycle(
    db, webhook, stripe_api, buyer, make_plan
):
    """Flexible billing mode bills the old metered price's usage at the change (an invoice item)
    and the new price's from the change to the period's end on the renewal invoice."""
    subscribed(buyer, stripe_api, webhook)
    bigger = make_plan(included_minutes=2000)
    change = T0 + 15 * 86_400
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(plan=bigger, month_index=1)
    renewal = Buyer(buyer.org, bigger, buyer.sub_id, buyer.customer_id).invoice_event(
        "invoice.paid", billed=(change, month(0)[1]), created=month(1)[0]
    )

    assert deliver(webhook, renewal).get_json()["status"] == "processed"

    first, second = cycle_rows(db, buyer.sub_id)
    assert first["stripe_invoice_id"] == renewal["data"]["object"]["id"]
    assert first["status"] == "closed" and second["stripe_invoice_id"] is None
