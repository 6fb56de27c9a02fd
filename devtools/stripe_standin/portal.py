"""The customer portal's configurations and sessions (the portal's page: hosted_pages.py). A
session uses the configuration it names, else the account's default (made on first use, as the
Dashboard's portal settings do)."""

from __future__ import annotations

import copy
import time

from .params import as_bool, metadata, required
from .state import ID, Call, Json, StripeError, api, fixture, list_object, new_id

FEATURES = (
    "customer_update",
    "invoice_history",
    "payment_method_update",
    "subscription_cancel",
    "subscription_update",
)


def merged(current: Json, update: Json) -> Json:
    """`current` with `update`'s values, nested objects merged (lists replace), as Stripe does."""
    out = copy.deepcopy(current)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        elif isinstance(value, str) and value in ("true", "false"):
            out[key] = value == "true"
        else:
            out[key] = value
    return out


def configure(config: Json, p: Json) -> Json:
    features = p.get("features", {})
    unknown = set(features) - set(FEATURES) if isinstance(features, dict) else {"features"}
    if unknown:
        raise StripeError(400, f"Received unknown parameter: features[{sorted(unknown)[0]}]")
    config["features"] = merged(config["features"], features)
    if "metadata" in p:
        config["metadata"] = metadata(config.get("metadata") or {}, p["metadata"])
    if (active := as_bool(p, "active")) is not None:
        config["active"] = active
    if "default_return_url" in p:
        config["default_return_url"] = p["default_return_url"] or None
    config["updated"] = int(time.time())
    return config


def create_configuration(call: Call, *, default: bool = False) -> Json:
    required(call.params, "features")
    now = int(time.time())
    config = fixture(
        "billing_portal.configuration",
        id=new_id("bpc"),
        created=now,
        is_default=default,
        livemode=False,
        metadata={},
    )
    return call.state.put(configure(config, call.params))


def update_configuration(call: Call, object_id: str) -> Json:
    config = copy.deepcopy(call.state.get("billing_portal.configuration", object_id, status=404))
    return call.state.put(configure(config, call.params))


def list_configurations(call: Call) -> Json:
    p = call.params
    configs = list(call.state.store.get("billing_portal.configuration", {}).values())
    for flag in ("active", "is_default"):
        if (wanted := as_bool(p, flag)) is not None:
            configs = [c for c in configs if c[flag] == wanted]
    limit = int(p.get("limit", 10))
    return list_object("/v1/billing_portal/configurations", configs[:limit], limit)


def create_portal_session(call: Call) -> Json:
    p = call.params
    customer = call.state.get("customer", required(p, "customer"), "customer")
    if p.get("configuration"):
        configuration = call.state.get(
            "billing_portal.configuration", p["configuration"], "configuration"
        )
        if not configuration["active"]:
            raise StripeError(400, "This configuration is not active.", param="configuration")
    else:
        configs = call.state.store.get("billing_portal.configuration", {}).values()
        default: Json | None = next((c for c in configs if c["is_default"]), None)
        configuration = default or create_configuration(
            Call(call.state, {"features": {}}, call.base_url), default=True
        )
    session_id = new_id("bps")
    session = fixture(
        "billing_portal.session",
        id=session_id,
        created=int(time.time()),
        customer=customer["id"],
        configuration=configuration["id"],
        livemode=False,
        return_url=p.get("return_url"),
        url=f"{call.base_url}/portal/{session_id}",
        unset="flow",
    )
    return call.state.put(session)


ROUTES = [
    api(
        "POST",
        "/v1/billing_portal/sessions",
        create_portal_session,
        "customer return_url configuration",
    ),
    api(
        "GET",
        "/v1/billing_portal/configurations",
        list_configurations,
        "active is_default limit",
    ),
    api(
        "POST",
        "/v1/billing_portal/configurations",
        create_configuration,
        "features[*] metadata[*] default_return_url",
    ),
    api(
        "POST",
        "/v1/billing_portal/configurations" + ID,
        update_configuration,
        "features[*] metadata[*] default_return_url active",
    ),
]
