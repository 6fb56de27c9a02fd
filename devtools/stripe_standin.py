"""A local stand-in for Stripe's API, for local runs and end-to-end tests ONLY.

NEVER use it in production, and never point real money at it: it keeps everything in memory,
accepts any `sk_test_` key, charges nobody and simulates the passing of billing periods.

It speaks Stripe's wire format (form-encoded bodies with bracket notation, JSON answers,
Stripe's error shape and status codes, unknown parameters refused, `Idempotency-Key` replay)
for exactly the endpoints metered-billing calls. Every object it returns is a deep copy of
Stripe's own example object (`fixtures3.json`, API 2026-10-28.endive) with ids and fields set.

Routes under `/_standin/` play Stripe's and the customer's part (complete a checkout, renew,
fail and recover a payment, cancel) and deliver signed webhook events to the webhook URL.
Events caused by `/_standin/` routes are delivered before the route answers (deterministic for
tests); events caused by `/v1/` calls are delivered right after the answer is sent, so a webhook
handler that calls back into the stand-in never waits on itself. Only the event types the
project handles are emitted, and only to the one webhook URL given at start (endpoints created
through `/v1/webhook_endpoints` are stored, not delivered to).

    python -m devtools.stripe_standin --port 12111 --webhook-url http://127.0.0.1:8082/ \
        --webhook-secret whsec_... [--meter-event-name voice_call_minutes] [--seed-prices f.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import string
import threading
import time
from calendar import monthrange
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import httpx
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server, run_simple
from werkzeug.wrappers import Request, Response

log = logging.getLogger("stripe_standin")

API_VERSION = "2026-10-28.endive"
FIXTURES_PATH = Path(
    os.environ.get("STRIPE_FIXTURES_PATH")
    or Path(__file__).resolve().parent / "stripe_fixtures" / "fixtures3.json"
)
METER_EVENT_WINDOW = (35 * 86400, 300)  # Stripe: at most 35 days old, 5 minutes ahead
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
Json = dict[str, Any]


# ---------------------------------------------------------------- small pieces


class StripeError(Exception):
    """An error answered in Stripe's shape: {"error": {"type", "code", "message", "param"}}."""

    def __init__(self, status: int, message: str, *, code: str | None = None, **kw: str | None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param = kw.get("param")
        self.type = kw.get("type") or "invalid_request_error"

    def body(self) -> Json:
        error = {"type": self.type, "code": self.code, "message": self.message, "param": self.param}
        return {"error": error}


def missing(param: str) -> StripeError:
    message = f"Missing required param: {param}."
    return StripeError(400, message, code="parameter_missing", param=param)


def no_such(noun: str, object_id: str, param: str, status: int = 400) -> StripeError:
    message = f"No such {noun}: '{object_id}'"
    return StripeError(status, message, code="resource_missing", param=param)


def new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(24))


@functools.cache
def _fixtures() -> Json:
    with FIXTURES_PATH.open() as f:
        resources: Json = json.load(f)["resources"]
    return resources


def fixture(resource: str, /, unset: str = "", **fields: Any) -> Json:
    """A deep copy of Stripe's example `resource`: `fields` set, the `unset` names null."""
    obj: Json = copy.deepcopy(_fixtures()[resource])
    obj.update(dict.fromkeys(unset.split()), **fields)
    return obj


def list_object(url: str, data: list[Json], limit: int | None) -> Json:
    limit = max(1, min(limit or 10, 100))
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit, "url": url}


def sign(secret: str, timestamp: int, body: str) -> str:
    """The `Stripe-Signature` header: HMAC-SHA256 over "{t}.{body}", exactly like Stripe."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def add_interval(ts: int, unit: str, count: int) -> int:
    """`ts` moved by `count` days/weeks/months/years; a month end clamps like Stripe's anchors."""
    if unit in ("day", "week"):
        return ts + count * 86400 * (7 if unit == "week" else 1)
    start = datetime.fromtimestamp(ts, UTC)
    years, month0 = divmod(start.month - 1 + count * (12 if unit == "year" else 1), 12)
    year, month = start.year + years, month0 + 1
    day = min(start.day, monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def period_end_after(anchor: int, recurring: Json, after: int) -> int:
    """The first period boundary counted from `anchor` that lies after `after`."""
    unit, count, n = recurring["interval"], recurring["interval_count"], 1
    while add_interval(anchor, unit, count * n) <= after:
        n += 1
    return add_interval(anchor, unit, count * n)


# ---------------------------------------------------------------- wire format


def decode_form(pairs: Iterable[tuple[str, str]]) -> Json:
    """`a[b][0][c]=v` pairs to nested dicts/lists; `a[]` appends; metadata keys stay keys."""
    root: Json = {}
    for key, value in pairs:
        head, bracket, rest = key.partition("[")
        if bracket and not rest.endswith("]"):
            raise StripeError(400, f"Invalid parameter name: {key}", param=key)
        parts = [head, *(rest[:-1].split("][") if bracket else [])]
        node: Any = root
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise StripeError(400, f"Invalid parameter: {key} mixes a value and an object.")
            part = part or str(len(node))
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    decoded: Json = _listify(root, "")
    return decoded


def _listify(node: Any, name: str) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v, k) for k, v in node.items()}
    if items and name != "metadata" and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def check_known(keys: Iterable[str], allowed: frozenset[str]) -> None:
    """Refuse any parameter outside the endpoint's allow-list, naming it as Stripe does."""
    for key in keys:
        shape = re.sub(r"\[\d*\]", "[]", key)  # line_items[0][price] -> line_items[][price]
        if shape in allowed or any(
            a.endswith("[*]") and (shape.startswith(a[:-2]) or shape == a[:-3]) for a in allowed
        ):
            continue
        message = f"Received unknown parameter: {key}"
        raise StripeError(400, message, code="parameter_unknown", param=key)


