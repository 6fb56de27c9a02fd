"""One organisation, one live subscription: a second live one is canceled at Stripe, the newer one.

The older subscription (Stripe's `created`) is kept and never canceled; the newer is canceled with
no final invoice and no proration, its row ends canceled, and an audit row lists its invoices for
a person to refund. Replays, concurrent deliveries, either delivery order and Stripe being down
all end the same way.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from tests.test_webhook_support import (
    T0,
    Buyer,
    StripeStandIn,
    audit_rows,
    cycle_rows,
    deliver,
    deliver_together,
    event_object,
    event_row,
    item_object,
    month,
    new_id,
    subscribed,
    subscription_object,
    subscription_row,
)

# The fixtures `webhook`, `stripe_api` and `buyer`.
pytest_plugins = ("tests.test_webhook_support",)

LATER = T0 + 3_600  # the duplicate was created an hour after the first subscription


def second_subscription(buyer: Buyer, stripe_api: StripeStandIn, **state: Any) -> Buyer:
    """A second subscription of the buyer's organisation, live at Stripe, created an hour later,
    its first invoice paid."""
    second = Buyer(buyer.org, buyer.plan, new_id("sub"), buyer.customer_id)
    sub = second.subscription(created=LATER, **state)
    sub["latest_invoice"] = new_id("in")
    stripe_api.subscriptions[second.sub_id] = sub
    return second


def live_subscriptions(db: Any, org_id: Any) -> list[str]:
    """The organisation's live subscriptions, newest row first (how record_usage picks one)."""
    rows = db.execute(
        "select stripe_subscription_id from subscriptions where organisation_id = %s"
        " and status in ('active', 'trialing', 'past_due', 'unpaid') order by created_at desc",
        (org_id,),
    ).fetchall()
    return [row["stripe_subscription_id"] for row in rows]


def duplicate_audits(db: Any, org_id: Any) -> list[dict[str, Any]]:
    return [
        row["details"]
        for row in audit_rows(db, org_id)
        if row["action"] == "subscription.duplicate_canceled"
    ]


def assert_newer_canceled(db: Any, stripe_api: StripeStandIn, kept: Buyer, newer: Buyer) -> None:
    """Stripe and our rows agree: `newer` canceled, `kept` the organisation's one live one."""
    assert stripe_api.subscriptions[newer.sub_id]["status"] == "canceled"
    assert stripe_api.subscriptions[kept.sub_id]["status"] == "active"
    assert subscription_row(db, newer.sub_id)["status"] == "canceled"
    assert subscription_row(db, kept.sub_id)["status"] == "active"
    assert live_subscriptions(db, kept.org["id"]) == [kept.sub_id]
    assert [r.url.path for r in stripe_api.cancels] == [f"/v1/subscriptions/{newer.sub_id}"]


