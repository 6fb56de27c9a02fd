"""Order and duplicates change nothing: realistic subscription lifecycles delivered in any order,
with any repeats, end in the same rows as in-order delivery; an older state never wins."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.db import get_database
from shared.settings import get_settings
from shared.subscriptions import Fetched, apply_state
from tests.test_webhook_support import (
    MONTH,
    T0,
    checkout_session_object,
    cycle_rows,
    deliver,
    event_object,
    invoice_object,
    month,
    new_id,
    subscription_object,
    subscription_row,
    ts,
)

# The fixtures `webhook` and `stripe_api`.
pytest_plugins = ("tests.test_webhook_support",)


@dataclass(frozen=True)
class Lifecycle:
    billing_period: str
    renewals: int
    payment_failure: bool  # the last renewal's payment fails first, then recovers
    plan_change: bool
    ending: str | None  # None, "at_period_end" or "now"


lifecycles = st.builds(
    Lifecycle,
    billing_period=st.sampled_from(["monthly", "yearly"]),
    renewals=st.integers(0, 3),
    payment_failure=st.booleans(),
    plan_change=st.booleans(),
    ending=st.sampled_from([None, "at_period_end", "now"]),
)


@dataclass
class World:
    """One organisation living through a lifecycle; `tag` makes its Stripe ids unique."""

    org_id: str
    plans: tuple[dict[str, Any], dict[str, Any]]
    tag: str = field(default_factory=lambda: new_id("w")[2:14])

    @property
    def sub_id(self) -> str:
        return f"sub_{self.tag}"

    @property
    def customer_id(self) -> str:
        return f"cus_{self.tag}"


def story(world: World, life: Lifecycle) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events Stripe sends for `life`, in the order it sends them, and the subscription's
    states (the last is Stripe's final state)."""
    now = {"plan": world.plans[0], "month": 0, "status": "active", "cancel": False, "at": None}
    states: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []

    def state() -> dict[str, Any]:
        snapshot = subscription_object(
            world.sub_id,
            world.customer_id,
            now["plan"],
            status=now["status"],
            billing_period=life.billing_period,
            month_index=now["month"],
            organisation_id=world.org_id,
            cancel_at_period_end=now["cancel"],
            canceled_at=now["at"],
        )
        states.append(snapshot)
        return snapshot

    def emit(event_type: str, obj: dict[str, Any]) -> None:
        name = f"evt_{world.tag}_{len(events):02d}"
        events.append(event_object(event_type, obj, event_id=name, created=T0 + len(events)))

    def invoice(number: int, billed: tuple[int, int], created: int) -> dict[str, Any]:
        return invoice_object(
            f"in_{world.tag}_{number}",
            world.sub_id,
            world.customer_id,
            billed=billed,
            created=created,
            metered_price=now["plan"]["stripe_metered_price_id"],
        )

    emit("customer.subscription.created", state())
    session = checkout_session_object(
        world.sub_id,
        world.customer_id,
        organisation_id=world.org_id,
        plan=world.plans[0],
        billing_period=life.billing_period,
    )
    emit("checkout.session.completed", session)
    emit("invoice.paid", invoice(0, (T0, T0), T0))
    for renewal in range(1, life.renewals + 1):
        now["month"] = renewal
        bill = invoice(renewal, month(renewal - 1), month(renewal)[0])
        if life.payment_failure and renewal == life.renewals:
            now["status"] = "past_due"
            emit("invoice.payment_failed", {**bill, "status": "open"})
            emit("customer.subscription.updated", state())
            now["status"] = "active"
        emit("invoice.paid", bill)
        emit("customer.subscription.updated", state())
    if life.plan_change:
        now["plan"] = world.plans[1]
        emit("customer.subscription.updated", state())
    if life.ending == "at_period_end":
        now["cancel"] = True
        emit("customer.subscription.updated", state())
    elif life.ending == "now":
        now["status"], now["at"] = "canceled", month(now["month"])[0] + 86_400
        emit("customer.subscription.deleted", state())
    return events, states