def param_name(prefix: str, name: str) -> str:
    return f"{prefix}[{name}]" if prefix else name


def as_int(params: Json, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        message = f"Invalid integer: {value}"
        raise StripeError(400, message, code="parameter_invalid_integer", param=name) from None


def as_bool(params: Json, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise StripeError(400, f"Invalid boolean: {value}", param=name)
    return bool(value == "true")


def as_object(params: Json, name: str, *, required: bool = False) -> Json:
    """A nested parameter (`name[key]=...`); {} when absent."""
    value = params.get(name)
    if value is None and required:
        raise missing(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid object", param=name)
    return value


def required(params: Json, name: str, prefix: str = "") -> Any:
    if params.get(name) in (None, ""):
        raise missing(param_name(prefix, name))
    return params[name]


def metadata(current: Json, update: Any) -> Json:
    """Stripe's metadata update: strings only, "" unsets a key, an empty `metadata=` clears all."""
    if update == "":
        return {}
    if not isinstance(update, dict):
        raise StripeError(400, "Invalid object", param="metadata")
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


# ---------------------------------------------------------------- state


class State:
    """Everything the stand-in knows, in memory; every read and write holds `lock`."""

    KINDS = (
        "customer",
        "product",
        "price",
        "billing.meter",
        "checkout.session",
        "subscription",
        "invoice",
        "billing_portal.session",
        "webhook_endpoint",
    )

    def __init__(self, has_webhook: bool) -> None:
        self.lock = threading.Lock()
        self.has_webhook = has_webhook
        self.store: dict[str, dict[str, Json]] = {kind: {} for kind in self.KINDS}
        self.session_orders: dict[str, Json] = {}  # checkout id -> line items, subscription_data
        self.meter_events: dict[str, Json] = {}  # by identifier
        self.billed: dict[str, str] = {}  # meter event identifier -> invoice that billed it
        self.event_log: dict[str, Json] = {}
        self.idempotency: dict[str, Json] = {}

    def get(self, kind: str, object_id: Any, param: str = "id", status: int = 400) -> Json:
        obj = self.store[kind].get(object_id) if isinstance(object_id, str) else None
        if obj is None:
            raise no_such(kind.split(".")[-1].replace("_", " "), str(object_id), param, status)
        return obj

    def put(self, obj: Json) -> Json:
        self.store[obj["object"]][obj["id"]] = obj
        return obj

    SAVED = ("store", "session_orders", "meter_events", "billed", "event_log", "idempotency")

    def save(self, path: Path) -> None:
        """Write everything to `path` (local runs keep Stripe's side next to their database)."""
        with self.lock:
            path.write_text(json.dumps({name: getattr(self, name) for name in self.SAVED}))

    def load(self, path: Path) -> None:
        """Read what `save` wrote, if anything."""
        if path.exists():
            saved = json.loads(path.read_text())
            with self.lock:
                for name in self.SAVED:
                    getattr(self, name).update(saved.get(name, {}))

    def dump(self) -> Json:
        names = {"billing.meter": "meters", "checkout.session": "checkout_sessions"}
        out: Json = {names.get(k, k + "s"): list(v.values()) for k, v in self.store.items()}
        out["meter_events"] = [
            {**e, "billed_on": self.billed.get(key)} for key, e in self.meter_events.items()
        ]
        out["events"] = list(self.event_log.values())
        out["checkout_orders"] = self.session_orders  # line items as sent, by session id
        return copy.deepcopy(out)


@dataclass
class Call:
    """One request: the state, its decoded parameters, and the events it causes."""

    state: State
    params: Json
    base_url: str = ""
    request_id: str | None = None
    idempotency_key: str | None = None
    events: list[Json] = field(default_factory=list)

    def emit(self, event_type: str, obj: Json) -> None:
        event = fixture(
            "event",
            id=new_id("evt"),
            api_version=API_VERSION,
            created=int(time.time()),
            data={"object": copy.deepcopy(obj)},
            livemode=False,
            pending_webhooks=1 if self.state.has_webhook else 0,
            request={"id": self.request_id, "idempotency_key": self.idempotency_key},
            type=event_type,
        )
        self.state.event_log[event["id"]] = {
            "id": event["id"],
            "type": event_type,
            "object_id": obj["id"],
            "created": event["created"],
            "deliveries": [],
        }
        self.events.append(event)


# ---------------------------------------------------------------- catalog


def create_customer(call: Call) -> Json:
    p = call.params
    customer = fixture(
        "customer",
        id=new_id("cus"),
        created=int(time.time()),
        email=p.get("email"),
        name=p.get("name"),
        metadata=metadata({}, p.get("metadata", {})),
        invoice_prefix=secrets.token_hex(4).upper(),
        unset="address currency discount shipping",
    )
    return call.state.put(customer)


def get_customer(call: Call, object_id: str) -> Json:
    return call.state.get("customer", object_id, status=404)


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
                return tier["unit_amount"] * quantity + (tier["flat_amount"] or 0)
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


# ---------------------------------------------------------------- checkout and portal


def create_checkout_session(call: Call) -> Json:
    p, st = call.params, call.state
    if required(p, "mode") != "subscription":
        raise StripeError(400, "The stand-in only supports mode=subscription.", param="mode")
    if p.get("customer") is not None:
        st.get("customer", p["customer"], "customer")
    lines = required(p, "line_items")
    if not isinstance(lines, list):
        raise StripeError(400, "Invalid array", param="line_items")
    prices = [line_price(st, line, f"line_items[{i}]") for i, line in enumerate(lines)]
    recurring = [x["recurring"] for x in prices if x["recurring"]]
    if not recurring:
        message = "You must specify at least one recurring price in `subscription` mode."
        raise StripeError(400, message, param="line_items")
    if len({(r["interval"], r["interval_count"]) for r in recurring}) > 1:
        message = "Checkout does not support multiple prices with different billing intervals."
        raise StripeError(400, message, param="line_items")
    order = [
        {"price": x["id"], "quantity": as_int(line, "quantity")}
        for x, line in zip(prices, lines, strict=True)
    ]
    amount = sum(price_amount(x, o["quantity"] or 0) for x, o in zip(prices, order, strict=True))
    subscription_metadata = as_object(as_object(p, "subscription_data"), "metadata")
    session_id, now = new_id("cs_test"), int(time.time())
    session = fixture(
        "checkout.session",
        id=session_id,
        created=now,
        expires_at=now + 86400,
        mode="subscription",
        status="open",
        payment_status="unpaid",
        customer=p.get("customer"),
        client_reference_id=p.get("client_reference_id"),
        metadata=metadata({}, p.get("metadata", {})),
        success_url=p.get("success_url"),
        cancel_url=p.get("cancel_url"),
        allow_promotion_codes=as_bool(p, "allow_promotion_codes"),
        currency=prices[0]["currency"],
        amount_subtotal=amount,
        amount_total=amount,
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        url=f"{call.base_url}/checkout/{session_id}",
        ui_mode="hosted_page",
        custom_text=dict.fromkeys(_fixtures()["checkout.session"]["custom_text"]),
        adaptive_pricing={"enabled": False},
        managed_payments={"enabled": False},
        unset="payment_intent invoice invoice_creation customer_details after_expiration"
        " consent_collection shipping_address_collection shipping_cost subscription"
        " collected_information currency_conversion payment_method_configuration_details",
    )
    st.session_orders[session_id] = {
        "lines": order,
        "subscription_metadata": metadata({}, subscription_metadata),
    }
    return st.put(session)


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


def get_checkout_session(call: Call, object_id: str) -> Json:
    return call.state.get("checkout.session", object_id, status=404)


def expire_checkout_session(call: Call, object_id: str) -> Json:
    """Only an open session can be expired, as Stripe: a complete or expired one is a 400."""
    session = call.state.get("checkout.session", object_id, status=404)
    if session["status"] != "open":
        message = (
            'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout '
            f"Session has a status of `{session['status']}`."
        )
        raise StripeError(400, message)
    session.update(status="expired", url=None)
    return session


def create_portal_session(call: Call) -> Json:
    p = call.params
    customer = call.state.get("customer", required(p, "customer"), "customer")
    session_id = new_id("bps")
    session = fixture(
        "billing_portal.session",
        id=session_id,
        created=int(time.time()),
        customer=customer["id"],
        configuration=new_id("bpc"),
        livemode=False,
        return_url=p.get("return_url"),
        url=f"{call.base_url}/portal/{session_id}",
        unset="flow",
    )
    return call.state.put(session)


# ---------------------------------------------------------------- subscriptions


def sim_now(sub: Json) -> int:
    """Simulated time: renewals move item periods ahead of the wall clock."""
    starts = [int(item["current_period_start"]) for item in sub["items"]["data"]]
    return max([int(time.time()), *starts])


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


def change_item(st: State, sub: Json, change: Any, prefix: str) -> None:
    """items[i][price] adds an item; items[i][id] with [price], [quantity] or [deleted] edits one."""
    if not isinstance(change, dict) or "id" not in change:
        add_item(st, sub, change, prefix)
        return
    items = sub["items"]["data"]
    item = next((x for x in items if x["id"] == change["id"]), None)
    if item is None:
        raise no_such("subscription item", change["id"], f"{prefix}[id]")
    if as_bool(change, "deleted"):
        items.remove(item)
        return
    price = st.get("price", change.get("price", item["price"]["id"]), f"{prefix}[price]")
    line = {"price": price["id"], "quantity": change.get("quantity", item["quantity"] or 1)}
    if price["recurring"]["usage_type"] == "metered" and "quantity" not in change:
        line.pop("quantity")
    line_price(st, line, prefix)
    swapped = new_item(sub["id"], price, as_int(line, "quantity"), item["current_period_start"])
    item.update(price=swapped["price"], plan=swapped["plan"], quantity=swapped["quantity"])


def check_live(sub: Json) -> None:
    if sub["status"] == "canceled":
        message = "A canceled subscription can only update its cancellation_details and metadata."
        raise StripeError(400, message)


def check_proration(p: Json) -> None:
    value = p.get("proration_behavior")
    if value is not None and value not in PRORATION_BEHAVIORS:
        message = f"Invalid proration_behavior: must be one of {sorted(PRORATION_BEHAVIORS)}"
        raise StripeError(400, message, param="proration_behavior")


def get_subscription(call: Call, object_id: str) -> Json:
    return call.state.get("subscription", object_id, status=404)


def update_subscription(call: Call, object_id: str) -> Json:
    """metadata, cancel_at_period_end, items (all or nothing: edits a copy, then stores it)."""
    p, st = call.params, call.state
    sub = copy.deepcopy(st.get("subscription", object_id, status=404))
    if set(p) - {"metadata", "expand"}:
        check_live(sub)
    check_proration(p)
    if "metadata" in p:
        sub["metadata"] = metadata(sub["metadata"], p["metadata"])
    if (cancel := as_bool(p, "cancel_at_period_end")) is not None:
        ends = [item["current_period_end"] for item in sub["items"]["data"]]
        sub["cancel_at_period_end"] = cancel
        sub["cancel_at"] = max(ends) if cancel else None
        sub["canceled_at"] = sim_now(sub) if cancel else None
    changes = p.get("items", [])
    for i, change in enumerate(changes if isinstance(changes, list) else [changes]):
        change_item(st, sub, change, f"items[{i}]")
    call.emit("customer.subscription.updated", sub)
    return st.put(sub)


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
    sub["cancellation_details"] = {
        "comment": details.get("comment") or None,
        "feedback": feedback,
        "reason": "cancellation_requested",
    }
    call.emit("customer.subscription.deleted", sub)
    return sub


# ---------------------------------------------------------------- invoices


def invoice_line(invoice_id: str, sub: Json, price: Json, **how: Any) -> Json:
    """One line: a subscription item's fee or usage (`item=`), or a one-time invoice item."""
    quantity, period, item_id = how["quantity"], how["period"], how.get("item")
    details = {"proration": False, "proration_details": {"credited_items": None}}
    details["subscription"] = sub["id"]
    if item_id:
        details.update(invoice_item=None, subscription_item=item_id)
        parent = {"type": "subscription_item_details", "subscription_item_details": details}
    else:
        details.update(invoice_item=new_id("ii"))
        parent = {"type": "invoice_item_details", "invoice_item_details": details}
    amount = price_amount(price, quantity)
    return fixture(
        "line_item",
        id=new_id("il"),
        invoice=invoice_id,
        amount=amount,
        subtotal=amount,
        currency=price["currency"],
        description=f"{quantity} × {price['nickname'] or price['product']}",
        period={"start": period[0], "end": period[1]},
        quantity=quantity,
        subscription=sub["id"],
        parent={"invoice_item_details": None, "subscription_item_details": None} | parent,
        pricing={
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": price["unit_amount_decimal"],
        },
        taxes=[],
        pretax_credit_amounts=[],
    )


def new_invoice(st: State, sub: Json, invoice_id: str, lines: list[Json], **how: Any) -> Json:
    """A finalized invoice for `sub`, paid or left open; it becomes the latest invoice."""
    customer = st.store["customer"][sub["customer"]]
    now, total = sim_now(sub), sum(line["amount"] for line in lines)
    number = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
    customer["next_invoice_sequence"] += 1
    invoice = fixture(
        "invoice",
        id=invoice_id,
        number=number,
        created=now,
        effective_at=now,
        customer=customer["id"],
        customer_email=customer["email"],
        customer_name=customer["name"],
        currency=sub["currency"],
        billing_reason=how["reason"],
        period_start=how["period"][0],
        period_end=how["period"][1],
        lines={"object": "list", "data": lines, "has_more": False},
        subtotal=total,
        subtotal_excluding_tax=total,
        total=total,
        total_excluding_tax=total,
        amount_due=total,
        amount_paid=0,
        amount_remaining=total,
        amount_overpaid=0,
        attempted=True,
        attempt_count=1,
        status="open",
        parent={
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": copy.deepcopy(sub["metadata"]),
                "subscription": sub["id"],
            },
        },
        total_taxes=[],
        total_pretax_credit_amounts=[],
        unset="due_date from_invoice last_finalization_error next_payment_attempt shipping_cost"
        " shipping_details webhooks_delivered_at",
    )
    invoice["lines"]["url"] = f"/v1/invoices/{invoice_id}/lines"
    invoice["status_transitions"].update(finalized_at=now, paid_at=None)
    invoice.pop("subscription", None)  # gone since API "basil": see parent.subscription_details
    if how["paid"]:
        mark_paid(invoice)
    sub["latest_invoice"] = invoice_id
    return st.put(invoice)


def mark_paid(invoice: Json) -> None:
    invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0)
    invoice["status_transitions"]["paid_at"] = invoice["status_transitions"]["finalized_at"]


def get_invoice(call: Call, object_id: str) -> Json:
    return call.state.get("invoice", object_id, status=404)


def list_invoices(call: Call) -> Json:
    p = call.params
    invoices = list(reversed(call.state.store["invoice"].values()))
    if "subscription" in p:
        wanted = p["subscription"]
        invoices = [
            x for x in invoices if x["parent"]["subscription_details"]["subscription"] == wanted
        ]
    for name in ("customer", "status"):
        if name in p:
            invoices = [x for x in invoices if x[name] == p[name]]
    return list_object("/v1/invoices", invoices, as_int(p, "limit"))


# ---------------------------------------------------------------- meter events


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


def take_usage(st: State, customer_id: str, meter_id: str, invoice_id: str) -> int:
    """Unbilled usage of one meter for one customer, marked billed on `invoice_id`.

    Time is simulated by shifting periods, not by the clock, while meter events carry real
    timestamps: so a renewal bills every event received since the previous one (per customer
    and meter) instead of selecting events by timestamp within the period.
    """
    meter = st.store["billing.meter"][meter_id]
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    values = []
    for identifier, e in st.meter_events.items():
        mine = (e["event_name"], e["payload"].get(customer_key)) == (
            meter["event_name"],
            customer_id,
        )
        if mine and identifier not in st.billed:
            st.billed[identifier] = invoice_id
            values.append(int(e["payload"][value_key]))
    formula = meter["default_aggregation"]["formula"]
    if formula == "count":
        return len(values)
    if formula == "last":
        return values[-1] if values else 0
    return sum(values)


# ---------------------------------------------------------------- Stripe's and the customer's part


def complete_checkout(call: Call, object_id: str) -> Json:
    """The customer pays: subscription, first invoice (flat + setup fee), three events."""
    st = call.state
    session = st.get("checkout.session", object_id, status=404)
    if session["status"] != "open":
        raise StripeError(400, f"Checkout session {object_id} is {session['status']}, not open.")
    if session["customer"] is None:
        session["customer"] = create_customer(Call(st, {}))["id"]
    customer, order = st.store["customer"][session["customer"]], st.session_orders[object_id]
    now, invoice_id = int(time.time()), new_id("in")
    sub = fixture(
        "subscription",
        id=new_id("sub"),
        customer=customer["id"],
        created=now,
        start_date=now,
        billing_cycle_anchor=now,
        status="active",
        currency=session["currency"],
        metadata=copy.deepcopy(order["subscription_metadata"]),
        billing_mode={"type": "flexible", "flexible": {"proration_discounts": "included"}},
        cancel_at_period_end=False,
        cancellation_details={"comment": None, "feedback": None, "reason": None},
        billing_schedules=[],
        managed_payments={"enabled": False},
        unset="cancel_at canceled_at ended_at trial_start trial_end billing_cycle_anchor_config"
        " billing_thresholds next_pending_invoice_item_invoice pause_collection pending_update"
        " pending_invoice_item_interval transfer_data",
    )
    sub["billing_mode"]["updated_at"] = now
    sub["items"].update(data=[], url=f"/v1/subscription_items?subscription={sub['id']}")
    lines = []
    for line in order["lines"]:
        price, quantity = st.store["price"][line["price"]], line["quantity"]
        if price["recurring"] is None:  # one-time (setup fee): on the first invoice only
            lines.append(invoice_line(invoice_id, sub, price, quantity=quantity, period=(now, now)))
            continue
        item = new_item(sub["id"], price, quantity, now)
        sub["items"]["data"].append(item)
        if item["quantity"] is not None:  # flexible billing: metered items not on this invoice
            period = (now, item["current_period_end"])
            fee = invoice_line(
                invoice_id, sub, price, quantity=quantity, period=period, item=item["id"]
            )
            lines.append(fee)
    invoice = new_invoice(
        st, sub, invoice_id, lines, reason="subscription_create", period=(now, now), paid=True
    )
    st.put(sub)
    details = fixture("checkout.session")["customer_details"]
    details.update(email=customer["email"], name=customer["name"], address=None)
    session.update(
        status="complete",
        payment_status="paid",
        subscription=sub["id"],
        invoice=invoice["id"],
        customer_details=details,
    )
    call.emit("checkout.session.completed", session)
    call.emit("customer.subscription.created", sub)
    call.emit("invoice.paid", invoice)
    return {"subscription": sub["id"], "invoice": invoice["id"]}


def advance_subscription(call: Call, object_id: str) -> Json:
    """Renewal: close the shortest period(s), bill their usage (and monthly flat fees), roll on.

    Items whose period ends at the earliest boundary roll one interval; a yearly item keeps
    its period until its year is over. `{"fail": true}` leaves the invoice open (past_due).
    A subscription set to cancel at period end ends instead, with a final usage invoice.
    """
    st = call.state
    sub = st.get("subscription", object_id, status=404)
    check_live(sub)
    if not sub["items"]["data"]:
        raise StripeError(400, f"Subscription {object_id} has no items to renew.")
    boundary = min(item["current_period_end"] for item in sub["items"]["data"])
    ending = sub["cancel_at_period_end"] and boundary >= (sub["cancel_at"] or 0)
    invoice_id, lines, started = new_id("in"), [], []
    for item in [x for x in sub["items"]["data"] if x["current_period_end"] <= boundary]:
        price, old = item["price"], (item["current_period_start"], item["current_period_end"])
        new = (old[1], period_end_after(item["created"], price["recurring"], old[1]))
        started.append(old[0])
        if price["recurring"]["usage_type"] == "metered":  # billed in arrears
            usage = take_usage(st, sub["customer"], price["recurring"]["meter"], invoice_id)
            lines.append(
                invoice_line(invoice_id, sub, price, quantity=usage, period=old, item=item["id"])
            )
        elif not ending:  # licensed fees are billed in advance for the new period
            quantity = item["quantity"]
            lines.append(
                invoice_line(invoice_id, sub, price, quantity=quantity, period=new, item=item["id"])
            )
        if not ending:
            item["current_period_start"], item["current_period_end"] = new
    fail = bool(call.params.get("fail"))
    period = (min(started), boundary)
    invoice = new_invoice(
        st, sub, invoice_id, lines, reason="subscription_cycle", period=period, paid=not fail
    )
    if ending:
        sub.update(status="canceled", ended_at=boundary)
    else:
        sub["status"] = "past_due" if fail else "active"
    call.emit("invoice.payment_failed" if fail else "invoice.paid", invoice)
    call.emit(f"customer.subscription.{'deleted' if ending else 'updated'}", sub)
    return {"subscription": sub["id"], "invoice": invoice["id"], "status": sub["status"]}


def pay_invoice(call: Call, object_id: str) -> Json:
    """Recovery of a failed payment: the invoice is paid, the subscription active again."""
    st = call.state
    invoice = st.get("invoice", object_id, status=404)
    if invoice["status"] != "open":
        raise StripeError(400, f"Invoice {object_id} is {invoice['status']}, not open.")
    invoice["attempt_count"] += 1
    mark_paid(invoice)
    sub = st.store["subscription"][invoice["parent"]["subscription_details"]["subscription"]]
    if sub["status"] == "past_due":
        sub["status"] = "active"
    call.emit("invoice.paid", invoice)
    call.emit("customer.subscription.updated", sub)
    return {"subscription": sub["id"], "invoice": invoice["id"], "status": sub["status"]}


def cancel_now(call: Call, object_id: str) -> Json:
    sub = cancel_subscription(call, object_id)
    return {"subscription": sub["id"], "status": sub["status"]}


def dump_state(call: Call) -> Json:
    return call.state.dump()


def standin_page(call: Call, object_id: str) -> str:
    """A tiny page where Stripe's hosted Checkout or portal would be."""
    oid = html.escape(object_id)
    return (
        "<!doctype html><title>Stripe stand-in</title>"
        "<h1>Local Stripe stand-in (not Stripe, never for production)</h1>"
        f"<p>Session <code>{oid}</code>. Nothing is charged here; tests complete checkouts with "
        f"<code>POST /_standin/checkout_sessions/{oid}/complete</code>.</p>"
    )


# ---------------------------------------------------------------- routing and serving


class Endpoint(NamedTuple):
    kind: str  # "api" (Stripe wire format), "control" (JSON) or "page" (HTML)
    handler: Callable[..., Any]
    allowed: frozenset[str] = frozenset()


def api(method: str, path: str, handler: Callable[..., Json], allowed: str = "") -> Rule:
    """A Stripe route; `allowed` lists its parameters (`[]` an index, `[*]` any key)."""
    endpoint = Endpoint("api", handler, frozenset([*allowed.split(), "expand[]"]))
    return Rule(path, methods=[method], endpoint=endpoint)


def control(method: str, path: str, handler: Callable[..., Any], kind: str = "control") -> Rule:
    return Rule(path, methods=[method], endpoint=Endpoint(kind, handler))


ID = "/<object_id>"
ROUTES = Map(
    [
        api("POST", "/v1/customers", create_customer, "email name metadata[*]"),
        api("GET", "/v1/customers" + ID, get_customer),
        api(
            "POST",
            "/v1/checkout/sessions",
            create_checkout_session,
            "mode customer line_items[][price] line_items[][quantity] client_reference_id"
            " metadata[*] subscription_data[metadata][*] success_url cancel_url"
            " allow_promotion_codes",
        ),
        api("GET", "/v1/checkout/sessions" + ID, get_checkout_session),
        api("POST", "/v1/checkout/sessions" + ID + "/expire", expire_checkout_session),
        api("GET", "/v1/subscriptions" + ID, get_subscription),
        api(
            "POST",
            "/v1/subscriptions" + ID,
            update_subscription,
            "metadata[*] cancel_at_period_end proration_behavior items[][price] items[][id]"
            " items[][quantity] items[][deleted]",
        ),
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
        api("GET", "/v1/invoices" + ID, get_invoice),
        api("GET", "/v1/invoices", list_invoices, "subscription customer status limit"),
        api(
            "POST",
            "/v1/billing/meter_events",
            create_meter_event,
            "event_name payload[*] identifier timestamp",
        ),
        api("POST", "/v1/billing_portal/sessions", create_portal_session, "customer return_url"),
        api("GET", "/v1/billing/meters", list_meters, "status limit"),
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
        api("GET", "/v1/webhook_endpoints", list_webhook_endpoints, "limit"),
        api(
            "POST",
            "/v1/webhook_endpoints",
            create_webhook_endpoint,
            "url enabled_events[] api_version description metadata[*]",
        ),
        control("POST", "/_standin/checkout_sessions" + ID + "/complete", complete_checkout),
        control("POST", "/_standin/subscriptions" + ID + "/advance", advance_subscription),
        control("POST", "/_standin/subscriptions" + ID + "/cancel", cancel_now),
        control("POST", "/_standin/invoices" + ID + "/pay", pay_invoice),
        control("GET", "/_standin/state", dump_state),
        control("GET", "/checkout" + ID, standin_page, kind="page"),
        control("GET", "/portal" + ID, standin_page, kind="page"),
    ]
)
EXPANDABLE = {
    "customer": "customer",
    "latest_invoice": "invoice",
    "subscription": "subscription",
    "invoice": "invoice",
    "product": "product",
}


def expand(st: State, obj: Json, paths: Any) -> Json:
    """Replace expandable ids by their objects (prices are always embedded in items, as Stripe)."""
    obj = copy.deepcopy(obj)
    for path in paths if isinstance(paths, list) else []:
        targets, name = [obj], path
        if obj.get("object") == "list" and path.startswith("data."):
            targets, name = obj["data"], path[len("data.") :]
        for target in targets:
            kind, value = EXPANDABLE.get(name), target.get(name)
            if kind and isinstance(value, str) and value in st.store[kind]:
                target[name] = copy.deepcopy(st.store[kind][value])
    return obj


class StripeStandin:
    """The WSGI app; `state` is public for helpers such as `seed_prices`."""

    def __init__(self, webhook_url: str | None, webhook_secret: str) -> None:
        self.webhook_url, self.webhook_secret = webhook_url, webhook_secret
        self.state = State(has_webhook=bool(webhook_url))

    def __call__(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except StripeError as error:
            response = json_response(error.body(), error.status)
        except Exception:  # a bug here: answer like Stripe's own 500s, and keep the traceback
            log.exception("stand-in failed on %s %s", request.method, request.path)
            failure = StripeError(500, "The stand-in failed; see its log.", type="api_error")
            response = json_response(failure.body(), 500)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        try:
            endpoint, args = ROUTES.bind_to_environ(request.environ).match()
        except HTTPException:
            message = f"Unrecognized request URL ({request.method}: {request.path})."
            raise StripeError(404, message) from None
        call = Call(self.state, {}, request.host_url.rstrip("/"))
        if endpoint.kind == "api":
            return self.serve_api(request, endpoint, args, call)
        if endpoint.kind == "page":
            return Response(endpoint.handler(call, **args), mimetype="text/html")
        try:
            call.params = json.loads(request.get_data(as_text=True) or "{}")
        except json.JSONDecodeError:
            raise StripeError(400, "The body is not JSON.") from None
        if not isinstance(call.params, dict):
            raise StripeError(400, "The body must be a JSON object.")
        with self.state.lock:
            answer = endpoint.handler(call, **args)
        if call.events:
            answer["deliveries"] = self.deliver(call.events)
        return json_response(answer, 200)

    def serve_api(
        self, request: Request, endpoint: Endpoint, args: Mapping[str, Any], call: Call
    ) -> Response:
        authenticate(request)
        raw = request.get_data(as_text=True) if request.method == "POST" else ""
        pairs = parse_qsl(raw or request.query_string.decode(), keep_blank_values=True)
        call.params = decode_form(pairs)
        call.request_id = new_id("req")
        call.idempotency_key = request.headers.get("Idempotency-Key") if raw else None
        headers = {
            "Request-Id": call.request_id,
            "Stripe-Version": request.headers.get("Stripe-Version", API_VERSION),
        }
        fingerprint = json.dumps([request.method, request.path, sorted(pairs)])
        with self.state.lock:
            key = call.idempotency_key
            if key and key in self.state.idempotency:
                return replay(self.state.idempotency[key], fingerprint, key)
            check_known((k for k, _ in pairs), endpoint.allowed)
            obj = endpoint.handler(call, **args)
            body = json.dumps(expand(self.state, obj, call.params.get("expand")))
            if key:  # only requests that executed are kept (as Stripe does)
                entry = {"fingerprint": fingerprint, "body": body, "headers": headers}
                self.state.idempotency[key] = entry
        response = Response(body, 200, headers, mimetype="application/json")
        if events := call.events:
            response.call_on_close(lambda: self.deliver(events))  # once the caller has its answer
        return response

    def deliver(self, events: list[Json]) -> list[Json]:
        """POST each event, signed, to the webhook URL; record each outcome. Never under the lock."""
        results = []
        for event in events:
            result: Json = {"event_id": event["id"], "type": event["type"], "status_code": None}
            if self.webhook_url:
                body, now = json.dumps(event), int(time.time())
                headers = {
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": sign(self.webhook_secret, now, body),
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) local stand-in",
                }
                try:
                    reply = httpx.post(self.webhook_url, content=body, headers=headers, timeout=10)
                    result["status_code"] = reply.status_code
                except httpx.HTTPError as error:
                    result["error"] = f"{type(error).__name__}: {error}"
                    log.warning("delivery of %s failed: %s", event["id"], result["error"])
            with self.state.lock:
                self.state.event_log[event["id"]]["deliveries"].append(result)
            results.append(result)
        return results


def authenticate(request: Request) -> None:
    """Any `sk_test_` key, as Bearer (stripe-python) or Basic (`curl -u sk_test_...:`)."""
    auth = request.authorization
    key = auth and (auth.token if auth.type == "bearer" else auth.username)
    if not key:
        message = (
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
        )
        raise StripeError(401, message)
    if not key.startswith("sk_test_"):
        raise StripeError(401, f"Invalid API Key provided: {key[:8]}{'*' * 8}")


def replay(stored: Json, fingerprint: str, key: str) -> Response:
    if stored["fingerprint"] != fingerprint:
        message = (
            "Keys for idempotent requests can only be used with the same parameters they were "
            f"first used with. Try using a key other than '{key}' if you meant to execute a "
            "different request."
        )
        error = StripeError(400, message, code="idempotency_error", type="idempotency_error")
        return json_response(error.body(), 400)
    headers = {**stored["headers"], "Idempotent-Replayed": "true"}
    return Response(stored["body"], 200, headers, mimetype="application/json")


def json_response(body: Json, status: int, headers: Json | None = None) -> Response:
    return Response(json.dumps(body), status, headers, mimetype="application/json")


# ---------------------------------------------------------------- public helpers


def create_app(
    webhook_url: str | None, webhook_secret: str, *, meter_event_names: Iterable[str] = ()
) -> StripeStandin:
    """The stand-in WSGI app, with a `sum` meter already registered for each event name."""
    app = StripeStandin(webhook_url, webhook_secret)
    with app.state.lock:
        for name in meter_event_names:
            ensure_meter(app.state, name)
    return app


def seed_prices(app: StripeStandin, specs: Iterable[Json]) -> list[Json]:
    """Pre-seed prices with chosen ids; a missing product (or meter) is created on the way.

    A spec: `{"id": "price_pro_monthly", "currency": "eur", "unit_amount": 4900,
    "interval": "month" (none: one-time), "usage_type": "licensed" | "metered",
    "meter_event_name": "voice_call_minutes", "product": "prod_pro", "lookup_key", "nickname"}`.
    """
    created = []
    with app.state.lock:
        st = app.state
        for spec in specs:
            product = spec.get("product") or new_id("prod")
            if product not in st.store["product"]:
                create_product(Call(st, {"id": product, "name": spec.get("nickname") or product}))
            params: Json = {"currency": spec["currency"], "product": product}
            params["unit_amount"] = str(spec["unit_amount"])
            params.update({k: spec[k] for k in ("lookup_key", "nickname") if spec.get(k)})
            usage_type = spec.get("usage_type", "licensed")
            if spec.get("interval") or usage_type == "metered":
                interval = spec.get("interval") or "month"
                params["recurring"] = {"interval": interval, "usage_type": usage_type}
            if usage_type == "metered":
                meter = ensure_meter(st, spec.get("meter_event_name") or "voice_call_minutes")
                params["recurring"]["meter"] = meter["id"]
            price = create_price(Call(st, params), price_id=spec.get("id"))
            created.append(copy.deepcopy(price))
    return created


def serve_in_thread(
    webhook_url: str | None, webhook_secret: str, **options: Any
) -> tuple[str, Callable[[], None]]:
    """Serve a fresh stand-in on a free 127.0.0.1 port in a daemon thread: (base_url, stop)."""
    server = make_server(
        "127.0.0.1", 0, create_app(webhook_url, webhook_secret, **options), threaded=True
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="stripe-standin",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"http://127.0.0.1:{server.server_port}", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stripe_standin",
        description="A local stand-in for Stripe's API on 127.0.0.1, for local runs and "
        "end-to-end tests only. NEVER for production: in memory, any sk_test_ key, no money.",
    )
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", help="where signed events are POSTed (none: only logged)")
    parser.add_argument(
        "--webhook-secret", help="whsec_... used to sign events (with --webhook-url)"
    )
    parser.add_argument(
        "--meter-event-name", action="append", default=[], help="pre-register a meter (repeatable)"
    )
    parser.add_argument("--seed-prices", type=Path, help="JSON list of price specs (seed_prices)")
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(
        args.webhook_url, args.webhook_secret or "", meter_event_names=args.meter_event_name
    )
    if args.seed_prices:
        for price in seed_prices(app, json.loads(args.seed_prices.read_text())):
            log.info("seeded price %s (%s)", price["id"], price["lookup_key"] or price["nickname"])
    log.info("Stripe stand-in (never for production) on http://127.0.0.1:%d", args.port)
    run_simple("127.0.0.1", args.port, app, threaded=True)


if __name__ == "__main__":
    main()
