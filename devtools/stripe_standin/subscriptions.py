"""Subscriptions and their items: retrieve, add an item, cancel (updates: plan_changes.py)."""

from __future__ import annotations

import copy
from typing import Any

from .catalog import line_price
from .params import as_bool, as_int, as_object, metadata, param_name, required
from .state import (
    ID,
    Call,
    Json,
    State,
    StripeError,
    api,
    control,
    fixture,
    new_id,
    period_end_after,
    sim_now,
)

PRORATION_BEHAVIORS = {"create_prorations", "none", "always_invoice"}


CANCELLATION_FEEDBACK = {
    "customer_service",
    "low_quality",
    "missing_features",
    "other",
    "switched_service",
    "too_complex",
    "too_expensive",
    "unused",
}


def new_item(sub_id: str, price: Json, quantity: int | None, start: int) -> Json:
    recurring = price["recurring"]
    plan = fixture("subscription_item")["plan"]  # the legacy mirror of the price
    plan.update({k: v for k, v in (price | recurring).items() if k in plan and k != "object"})
    plan.update(amount=price["unit_amount"], amount_decimal=price["unit_amount_decimal"])
    plan["transform_usage"] = None
    return fixture(
        "subscription_item",
        id=new_id("si"),
        created=start,
        subscription=sub_id,
        price=copy.deepcopy(price),
        plan=plan,
        quantity=None if recurring["usage_type"] == "metered" else quantity,
        metadata={},
        current_period_start=start,
        current_period_end=period_end_after(start, recurring, start),
        unset="billing_thresholds",
    )


def add_item(st: State, sub: Json, line: Json, prefix: str) -> Json:
    price = line_price(st, line, prefix)
    if not price["recurring"]:
        message = "A subscription item needs a recurring price."
        raise StripeError(400, message, param=param_name(prefix, "price"))
    if any(item["price"]["id"] == price["id"] for item in sub["items"]["data"]):
        message = f"Cannot add multiple subscription items with the same price: {price['id']}"
        raise StripeError(400, message, param=param_name(prefix, "price"))
    item = new_item(sub["id"], price, as_int(line, "quantity"), sim_now(sub))
    sub["items"]["data"].append(item)
    return item


def check_live(sub: Json) -> None:
    if sub["status"] == "canceled":
        message = "A canceled subscription can only update its cancellation_details and metadata."
        raise StripeError(400, message)


def check_proration(p: Json) -> None:
    check_choice(p, "proration_behavior", PRORATION_BEHAVIORS)


def check_choice(p: Json, name: str, choices: set[str], prefix: str = "") -> Any:
    """The value of an enum parameter (None when absent), refused when not one of `choices`."""
    value = p.get(name)
    if value is not None and value not in choices:
        param = param_name(prefix, name)
        message = f"Invalid {param}: must be one of {', '.join(sorted(choices))}"
        raise StripeError(400, message, param=param)
    return value


def item_anchor(st: State, item: Json) -> int:
    """Where an item's periods are counted from: its creation, or its last interval change."""
    clock: Json = st.item_clocks.get(item["id"], {})
    return int(clock["anchor"] if "anchor" in clock else item["created"])


def usage_start(st: State, item: Json) -> int:
    """Where the item's unbilled metered usage starts: its period start, or a later price change."""
    moved = st.item_clocks.get(item["id"], {}).get("usage_start", 0)
    return max(int(item["current_period_start"]), int(moved))


def set_cancel_at_period_end(sub: Json, cancel: bool) -> None:
    ends = [item["current_period_end"] for item in sub["items"]["data"]]
    sub["cancel_at_period_end"] = cancel
    sub["cancel_at"] = max(ends) if cancel else None
    sub["canceled_at"] = sim_now(sub) if cancel else None


def get_subscription(call: Call, object_id: str) -> Json:
    return call.state.get("subscription", object_id, status=404)


def create_subscription_item(call: Call) -> Json:
    """Adds an item (e.g. the monthly metered price on a yearly, flexible subscription)."""
    p, st = call.params, call.state
    sub = copy.deepcopy(st.get("subscription", required(p, "subscription"), "subscription"))
    check_live(sub)
    check_proration(p)
    item_metadata = metadata({}, p.get("metadata", {}))
    item = add_item(st, sub, p, "")
    item["metadata"] = item_metadata
    st.put(sub)
    call.emit("customer.subscription.updated", sub)
    return item


def cancel_subscription(call: Call, object_id: str) -> Json:
    """Cancel now: status canceled, canceled_at and ended_at set, subscription.deleted sent.

    invoice_now and prorate are taken (the stand-in makes no final invoice nor proration either
    way); cancellation_details[comment|feedback] are kept, reason cancellation_requested."""
    sub = call.state.get("subscription", object_id, status=404)
    check_live(sub)
    for flag in ("invoice_now", "prorate"):
        as_bool(call.params, flag)  # refuses a value that is not a boolean, as Stripe does
    details = as_object(call.params, "cancellation_details")
    feedback = details.get("feedback") or None
    if feedback is not None and feedback not in CANCELLATION_FEEDBACK:
        choices = ", ".join(sorted(CANCELLATION_FEEDBACK))
        message = f"Invalid cancellation_details[feedback]: must be one of {choices}"
        raise StripeError(400, message, param="cancellation_details[feedback]")
    now = sim_now(sub)
    sub.update(status="canceled", canceled_at=now, ended_at=now, cancel_at=None)
    if schedule := call.state.store["subscription_schedule"].get(sub["schedule"] or ""):
        schedule.update(status="canceled", canceled_at=now, current_phase=None)
    sub["cancellation_details"] = {
        "comment": details.get("comment") or None,
        "feedback": feedback,
        "reason": "cancellation_requested",
    }
    call.emit("customer.subscription.deleted", sub)
    return sub


def cancel_now(call: Call, object_id: str) -> Json:
    sub = cancel_subscription(call, object_id)
    return {"subscription": sub["id"], "status": sub["status"]}


ROUTES = [
    api("GET", "/v1/subscriptions" + ID, get_subscription),
    api(
        "DELETE",
        "/v1/subscriptions" + ID,
        cancel_subscription,
        "invoice_now prorate cancellation_details[comment] cancellation_details[feedback]",
    ),
    api(
        "POST",
        "/v1/subscription_items",
        create_subscription_item,
        "subscription price quantity proration_behavior metadata[*]",
    ),
    control("POST", "/_standin/subscriptions" + ID + "/cancel", cancel_now),
]
