"""Webhooks: the `Stripe-Signature` header, delivery of events, and stored webhook endpoints.

Events are made by `Call.emit` (state.py) and delivered here, signed, to the one webhook URL
given at start; endpoints created through `/v1/webhook_endpoints` are stored, not delivered to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time

import httpx

from .params import as_int, metadata, required
from .state import Call, Json, State, api, fixture, list_object, new_id

log = logging.getLogger("stripe_standin")


def sign(secret: str, timestamp: int, body: str) -> str:
    """The `Stripe-Signature` header: HMAC-SHA256 over "{t}.{body}", exactly like Stripe."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def create_webhook_endpoint(call: Call) -> Json:
    p = call.params
    endpoint = fixture(
        "webhook_endpoint",
        id=new_id("we"),
        created=int(time.time()),
        url=required(p, "url"),
        enabled_events=required(p, "enabled_events"),
        api_version=p.get("api_version"),
        description=p.get("description"),
        metadata=metadata({}, p.get("metadata", {})),
    )
    call.state.put(endpoint)
    return {**endpoint, "secret": "whsec_" + secrets.token_hex(16)}  # shown on create only


def list_webhook_endpoints(call: Call) -> Json:
    endpoints = list(reversed(call.state.store["webhook_endpoint"].values()))
    return list_object("/v1/webhook_endpoints", endpoints, as_int(call.params, "limit"))


def deliver(state: State, url: str | None, secret: str, events: list[Json]) -> list[Json]:
    """POST each event, signed, to `url`; record each outcome. Never under the lock."""
    results = []
    for event in events:
        result: Json = {"event_id": event["id"], "type": event["type"], "status_code": None}
        if url:
            body, now = json.dumps(event), int(time.time())
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign(secret, now, body),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) local stand-in",
            }
            try:
                reply = httpx.post(url, content=body, headers=headers, timeout=10)
                result["status_code"] = reply.status_code
            except httpx.HTTPError as error:
                result["error"] = f"{type(error).__name__}: {error}"
                log.warning("delivery of %s failed: %s", event["id"], result["error"])
        with state.lock:
            state.event_log[event["id"]]["deliveries"].append(result)
        results.append(result)
    return results


ROUTES = [
    api("GET", "/v1/webhook_endpoints", list_webhook_endpoints, "limit"),
    api(
        "POST",
        "/v1/webhook_endpoints",
        create_webhook_endpoint,
        "url enabled_events[] api_version description metadata[*]",
    ),
]