def test_a_second_live_subscription_is_canceled_and_the_first_kept(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    [first_cycle] = cycle_rows(db, buyer.sub_id)
    second = second_subscription(buyer, stripe_api)
    event = second.checkout_event()

    response = deliver(webhook, event)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "processed"
    # The exact cancel: now, no final invoice, no proration, our comment, a stable key.
    [cancel] = stripe_api.cancels
    assert cancel.method == "DELETE" and cancel.url.path == f"/v1/subscriptions/{second.sub_id}"
    assert urllib.parse.parse_qs(cancel.url.query.decode()) == {
        "invoice_now": ["false"],
        "prorate": ["false"],
        "cancellation_details[comment]": [
            f"Duplicate subscription: the organisation keeps {buyer.sub_id}."
        ],
    }
    assert cancel.headers["Idempotency-Key"] == f"cancel-duplicate-{second.sub_id}"
    assert_newer_canceled(db, stripe_api, kept=buyer, newer=second)
    # The kept one is untouched: same cycle, still open; the duplicate never had one.
    assert cycle_rows(db, buyer.sub_id) == [first_cycle]
    assert cycle_rows(db, second.sub_id) == []
    assert duplicate_audits(db, buyer.org["id"]) == [
        {
            "kept": buyer.sub_id,
            "canceled": second.sub_id,
            "invoices_to_refund": [stripe_api.subscriptions[second.sub_id]["latest_invoice"]],
            "event_id": event["id"],
        }
    ]
    assert event_row(db, event["id"])["status"] == "processed"
    # Stripe's own customer.subscription.deleted for it changes nothing more.
    deleted = second.subscription_event("customer.subscription.deleted")
    assert deliver(webhook, deleted).get_json()["status"] == "processed"
    assert len(stripe_api.cancels) == 1 and len(duplicate_audits(db, buyer.org["id"])) == 1


def test_the_same_event_replayed_or_delivered_concurrently_cancels_once(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    second = second_subscription(buyer, stripe_api)
    event = second.subscription_event("customer.subscription.created", created=LATER)
    stripe_api.delay_seconds = 0.2  # keep the first delivery busy while the others arrive
    answers = deliver_together(webhook, [json.dumps(event)] * 6)
    stripe_api.delay_seconds = 0
    replayed = deliver(webhook, event)

    assert {status for status, _ in answers} <= {200, 503}, answers
    assert replayed.get_json()["status"] == "duplicate"
    assert_newer_canceled(db, stripe_api, kept=buyer, newer=second)
    assert len(duplicate_audits(db, buyer.org["id"])) == 1


def test_different_events_of_the_duplicate_racing_end_it_once(db, webhook, stripe_api, buyer):
    """Two deliveries may both see it live and both ask Stripe to cancel: Stripe refuses the
    second (a canceled subscription is terminal), which is no failure."""
    subscribed(buyer, stripe_api, webhook)
    second = second_subscription(buyer, stripe_api)
    events = [
        second.checkout_event(),
        second.subscription_event("customer.subscription.created", created=LATER),
        second.subscription_event("customer.subscription.updated", created=LATER),
    ]
    stripe_api.delay_seconds = 0.1
    answers = deliver_together(webhook, events)

    assert [status for status, _ in answers] == [200] * len(events), answers
    assert stripe_api.subscriptions[second.sub_id]["status"] == "canceled"
    assert subscription_row(db, second.sub_id)["status"] == "canceled"
    assert live_subscriptions(db, buyer.org["id"]) == [buyer.sub_id]
    assert {r.url.path for r in stripe_api.cancels} == {f"/v1/subscriptions/{second.sub_id}"}
    assert len(duplicate_audits(db, buyer.org["id"])) == 1


def test_the_newer_is_canceled_when_it_arrives_first(db, webhook, stripe_api, buyer):
    """The newer subscription's event arrives first and it is applied live (nothing else is);
    the older one's event then cancels the newer, not itself."""
    newer = second_subscription(buyer, stripe_api)
    first = newer.subscription_event("customer.subscription.created", created=LATER)
    assert deliver(webhook, first).get_json()["status"] == "processed"
    assert live_subscriptions(db, buyer.org["id"]) == [newer.sub_id]
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.subscription_event("customer.subscription.created")

    response = deliver(webhook, event)

    assert response.get_json()["status"] == "processed"
    assert_newer_canceled(db, stripe_api, kept=buyer, newer=newer)
    [closed] = cycle_rows(db, newer.sub_id)
    assert closed["status"] == "closed"
    [details] = duplicate_audits(db, buyer.org["id"])
    assert (details["kept"], details["canceled"]) == (buyer.sub_id, newer.sub_id)
    assert details["event_id"] == event["id"]
    assert event_row(db, event["id"])["status"] == "processed"


def test_created_events_of_both_racing_cancel_the_newer(
    db, webhook, stripe_api, make_org, make_plan
):
    """Whichever of the two commits first, the organisation lock makes the other see it."""
    for _ in range(3):
        older = Buyer(make_org(), make_plan(), new_id("sub"), new_id("cus"))
        stripe_api.subscriptions[older.sub_id] = older.subscription()
        newer = second_subscription(older, stripe_api)
        events = [
            older.subscription_event("customer.subscription.created"),
            newer.subscription_event("customer.subscription.created", created=LATER),
        ]
        stripe_api.cancels.clear()
        stripe_api.delay_seconds = 0.05
        answers = deliver_together(webhook, events)

        assert [status for status, _ in answers] == [200, 200], answers
        assert_newer_canceled(db, stripe_api, kept=older, newer=newer)
        assert len(duplicate_audits(db, older.org["id"])) == 1


def test_stripe_down_during_the_cancel_fails_the_event_and_its_retry_cancels(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    second = second_subscription(buyer, stripe_api)
    event = second.checkout_event()
    stripe_api.fail_cancels = 1

    failed = deliver(webhook, event)

    assert failed.status_code == 503
    assert failed.get_json()["error"]["code"] == "stripe_unavailable"
    stored = event_row(db, event["id"])
    assert stored["status"] == "failed" and "500" in stored["error"]
    # Meanwhile the duplicate is not the organisation's subscription: usage goes to the first.
    assert live_subscriptions(db, buyer.org["id"]) == [buyer.sub_id]
    assert subscription_row(db, second.sub_id) is None

    retried = deliver(webhook, event)  # Stripe's retry

    assert retried.status_code == 200 and retried.get_json()["status"] == "processed"
    assert len(stripe_api.cancels) == 2  # the failed attempt, then the cancel
    stripe_api.cancels.pop(0)
    assert_newer_canceled(db, stripe_api, kept=buyer, newer=second)
    assert event_row(db, event["id"])["status"] == "processed"
    assert len(duplicate_audits(db, buyer.org["id"])) == 1


def test_a_cancel_whose_apply_never_ran_is_recorded_on_the_retry(db, webhook, stripe_api, buyer):
    """The process died after Stripe canceled the duplicate: the retry finds it canceled with our
    comment, cancels nothing more and still writes the audit row."""
    subscribed(buyer, stripe_api, webhook)
    second = second_subscription(buyer, stripe_api)
    sub = stripe_api.subscriptions[second.sub_id]
    sub.update(status="canceled", canceled_at=LATER + 60, ended_at=LATER + 60)
    sub["cancellation_details"] = {
        "comment": f"Duplicate subscription: the organisation keeps {buyer.sub_id}.",
        "feedback": None,
        "reason": "cancellation_requested",
    }

    assert deliver(webhook, second.checkout_event()).get_json()["status"] == "processed"

    assert stripe_api.cancels == []
    assert subscription_row(db, second.sub_id)["status"] == "canceled"
    [details] = duplicate_audits(db, buyer.org["id"])
    assert (details["kept"], details["canceled"]) == (buyer.sub_id, second.sub_id)
    assert details["invoices_to_refund"] == [sub["latest_invoice"]]


def test_a_stale_row_of_the_older_one_cancels_nothing(db, webhook, stripe_api, buyer):
    """The older one was canceled at Stripe and its event is still on its way: Stripe's word is
    asked before anything is canceled, and the new subscription stays."""
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=T0 + 1_800
    )
    second = second_subscription(buyer, stripe_api)

    assert deliver(webhook, second.checkout_event()).get_json()["status"] == "processed"

    assert stripe_api.cancels == []
    assert subscription_row(db, buyer.sub_id)["status"] == "canceled"
    assert live_subscriptions(db, buyer.org["id"]) == [second.sub_id]
    assert duplicate_audits(db, buyer.org["id"]) == []


def test_buying_again_after_a_canceled_subscription_cancels_nothing(db, webhook, stripe_api, buyer):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=T0 + 86_400
    )
    deliver(webhook, buyer.subscription_event("customer.subscription.deleted"))
    again = second_subscription(buyer, stripe_api)

    assert deliver(webhook, again.checkout_event()).get_json()["status"] == "processed"

    assert stripe_api.cancels == []
    assert live_subscriptions(db, buyer.org["id"]) == [again.sub_id]
    assert duplicate_audits(db, buyer.org["id"]) == []


def test_a_subscription_to_another_product_of_the_account_is_nobodys_duplicate(
    db, webhook, stripe_api, buyer
):
    """The account also sells a support add-on (made in the Dashboard) to the same customer: its
    subscription has no price of ours. It was named the newer duplicate and canceled at Stripe."""
    subscribed(buyer, stripe_api, webhook)
    other = new_id("sub")
    addon = subscription_object(other, buyer.customer_id, buyer.plan, created=T0 + 3600)
    addon["items"]["data"] = [item_object(other, "price_support_addon", month(0))]
    stripe_api.subscriptions[other] = addon
    event = event_object("customer.subscription.created", addon)

    response = deliver(webhook, event)

    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "unknown_price"
    assert stripe_api.cancels == []
    assert subscription_row(db, other) is None
    assert live_subscriptions(db, buyer.org["id"]) == [buyer.sub_id]
    assert duplicate_audits(db, buyer.org["id"]) == []
    assert event_row(db, event["id"])["status"] == "failed"
    # Not left failed in the session's database: every later `repair failed-events` would retry it.
    db.execute("update stripe_events set status = 'ignored' where id = %s", (event["id"],))


def test_the_repair_resync_settles_a_duplicate_the_same_way(db, webhook, stripe_api, buyer, capsys):
    from ops import repair

    subscribed(buyer, stripe_api, webhook)
    second = second_subscription(buyer, stripe_api)  # at Stripe only: its events were lost

    assert repair.main(["resync", "--subscription", second.sub_id]) == 0

    [cancel] = stripe_api.cancels
    assert cancel.url.path == f"/v1/subscriptions/{second.sub_id}"
    assert_newer_canceled(db, stripe_api, kept=buyer, newer=second)
    assert [audit["canceled"] for audit in duplicate_audits(db, buyer.org["id"])] == [second.sub_id]
