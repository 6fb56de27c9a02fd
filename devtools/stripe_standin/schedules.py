"""Subscription schedules: a subscription's next phases, entered at its renewals.

Made from a subscription (`from_subscription` only): one phase holding its current items, from
its current period's start to the end of its longest item period (a yearly flat fee's year on a
yearly + monthly metered subscription). Updating a schedule sets its current and future phases
(items with price and quantity; an end as `end_date` or `duration`; `iterations` is gone since
2025-09-30.clover and refused as unknown); the current phase keeps its start and its items (the
stand-in changes the subscription's items only at a phase boundary).

At the renewal (renewals.py) whose boundary reaches the current phase's end, the next phase's
items replace the subscription's: an item whose price stays keeps its id and period, others go
and new ones start their periods at the boundary; the ended period's metered usage is billed at
the old price on that renewal, the new prices bill from the new period on. An item removed
before its own period ends is closed as a plan change would (plan_changes.close_item, with the
next phase's proration_behavior). After the last phase, end_behavior `release` releases the
schedule (status released, subscription.schedule null) and `cancel` ends the subscription
(schedule status canceled). Time moves only by renewals here: a phase end set between two
renewals takes effect at the next one.
"""

from __future__ import annotations

import copy
from typing import Any

from .catalog import line_price
from .params import as_bool, as_int, as_object, metadata, required
from .prorations import Change, close_item, record
from .state import (
    ID,
    Call,
    Json,
    State,
    StripeError,
    add_interval,
    api,
    fixture,
    missing,
    new_id,
    sim_now,
)
from .subscriptions import PRORATION_BEHAVIORS, check_choice, check_live, new_item

END_BEHAVIORS = {"release", "cancel"}
LIVE = ("not_started", "active")


def create_schedule(call: Call) -> Json:
    """A schedule for an existing subscription, with its current items as the first phase."""
    st = call.state
    if not call.params.get("from_subscription"):
        message = "The stand-in only creates subscription schedules with from_subscription."
        raise StripeError(400, message, code="parameter_missing", param="from_subscription")
    sub = st.get("subscription", call.params["from_subscription"], "from_subscription")
    check_live(sub)
    if sub["schedule"]:
        message = (
            "You cannot migrate a subscription that is already attached to a schedule:"
            f" `{sub['schedule']}`."
        )
        raise StripeError(400, message, param="from_subscription")
    items = sub["items"]["data"]
    start = min(item["current_period_start"] for item in items)
    end = max(item["current_period_end"] for item in items)
    phase_items = [(item["price"], item["quantity"]) for item in items]
    settings = fixture("subscription_schedule")["default_settings"]
    settings.update(transfer_data=None, billing_thresholds=None)
    settings["automatic_tax"].update(liability=None)
    schedule = fixture(
        "subscription_schedule",
        id=new_id("sub_sched"),
        created=sim_now(sub),
        customer=sub["customer"],
        subscription=sub["id"],
        status="active",
        current_phase={"start_date": start, "end_date": end},
        phases=[new_phase(sub, phase_items, (start, end), "create_prorations")],
        end_behavior="release",
        metadata={},
        billing_mode=copy.deepcopy(sub["billing_mode"]),
        default_settings=settings,
        unset="application canceled_at completed_at released_at released_subscription"
        " test_clock customer_account",
    )
    sub["schedule"] = schedule["id"]
    call.emit("customer.subscription.updated", sub)
    return st.put(schedule)


def get_schedule(call: Call, object_id: str) -> Json:
    return call.state.get("subscription_schedule", object_id, status=404)


def update_schedule(call: Call, object_id: str) -> Json:
    """phases (current and future), end_behavior, proration_behavior, metadata."""
    p, st = call.params, call.state
    schedule = copy.deepcopy(st.get("subscription_schedule", object_id, status=404))
    check_status(schedule, "update")
    sub = st.store["subscription"][schedule["subscription"]]
    end_behavior = check_choice(p, "end_behavior", END_BEHAVIORS)
    check_choice(p, "proration_behavior", PRORATION_BEHAVIORS)
    if "phases" in p:
        current = current_index(schedule)
        past = schedule["phases"][:current]
        schedule["phases"] = past + build_phases(st, sub, schedule, p["phases"])
        first = schedule["phases"][current]
        schedule["current_phase"] = {
            "start_date": first["start_date"],
            "end_date": first["end_date"],
        }
    if end_behavior:
        schedule["end_behavior"] = end_behavior
    if "metadata" in p:
        schedule["metadata"] = metadata(schedule["metadata"], p["metadata"])
    return st.put(schedule)


