"""Billing meter events: recorded with Stripe's checks, canceled by adjustments, taken by the
invoice that bills them; the stand-in's ways to lose one or to take one nobody sent.

`POST /v1/billing/meter_events` checks synchronously what Stripe checks with the request
(parameters, identifier length and uniqueness, the timestamp window) and answers 200. What Stripe
validates asynchronously (a meter for the event name, an active one, the customer, the value)
depends on how the stand-in was created: by default (`async_meter_validation=True`, Stripe's
behaviour) it accepts it, records nothing, and reports it in the next error report
(meter_errors.py); with `async_meter_validation=False` it refuses such an event with a 400. Events from the v2 stream (meter_stream.py) are always validated so.

Identifiers are unique for the process's life (Stripe: at least a rolling 24 hours), shared by
v1 and the stream; an invalid or dropped event does not take its identifier (it may be resent).

`POST /v1/billing/meter_event_adjustments` (`type=cancel`, `cancel[identifier]`) cancels an
event received less than 24 hours ago (on the stand-in's clock, state.State.now): it leaves the
summaries and is not billed by a later invoice; an invoice that already billed it keeps it (as
Stripe: a finalized invoice is not corrected).

Control routes (JSON bodies):

    POST /_standin/meter_events/drop_next   {"count": n}: the next n events (v1 or stream) are
                                            answered as usual and silently lost
    POST /_standin/meter_events/stray       {"customer", "value", "timestamp"?, "event_name"?,
                                            "identifier"?}: Stripe holds an event nobody sent
"""

from __future__ import annotations

import re

from .catalog import find_meter
from .meter_errors import record_error
from .params import as_int, as_object, required
from .state import METER_EVENT_WINDOW, Call, Json, State, StripeError, api, control, fixture, new_id

# Stripe: "You can only cancel events within 24 hours of Stripe receiving them."
CANCEL_WINDOW = 86400
VALUE = re.compile(r"[0-9]+")  # the stand-in bills whole, non-negative quantities


def create_meter_event(call: Call) -> Json:
    p, st = call.params, call.state
    event_name = required(p, "event_name")
    if not st.async_meter_validation and find_meter(st, event_name) is None:
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
    if meter := None if st.async_meter_validation else find_meter(st, event_name):
        check_synchronously(st, meter, payload)
    now = st.now()
    timestamp = as_int(p, "timestamp") or now
    if error := timestamp_error(timestamp, now):
        code, message = error
        raise StripeError(400, message, code=code, param="timestamp")
    event = fixture(
        "billing.meter_event",
        created=now,
        event_name=event_name,
        identifier=identifier,
        livemode=False,
        payload={k: str(v) for k, v in payload.items()},
        timestamp=timestamp,
    )
    ingest(st, event)
    return event


def check_synchronously(st: State, meter: Json, payload: Json) -> None:
    """The stand-in's default: the customer and the value refused with a 400 at once."""
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    customer_id = required(payload, customer_key, "payload")
    st.get("customer", customer_id, f"payload[{customer_key}]")
    if not VALUE.fullmatch(str(required(payload, value_key, "payload"))):
        message = f"Invalid payload[{value_key}]: it must be a non-negative integer string."
        raise StripeError(400, message, param=f"payload[{value_key}]")


def timestamp_error(timestamp: int, now: int) -> tuple[str, str] | None:
    if timestamp < now - METER_EVENT_WINDOW[0]:
        return "timestamp_too_far_in_past", "Timestamp must be within the past 35 calendar days."
    if timestamp > now + METER_EVENT_WINDOW[1]:
        return "timestamp_in_future", "Timestamp must be at most 5 minutes in the future."
    return None


def ingest(st: State, event: Json, *, check_timestamp: bool = False) -> str:
    """Take an accepted event: "recorded", "dropped" (drop_next), "invalid" (reported later) or
    "duplicate" (the stream ignores an identifier already recorded)."""
    identifier = event["identifier"]
    if identifier in st.meter_events:
        return "duplicate"
    if st.meter_drops["waiting"] > 0:
        st.meter_drops["waiting"] -= 1
        st.meter_drops["dropped"].append(event)
        return "dropped"
    if error := validation_error(st, event, check_timestamp=check_timestamp):
        meter_id, code, message = error
        record_error(st, meter_id, code, message, identifier, event["created"])
        return "invalid"
    st.meter_events[identifier] = event
    return "recorded"


def validation_error(
    st: State, event: Json, *, check_timestamp: bool
) -> tuple[str | None, str, str] | None:
    """What Stripe's asynchronous validation finds wrong: (meter id or None, code, message)."""
    name, payload = event["event_name"], event["payload"]
    meter = find_meter(st, name)
    if meter is None:
        archived = [m for m in st.store["billing.meter"].values() if m["event_name"] == name]
        if archived:
            message = f"The meter {archived[-1]['id']} for event_name {name} is archived."
            return archived[-1]["id"], "archived_meter", message
        return None, "no_meter", f"No meter was found matching event_name {name}."
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    if not payload.get(customer_key):
        message = f"Customer mapping key {customer_key} not found in payload."
        return meter["id"], "meter_event_no_customer_defined", message
    if payload[customer_key] not in st.store["customer"]:
        message = f"No customer found with id {payload[customer_key]}."
        return meter["id"], "meter_event_customer_not_found", message
    if value_key not in payload:
        message = f"Value key {value_key} not found in payload."
        return meter["id"], "meter_event_value_not_found", message
    if not VALUE.fullmatch(str(payload[value_key])):
        message = f"Value {payload[value_key]!r} is not a whole non-negative number."
        return meter["id"], "meter_event_invalid_value", message
    if check_timestamp and (error := timestamp_error(event["timestamp"], event["created"])):
        return meter["id"], error[0], error[1]
    return None


