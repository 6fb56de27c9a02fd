"""Plan changes on the Stripe stand-in, through stripe-python: prorations, metered price swaps,
pending updates, an interval change, subscription schedules (devtools/stripe_standin/
plan_changes.py and schedules.py say the rules)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe

from devtools.stripe_standin import serve_in_thread
from shared.subscriptions import normalise_invoice
from tests.test_stripe_standin import SECRET, Receiver, checkout, control, new_customer

Catalog = dict[str, str]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def base_url(receiver: Receiver) -> Iterator[str]:
    url, stop = serve_in_thread(receiver.url, SECRET)
    yield url
    deadline = time.monotonic() + 5  # let deliveries after a /v1/ answer finish first
    while time.monotonic() < deadline:
        events = httpx.get(f"{url}/_standin/state").json()["events"]
        if all(event["deliveries"] for event in events):
            break
        time.sleep(0.02)
    stop()


@pytest.fixture
def client(base_url: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_x",
        base_addresses={"api": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )


@pytest.fixture
def plans(client: stripe.StripeClient) -> Catalog:
    """Basic and Pro, each a monthly flat fee and a metered price with included minutes (tiers)."""
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "Voice call minutes",
            "event_name": "voice_call_minutes",
            "default_aggregation": {"formula": "sum"},
        }
    )
    client.v1.products.create(params={"id": "prod_plans", "name": "Plans"})

    def price(key: str, **params: Any) -> str:
        base = {"currency": "eur", "product": "prod_plans", "lookup_key": key, "nickname": key}
        return client.v1.prices.create(params={**base, **params}).id

    def metered(key: str, included: int, unit: int) -> str:
        return price(
            key,
            recurring={"interval": "month", "usage_type": "metered", "meter": meter.id},
            billing_scheme="tiered",
            tiers_mode="graduated",
            tiers=[{"up_to": included, "unit_amount": 0}, {"up_to": "inf", "unit_amount": unit}],
        )

    return {
        "basic_monthly": price("basic_monthly", unit_amount=2900, recurring={"interval": "month"}),
        "basic_overage": metered("basic_overage", 100, 10),
        "pro_monthly": price("pro_monthly", unit_amount=4900, recurring={"interval": "month"}),
        "pro_yearly": price("pro_yearly", unit_amount=49000, recurring={"interval": "year"}),
        "pro_overage": metered("pro_overage", 500, 5),
    }


def subscribe(
    client: stripe.StripeClient, base_url: str, plans: Catalog, plan: str
) -> stripe.Subscription:
    lines = [
        {"price": plans[f"{plan}_monthly"], "quantity": 1},
        {"price": plans[f"{plan}_overage"]},
    ]
    session = checkout(client, new_customer(client), lines)
    answer = control(base_url, f"checkout_sessions/{session.id}/complete")
    return client.v1.subscriptions.retrieve(answer["subscription"])


def items_by_price(sub: stripe.Subscription) -> dict[str, Any]:
    return {item.price.id: item for item in sub["items"].data}


def report(client: stripe.StripeClient, sub: stripe.Subscription, minutes: int) -> None:
    client.v1.billing.meter_events.create(
        params={
            "event_name": "voice_call_minutes",
            "payload": {"stripe_customer_id": str(sub.customer), "value": str(minutes)},
            "identifier": f"call-{time.monotonic_ns()}",
        }
    )


def halfway(item: Any) -> int:
    """The middle of the item's period (periods are whole days: exactly half is left)."""
    return int(
        item.current_period_start + (item.current_period_end - item.current_period_start) // 2
    )


def upgrade_to_pro(
    client: stripe.StripeClient, sub: stripe.Subscription, plans: Catalog, **params: Any
) -> stripe.Subscription:
    items = items_by_price(sub)
    return client.v1.subscriptions.update(
        sub.id,
        params={
            "items": [
                {"id": items[plans["basic_monthly"]].id, "price": plans["pro_monthly"]},
                {"id": items[plans["basic_overage"]].id, "price": plans["pro_overage"]},
            ],
            **params,
        },
    )


def lines_of(invoice: stripe.Invoice) -> list[dict[str, Any]]:
    return [line.to_dict() for line in invoice.lines.data]


