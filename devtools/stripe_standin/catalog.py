"""The catalog: billing meters (create, retrieve, list, deactivate, reactivate), products and prices
(per unit or tiered, lookup keys)."""

from __future__ import annotations

import copy
import time
from typing import Any

from .params import as_bool, as_int, as_object, metadata, param_name, required
from .state import ID, Call, Json, State, StripeError, api, fixture, list_object, missing, new_id

# ---------------------------------------------------------------- meters


def create_meter(call: Call) -> Json:
    p = call.params
    formula = as_object(p, "default_aggregation", required=True).get("formula")
    if formula not in ("sum", "count", "last"):
        message = "Invalid default_aggregation[formula]: must be one of sum, count or last"
        raise StripeError(400, message, param="default_aggregation[formula]")
    now = int(time.time())
    mapping = {"event_payload_key": "stripe_customer_id", "type": "by_id"}
    meter = fixture(
        "billing.meter",
        id=new_id("mtr"),
        created=now,
        updated=now,
        livemode=False,
        display_name=required(p, "display_name"),
        event_name=required(p, "event_name"),
        default_aggregation={"formula": formula},
        customer_mapping=mapping | as_object(p, "customer_mapping"),
        value_settings={"event_payload_key": "value"} | as_object(p, "value_settings"),
    )
    return call.state.put(meter)


def list_meters(call: Call) -> Json:
    meters = list(reversed(call.state.store["billing.meter"].values()))
    if status := call.params.get("status"):
        meters = [m for m in meters if m["status"] == status]
    return list_object("/v1/billing/meters", meters, as_int(call.params, "limit"))


def get_meter(call: Call, object_id: str) -> Json:
    return call.state.get("billing.meter", object_id, status=404)


def deactivate_meter(call: Call, object_id: str) -> Json:
    """Archive a meter: its events are no longer accepted (reported as `archived_meter`)."""
    meter = call.state.get("billing.meter", object_id, status=404)
    if meter["status"] == "inactive":
        raise StripeError(400, "This meter is already inactive.", param="id")
    now = call.state.now()
    meter.update(status="inactive", updated=now)
    meter["status_transitions"] = {"deactivated_at": now}
    return meter


def reactivate_meter(call: Call, object_id: str) -> Json:
    meter = call.state.get("billing.meter", object_id, status=404)
    if meter["status"] == "active":
        raise StripeError(400, "This meter is already active.", param="id")
    meter.update(status="active", updated=call.state.now())
    meter["status_transitions"] = {"deactivated_at": None}
    return meter


def find_meter(st: State, event_name: str) -> Json | None:
    meters = st.store["billing.meter"].values()
    return next(
        (m for m in meters if (m["event_name"], m["status"]) == (event_name, "active")), None
    )


def ensure_meter(st: State, event_name: str) -> Json:
    """The active meter for `event_name`, registered (formula sum) when there is none."""
    aggregation = {"formula": "sum"}
    params = {
        "display_name": event_name,
        "event_name": event_name,
        "default_aggregation": aggregation,
    }
    return find_meter(st, event_name) or create_meter(Call(st, params))


# ---------------------------------------------------------------- products


def create_product(call: Call) -> Json:
    p = call.params
    product_id = p.get("id") or new_id("prod")
    if product_id in call.state.store["product"]:
        message = "Product already exists."
        raise StripeError(400, message, code="resource_already_exists", param="id")
    now = int(time.time())
    product = fixture(
        "product",
        id=product_id,
        created=now,
        updated=now,
        name=required(p, "name"),
        metadata={},
        unset="default_price description package_dimensions",
    )
    return call.state.put(update_fields(product, p))


def update_product(call: Call, object_id: str) -> Json:
    product = copy.deepcopy(call.state.get("product", object_id, status=404))
    product["updated"] = int(time.time())
    return call.state.put(update_fields(product, call.params))


def get_product(call: Call, object_id: str) -> Json:
    return call.state.get("product", object_id, status=404)