def rows(db: Any, world: World) -> dict[str, Any]:
    """What a user would check, with the world's own ids taken out."""

    def untag(value: Any) -> Any:
        return value.replace(world.tag, "*") if isinstance(value, str) else value

    sub = db.execute(
        "select s.status, s.plan_id, s.billing_period, s.current_period_start,"
        " s.current_period_end, s.cancel_at_period_end, s.canceled_at, s.stripe_customer_id,"
        " o.stripe_customer_id as organisation_customer"
        " from subscriptions s join organisations o on o.id = s.organisation_id"
        " where s.stripe_subscription_id = %s",
        (world.sub_id,),
    ).fetchone()
    cycles = [
        (
            c["period_start"],
            c["period_end"],
            c["included_minutes"],
            c["minutes_used"],
            c["status"],
            untag(c["stripe_invoice_id"]),
        )
        for c in cycle_rows(db, world.sub_id)
    ]
    audit = sorted(
        (a["action"], json.dumps(a["details"]["before"]), json.dumps(a["details"]["after"]))
        for a in db.execute(
            "select action, details from audit_log where organisation_id = %s", (world.org_id,)
        )
    )
    events = sorted(
        (untag(e["id"]), e["status"], e["error"])
        for e in db.execute(
            "select id, status, error from stripe_events where id like %s", (f"evt_{world.tag}_%",)
        )
    )
    return {
        "subscription": {key: untag(value) for key, value in (sub or {}).items()},
        "cycles": cycles,
        "audit": audit,
        "events": events,
    }


@pytest.fixture
def plans(make_plan: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return make_plan(), make_plan(included_minutes=2000, sort_order=2)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(life=lifecycles, data=st.data())
def test_any_delivery_order_with_any_duplicates_ends_in_the_in_order_rows(
    db, webhook, stripe_api, make_org, plans, life, data
):
    in_order, shuffled = World(str(make_org()["id"]), plans), World(str(make_org()["id"]), plans)
    deliveries: dict[str, list[dict[str, Any]]] = {}
    for world in (in_order, shuffled):
        events, states = story(world, life)
        # A handler fetches the subscription as Stripe has it when it runs: after the whole
        # story, that is the final state, whatever order the events come in.
        stripe_api.subscriptions[world.sub_id] = states[-1]
        deliveries[world.tag] = events
    events = deliveries[shuffled.tag]
    repeats = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=8), label="repeats")
    order = data.draw(st.permutations(list(range(len(events))) + repeats), label="order")

    for event in deliveries[in_order.tag]:
        assert deliver(webhook, event).get_json()["status"] == "processed"
    for index in order:
        response = deliver(webhook, events[index])
        assert response.status_code == 200
        assert response.get_json()["status"] in {"processed", "duplicate"}

    expected = rows(db, in_order)
    assert rows(db, shuffled) == expected
    # ... and those rows are Stripe's final state.
    final = stripe_api.subscriptions[in_order.sub_id]
    sub = expected["subscription"]
    assert sub["status"] == final["status"]
    assert sub["plan_id"] == plans[1 if life.plan_change else 0]["id"]
    assert sub["billing_period"] == life.billing_period
    assert sub["cancel_at_period_end"] is (life.ending == "at_period_end")
    assert sub["organisation_customer"] == sub["stripe_customer_id"] == "cus_*"
    if life.ending == "now":
        # Every handler saw it canceled: no cycle was ever opened for it.
        assert expected["cycles"] == []
    else:
        [cycle] = expected["cycles"]
        assert cycle[:2] == tuple(map(ts, month(life.renewals))) and cycle[4] == "active"
    assert {status for _, status, _ in expected["events"]} == {"processed"}
    assert [action for action, _, _ in expected["audit"]] == ["subscription.created"]


# --- racing handlers: an older fetch never overwrites a newer one -----------------------------


@pytest.fixture
def database(function_env: dict[str, str]) -> Any:
    return get_database(get_settings())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(life=lifecycles, data=st.data())