def by_kind(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Lines as credit / debit (prorations), usage_item (invoice items) and own (item lines)."""
    kinds: dict[str, list[dict[str, Any]]] = {
        "credit": [],
        "debit": [],
        "usage_item": [],
        "own": [],
    }
    for line in lines:
        parent = line["parent"]
        if parent["type"] == "invoice_item_details":
            kinds["usage_item"].append(line)
        elif parent["subscription_item_details"]["proration"]:
            kinds["credit" if line["amount"] < 0 else "debit"].append(line)
        else:
            kinds["own"].append(line)
    return kinds


def price_of(line: dict[str, Any]) -> str:
    return str(line["pricing"]["price_details"]["price"])


# ---------------------------------------------------------------- upgrades paid at once


def test_upgrade_always_invoice_paid_swaps_items_and_bills_prorations_and_old_usage(
    client: stripe.StripeClient, base_url: str, plans: Catalog, receiver: Receiver
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    before = items_by_price(sub)
    flat, metered = before[plans["basic_monthly"]], before[plans["basic_overage"]]
    report(client, sub, 150)  # 100 included, 50 × 0.10 at the Basic price
    delivered = len(receiver.deliveries)
    at = halfway(flat)

    updated = upgrade_to_pro(
        client,
        sub,
        plans,
        proration_behavior="always_invoice",
        payment_behavior="pending_if_incomplete",
        proration_date=at,
    )

    after = items_by_price(updated)
    assert set(after) == {plans["pro_monthly"], plans["pro_overage"]}
    assert after[plans["pro_monthly"]].id == flat.id  # the same items, new prices
    assert after[plans["pro_overage"]].id == metered.id
    assert after[plans["pro_monthly"]].current_period_end == flat.current_period_end
    assert updated.pending_update is None
    assert updated.status == "active"
    invoice = client.v1.invoices.retrieve(str(updated.latest_invoice))
    assert (invoice.billing_reason, invoice.status) == ("subscription_update", "paid")
    kinds = by_kind(lines_of(invoice))
    credit, debit = kinds["credit"], kinds["debit"]
    assert [price_of(x) for x in credit] == [plans["basic_monthly"]]
    assert [price_of(x) for x in debit] == [plans["pro_monthly"]]
    assert (credit[0]["amount"], debit[0]["amount"]) == (-1450, 2450)  # half a period left
    for line in credit + debit:
        details = line["parent"]["subscription_item_details"]
        assert details["subscription_item"] == flat.id
        assert details["invoice_item"].startswith("ii_")
        assert line["period"] == {"start": at, "end": flat.current_period_end}
    assert credit[0]["description"].startswith("Unused time on 1 × basic_monthly after")
    first = client.v1.invoices.retrieve(str(sub.latest_invoice))
    [paid_fee] = [x.id for x in first.lines.data if price_of(x.to_dict()) == plans["basic_monthly"]]
    credited = credit[0]["parent"]["subscription_item_details"]["proration_details"]
    assert credited["credited_items"] == {"invoice": first.id, "invoice_line_items": [paid_fee]}
    [usage] = kinds["usage_item"]
    assert price_of(usage) == plans["basic_overage"]
    assert (usage["quantity"], usage["amount"]) == (150, 500)
    assert usage["parent"]["invoice_item_details"]["proration"] is False
    assert usage["period"]["start"] == metered.current_period_start
    assert kinds["own"] == []
    assert invoice.total == invoice.amount_paid == sum(x["amount"] for x in lines_of(invoice))
    # The usage invoice item names the part of the cycle before the change; prorations none.
    [usage_line] = normalise_invoice(invoice.to_dict())["lines"]
    assert usage_line["price_id"] == plans["basic_overage"]
    assert usage_line["period_end"] == usage["period"]["end"]
    receiver.wait_for(delivered + 2)
    assert receiver.types()[delivered:] == ["customer.subscription.updated", "invoice.paid"]

    # Later usage goes to the Pro price at the renewal, its tiers counted from zero.
    report(client, sub, 700)  # 500 included, 200 × 0.05
    renewal = control(base_url, f"subscriptions/{sub.id}/advance")
    lines = lines_of(client.v1.invoices.retrieve(renewal["invoice"]))
    amounts = {price_of(x): (x["quantity"], x["amount"]) for x in lines}
    assert amounts == {plans["pro_overage"]: (700, 1000), plans["pro_monthly"]: (1, 4900)}
    metered_line = next(x for x in lines if price_of(x) == plans["pro_overage"])
    assert metered_line["period"]["start"] == usage["period"]["end"]  # from the change on


# ---------------------------------------------------------------- declined payments


def test_declined_upgrade_with_pending_if_incomplete_changes_nothing_until_paid(
    client: stripe.StripeClient, base_url: str, plans: Catalog, receiver: Receiver
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    report(client, sub, 150)
    control(base_url, f"customers/{sub.customer}/decline_next_payment")
    delivered = len(receiver.deliveries)

    held = upgrade_to_pro(
        client,
        sub,
        plans,
        proration_behavior="always_invoice",
        payment_behavior="pending_if_incomplete",
        metadata={"plan_id": "pro"},
    )

    assert set(items_by_price(held)) == {plans["basic_monthly"], plans["basic_overage"]}
    assert held.metadata["plan_id"] == "p-1"  # applied only with the change
    assert held.status == "active"
    update = held.pending_update
    assert update is not None
    assert update.expires_at == pytest.approx(time.time() + 23 * 3600, abs=60)
    assert update.metadata is not None and update.metadata.to_dict() == {"plan_id": "pro"}
    pending_prices = {item.price.id for item in update.subscription_items or []}
    assert pending_prices == {plans["pro_monthly"], plans["pro_overage"]}
    stored = client.v1.subscriptions.retrieve(sub.id)
    assert set(items_by_price(stored)) == {plans["basic_monthly"], plans["basic_overage"]}
    assert stored.pending_update is not None
    invoice = client.v1.invoices.retrieve(str(held.latest_invoice))
    assert (invoice.status, invoice.attempt_count, invoice.amount_paid) == ("open", 1, 0)
    assert invoice.amount_due > 0
    assert by_kind(lines_of(invoice))["usage_item"][0]["amount"] == 500
    receiver.wait_for(delivered + 2)
    assert receiver.types()[delivered:] == [
        "customer.subscription.updated",
        "invoice.payment_failed",
    ]

    paid = control(base_url, f"invoices/{invoice.id}/pay")  # the retry succeeds

    assert paid["invoice_status"] == "paid"
    applied = client.v1.subscriptions.retrieve(sub.id)
    assert set(items_by_price(applied)) == {plans["pro_monthly"], plans["pro_overage"]}
    assert applied.pending_update is None
    assert applied.metadata.to_dict() == {"organisation_id": "org-1", "plan_id": "pro"}


def test_a_pending_update_expires_at_the_renewal_and_its_invoice_is_voided(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    report(client, sub, 150)
    control(base_url, f"customers/{sub.customer}/decline_next_payment")
    held = upgrade_to_pro(
        client,
        sub,
        plans,
        proration_behavior="always_invoice",
        payment_behavior="pending_if_incomplete",
    )

    renewal = control(base_url, f"subscriptions/{sub.id}/advance")

    assert client.v1.invoices.retrieve(str(held.latest_invoice)).status == "void"
    after = client.v1.subscriptions.retrieve(sub.id)
    assert after.pending_update is None
    assert set(items_by_price(after)) == {plans["basic_monthly"], plans["basic_overage"]}
    lines = lines_of(client.v1.invoices.retrieve(renewal["invoice"]))
    amounts = {price_of(x): x["amount"] for x in lines}  # the usage at the price it kept
    assert amounts == {plans["basic_overage"]: 500, plans["basic_monthly"]: 2900}


def test_declined_upgrade_by_default_applies_it_and_leaves_the_invoice_open(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    control(base_url, f"customers/{sub.customer}/decline_next_payment")

    updated = upgrade_to_pro(client, sub, plans, proration_behavior="always_invoice")

    assert set(items_by_price(updated)) == {plans["pro_monthly"], plans["pro_overage"]}
    assert (updated.status, updated.pending_update) == ("past_due", None)
    assert client.v1.invoices.retrieve(str(updated.latest_invoice)).status == "open"


def test_error_if_incomplete_refuses_a_declined_upgrade_with_402(
    client: stripe.StripeClient, base_url: str, plans: Catalog, receiver: Receiver
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    control(base_url, f"customers/{sub.customer}/decline_next_payment")
    invoices = len(httpx.get(f"{base_url}/_standin/state").json()["invoices"])

    with pytest.raises(stripe.CardError) as declined:
        upgrade_to_pro(
            client,
            sub,
            plans,
            proration_behavior="always_invoice",
            payment_behavior="error_if_incomplete",
        )

    assert (declined.value.http_status, declined.value.code) == (402, "card_declined")
    assert declined.value.error is not None
    assert declined.value.error.decline_code == "generic_decline"
    unchanged = client.v1.subscriptions.retrieve(sub.id)
    assert set(items_by_price(unchanged)) == {plans["basic_monthly"], plans["basic_overage"]}
    assert unchanged.latest_invoice == sub.latest_invoice
    assert len(httpx.get(f"{base_url}/_standin/state").json()["invoices"]) == invoices


def test_a_downgrade_credit_is_kept_on_the_balance_for_the_next_invoice(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    flat = items_by_price(sub)[plans["pro_monthly"]]
    at = halfway(flat)

    updated = client.v1.subscriptions.update(
        sub.id,
        params={
            "items": [{"id": flat.id, "price": plans["basic_monthly"]}],
            "proration_behavior": "always_invoice",
            "proration_date": at,
        },
    )

    invoice = client.v1.invoices.retrieve(str(updated.latest_invoice))
    credit = -2450 + 1450  # half a month of Pro back, half a month of Basic
    assert invoice.total == credit < 0
    assert (invoice.status, invoice.amount_due, invoice.attempt_count) == ("paid", 0, 0)
    assert invoice.ending_balance == credit
    renewal = client.v1.invoices.retrieve(
        control(base_url, f"subscriptions/{sub.id}/advance")["invoice"]
    )
    assert (renewal.total, renewal.starting_balance) == (2900, credit)
    assert renewal.amount_due == renewal.amount_paid == 2900 + credit


# ---------------------------------------------------------------- metered usage around a swap


def test_metered_swap_bills_earlier_usage_at_the_old_tiers_on_the_next_invoice(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    metered = items_by_price(sub)[plans["basic_overage"]]
    report(client, sub, 150)  # Basic: 100 included, then 0.10

    updated = client.v1.subscriptions.update(
        sub.id, params={"items": [{"id": metered.id, "price": plans["pro_overage"]}]}
    )

    assert updated.latest_invoice == sub.latest_invoice  # create_prorations: nothing invoiced now
    report(client, sub, 700)  # Pro: 500 included, then 0.05
    renewal = control(base_url, f"subscriptions/{sub.id}/advance")
    invoice = client.v1.invoices.retrieve(renewal["invoice"])
    kinds = by_kind(lines_of(invoice))
    [early] = kinds["usage_item"]
    assert (price_of(early), early["quantity"], early["amount"]) == (
        plans["basic_overage"],
        150,
        500,
    )
    own = {price_of(x): (x["quantity"], x["amount"]) for x in kinds["own"]}
    assert own == {plans["pro_overage"]: (700, 1000), plans["basic_monthly"]: (1, 2900)}
    later = next(x for x in kinds["own"] if price_of(x) == plans["pro_overage"])
    assert later["period"]["start"] == early["period"]["end"]
    assert later["period"]["end"] == metered.current_period_end
    usage_lines = normalise_invoice(invoice.to_dict())["lines"]
    assert {x["price_id"] for x in usage_lines} == {
        plans["pro_overage"],
        plans["basic_monthly"],
        plans["basic_overage"],
    }


def test_metered_swap_with_proration_none_bills_the_earlier_usage_nowhere(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    metered = items_by_price(sub)[plans["basic_overage"]]
    report(client, sub, 150)
    client.v1.subscriptions.update(
        sub.id,
        params={
            "items": [{"id": metered.id, "price": plans["pro_overage"]}],
            "proration_behavior": "none",
        },
    )
    report(client, sub, 600)

    renewal = control(base_url, f"subscriptions/{sub.id}/advance")

    lines = lines_of(client.v1.invoices.retrieve(renewal["invoice"]))
    amounts = {price_of(x): (x["quantity"], x["amount"]) for x in lines}
    assert amounts == {plans["pro_overage"]: (600, 500), plans["basic_monthly"]: (1, 2900)}


# ---------------------------------------------------------------- interval change


def test_monthly_to_yearly_restarts_the_flat_item_and_keeps_the_monthly_metered_item(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    before = items_by_price(sub)
    flat, metered = before[plans["pro_monthly"]], before[plans["pro_overage"]]
    report(client, sub, 600)
    at = halfway(flat)

    updated = client.v1.subscriptions.update(
        sub.id,
        params={"items": [{"id": flat.id, "price": plans["pro_yearly"]}], "proration_date": at},
    )

    after = items_by_price(updated)
    yearly = after[plans["pro_yearly"]]
    assert yearly.id == flat.id
    assert 365 <= (yearly.current_period_end - yearly.current_period_start) / 86400 <= 366
    assert yearly.current_period_start >= flat.current_period_start
    kept = after[plans["pro_overage"]]
    assert (kept.current_period_start, kept.current_period_end) == (
        metered.current_period_start,
        metered.current_period_end,
    )
    invoice = client.v1.invoices.retrieve(str(updated.latest_invoice))  # invoiced now
    assert (invoice.billing_reason, invoice.status) == ("subscription_update", "paid")
    kinds = by_kind(lines_of(invoice))
    assert [x["amount"] for x in kinds["credit"]] == [-2450]  # half the month unused
    [fee] = kinds["own"]
    assert (price_of(fee), fee["amount"]) == (plans["pro_yearly"], 49000)
    assert fee["period"] == {"start": yearly.current_period_start, "end": yearly.current_period_end}
    assert kinds["usage_item"] == kinds["debit"] == []  # the metered item is untouched

    renewal = control(base_url, f"subscriptions/{sub.id}/advance")  # the month ends first
    lines = lines_of(client.v1.invoices.retrieve(renewal["invoice"]))
    assert [(price_of(x), x["amount"]) for x in lines] == [(plans["pro_overage"], 500)]


# ---------------------------------------------------------------- subscription schedules


def schedule_downgrade(
    client: stripe.StripeClient, sub: stripe.Subscription, plans: Catalog, **params: Any
) -> stripe.SubscriptionSchedule:
    """Pro until the period ends, then Basic for a month, then released."""
    schedule = client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    current = schedule.phases[0]
    return client.v1.subscription_schedules.update(
        schedule.id,
        params={
            "phases": [
                {
                    "items": [
                        {"price": item.price, "quantity": item.quantity} for item in current.items
                    ],
                    "start_date": current.start_date,
                    "end_date": current.end_date,
                },
                {
                    "items": [
                        {"price": plans["basic_monthly"], "quantity": 1},
                        {"price": plans["basic_overage"]},
                    ],
                    "duration": {"interval": "month", "interval_count": 1},
                },
            ],
            "end_behavior": "release",
            **params,
        },
    )


def test_schedule_from_subscription_mirrors_it_and_is_made_once(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    flat = items_by_price(sub)[plans["pro_monthly"]]

    schedule = client.v1.subscription_schedules.create(params={"from_subscription": sub.id})

    assert schedule.id.startswith("sub_sched_")
    assert (schedule.status, schedule.subscription, schedule.end_behavior) == (
        "active",
        sub.id,
        "release",
    )
    assert schedule.billing_mode.type == "flexible"
    assert schedule.current_phase is not None
    assert (schedule.current_phase.start_date, schedule.current_phase.end_date) == (
        flat.current_period_start,
        flat.current_period_end,
    )
    [phase] = schedule.phases
    assert {(item.price, item.quantity) for item in phase.items} == {
        (plans["pro_monthly"], 1),
        (plans["pro_overage"], None),
    }
    assert client.v1.subscriptions.retrieve(sub.id).schedule == schedule.id
    assert client.v1.subscription_schedules.retrieve(schedule.id).to_dict() == schedule.to_dict()
    with pytest.raises(stripe.InvalidRequestError) as twice:
        client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    assert twice.value.param == "from_subscription"
    assert "already attached to a schedule" in str(twice.value.user_message)


def test_scheduled_downgrade_applies_at_the_renewal_then_the_schedule_is_released(
    client: stripe.StripeClient, base_url: str, plans: Catalog, receiver: Receiver
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    old = items_by_price(sub)
    schedule = schedule_downgrade(client, sub, plans)
    assert len(schedule.phases) == 2
    assert schedule.phases[1].start_date == schedule.phases[0].end_date
    report(client, sub, 600)  # Pro: 500 included, 100 × 0.05

    first = control(base_url, f"subscriptions/{sub.id}/advance")

    lines = lines_of(client.v1.invoices.retrieve(first["invoice"]))
    amounts = {price_of(x): (x["quantity"], x["amount"]) for x in lines}
    assert amounts == {plans["pro_overage"]: (600, 500), plans["basic_monthly"]: (1, 2900)}
    assert not any(x["parent"]["subscription_item_details"]["proration"] for x in lines)
    downgraded = client.v1.subscriptions.retrieve(sub.id)
    new = items_by_price(downgraded)
    assert set(new) == {plans["basic_monthly"], plans["basic_overage"]}
    boundary = old[plans["pro_monthly"]].current_period_end
    assert {item.current_period_start for item in new.values()} == {boundary}
    assert not {item.id for item in new.values()} & {item.id for item in old.values()}
    schedule = client.v1.subscription_schedules.retrieve(schedule.id)
    assert schedule.current_phase is not None and schedule.current_phase.start_date == boundary
    assert downgraded.schedule == schedule.id

    report(client, sub, 150)  # Basic: 100 included, 50 × 0.10
    second = control(base_url, f"subscriptions/{sub.id}/advance")  # the last phase ends

    lines = lines_of(client.v1.invoices.retrieve(second["invoice"]))
    amounts = {price_of(x): (x["quantity"], x["amount"]) for x in lines}
    assert amounts == {plans["basic_overage"]: (150, 500), plans["basic_monthly"]: (1, 2900)}
    released = client.v1.subscription_schedules.retrieve(schedule.id)
    assert (released.status, released.subscription, released.released_subscription) == (
        "released",
        None,
        sub.id,
    )
    after = client.v1.subscriptions.retrieve(sub.id)
    assert (after.schedule, after.status) == (None, "active")
    assert set(items_by_price(after)) == {plans["basic_monthly"], plans["basic_overage"]}


def test_a_schedule_ending_with_cancel_ends_the_subscription(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    schedule = client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    client.v1.subscription_schedules.update(schedule.id, params={"end_behavior": "cancel"})

    answer = control(base_url, f"subscriptions/{sub.id}/advance")

    assert answer["status"] == "canceled"
    assert [d["type"] for d in answer["deliveries"]][-1] == "customer.subscription.deleted"
    assert client.v1.subscription_schedules.retrieve(schedule.id).status == "canceled"


def test_yearly_to_monthly_waits_for_the_year_to_end(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    lines = [{"price": plans["pro_yearly"], "quantity": 1}]
    session = checkout(client, new_customer(client), lines)
    sub_id = control(base_url, f"checkout_sessions/{session.id}/complete")["subscription"]
    client.v1.subscription_items.create(
        params={"subscription": sub_id, "price": plans["pro_overage"]}
    )
    sub = client.v1.subscriptions.retrieve(sub_id)
    yearly = items_by_price(sub)[plans["pro_yearly"]]
    schedule = client.v1.subscription_schedules.create(params={"from_subscription": sub_id})
    assert schedule.current_phase is not None
    assert schedule.current_phase.end_date == yearly.current_period_end  # the longest period
    current = schedule.phases[0]
    client.v1.subscription_schedules.update(
        schedule.id,
        params={
            "phases": [
                {
                    "items": [{"price": i.price, "quantity": i.quantity} for i in current.items],
                    "start_date": current.start_date,
                    "end_date": current.end_date,
                },
                {"items": [{"price": plans["pro_monthly"]}, {"price": plans["pro_overage"]}]},
            ]
        },
    )

    for _ in range(12):  # the monthly metered item renews; the yearly fee stays
        control(base_url, f"subscriptions/{sub_id}/advance")
        prices = set(items_by_price(client.v1.subscriptions.retrieve(sub_id)))
        if plans["pro_monthly"] in prices:
            break
    after = items_by_price(client.v1.subscriptions.retrieve(sub_id))
    assert set(after) == {plans["pro_monthly"], plans["pro_overage"]}
    assert after[plans["pro_monthly"]].current_period_start == yearly.current_period_end
    assert after[plans["pro_overage"]].id == items_by_price(sub)[plans["pro_overage"]].id


def test_release_stops_the_schedule_and_only_once(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "pro")
    schedule = schedule_downgrade(client, sub, plans)

    released = client.v1.subscription_schedules.release(schedule.id)

    assert (released.status, released.released_subscription, released.subscription) == (
        "released",
        sub.id,
        None,
    )
    assert released.released_at is not None
    assert client.v1.subscriptions.retrieve(sub.id).schedule is None
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.subscription_schedules.release(schedule.id)
    assert "currently in the `released` status" in str(again.value.user_message)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscription_schedules.update(schedule.id, params={"end_behavior": "cancel"})
    control(base_url, f"subscriptions/{sub.id}/advance")  # no downgrade any more
    kept = client.v1.subscriptions.retrieve(sub.id)
    assert set(items_by_price(kept)) == {plans["pro_monthly"], plans["pro_overage"]}


# ---------------------------------------------------------------- refused


def test_parameters_stripe_refuses_are_refused(
    client: stripe.StripeClient, base_url: str, plans: Catalog
) -> None:
    sub = subscribe(client, base_url, plans, "basic")
    flat = items_by_price(sub)[plans["basic_monthly"]]

    def refused(params: dict[str, Any]) -> stripe.InvalidRequestError:
        with pytest.raises(stripe.InvalidRequestError) as error:
            client.v1.subscriptions.update(sub.id, params=params)  # type: ignore[arg-type]
        assert error.value.http_status == 400
        return error.value

    unknown = refused({"items": [{"id": flat.id, "price_data": {"currency": "eur"}}]})
    assert (unknown.code, unknown.param) == ("parameter_unknown", "items[0][price_data][currency]")
    assert refused({"payment_behavior": "sometimes"}).param == "payment_behavior"
    assert refused({"proration_behavior": "later"}).param == "proration_behavior"
    pending = refused(
        {
            "items": [{"id": flat.id, "deleted": True}],
            "payment_behavior": "pending_if_incomplete",
        }
    )
    assert pending.param == "items[0][deleted]"
    assert "pending_if_incomplete" in str(pending.user_message)
    assert refused({"proration_date": 1}).param == "proration_date"
    assert client.v1.subscriptions.retrieve(sub.id).to_dict() == sub.to_dict()

    schedule = client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    phase = schedule.phases[0]
    with pytest.raises(stripe.InvalidRequestError) as iterations:  # gone since 2025-09-30.clover
        client.v1.subscription_schedules.update(
            schedule.id,
            params={
                "phases": [
                    {
                        "items": [{"price": plans["basic_monthly"]}],
                        "start_date": phase.start_date,
                        "iterations": 2,
                    }
                ]
            },  # type: ignore[typeddict-unknown-key]
        )
    assert (iterations.value.code, iterations.value.param) == (
        "parameter_unknown",
        "phases[0][iterations]",
    )
    with pytest.raises(stripe.InvalidRequestError) as moved:
        client.v1.subscription_schedules.update(
            schedule.id,
            params={
                "phases": [
                    {
                        "items": [{"price": plans["basic_monthly"]}],
                        "start_date": phase.start_date + 1,
                    }
                ]
            },
        )
    assert moved.value.param == "phases[0][start_date]"
    with pytest.raises(stripe.InvalidRequestError) as managed:
        client.v1.subscriptions.update(sub.id, params={"cancel_at_period_end": True})
    assert "managed by the subscription schedule" in str(managed.value.user_message)