def update_fields(obj: Json, p: Json) -> Json:
    """The plain updatable fields shared by products and prices."""
    for name in ("name", "description", "nickname"):
        if name in p:
            obj[name] = p[name] or None
    if (active := as_bool(p, "active")) is not None:
        obj["active"] = active
    if "metadata" in p:
        obj["metadata"] = metadata(obj["metadata"], p["metadata"])
    return obj


# ---------------------------------------------------------------- prices


def create_price(call: Call, price_id: str | None = None) -> Json:
    p, st = call.params, call.state
    if price_id in st.store["price"]:
        message = "Price already exists."
        raise StripeError(400, message, code="resource_already_exists", param="id")
    st.get("product", required(p, "product"), "product")
    recurring = None
    if "recurring" in p:
        given = as_object(p, "recurring")
        recurring = {
            "interval": required(given, "interval", "recurring"),
            "interval_count": as_int(given, "interval_count") or 1,
            "meter": given.get("meter"),
            "usage_type": given.get("usage_type", "licensed"),
            "trial_period_days": None,
        }
        if recurring["interval"] not in ("day", "week", "month", "year"):
            raise StripeError(400, "Invalid recurring[interval]", param="recurring[interval]")
        if recurring["usage_type"] not in ("licensed", "metered"):
            raise StripeError(400, "Invalid recurring[usage_type]", param="recurring[usage_type]")
        if recurring["usage_type"] == "metered":  # since API "basil" a meter is required
            st.get("billing.meter", required(given, "meter", "recurring"), "recurring[meter]")
    scheme = p.get("billing_scheme", "per_unit")
    tiers = price_tiers(p) if scheme == "tiered" else None
    amount = None if tiers else as_int(p, "unit_amount", required=True)
    price = fixture(
        "price",
        id=price_id or new_id("price"),
        created=int(time.time()),
        currency=required(p, "currency").lower(),
        product=p["product"],
        unit_amount=amount,
        unit_amount_decimal=None if amount is None else str(amount),
        recurring=recurring,
        type="recurring" if recurring else "one_time",
        billing_scheme=scheme,
        tiers_mode=p.get("tiers_mode") if tiers else None,
        tiers=tiers,  # Stripe returns tiers only when expanded; here always (a superset)
        tax_behavior=p.get("tax_behavior", "unspecified"),
        metadata={},
        unset="lookup_key custom_unit_amount transform_quantity",
    )
    update_fields(price, {k: v for k, v in p.items() if k not in ("tiers", "tiers_mode")})
    set_lookup_key(st, price, p)  # last: it may move the key away from another price
    return st.put(price)


def price_tiers(p: Json) -> list[Json]:
    """Graduated tiers (`tiers[i][up_to]`, `[unit_amount]`, `[flat_amount]`); the last up to inf."""
    if p.get("tiers_mode") not in ("graduated", "volume"):
        raise StripeError(400, "Missing required param: tiers_mode.", param="tiers_mode")
    if "unit_amount" in p:
        message = "You may only specify one of these parameters: unit_amount, tiers."
        raise StripeError(400, message, param="unit_amount")
    given = p.get("tiers")
    if not isinstance(given, list) or not given:
        raise StripeError(400, "Missing required param: tiers.", param="tiers")
    tiers = []
    for i, tier in enumerate(given):
        up_to = tier.get("up_to")
        last = i == len(given) - 1
        if (up_to == "inf") != last:
            raise StripeError(
                400, "Only the last tier may be up to inf.", param=f"tiers[{i}][up_to]"
            )
        unit = as_int(tier, "unit_amount") or 0
        tiers.append(
            {
                "up_to": None if last else int(up_to),
                "unit_amount": unit,
                "unit_amount_decimal": str(unit),
                "flat_amount": as_int(tier, "flat_amount"),
                "flat_amount_decimal": None,
            }
        )
    return tiers


def price_amount(price: Json, quantity: int) -> int:
    """What `quantity` units cost: per unit, or through graduated/volume tiers."""
    if not price.get("tiers"):
        return int(price["unit_amount"]) * quantity
    total, floor = 0, 0
    for tier in price["tiers"]:
        ceiling = tier["up_to"] if tier["up_to"] is not None else max(quantity, floor)
        if price["tiers_mode"] == "volume":
            if quantity <= ceiling:
                return int(tier["unit_amount"] * quantity + (tier["flat_amount"] or 0))
            continue
        in_tier = max(0, min(quantity, ceiling) - floor)
        if in_tier or (tier["flat_amount"] and quantity > floor):
            total += tier["unit_amount"] * in_tier + (tier["flat_amount"] or 0)
        floor = ceiling
    return total


