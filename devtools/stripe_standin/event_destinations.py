"""API v2 event destinations and events: thin events, kept and delivered to their destinations.

A thin event is a v2 event (`object: "v2.core.event"`, `created` an RFC 3339 string). It is
kept in full (`GET /v2/core/events/{id}` returns it with its `data`) and delivered without its
`data` (the notification `client.parse_event_notification` reads: id, object, type, livemode,
created, context, reason, related_object) to every enabled `webhook_endpoint` destination whose
`event_payload` is `thin` and whose `enabled_events` hold its type (or `*`), signed with that
destination's own secret in Stripe's scheme (`Stripe-Signature: t=...,v1=...`). Destinations
with `event_payload: snapshot` are stored only: v1 events still go to the one webhook URL given
at start (webhooks.py).

The stand-in emits only the meter error reports (meter_errors.py) as thin events.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import time

import httpx

from .params import as_int, metadata, required
from .state import ID, V2_LIST, Call, Json, State, StripeError, iso, new_id, no_such, parse_iso, v2
from .webhooks import sign

log = logging.getLogger("stripe_standin")

INCLUDABLE = ("webhook_endpoint.signing_secret", "webhook_endpoint.url")
NOTIFICATION_FIELDS = (
    "id",
    "object",
    "type",
    "livemode",
    "created",
    "context",
    "reason",
    "related_object",
)

# ---------------------------------------------------------------- event destinations


def create_event_destination(call: Call) -> Json:
    p = call.params
    name, kind = required(p, "name"), required(p, "type")
    payload = required(p, "event_payload")
    if kind != "webhook_endpoint":
        message = "The stand-in delivers to webhook endpoints only: type must be webhook_endpoint."
        raise StripeError(400, message, param="type")
    if payload not in ("snapshot", "thin"):
        raise StripeError(
            400, "Invalid event_payload: must be snapshot or thin.", param="event_payload"
        )
    enabled = required(p, "enabled_events")
    if not isinstance(enabled, list) or not all(isinstance(e, str) for e in enabled):
        raise StripeError(
            400, "Invalid enabled_events: a list of event types.", param="enabled_events"
        )
    if payload == "thin" and p.get("snapshot_api_version"):
        message = "snapshot_api_version is for snapshot events only; do not set it for thin events."
        raise StripeError(400, message, param="snapshot_api_version")
    endpoint = p.get("webhook_endpoint")
    if not isinstance(endpoint, dict):
        raise StripeError(
            400, "Missing required param: webhook_endpoint.", param="webhook_endpoint"
        )
    url = required(endpoint, "url", "webhook_endpoint")
    include = includes(p)
    now = iso(time.time())
    destination = {
        "id": new_id("ed"),
        "object": "v2.core.event_destination",
        "amazon_eventbridge": None,
        "azure_event_grid": None,
        "created": now,
        "description": p.get("description") or "",
        "enabled_events": enabled,
        "event_payload": payload,
        "events_from": p.get("events_from"),
        "livemode": False,
        "metadata": metadata({}, p.get("metadata", {})),
        "name": name,
        "snapshot_api_version": p.get("snapshot_api_version"),
        "status": "enabled",
        "status_details": None,
        "type": kind,
        "updated": now,
        "webhook_endpoint": {"signing_secret": "whsec_" + secrets.token_hex(16), "url": url},
    }
    call.state.put(destination)
    return render(destination, include, created=True)


def includes(p: Json) -> list[str]:
    include = p.get("include") or []
    if not isinstance(include, list) or any(value not in INCLUDABLE for value in include):
        message = f"Invalid include: each value one of {', '.join(INCLUDABLE)}."
        raise StripeError(400, message, param="include")
    return include


def render(destination: Json, include: list[str], *, created: bool = False) -> Json:
    """What the API shows: the URL only when included, the secret only on create when included
    (Stripe: "Public API clients must include webhook_endpoint.signing_secret to receive the
    signing secret"; it cannot be read later)."""
    shown = copy.deepcopy(destination)
    endpoint = shown["webhook_endpoint"]
    if not (created and "webhook_endpoint.signing_secret" in include):
        endpoint["signing_secret"] = None
    if "webhook_endpoint.url" not in include:
        endpoint["url"] = None
    return shown


def list_event_destinations(call: Call) -> Json:
    include = includes(call.params)
    destinations = list(reversed(call.state.store["v2.core.event_destination"].values()))
    limit = max(1, min(as_int(call.params, "limit") or 20, 100))
    data = [render(d, include) for d in destinations[:limit]]
    return {"data": data, **V2_LIST}


def get_event_destination(call: Call, object_id: str) -> Json:
    destination = call.state.get("v2.core.event_destination", object_id, status=404)
    return render(destination, includes(call.params))


def disable_event_destination(call: Call, object_id: str) -> Json:
    return set_status(call, object_id, "disabled")


def enable_event_destination(call: Call, object_id: str) -> Json:
    return set_status(call, object_id, "enabled")


def set_status(call: Call, object_id: str, status: str) -> Json:
    destination = call.state.get("v2.core.event_destination", object_id, status=404)
    destination.update(status=status, updated=iso(time.time()))
    destination["status_details"] = (
        {"disabled": {"reason": "user"}} if status == "disabled" else None
    )
    return render(destination, [])


# ---------------------------------------------------------------- v2 events


def get_event(call: Call, object_id: str) -> Json:
    event = call.state.v2_events.get(object_id)
    if event is None:
        raise no_such("event", object_id, "id", 404)
    return event


def list_events(call: Call) -> Json:
    """Newest first; `object_id` (the related object), `types`, `created[gt|gte|lt|lte]`."""
    p = call.params
    events = list(reversed(call.state.v2_events.values()))
    if object_id := p.get("object_id"):
        events = [e for e in events if (e["related_object"] or {}).get("id") == object_id]
    if types := p.get("types"):
        events = [e for e in events if e["type"] in types]
    bounds = p.get("created") or {}
    tests = {"gt": int.__gt__, "gte": int.__ge__, "lt": int.__lt__, "lte": int.__le__}
    for op, value in bounds.items() if isinstance(bounds, dict) else []:
        limit_at = parse_iso(value, f"created[{op}]")
        events = [e for e in events if tests[op](parse_iso(e["created"], "created"), limit_at)]
    limit = max(1, min(as_int(p, "limit") or 20, 100))
    return {"data": events[:limit], **V2_LIST}


# ---------------------------------------------------------------- emitting and delivering


def emit_thin(call: Call, event_type: str, data: Json, related: Json | None) -> Json:
    """Keep a thin event and queue its delivery to each destination that takes it (under the
    lock; the app delivers outside it)."""
    st = call.state
    now = st_time(st)
    event: Json = {
        "id": new_id("evt"),
        "object": "v2.core.event",
        "context": None,
        "created": iso(now),
        "data": data,
        "livemode": False,
        "reason": None,
        "related_object": related,
        "type": event_type,
    }
    st.v2_events[event["id"]] = event
    targets = [
        {"destination": d["id"], "url": d["webhook_endpoint"]["url"]}
        | {"secret": d["webhook_endpoint"]["signing_secret"]}
        for d in st.store["v2.core.event_destination"].values()
        if d["status"] == "enabled"
        and d["event_payload"] == "thin"
        and (event_type in d["enabled_events"] or "*" in d["enabled_events"])
    ]
    if targets:  # logged like v1 events, with their deliveries
        st.event_log[event["id"]] = {
            "id": event["id"],
            "type": event_type,
            "object_id": (related or {}).get("id"),
            "created": int(now),
            "payload": "thin",
            "deliveries": [],
        }
    notification = {name: copy.deepcopy(event[name]) for name in NOTIFICATION_FIELDS}
    call.thin.append({"notification": notification, "targets": targets})
    return event


def st_time(st: State) -> float:
    """Now on the stand-in's clock, with its fraction of a second (for `created`)."""
    return time.time() + int(st.clock["offset"])


def deliver_thin(state: State, items: list[Json]) -> list[Json]:
    """POST each thin event notification, signed with each destination's secret. Never under
    the lock."""
    results = []
    for item in items:
        notification = item["notification"]
        body = json.dumps(notification)
        for target in item["targets"]:
            result: Json = {
                "event_id": notification["id"],
                "type": notification["type"],
                "destination": target["destination"],
                "status_code": None,
            }
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign(target["secret"], int(time.time()), body),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) local stand-in",
            }
            try:
                reply = httpx.post(target["url"], content=body, headers=headers, timeout=10)
                result["status_code"] = reply.status_code
            except httpx.HTTPError as error:
                result["error"] = f"{type(error).__name__}: {error}"
                log.warning("delivery of %s failed: %s", notification["id"], result["error"])
            with state.lock:
                state.event_log[notification["id"]]["deliveries"].append(result)
            results.append(result)
    return results


DESTINATION = "/v2/core/event_destinations"
ROUTES = [
    v2(
        "POST",
        DESTINATION,
        create_event_destination,
        "name type event_payload enabled_events enabled_events[] webhook_endpoint[url]"
        " description metadata[*]"
        " include[] events_from[] snapshot_api_version",
    ),
    v2("GET", DESTINATION, list_event_destinations, "include[] limit"),
    v2("GET", DESTINATION + ID, get_event_destination, "include[]"),
    v2("POST", DESTINATION + ID + "/disable", disable_event_destination),
    v2("POST", DESTINATION + ID + "/enable", enable_event_destination),
    v2("GET", "/v2/core/events" + ID, get_event),
    v2(
        "GET",
        "/v2/core/events",
        list_events,
        "object_id types[] limit created[gt] created[gte] created[lt] created[lte]",
    ),
]