def release_schedule(call: Call, object_id: str) -> Json:
    """Stop the schedule now; the subscription carries on as it is."""
    st = call.state
    schedule = st.get("subscription_schedule", object_id, status=404)
    as_bool(call.params, "preserve_cancel_date")  # a boolean, as Stripe checks
    check_status(schedule, "release")
    sub = st.store["subscription"][schedule["subscription"]]
    release(schedule, sub, sim_now(sub))
    call.emit("customer.subscription.updated", sub)
    return schedule


def check_status(schedule: Json, verb: str) -> None:
    if schedule["status"] not in LIVE:
        message = (
            f"You cannot {verb} a subscription schedule that is currently in the"
            f" `{schedule['status']}` status. It must be in one of the following statuses:"
            " `not_started`, `active`."
        )
        raise StripeError(400, message)


def build_phases(st: State, sub: Json, schedule: Json, given: Any) -> list[Json]:
    """The phases as sent: the first is the current one (same start, same items)."""
    if not isinstance(given, list) or not given:
        raise StripeError(400, "Invalid array", param="phases")
    phases: list[Json] = []
    start = schedule["current_phase"]["start_date"]
    for i, phase in enumerate(given):
        prefix = f"phases[{i}]"
        if not isinstance(phase, dict):
            raise StripeError(400, "Invalid object", param=prefix)
        if i == 0 and as_int(phase, "start_date", required=True) != start:
            message = "You can not modify the start date of the current phase."
            raise StripeError(400, message, param=f"{prefix}[start_date]")
        if i and "start_date" in phase and as_int(phase, "start_date") != start:
            message = "A phase must start when the phase before it ends."
            raise StripeError(400, message, param=f"{prefix}[start_date]")
        items = phase_items(st, phase, prefix)
        end = phase_end(phase, start, items, prefix, last=i == len(given) - 1)
        proration = check_choice(phase, "proration_behavior", PRORATION_BEHAVIORS, prefix)
        phases.append(new_phase(sub, items, (start, end), proration or "create_prorations"))
        start = end
    current = {item["price"]["id"]: item["quantity"] for item in sub["items"]["data"]}
    if {item["price"]: item["quantity"] for item in phases[0]["items"]} != current:
        message = (
            "The stand-in changes a subscription's items only at a phase boundary: phases[0]"
            " must hold the subscription's current items (update the subscription instead)."
        )
        raise StripeError(400, message, param="phases[0][items]")
    return phases


def phase_items(st: State, phase: Json, prefix: str) -> list[tuple[Json, int | None]]:
    given = phase.get("items")
    if not isinstance(given, list) or not given:
        raise missing(f"{prefix}[items]")
    items: list[tuple[Json, int | None]] = []
    for j, item in enumerate(given):
        where = f"{prefix}[items][{j}]"
        if not isinstance(item, dict):
            raise StripeError(400, "Invalid object", param=where)
        price = st.get("price", required(item, "price", where), f"{where}[price]")
        line = {"price": price["id"], "quantity": item.get("quantity")}
        metered = (price["recurring"] or {}).get("usage_type") == "metered"
        if line["quantity"] is None and not metered:
            line["quantity"] = "1"  # Stripe's default for a licensed price in a phase
        line_price(st, {k: v for k, v in line.items() if v is not None}, where)
        if not price["recurring"]:
            message = "A phase item needs a recurring price (one-time: add_invoice_items)."
            raise StripeError(400, message, param=f"{where}[price]")
        if any(price["id"] == other["id"] for other, _ in items):
            message = f"Cannot add multiple phase items with the same price: {price['id']}"
            raise StripeError(400, message, param=f"{where}[price]")
        items.append((price, as_int(line, "quantity")))
    return items


