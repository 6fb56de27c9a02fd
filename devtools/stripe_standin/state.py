"""The stand-in's ground floor: errors, ids, Stripe's fixtures, routes' shape, the state.

Everything else in the package imports from here, and this module imports from nothing in it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import secrets
import string
import threading
import time
from calendar import monthrange
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from werkzeug.routing import Rule

API_VERSION = "2026-10-28.endive"
FIXTURES_PATH = Path(
    os.environ.get("STRIPE_FIXTURES_PATH")
    or Path(__file__).resolve().parent.parent / "stripe_fixtures" / "fixtures3.json"
)
METER_EVENT_WINDOW = (35 * 86400, 300)  # Stripe: at most 35 days old, 5 minutes ahead
Json = dict[str, Any]
V2_LIST = {"next_page_url": None, "previous_page_url": None}


# ---------------------------------------------------------------- errors, ids, fixtures


class StripeError(Exception):
    """An error answered in Stripe's shape: {"error": {"type", "code", "message", "param"}}
    (and `decline_code` for a card error)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, **kw: str | None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param = kw.get("param")
        self.type = kw.get("type") or "invalid_request_error"
        self.decline_code = kw.get("decline_code")

    def body(self) -> Json:
        error = {"type": self.type, "code": self.code, "message": self.message, "param": self.param}
        if self.decline_code:
            error["decline_code"] = self.decline_code
        return {"error": error}

    def v2_body(self) -> Json:
        """API v2's shape: {"error": {"type", "code", "message"}} (a missing code: invalid_fields
        for a 400, as v2 answers a request whose fields are wrong)."""
        code = self.code or ("invalid_fields" if self.status == 400 else None)
        error = {"type": self.type, "code": code, "message": self.message}
        return {"error": error | ({"param": self.param} if self.param else {})}


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


def iso(ts: float) -> str:
    """A v2 timestamp: RFC 3339 in UTC with milliseconds ("2024-09-26T17:46:22.134Z")."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(value: Any, param: str) -> int:
    """A v2 date-time parameter ("2024-06-01T12:00:00Z", offsets and fractions allowed) as Unix
    seconds; anything else is refused naming `param`."""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        moment = None
    if not isinstance(value, str) or moment is None or moment.tzinfo is None:
        message = f"Invalid {param}: expected an RFC 3339 date-time such as 2024-06-01T12:00:00Z."
        raise StripeError(400, message, code="invalid_fields", param=param)
    return int(moment.timestamp())


def list_object(url: str, data: list[Json], limit: int | None) -> Json:
    limit = max(1, min(limit or 10, 100))
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit, "url": url}


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


def sim_now(sub: Json) -> int:
    """Simulated time: renewals move item periods ahead of the wall clock."""
    starts = [int(item["current_period_start"]) for item in sub["items"]["data"]]
    return max([int(time.time()), *starts])


# ---------------------------------------------------------------- routes' shape


class Endpoint(NamedTuple):
    # "api" (Stripe's v1 wire format), "v2" (API v2: JSON bodies, v2 errors), "v2_session" (v2,
    # authenticated by a meter event session's token), "control" (JSON) or "page" (HTML)
    kind: str
    handler: Callable[..., Any]
    allowed: frozenset[str] = frozenset()


def api(method: str, path: str, handler: Callable[..., Json], allowed: str = "") -> Rule:
    """A Stripe route; `allowed` lists its parameters (`[]` an index, `[*]` any key)."""
    endpoint = Endpoint("api", handler, frozenset([*allowed.split(), "expand[]"]))
    return Rule(path, methods=[method], endpoint=endpoint)


def v2(
    method: str,
    path: str,
    handler: Callable[..., Json],
    allowed: str = "",
    *,
    session: bool = False,
) -> Rule:
    """An API v2 route (JSON body or query string); `session`: authenticated by a meter event
    session's token instead of a secret key."""
    endpoint = Endpoint("v2_session" if session else "v2", handler, frozenset(allowed.split()))
    return Rule(path, methods=[method], endpoint=endpoint)


def control(method: str, path: str, handler: Callable[..., Any], kind: str = "control") -> Rule:
    return Rule(path, methods=[method], endpoint=Endpoint(kind, handler))


