"""Billing meter event summaries: `GET /v1/billing/meters/{id}/event_summaries`.

One customer's usage on one meter in [start_time, end_time), aggregated by the meter's formula
(sum, count, last) over the events whose `timestamp` falls in it, canceled events excluded; with
`value_grouping_window` (`hour`, `day`) one summary per UTC hour or day of the range, empty ones
included (value 0), newest first, paged with `limit` (1-100, default 10), `starting_after` and
`ending_before` (summary ids, stable for a meter, customer and window). Times must lie on minute
boundaries (on hour or UTC day boundaries with that grouping), or Stripe answers 400. Stripe's
summaries are eventually consistent (a minute or so behind); the stand-in's are immediate.

Choosing windows in a test: meter events carry real timestamps (the wall clock, or what the
caller sent; `/_standin/clock/advance` moves the clock), while renewals move subscription
periods ahead of the wall clock without moving any timestamp, and bill every unbilled event
whatever its timestamp (meter_events.take_usage). So a summary agrees with an invoice only over
the events' real timestamps: query from the first event's minute (floored) to the minute after
the last one (`(t // 60 + 1) * 60`), or, with a subscription that has not been advanced yet, its
current period (`current_period_start` floored to the minute, `current_period_end` rounded up),
which holds the wall clock. After an /advance the current period lies in the future: a window
built from it finds none of the events sent meanwhile.
"""

from __future__ import annotations

import hashlib

from .meter_events import aggregate, customer_events
from .params import as_int, required
from .state import ID, Call, Json, StripeError, api, fixture

GROUPING = {"hour": 3600, "day": 86400}


def list_event_summaries(call: Call, object_id: str) -> Json:
    p, st = call.params, call.state
    meter = st.get("billing.meter", object_id, status=404)
    customer = st.get("customer", required(p, "customer"), "customer")
    start = as_int(p, "start_time", required=True) or 0
    end = as_int(p, "end_time", required=True) or 0
    grouping = p.get("value_grouping_window")
    if grouping is not None and grouping not in GROUPING:
        message = "Invalid value_grouping_window: must be one of day or hour"
        raise StripeError(400, message, param="value_grouping_window")
    step = GROUPING.get(grouping or "", 60)
    unit = {60: "minute", 3600: "hour", 86400: "day (UTC)"}[step]
    for name, value in (("start_time", start), ("end_time", end)):
        if value % step:
            message = f"Invalid {name}: {value} must be aligned with {unit} boundaries."
            raise StripeError(400, message, param=name)
    if start >= end:
        raise StripeError(400, "start_time must be before end_time.", param="start_time")
    events = customer_events(st, meter, customer["id"])
    if grouping:
        windows = [(t, min(t + step, end)) for t in range(start, end, step)]
        summaries = [summary(events, meter, customer["id"], w) for w in reversed(windows)]
    else:
        summaries = [summary(events, meter, customer["id"], (start, end))]
    return page(f"/v1/billing/meters/{meter['id']}/event_summaries", summaries, p)


def summary(
    events: list[tuple[str, Json]], meter: Json, customer: str, window: tuple[int, int]
) -> Json:
    start, end = window
    value_key = meter["value_settings"]["event_payload_key"]
    inside = sorted(
        (e for _, e in events if start <= int(e["timestamp"]) < end),
        key=lambda e: (int(e["timestamp"]), int(e["created"])),
    )
    values = [int(e["payload"][value_key]) for e in inside]
    digest = hashlib.sha256(f"{meter['id']}:{customer}:{start}:{end}".encode()).hexdigest()
    return fixture(
        "billing.meter_event_summary",
        id="mtrusg_" + digest[:32],
        aggregated_value=aggregate(meter["default_aggregation"]["formula"], values),
        start_time=start,
        end_time=end,
        livemode=False,
        meter=meter["id"],
    )


def page(url: str, items: list[Json], p: Json) -> Json:
    """One page of `items` as Stripe pages lists: `limit`, `starting_after`, `ending_before`."""
    limit = max(1, min(as_int(p, "limit") or 10, 100))
    ids = [item["id"] for item in items]
    for cursor in ("starting_after", "ending_before"):
        if p.get(cursor) and p[cursor] not in ids:
            message = f"Invalid {cursor}: no summary {p[cursor]} in this list."
            raise StripeError(400, message, code="resource_missing", param=cursor)
    if p.get("starting_after"):
        rest = items[ids.index(p["starting_after"]) + 1 :]
        data, has_more = rest[:limit], len(rest) > limit
    elif p.get("ending_before"):
        before = items[: ids.index(p["ending_before"])]
        data, has_more = before[-limit:], len(before) > limit
    else:
        data, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


ROUTES = [
    api(
        "GET",
        "/v1/billing/meters" + ID + "/event_summaries",
        list_event_summaries,
        "customer start_time end_time value_grouping_window limit starting_after ending_before",
    ),
]