def phase_end(
    phase: Json, start: int, items: list[tuple[Json, Any]], prefix: str, *, last: bool
) -> int:
    """end_date, or start + duration; a last phase without either lasts its longest interval."""
    duration = as_object(phase, "duration")
    if "end_date" in phase and duration:
        message = "You may only specify one of these parameters: duration, end_date."
        raise StripeError(400, message, param=f"{prefix}[duration]")
    if duration:
        unit = check_choice(
            duration, "interval", {"day", "week", "month", "year"}, f"{prefix}[duration]"
        )
        if unit is None:
            raise missing(f"{prefix}[duration][interval]")
        return add_interval(start, unit, as_int(duration, "interval_count") or 1)
    if "end_date" in phase:
        end = as_int(phase, "end_date", required=True)
        if end is None or end <= start:
            message = "The end_date of a phase must be after its start_date."
            raise StripeError(400, message, param=f"{prefix}[end_date]")
        return end
    if not last:
        raise missing(f"{prefix}[end_date]")
    ends = [
        add_interval(start, p["recurring"]["interval"], p["recurring"]["interval_count"])
        for p, _ in items
    ]
    return max(ends)


def new_phase(
    sub: Json, items: list[tuple[Json, Any]], period: tuple[int, int], proration: str
) -> Json:
    phase: Json = fixture("subscription_schedule")["phases"][0]
    phase.update(
        start_date=period[0],
        end_date=period[1],
        currency=sub["currency"],
        proration_behavior=proration,
        items=[
            {
                "billing_thresholds": None,
                "discounts": [],
                "metadata": {},
                "plan": price["id"],
                "price": price["id"],
                "quantity": quantity,
                "tax_rates": [],
            }
            for price, quantity in items
        ],
        add_invoice_items=[],
        billing_thresholds=None,
        invoice_settings=None,
        metadata={},
        transfer_data=None,
    )
    return phase


def current_index(schedule: Json) -> int:
    start = schedule["current_phase"]["start_date"]
    return next(i for i, phase in enumerate(schedule["phases"]) if phase["start_date"] == start)


def release(schedule: Json, sub: Json, at: int) -> None:
    schedule.update(
        status="released",
        released_at=at,
        released_subscription=sub["id"],
        subscription=None,
        current_phase=None,
    )
    sub["schedule"] = None


# ---------------------------------------------------------------- at a renewal (renewals.py)


def due_schedule(st: State, sub: Json, boundary: int) -> Json | None:
    """The subscription's active schedule when this renewal ends its current phase."""
    schedule = st.store["subscription_schedule"].get(sub["schedule"] or "")
    if schedule is None or schedule["status"] != "active":
        return None
    return schedule if boundary >= schedule["current_phase"]["end_date"] else None


def ends_subscription(schedule: Json) -> bool:
    """Whether ending the current phase ends the subscription (last phase, end_behavior cancel)."""
    last = current_index(schedule) == len(schedule["phases"]) - 1
    return last and schedule["end_behavior"] == "cancel"


def enter_next_phase(st: State, sub: Json, schedule: Json, boundary: int) -> None:
    """The next phase's items replace the subscription's at `boundary`; or the schedule ends."""
    index = current_index(schedule)
    if index == len(schedule["phases"]) - 1:
        if schedule["end_behavior"] == "release":
            release(schedule, sub, boundary)
        else:
            schedule.update(status="canceled", canceled_at=boundary, current_phase=None)
        return
    phase = schedule["phases"][index + 1]
    wanted = {item["price"]: item["quantity"] for item in phase["items"]}
    change = Change(st, sub, boundary, boundary, phase["proration_behavior"])
    kept = []
    for item in sub["items"]["data"]:
        if item["price"]["id"] in wanted:
            if item["quantity"] is not None:
                item["quantity"] = wanted[item["price"]["id"]]
            kept.append(item)
        elif item["current_period_end"] > boundary:  # leaves before its own period ends
            close_item(change, item)
    have = {item["price"]["id"] for item in kept}
    added = [
        new_item(sub["id"], st.store["price"][price], quantity, boundary)
        for price, quantity in wanted.items()
        if price not in have
    ]
    sub["items"]["data"] = kept + added
    record(change)
    schedule["current_phase"] = {"start_date": phase["start_date"], "end_date": phase["end_date"]}


ROUTES = [
    api("POST", "/v1/subscription_schedules", create_schedule, "from_subscription"),
    api("GET", "/v1/subscription_schedules" + ID, get_schedule),
    api(
        "POST",
        "/v1/subscription_schedules" + ID,
        update_schedule,
        "end_behavior proration_behavior metadata[*] phases[][items][][price]"
        " phases[][items][][quantity] phases[][start_date] phases[][end_date]"
        " phases[][duration][interval] phases[][duration][interval_count]"
        " phases[][proration_behavior]",
    ),
    api(
        "POST",
        "/v1/subscription_schedules" + ID + "/release",
        release_schedule,
        "preserve_cancel_date",
    ),
]
