"""Billing meter events: recorded with Stripe's checks, taken by the invoice that bills them."""

from __future__ import annotations

import time

from .catalog import find_meter
from .state import (
    METER_EVENT_WINDOW,
    Call,
    Json,
    State,
    StripeError,
    api,
    as_int,
    as_object,
    fixture,
    new_id,
    required,
)


def create_meter_event(call: Call) -> Json:
    p, st = call.params, call.state
    event_name = required(p, "event_name")
    meter = find_meter(st, event_name)
    if meter is None:
        message = f"No active meter found for event_name '{event_name}'."
        raise StripeError(400, message, code="resource_missing", param="event_name")
    identifier = p.get("identifier") or new_id("mev")
    if len(identifier) > 100:
        message = "Invalid identifier: must be at most 100 characters"
        raise StripeError(400, message, param="identifier")
    if identifier in st.meter_events:
        # Stripe keeps identifiers unique for at least 24 hours; here, for the process's life.
        message = f"An event already exists with identifier {identifier}."
        raise StripeError(400, message, code="resource_already_exists", param="identifier")
    payload = as_object(p, "payload", required=True)
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    customer_id = required(payload, customer_key, "payload")
    st.get("customer", customer_id, f"payload[{customer_key}]")
    if not str(required(payload, value_key, "payload")).isdigit():
        message = f"Invalid payload[{value_key}]: it must be a non-negative integer string."
        raise StripeError(400, message, param=f"payload[{value_key}]")
    now = int(time.time())
    timestamp = as_int(p, "timestamp") or now
    if timestamp < now - METER_EVENT_WINDOW[0]:
        message = "Timestamp must be within the past 35 calendar days."
        raise StripeError(400, message, code="timestamp_too_far_in_past", param="timestamp")
    if timestamp > now + METER_EVENT_WINDOW[1]:
        message = "Timestamp must be at most 5 minutes in the future."
        raise StripeError(400, message, code="timestamp_in_future", param="timestamp")
    event = fixture(
        "billing.meter_event",
        created=now,
        event_name=event_name,
        identifier=identifier,
        livemode=False,
        payload={k: str(v) for k, v in payload.items()},
        timestamp=timestamp,
    )
    st.meter_events[identifier] = event
    return event


def take_usage(st: State, customer_id: str, meter_id: str, invoice_id: str) -> int:
    """Unbilled usage of one meter for one customer, marked billed on `invoice_id`.

    Time is simulated by shifting periods, not by the clock, while meter events carry real
    timestamps: so a renewal bills every event received since the previous one (per customer
    and meter) instead of selecting events by timestamp within the period.
    """
    identifiers, usage = unbilled_usage(st, customer_id, meter_id)
    mark_billed(st, identifiers, invoice_id)
    return usage


def unbilled_usage(st: State, customer_id: str, meter_id: str) -> tuple[list[str], int]:
    """The events `take_usage` would take (their identifiers) and their aggregated value."""
    meter = st.store["billing.meter"][meter_id]
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    identifiers, values = [], []
    for identifier, e in st.meter_events.items():
        mine = (e["event_name"], e["payload"].get(customer_key)) == (
            meter["event_name"],
            customer_id,
        )
        if mine and identifier not in st.billed:
            identifiers.append(identifier)
            values.append(int(e["payload"][value_key]))
    formula = meter["default_aggregation"]["formula"]
    if formula == "count":
        return identifiers, len(values)
    if formula == "last":
        return identifiers, values[-1] if values else 0
    return identifiers, sum(values)


def mark_billed(st: State, identifiers: list[str], mark: str) -> None:
    """Record where these events were billed: an invoice, a pending invoice item, or a note."""
    for identifier in identifiers:
        st.billed[identifier] = mark


def move_billed(st: State, old_mark: str, new_mark: str | None) -> None:
    """Events marked `old_mark` re-marked `new_mark` (None: unbilled again, as by a void)."""
    for identifier in [i for i, mark in st.billed.items() if mark == old_mark]:
        if new_mark is None:
            del st.billed[identifier]
        else:
            st.billed[identifier] = new_mark


ROUTES = [
    api(
        "POST",
        "/v1/billing/meter_events",
        create_meter_event,
        "event_name payload[*] identifier timestamp",
    ),
]