def test_fetches_applied_in_any_order_leave_the_latest_fetch(
    db, database, make_org, plans, life, data
):
    """Handlers fetch while the story unfolds (each fetch sees the state of its moment) and commit
    in any order, some twice. The row ends as the latest fetch saw it, never older."""
    world = World(str(make_org()["id"]), plans)
    _, states = story(world, life)
    seen = sorted(data.draw(st.lists(st.integers(0, len(states) - 1), max_size=10), label="seen"))
    seen.append(len(states) - 1)  # some handler runs after the last change
    start = datetime.now(UTC)
    fetches = [Fetched(states[i], start + timedelta(milliseconds=n)) for n, i in enumerate(seen)]
    order = data.draw(st.permutations(list(range(len(fetches))) * 2), label="order")

    for index in order:
        apply_state(fetches[index], database=database)

    sub = subscription_row(db, world.sub_id)
    final = states[-1]
    assert sub["status"] == final["status"]
    assert sub["plan_id"] == plans[1 if life.plan_change else 0]["id"]
    assert sub["cancel_at_period_end"] is final["cancel_at_period_end"]
    assert sub["current_period_end"] == ts(final["items"]["data"][0]["current_period_end"])
    assert sub["stripe_state_at"] == fetches[-1].fetched_at
    cycles = cycle_rows(db, world.sub_id)
    active = [c for c in cycles if c["status"] == "active"]
    if life.ending == "now":
        assert active == []
    else:
        assert [(c["period_start"], c["period_end"]) for c in active] == [
            tuple(map(ts, month(life.renewals)))
        ]
    assert all(c["period_start"] <= ts(month(life.renewals)[0]) for c in cycles)


# --- the same rules, one at a time -------------------------------------------------------------


@pytest.fixture
def live(db, database, make_org, plans) -> tuple[World, datetime]:
    """A world whose subscription was applied as it is in month 1, past due, at `t`."""
    world = World(str(make_org()["id"]), plans)
    t = datetime.now(UTC)
    newer = subscription_object(
        world.sub_id,
        world.customer_id,
        plans[0],
        status="past_due",
        month_index=1,
        organisation_id=world.org_id,
    )
    apply_state(Fetched(newer, t), database=database)
    return world, t


def test_an_older_state_applied_after_a_newer_one_changes_nothing(db, database, plans, live):
    world, t = live
    before = rows(db, world)
    older = subscription_object(
        world.sub_id,
        world.customer_id,
        plans[1],
        status="active",
        month_index=0,
        organisation_id=world.org_id,
    )

    result = apply_state(Fetched(older, t - timedelta(seconds=1)), database=database)

    assert result["applied"] is False
    assert rows(db, world) == before
    assert subscription_row(db, world.sub_id)["status"] == "past_due"


def test_the_same_state_twice_changes_nothing(db, database, plans, live):
    world, t = live
    before = rows(db, world)
    same = subscription_object(
        world.sub_id,
        world.customer_id,
        plans[0],
        status="past_due",
        month_index=1,
        organisation_id=world.org_id,
    )

    assert apply_state(Fetched(same, t), database=database)["applied"] is False
    assert apply_state(Fetched(same, t + timedelta(seconds=1)), database=database)["changed"] == []
    assert rows(db, world) == before


def test_a_canceled_subscription_never_comes_back_even_with_a_newer_stamp(
    db, database, plans, live
):
    world, t = live
    canceled = subscription_object(
        world.sub_id,
        world.customer_id,
        plans[0],
        status="canceled",
        month_index=1,
        organisation_id=world.org_id,
        canceled_at=month(1)[0] + 60,
    )
    apply_state(Fetched(canceled, t + timedelta(seconds=1)), database=database)
    active = subscription_object(
        world.sub_id,
        world.customer_id,
        plans[0],
        status="active",
        month_index=2,
        organisation_id=world.org_id,
    )

    result = apply_state(Fetched(active, t + timedelta(seconds=2)), database=database)

    assert result["applied"] is False
    sub = subscription_row(db, world.sub_id)
    assert sub["status"] == "canceled" and sub["current_period_start"] == ts(month(1)[0])
    assert [c["status"] for c in cycle_rows(db, world.sub_id)] == ["closed"]
    assert all(c["period_start"] < ts(T0 + 2 * MONTH) for c in cycle_rows(db, world.sub_id))