def get_price(call: Call, object_id: str) -> Json:
    return call.state.get("price", object_id, status=404)


def update_price(call: Call, object_id: str) -> Json:
    price = update_fields(
        copy.deepcopy(call.state.get("price", object_id, status=404)), call.params
    )
    set_lookup_key(call.state, price, call.params)
    return call.state.put(price)


def set_lookup_key(st: State, price: Json, p: Json) -> None:
    """A lookup key names one price; `transfer_lookup_key` moves it from its holder."""
    key = p.get("lookup_key")
    if key is None:
        return
    holder = next((x for x in st.store["price"].values() if x["lookup_key"] == key), None)
    if holder is not None and holder["id"] != price["id"]:
        if not as_bool(p, "transfer_lookup_key"):
            message = f"A price (`{holder['id']}`) already uses that lookup key."
            raise StripeError(400, message, param="lookup_key")
        holder["lookup_key"] = None
    price["lookup_key"] = key or None


def list_prices(call: Call) -> Json:
    p = call.params
    prices = list(reversed(call.state.store["price"].values()))
    if "lookup_keys" in p:
        prices = [x for x in prices if x["lookup_key"] in p["lookup_keys"]]
    if (active := as_bool(p, "active")) is not None:
        prices = [x for x in prices if x["active"] == active]
    for name in ("product", "type", "currency"):
        if name in p:
            prices = [x for x in prices if x[name] == p[name]]
    return list_object("/v1/prices", prices, as_int(p, "limit"))


def line_price(st: State, line: Any, prefix: str) -> Json:
    """The price of one line; a metered price takes no quantity, any other price needs one."""
    if not isinstance(line, dict):
        raise StripeError(400, "Invalid object", param=prefix)
    price = st.get("price", required(line, "price", prefix), param_name(prefix, "price"))
    if not price["active"]:
        message = "The price specified is inactive. This field only accepts active prices."
        raise StripeError(400, message, param=param_name(prefix, "price"))
    metered = (price["recurring"] or {}).get("usage_type") == "metered"
    quantity = as_int(line, "quantity")
    if metered and quantity is not None:
        message = "You cannot pass quantity for metered usage prices."
        raise StripeError(400, message, param=param_name(prefix, "quantity"))
    if not metered and quantity is None:
        raise missing(param_name(prefix, "quantity"))
    return price


ROUTES = [
    api("GET", "/v1/billing/meters", list_meters, "status limit"),
    api("GET", "/v1/billing/meters" + ID, get_meter),
    api("POST", "/v1/billing/meters" + ID + "/deactivate", deactivate_meter),
    api("POST", "/v1/billing/meters" + ID + "/reactivate", reactivate_meter),
    api(
        "POST",
        "/v1/billing/meters",
        create_meter,
        "display_name event_name default_aggregation[formula] customer_mapping[type]"
        " customer_mapping[event_payload_key] value_settings[event_payload_key]",
    ),
    api("GET", "/v1/products" + ID, get_product),
    api("POST", "/v1/products", create_product, "id name description active metadata[*]"),
    api("POST", "/v1/products" + ID, update_product, "name description active metadata[*]"),
    api("GET", "/v1/prices" + ID, get_price),
    api("GET", "/v1/prices", list_prices, "lookup_keys[] active product type currency limit"),
    api(
        "POST",
        "/v1/prices",
        create_price,
        "currency unit_amount product lookup_key transfer_lookup_key nickname metadata[*]"
        " recurring[interval] recurring[interval_count] recurring[usage_type]"
        " recurring[meter] billing_scheme tax_behavior tiers_mode tiers[][up_to]"
        " tiers[][unit_amount] tiers[][flat_amount]",
    ),
    api(
        "POST",
        "/v1/prices" + ID,
        update_price,
        "active metadata[*] lookup_key transfer_lookup_key nickname",
    ),
]