ID = "/<object_id>"


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
        "subscription_schedule",
        "billing_portal.configuration",
        "invoice",
        "invoiceitem",
        "billing_portal.session",
        "webhook_endpoint",
        "v2.core.event_destination",
    )

    def __init__(self, has_webhook: bool, *, async_meter_validation: bool = True) -> None:
        self.lock = threading.Lock()
        self.has_webhook = has_webhook
        self.public_url = ""  # where its hosted pages are (the app sets it from requests)
        # Stripe validates a meter event's meter, customer and value after accepting it; the
        # stand-in did so synchronously (400) before, which stays the default (meter_events.py).
        self.async_meter_validation = async_meter_validation
        self.store: dict[str, dict[str, Json]] = {kind: {} for kind in self.KINDS}
        self.session_orders: dict[str, Json] = {}  # checkout id -> line items, subscription_data
        self.meter_events: dict[str, Json] = {}  # by identifier
        self.billed: dict[str, str] = {}  # meter event identifier -> invoice that billed it
        self.event_log: dict[str, Json] = {}
        self.idempotency: dict[str, Json] = {}
        self.declines: dict[str, int] = {}  # customer -> payments still to decline
        # subscription item -> {"anchor": where its periods are counted from (default: created),
        # "usage_start": where its unbilled usage starts (a metered price change moves it)}
        self.item_clocks: dict[str, Json] = {}
        self.pending_changes: dict[str, Json] = {}  # subscription -> the pending update's effect
        # meter events (meter_events.py, meter_errors.py, meter_stream.py):
        self.canceled: dict[
            str, int
        ] = {}  # meter event identifier -> when an adjustment canceled it
        self.meter_errors: Json = {"pending": [], "reported": []}  # invalid events, asynchronously
        self.meter_drops: Json = {"waiting": 0, "dropped": []}  # /_standin/meter_events/drop_next
        self.meter_sessions: dict[str, Json] = {}  # authentication token -> meter event session
        self.v2_events: dict[str, Json] = {}  # thin events, in full (GET /v2/core/events/{id})
        self.clock: Json = {
            "offset": 0
        }  # seconds added to the wall clock (/_standin/clock/advance)

    def get(self, kind: str, object_id: Any, param: str = "id", status: int = 400) -> Json:
        obj = self.store[kind].get(object_id) if isinstance(object_id, str) else None
        if obj is None:
            raise no_such(kind.split(".")[-1].replace("_", " "), str(object_id), param, status)
        return obj

    def put(self, obj: Json) -> Json:
        self.store[obj["object"]][obj["id"]] = obj
        return obj

    SAVED = (
        "store",
        "session_orders",
        "meter_events",
        "billed",
        "event_log",
        "idempotency",
        "declines",
        "item_clocks",
        "pending_changes",
        "canceled",
        "meter_errors",
        "meter_drops",
        "meter_sessions",
        "v2_events",
        "clock",
    )

    def now(self) -> int:
        """The stand-in's wall clock for meter events: when an event is received, its default
        timestamp and allowed window, the 24 hours an adjustment may cancel it, session expiry.
        The wall clock unless /_standin/clock/advance moved it (billing periods are simulated
        apart from it, by /_standin/subscriptions/{id}/advance)."""
        return int(time.time()) + int(self.clock["offset"])

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
        names = {
            "billing.meter": "meters",
            "checkout.session": "checkout_sessions",
            "v2.core.event_destination": "event_destinations",
        }
        out: Json = {names.get(k, k + "s"): list(v.values()) for k, v in self.store.items()}
        out["meter_events"] = [
            {**e, "billed_on": self.billed.get(key), "canceled_at": self.canceled.get(key)}
            for key, e in self.meter_events.items()
        ]
        out["meter_errors"] = self.meter_errors  # pending and reported (an object, not a list)
        out["meter_drops"] = self.meter_drops
        out["thin_events"] = list(self.v2_events.values())
        out["clock"] = {"offset": self.clock["offset"], "now": self.now()}
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
    thin: list[Json] = field(default_factory=list)  # thin events and where each goes
    token: str | None = None  # a meter event session's token (v2_session routes)

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