# ---------------------------------------------------------------- adjustments


def create_adjustment(call: Call) -> Json:
    """Cancel one event by identifier, within 24 hours of its receipt.

    Refused (400): an identifier the stand-in does not hold for `event_name` (resource_missing),
    an event received 24 hours ago or more, and a second cancel of the same identifier
    (resource_already_exists, like a repeated meter event identifier).
    """
    p, st = call.params, call.state
    event_name = required(p, "event_name")
    if required(p, "type") != "cancel":
        message = "Invalid type: must be cancel (time period cancellation is not supported)."
        raise StripeError(400, message, param="type")
    identifier = required(as_object(p, "cancel", required=True), "identifier", "cancel")
    event = st.meter_events.get(identifier)
    if event is None or event["event_name"] != event_name:
        message = f"No meter event with identifier {identifier} for event_name {event_name}."
        raise StripeError(400, message, code="resource_missing", param="cancel[identifier]")
    if identifier in st.canceled:
        message = f"The meter event with identifier {identifier} has already been canceled."
        raise StripeError(400, message, code="resource_already_exists", param="cancel[identifier]")
    if st.now() - int(event["created"]) >= CANCEL_WINDOW:
        message = (
            f"The meter event with identifier {identifier} cannot be canceled: events can only"
            " be canceled within 24 hours of Stripe receiving them."
        )
        raise StripeError(400, message, param="cancel[identifier]")
    st.canceled[identifier] = st.now()
    # Stripe processes an adjustment asynchronously ("pending"); the stand-in applies it now.
    return fixture(
        "billing.meter_event_adjustment",
        cancel={"identifier": identifier},
        event_name=event_name,
        livemode=False,
        status="pending",
        type="cancel",
    )


# ---------------------------------------------------------------- the stand-in's part


def drop_next(call: Call) -> Json:
    """The next `count` (default 1) meter events are accepted and lost, as if never received."""
    count = as_int(call.params, "count") or 1
    call.state.meter_drops["waiting"] += count
    return {"waiting": call.state.meter_drops["waiting"]}


def take_stray(call: Call) -> Json:
    """Stripe holds usage the project never sent: a valid event recorded as received now."""
    p, st = call.params, call.state
    customer = st.get("customer", required(p, "customer"), "customer")
    name = p.get("event_name")
    if name is None:
        names = {
            m["event_name"] for m in st.store["billing.meter"].values() if m["status"] == "active"
        }
        if len(names) != 1:
            raise StripeError(400, "Give event_name: there is not exactly one active meter.")
        name = names.pop()
    meter = find_meter(st, name)
    if meter is None:
        raise StripeError(400, f"No active meter for event_name {name}.", param="event_name")
    value = str(required(p, "value"))
    if not VALUE.fullmatch(value):
        raise StripeError(400, "value must be a whole non-negative number.", param="value")
    identifier = p.get("identifier") or new_id("stray")
    if identifier in st.meter_events:
        raise StripeError(400, f"An event already exists with identifier {identifier}.")
    now = st.now()
    event = fixture(
        "billing.meter_event",
        created=now,
        event_name=name,
        identifier=identifier,
        livemode=False,
        payload={
            meter["customer_mapping"]["event_payload_key"]: customer["id"],
            meter["value_settings"]["event_payload_key"]: value,
        },
        timestamp=as_int(p, "timestamp") or now,
    )
    st.meter_events[identifier] = event
    return event


# ---------------------------------------------------------------- billing


def aggregate(formula: str, values: list[int]) -> int:
    """A meter's formula (sum, count, last) over its events' values, in the order given."""
    if formula == "count":
        return len(values)
    if formula == "last":
        return values[-1] if values else 0
    return sum(values)


def customer_events(st: State, meter: Json, customer_id: str) -> list[tuple[str, Json]]:
    """The meter's events for one customer that count (not canceled), as (identifier, event)."""
    customer_key = meter["customer_mapping"]["event_payload_key"]
    return [
        (identifier, e)
        for identifier, e in st.meter_events.items()
        if e["event_name"] == meter["event_name"]
        and e["payload"].get(customer_key) == customer_id
        and identifier not in st.canceled
    ]


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
    value_key = meter["value_settings"]["event_payload_key"]
    mine = [(i, e) for i, e in customer_events(st, meter, customer_id) if i not in st.billed]
    identifiers = [identifier for identifier, _ in mine]
    values = [int(e["payload"][value_key]) for _, e in mine]
    return identifiers, aggregate(meter["default_aggregation"]["formula"], values)


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
    api(
        "POST",
        "/v1/billing/meter_event_adjustments",
        create_adjustment,
        "event_name type cancel[identifier]",
    ),
    control("POST", "/_standin/meter_events/drop_next", drop_next),
    control("POST", "/_standin/meter_events/stray", take_stray),
]
