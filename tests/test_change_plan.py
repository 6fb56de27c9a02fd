"""POST change-plan through the real function, a real Postgres, and Stripe faked by respx; and the
webhook applying plan changes made anywhere (DESIGN.md "POST change-plan", sql/0050).

Stripe's rule the cycles mirror (flexible billing mode, "Update prices mid-cycle"): when the
metered price is replaced during a period, the usage metered before the change is billed at once
at the OLD price (its tiers from zero) and the usage after it at the NEW price at the period end
(its tiers from zero). So the cycle splits at the change into [start, change) on the old terms and
[change, end) on the new, usage assigned by `usage_records.metered_at`. A change at the period
boundary needs no split.

`StripeBilling` is Stripe's side: each subscription and schedule as Stripe has it "now", every
request kept (method, path, form, Idempotency-Key) so the tests assert exactly what was asked.
Objects are built from Stripe's own examples (fixtures3.json). Times are real: the periods are
placed around the wall clock, since the SQL compares with now() (grace hour, 35-day meter window).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import respx

from tests.conftest import WEBSITE_URL, function_client, stripe_fixture, user_token
from tests.test_webhook_support import deliver, event_object, new_id, price_object

DAY = 86_400
YEAR = 365 * DAY
LEASE_SECONDS = 60


# ---------------------------------------------------------------------------- Stripe's side


@dataclass
class Call:
    method: str
    path: str
    form: dict[str, str]
    key: str | None


def stripe_error(status: int, kind: str, message: str, code: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message, "code": code}})


def ts(unix_seconds: int) -> datetime:
    return datetime.fromtimestamp(unix_seconds, UTC)


class StripeBilling:
    """Subscriptions, their updates, and subscription schedules over respx, as Stripe keeps them.

    An update swaps the items' prices in place (an item keeps its id; a flat item moving from a
    monthly to a yearly price starts a new year now, as flexible billing mode does) and honours
    the idempotency key. `decline_updates` answers that many updates the way Stripe answers
    `payment_behavior=pending_if_incomplete` when the invoice is not paid: 200, nothing changed,
    `pending_update` set. `on_update` runs inside an update before Stripe applies it (a slow
    Stripe, a request landing meanwhile), `after_update` once it is applied but before it is
    answered (Stripe's event processed first); `on_retrieve` runs once inside the next retrieve,
    after the answer was read (a fetch that saw the state before something else happened).
    """

    def __init__(self, router: respx.Router) -> None:
        self.prices: dict[str, tuple[str, bool]] = {}  # id -> (interval, metered)
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.schedules: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}  # served to the webhook's invoice fetch
        self.calls: list[Call] = []
        self.decline_updates = 0
        self.on_update: Callable[[], None] | None = None
        self.on_retrieve: Callable[[], None] | None = None
        self.after_update: Callable[[], None] | None = None
        self._replays: dict[tuple[str, str], tuple[dict[str, str], dict[str, Any]]] = {}
        self._lock = threading.RLock()
        sub = r"^/v1/subscriptions/(?P<subscription_id>[^/]+)$"
        schedule = r"^/v1/subscription_schedules/(?P<schedule_id>[^/]+)"
        router.get(path__regex=sub).mock(side_effect=self._retrieve)
        router.post(path__regex=sub).mock(side_effect=self._update)
        router.get(path__regex=r"^/v1/invoices/(?P<invoice_id>[^/]+)$").mock(
            side_effect=lambda request, invoice_id: httpx.Response(
                200, json=self.invoices[invoice_id]
            )
        )
        router.post(path="/v1/subscription_schedules").mock(side_effect=self._create_schedule)
        router.get(path__regex=schedule + "$").mock(side_effect=self._get_schedule)
        router.post(path__regex=schedule + "$").mock(side_effect=self._update_schedule)
        router.post(path__regex=schedule + "/release$").mock(side_effect=self._release)

    # -- the catalogue and the objects

    def add_plan(self, plan: dict[str, Any]) -> None:
        self.prices[plan["stripe_price_id"]] = ("month", False)
        self.prices[plan["stripe_yearly_price_id"]] = ("year", False)
        self.prices[plan["stripe_metered_price_id"]] = ("month", True)

    def item(self, subscription_id: str, price_id: str, period: tuple[int, int]) -> dict[str, Any]:
        interval, metered = self.prices[price_id]
        item = stripe_fixture("subscription_item")
        item.update(
            id=f"si_{uuid.uuid4().hex[:14]}",
            subscription=subscription_id,
            price=price_object(price_id, interval=interval, metered=metered),
            current_period_start=period[0],
            current_period_end=period[1],
        )
        if metered:
            item.pop("quantity", None)
        else:
            item["quantity"] = 1
        return item

    def subscription(
        self,
        subscription_id: str,
        customer_id: str,
        organisation_id: str,
        items: list[tuple[str, tuple[int, int]]],
    ) -> dict[str, Any]:
        """A live subscription with `items` [(price, (period_start, period_end))], kept here."""
        sub = stripe_fixture("subscription")
        start = min(period[0] for _, period in items)
        sub.update(
            id=subscription_id,
            customer=customer_id,
            status="active",
            metadata={"organisation_id": organisation_id},
            cancel_at_period_end=False,
            cancel_at=None,
            canceled_at=None,
            ended_at=None,
            created=start,
            start_date=start,
            billing_cycle_anchor=start,
            currency="eur",
            trial_start=None,
            trial_end=None,
            pending_update=None,
            schedule=None,
            latest_invoice=None,
            billing_mode={"type": "flexible", "flexible": {"proration_discounts": "included"}},
        )
        sub["items"] = {
            "object": "list",
            "data": [self.item(subscription_id, price, period) for price, period in items],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        }
        self.subscriptions[subscription_id] = sub
        return sub

    def items_by_price(self, subscription_id: str) -> dict[str, dict[str, Any]]:
        items = self.subscriptions[subscription_id]["items"]["data"]
        return {item["price"]["id"]: item for item in items}

    def swap_price(self, subscription_id: str, old: str, new: str) -> None:
        """A change made elsewhere (the Dashboard): the item keeps its id and its period."""
        item = self.items_by_price(subscription_id)[old]
        interval, metered = self.prices[new]
        item["price"] = price_object(new, interval=interval, metered=metered)

    # -- requests

    def forms(self, method: str, path: str) -> list[dict[str, str]]:
        return [c.form for c in self.calls if (c.method, c.path) == (method, path)]

    def requests(self) -> list[tuple[str, str]]:
        return [(c.method, c.path) for c in self.calls]

    def _record(self, request: httpx.Request) -> Call:
        body = request.content.decode() if request.method == "POST" else request.url.query.decode()
        call = Call(
            request.method,
            request.url.path,
            dict(urllib.parse.parse_qsl(body, keep_blank_values=True)),
            request.headers.get("Idempotency-Key"),
        )
        with self._lock:
            self.calls.append(call)
        return call

    def _replayed(self, call: Call) -> httpx.Response | None:
        remembered = self._replays.get((call.path, call.key or ""))
        if remembered is None:
            return None
        if remembered[0] != call.form:
            return stripe_error(400, "idempotency_error", "Keys for idempotent requests ...")
        return httpx.Response(200, json=remembered[1])

    def _remember(self, call: Call, body: dict[str, Any]) -> httpx.Response:
        if call.key:
            self._replays[(call.path, call.key)] = (call.form, copy.deepcopy(body))
        return httpx.Response(200, json=body)

    def _retrieve(self, request: httpx.Request, subscription_id: str) -> httpx.Response:
        self._record(request)
        with self._lock:
            sub = copy.deepcopy(self.subscriptions.get(subscription_id))
        hook, self.on_retrieve = self.on_retrieve, None
        if hook:
            hook()
        if sub is None:
            message = f"No such subscription: '{subscription_id}'"
            return stripe_error(404, "invalid_request_error", message, "resource_missing")
        return httpx.Response(200, json=sub)

    def _update(self, request: httpx.Request, subscription_id: str) -> httpx.Response:
        call = self._record(request)
        with self._lock:
            replay = self._replayed(call)
        if replay is not None:
            return replay
        if self.on_update:
            self.on_update()
        with self._lock:
            sub = self.subscriptions[subscription_id]
            items = copy.deepcopy(sub["items"]["data"])
            now = int(time.time())
            i = 0
            while f"items[{i}][price]" in call.form or f"items[{i}][id]" in call.form:
                item_id, price = call.form.get(f"items[{i}][id]"), call.form[f"items[{i}][price]"]
                item = next((x for x in items if x["id"] == item_id), None)
                if item is None:
                    items.append(self.item(subscription_id, price, (now, now + 30 * DAY)))
                elif item["price"]["id"] != price:
                    before = item["price"]["recurring"]["interval"]
                    interval, metered = self.prices[price]
                    item["price"] = price_object(price, interval=interval, metered=metered)
                    if interval != before:  # a new billing interval starts now
                        length = YEAR if interval == "year" else 30 * DAY
                        item.update(current_period_start=now, current_period_end=now + length)
                i += 1
            if self.decline_updates > 0:
                self.decline_updates -= 1
                update = stripe_fixture("subscription")["pending_update"]
                update.update(
                    discount=None,
                    expires_at=now + 23 * 3600,
                    subscription_items=[x for x in items if x not in sub["items"]["data"]],
                )
                sub.update(pending_update=update, latest_invoice=new_id("in"))
            else:
                sub["items"]["data"] = items
                sub.update(pending_update=None, latest_invoice=new_id("in"))
            answer = self._remember(call, copy.deepcopy(sub))
        if self.after_update:
            self.after_update()
        return answer

    def _create_schedule(self, request: httpx.Request) -> httpx.Response:
        call = self._record(request)
        with self._lock:
            replay = self._replayed(call)
            if replay is not None:
                return replay
            sub = self.subscriptions[call.form["from_subscription"]]
            if sub["schedule"]:
                message = "You cannot migrate a subscription that is already attached to a schedule"
                return stripe_error(400, "invalid_request_error", message)
            items = sub["items"]["data"]
            start = min(item["current_period_start"] for item in items)
            end = max(item["current_period_end"] for item in items)
            schedule = stripe_fixture("subscription_schedule")
            phase = schedule["phases"][0]
            phase.update(
                start_date=start,
                end_date=end,
                currency="eur",
                items=[
                    {"price": x["price"]["id"], "quantity": x.get("quantity"), "metadata": {}}
                    for x in items
                ],
            )
            schedule.update(
                id=new_id("sub_sched"),
                customer=sub["customer"],
                subscription=sub["id"],
                status="active",
                current_phase={"start_date": start, "end_date": end},
                phases=[phase],
                end_behavior="release",
                canceled_at=None,
                completed_at=None,
                released_at=None,
                released_subscription=None,
            )
            self.schedules[schedule["id"]] = schedule
            sub["schedule"] = schedule["id"]
            return self._remember(call, copy.deepcopy(schedule))

    def _get_schedule(self, request: httpx.Request, schedule_id: str) -> httpx.Response:
        self._record(request)
        schedule = self.schedules.get(schedule_id)
        if schedule is None:
            message = f"No such subscription_schedule: '{schedule_id}'"
            return stripe_error(404, "invalid_request_error", message, "resource_missing")
        return httpx.Response(200, json=schedule)

    def _update_schedule(self, request: httpx.Request, schedule_id: str) -> httpx.Response:
        call = self._record(request)
        with self._lock:
            replay = self._replayed(call)
            if replay is not None:
                return replay
            schedule = self.schedules[schedule_id]
            if schedule["status"] not in ("not_started", "active"):
                message = f"You cannot update a subscription schedule that is {schedule['status']}"
                return stripe_error(400, "invalid_request_error", message)
            start = call.form.get("phases[0][start_date]")
            if start is not None and int(start) != schedule["current_phase"]["start_date"]:
                message = "You can not modify the start date of the current phase."
                return stripe_error(400, "invalid_request_error", message)
            schedule["end_behavior"] = call.form.get("end_behavior", schedule["end_behavior"])
            return self._remember(call, copy.deepcopy(schedule))

    def _release(self, request: httpx.Request, schedule_id: str) -> httpx.Response:
        call = self._record(request)
        with self._lock:
            replay = self._replayed(call)
            if replay is not None:
                return replay
            schedule = self.schedules[schedule_id]
            if schedule["status"] not in ("not_started", "active"):
                message = f"You cannot release a subscription schedule that is {schedule['status']}"
                return stripe_error(400, "invalid_request_error", message)
            self.release(schedule_id)
            return self._remember(call, copy.deepcopy(schedule))

    def release(self, schedule_id: str) -> None:
        """The schedule stops (released, here or in the Dashboard); the subscription carries on."""
        schedule = self.schedules[schedule_id]
        schedule.update(
            status="released",
            released_at=int(time.time()),
            released_subscription=schedule["subscription"],
            subscription=None,
        )
        self.subscriptions[schedule["released_subscription"]]["schedule"] = None


# ---------------------------------------------------------------------------- our side


@pytest.fixture
def stripe() -> Iterator[StripeBilling]:
    with respx.mock(base_url="https://api.stripe.com", assert_all_called=False) as router:
        yield StripeBilling(router)


@pytest.fixture
def client(function_env: dict[str, str]) -> Any:
    return function_client("change-plan", "change_plan")


@pytest.fixture
def webhook(function_env: dict[str, str]) -> Any:
    return function_client("stripe-webhook-handler", "stripe_webhook_handler")


@pytest.fixture
def plans(make_plan: Callable[..., dict[str, Any]], stripe: StripeBilling) -> dict[str, Any]:
    """Mini < Lite < Starter < Pro by flat price; Pro has the most included minutes."""
    tag = uuid.uuid4().hex[:8]
    made = {
        "mini": make_plan(
            name=f"Mini {tag}", included_minutes=100, monthly_price_cents=4900,
            yearly_price_cents=52920, overage_rate_cents=70, sort_order=0,
        ),
        "lite": make_plan(
            name=f"Lite {tag}", included_minutes=200, monthly_price_cents=9900,
            yearly_price_cents=106920, overage_rate_cents=60, sort_order=1,
        ),
        "starter": make_plan(
            name=f"Starter {tag}", included_minutes=500, monthly_price_cents=20400,
            yearly_price_cents=220320, overage_rate_cents=50, sort_order=2,
        ),
        "pro": make_plan(
            name=f"Pro {tag}", included_minutes=2000, monthly_price_cents=49900,
            yearly_price_cents=538920, overage_rate_cents=40, sort_order=3,
        ),
    }  # fmt: skip
    for plan in made.values():
        stripe.add_plan(plan)
    return made


@dataclass
class Subscribed:
    """An organisation (owner, admin, member) whose subscription the webhook has stored."""

    org: dict[str, Any]
    owner: str
    admin: str
    member: str
    sub_id: str
    customer_id: str
    plan: dict[str, Any]
    billing_period: str
    metered_period: tuple[int, int]
    flat_period: tuple[int, int]

    @property
    def org_id(self) -> str:
        return str(self.org["id"])


@pytest.fixture
def subscribe(
    db: psycopg.Connection[Any],
    make_user: Callable[..., str],
    make_org: Callable[..., dict[str, Any]],
    stripe: StripeBilling,
    webhook: Any,
) -> Callable[..., Subscribed]:
    """A subscription on `plan` delivered through the webhook (customer.subscription.created)."""

    def make(
        plan: dict[str, Any],
        billing_period: str = "monthly",
        *,
        metered_period: tuple[int, int] | None = None,
        flat_period: tuple[int, int] | None = None,
    ) -> Subscribed:
        owner, admin, member = make_user(), make_user(), make_user()
        customer_id = new_id("cus")
        org = make_org(
            owner, members={admin: "admin", member: "member"}, stripe_customer_id=customer_id
        )
        now = int(time.time())
        metered = metered_period or (now - 10 * DAY, now + 20 * DAY)
        if flat_period is None:
            flat_period = (
                metered if billing_period == "monthly" else (metered[0], metered[0] + YEAR)
            )
        flat_price = plan[
            "stripe_price_id" if billing_period == "monthly" else "stripe_yearly_price_id"
        ]
        sub_id = new_id("sub")
        stripe.subscription(
            sub_id,
            customer_id,
            str(org["id"]),
            [(flat_price, flat_period), (plan["stripe_metered_price_id"], metered)],
        )
        created = event_object(
            "customer.subscription.created", stripe.subscriptions[sub_id], created=metered[0]
        )
        response = deliver(webhook, created)
        assert response.status_code == 200, response.get_json()
        # The webhook saw this price when its period began (the cycle's confirmation).
        db.execute(
            "update billing_cycles c set confirmed_at = c.period_start from subscriptions s"
            " where s.id = c.subscription_id and s.stripe_subscription_id = %s",
            (sub_id,),
        )
        stripe.calls.clear()
        return Subscribed(
            org, owner, admin, member, sub_id, customer_id, plan, billing_period, metered,
            flat_period,
        )  # fmt: skip

    return make


def post(
    client: Any,
    body: Any,
    *,
    user: str | None = None,
    origin: str | None = WEBSITE_URL,
    content_type: str = "application/json",
) -> Any:
    headers = {}
    if origin:
        headers["Origin"] = origin
    if user:
        headers["Authorization"] = f"Bearer {user_token(user)}"
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post("/", data=data, headers=headers, content_type=content_type)


def error_code(response: Any) -> str:
    return str(response.get_json()["error"]["code"])


def choice(plan: dict[str, Any], period: str = "monthly") -> dict[str, str]:
    return {"plan_id": str(plan["id"]), "billing_period": period}


def record_call(
    db: psycopg.Connection[Any], org_id: str, minutes: int, ended_at: datetime | None = None
) -> dict[str, Any]:
    """Calls of `minutes` in all (one call lasts 24 h at most) reported as report-usage does
    (public.record_usage); the last one's result."""
    result: dict[str, Any] = {}
    while minutes > 0 or not result:
        part = min(minutes, 1000)
        minutes -= part
        row = db.execute(
            "select public.record_usage(%s, %s, %s, %s, %s) as result",
            (org_id, new_id("call"), part * 60, ended_at, LEASE_SECONDS),
        ).fetchone()
        assert row is not None
        result = row["result"]
    return result


def subscription_row(db: psycopg.Connection[Any], sub_id: str) -> dict[str, Any]:
    row = db.execute(
        "select * from subscriptions where stripe_subscription_id = %s", (sub_id,)
    ).fetchone()
    assert row is not None
    return dict(row)


def cycles(db: psycopg.Connection[Any], sub_id: str) -> list[dict[str, Any]]:
    """The subscription's cycles (parts) with their alerts, oldest first."""
    rows = db.execute(
        "select c.id, c.period_start, c.period_end, c.included_minutes, c.minutes_used,"
        " c.overage_minutes, c.overage_cost_cents, c.overage_rate_cents, c.status,"
        " c.closed_by_change, c.stripe_metered_price_id, c.stripe_invoice_id,"
        " array(select a.threshold_percent from usage_alerts a where a.billing_cycle_id = c.id"
        "       order by 1) as alerts,"
        " (select coalesce(sum(u.billed_minutes), 0) from usage_records u"
        "   where u.billing_cycle_id = c.id) as usage_rows_minutes"
        " from billing_cycles c join subscriptions s on s.id = c.subscription_id"
        " where s.stripe_subscription_id = %s order by c.period_start",
        (sub_id,),
    ).fetchall()
    return [dict(row) for row in rows]


def figures(cycle: dict[str, Any]) -> dict[str, Any]:
    keep = ("included_minutes", "minutes_used", "overage_minutes", "overage_cost_cents", "alerts")
    return {key: cycle[key] for key in keep}


def plan_changes(db: psycopg.Connection[Any], org_id: str) -> list[dict[str, Any]]:
    rows = db.execute(
        "select id, kind, status, from_plan_id, from_billing_period, to_plan_id,"
        " to_billing_period, error from plan_changes where organisation_id = %s"
        " order by created_at",
        (org_id,),
    ).fetchall()
    return [dict(row) for row in rows]


def audit(db: psycopg.Connection[Any], org_id: str, prefix: str = "subscription.plan") -> list[Any]:
    rows = db.execute(
        "select action, actor, details from audit_log where organisation_id = %s"
        " and action like %s order by id",
        (org_id, prefix + "%"),
    ).fetchall()
    return [dict(row) for row in rows]


def renewal_times(db: Any) -> dict[str, int]:
    """A boundary B an hour ago, the month before it, the month after it, the year before it (UTC
    calendar months, as private.metered_period counts them)."""
    row = db.execute(
        "with b as (select date_trunc('second', now() - interval '1 hour') at time zone 'UTC' as b)"
        " select extract(epoch from b.b at time zone 'UTC')::bigint as b,"
        " extract(epoch from (b.b - interval '1 month') at time zone 'UTC')::bigint as prev,"
        " extract(epoch from (b.b + interval '1 month') at time zone 'UTC')::bigint as next,"
        " extract(epoch from (b.b - interval '1 year') at time zone 'UTC')::bigint as year_ago"
        " from b"
    ).fetchone()
    return dict(row)


def ends(plan: dict[str, Any], period: str) -> dict[str, str]:
    return {"plan_id": str(plan["id"]), "billing_period": period}


def sub_path(subscribed: Subscribed) -> str:
    return f"/v1/subscriptions/{subscribed.sub_id}"


# ---------------------------------------------------------------------------- 1. who and what


def test_no_token_is_401(client: Any, stripe: StripeBilling, plans: dict[str, Any]) -> None:
    response = post(client, choice(plans["pro"]))

    assert (response.status_code, error_code(response)) == (401, "missing_token")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe.calls == []


def test_a_member_gets_403_and_nothing_is_claimed(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, choice(plans["pro"]), user=subscribed.member)

    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert stripe.calls == []
    assert plan_changes(db, subscribed.org_id) == []


def test_an_admin_may_change_the_plan(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, choice(plans["pro"]), user=subscribed.admin)

    assert response.status_code == 200, response.get_json()


def test_another_organisations_owner_gets_403(
    client: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    make_org: Callable[..., Any],
    db: Any,
) -> None:
    subscribed = subscribe(plans["starter"])
    outsider = str(make_org()["owner_id"])
    body = {**choice(plans["pro"]), "organisation_id": subscribed.org_id}
    response = post(client, body, user=outsider)

    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert stripe.calls == []
    assert subscription_row(db, subscribed.sub_id)["plan_id"] == plans["starter"]["id"]


@pytest.mark.parametrize("which", ["unknown", "inactive"])
def test_an_unknown_or_inactive_plan_is_404(
    client: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    make_plan: Callable[..., Any],
    db: Any,
    which: str,
) -> None:
    subscribed = subscribe(plans["starter"])
    plan_id = str(uuid.uuid4()) if which == "unknown" else str(make_plan(active=False)["id"])
    response = post(
        client, {"plan_id": plan_id, "billing_period": "monthly"}, user=subscribed.owner
    )

    assert (response.status_code, error_code(response)) == (404, "plan_not_found")
    assert stripe.calls == []
    assert plan_changes(db, subscribed.org_id) == []


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"billing_period": "weekly"}, "billing_period"),
        ({"billing_period": None}, "billing_period"),  # plan_id without billing_period
        ({"plan_id": "not-a-uuid"}, "plan_id"),
        ({"cancel_pending": True}, "cancel_pending"),  # together with plan_id
        ({"price_id": "price_cheap"}, "price_id"),  # the browser never names a price
        ({"organisation_id": 7}, "organisation_id"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(
    client: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
    body: dict[str, Any],
    field_name: str,
) -> None:
    subscribed = subscribe(plans["starter"])
    order = {**choice(plans["pro"]), **body}
    order = {key: value for key, value in order.items() if value is not None}
    response = post(client, order, user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == field_name
    assert field_name in response.get_json()["error"]["message"]
    assert stripe.calls == []
    assert plan_changes(db, subscribed.org_id) == []


def test_an_empty_body_names_plan_id(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, {}, user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == "plan_id"


def test_a_json_body_sent_as_text_plain_is_415(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, choice(plans["pro"]), user=subscribed.owner, content_type="text/plain")

    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe.calls == []


def test_preflight_from_the_website_and_other_origins_refused(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any
) -> None:
    ours = client.options(
        "/",
        headers={
            "Origin": WEBSITE_URL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    subscribed = subscribe(plans["starter"])
    theirs = post(
        client, choice(plans["pro"]), user=subscribed.owner, origin="https://evil.example"
    )

    assert ours.status_code == 204
    assert ours.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert "POST" in ours.headers["Access-Control-Allow-Methods"]
    assert "authorization" in ours.headers["Access-Control-Allow-Headers"].lower()
    assert (theirs.status_code, error_code(theirs)) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in theirs.headers
    assert stripe.calls == []


# ---------------------------------------------------------------------------- 2. the 409s


def test_no_live_subscription_is_409_no_subscription(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], make_org: Any
) -> None:
    org = make_org(stripe_customer_id=new_id("cus"))
    response = post(client, choice(plans["pro"]), user=str(org["owner_id"]))

    assert (response.status_code, error_code(response)) == (409, "no_subscription")
    assert stripe.calls == []


def test_a_canceled_subscription_is_409_no_subscription(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    db.execute(
        "update subscriptions set status = 'canceled' where stripe_subscription_id = %s",
        (subscribed.sub_id,),
    )
    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "no_subscription")
    assert stripe.calls == []


def test_past_due_is_409_payment_past_due(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    db.execute(
        "update subscriptions set status = 'past_due' where stripe_subscription_id = %s",
        (subscribed.sub_id,),
    )
    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "payment_past_due")
    assert stripe.calls == []
    assert plan_changes(db, subscribed.org_id) == []


def test_an_open_checkout_is_409_checkout_in_progress(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    db.execute(
        "insert into checkout_sessions (organisation_id, plan_id, billing_period, created_by,"
        " success_url, cancel_url, stripe_session_id, url, expires_at)"
        " values (%s, %s, 'monthly', %s, %s, %s, %s, %s, now() + interval '1 day')",
        (
            subscribed.org_id,
            plans["pro"]["id"],
            subscribed.owner,
            f"{WEBSITE_URL}/billing/success",
            f"{WEBSITE_URL}/billing/cancel",
            new_id("cs_test"),
            "https://checkout.stripe.com/c/pay/x",
        ),
    )
    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "checkout_in_progress")
    assert stripe.calls == []


def test_the_current_plan_and_period_is_409_same_plan(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, choice(plans["starter"]), user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "same_plan")
    assert stripe.calls == []
    assert plan_changes(db, subscribed.org_id) == []


def test_cancel_pending_with_nothing_pending_is_409_nothing_pending(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    response = post(client, {"cancel_pending": True}, user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "nothing_pending")
    assert stripe.calls == []


def claim_started(db: Any, subscribed: Subscribed, age: str) -> str:
    row = db.execute(
        "insert into plan_changes (organisation_id, subscription_id, requested_by, kind,"
        " from_plan_id, from_billing_period, to_plan_id, to_billing_period, created_at)"
        " select s.organisation_id, s.id, %s, 'upgrade', s.plan_id, 'monthly', s.plan_id,"
        " 'yearly', now() - %s::interval from subscriptions s"
        " where s.stripe_subscription_id = %s returning id",
        (subscribed.owner, age, subscribed.sub_id),
    ).fetchone()
    return str(row["id"])


def test_a_change_in_progress_is_409_change_in_progress(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    claim_started(db, subscribed, "10 seconds")
    response = post(client, choice(plans["pro"]), user=subscribed.admin)

    assert (response.status_code, error_code(response)) == (409, "change_in_progress")
    assert stripe.calls == []
    assert [c["status"] for c in plan_changes(db, subscribed.org_id)] == ["started"]


def test_an_abandoned_claim_does_not_block(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    abandoned = claim_started(db, subscribed, "3 minutes")
    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    statuses = {str(c["id"]): c["status"] for c in plan_changes(db, subscribed.org_id)}
    assert statuses.pop(abandoned) == "abandoned"
    assert list(statuses.values()) == ["applied"]


def test_two_requests_at_once_make_one_change_and_the_other_is_409(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    in_stripe, go_on = threading.Event(), threading.Event()

    def slow_stripe() -> None:
        in_stripe.set()
        assert go_on.wait(15)

    stripe.on_update = slow_stripe
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(
            post, client.application.test_client(), choice(plans["pro"]), user=subscribed.owner
        )
        assert in_stripe.wait(15)
        second = post(client.application.test_client(), choice(plans["pro"]), user=subscribed.admin)
        go_on.set()
        first_response = first.result(timeout=30)

    assert first_response.status_code == 200, first_response.get_json()
    assert (second.status_code, error_code(second)) == (409, "change_in_progress")
    assert len(stripe.forms("POST", sub_path(subscribed))) == 1
    assert [c["status"] for c in plan_changes(db, subscribed.org_id)] == ["applied"]


@pytest.mark.parametrize(
    ("current", "target", "kind", "effective"),
    [
        (("starter", "monthly"), ("pro", "monthly"), "upgrade", "now"),
        (("starter", "yearly"), ("pro", "yearly"), "upgrade", "now"),
        (("starter", "monthly"), ("mini", "yearly"), "upgrade", "now"),  # monthly -> yearly
        (("starter", "monthly"), ("twin", "monthly"), "downgrade", "period_end"),  # equal price
        (("pro", "yearly"), ("starter", "yearly"), "downgrade", "period_end"),
        (("pro", "yearly"), ("pro", "monthly"), "downgrade", "period_end"),  # yearly -> monthly
    ],
)
def test_the_direction_decides_now_or_period_end(
    client: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    make_plan: Callable[..., Any],
    db: Any,
    current: tuple[str, str],
    target: tuple[str, str],
    kind: str,
    effective: str,
) -> None:
    plans["twin"] = make_plan(monthly_price_cents=plans["starter"]["monthly_price_cents"])
    stripe.add_plan(plans["twin"])
    subscribed = subscribe(plans[current[0]], current[1])

    response = post(client, choice(plans[target[0]], target[1]), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["effective"] == effective
    (change,) = plan_changes(db, subscribed.org_id)
    assert (change["kind"], change["status"]) == (
        kind,
        "applied" if kind == "upgrade" else "scheduled",
    )
    scheduled = any(c.path == "/v1/subscription_schedules" for c in stripe.calls)
    assert scheduled is (kind == "downgrade")


# ---------------------------------------------------------------------------- 3. upgrades


def test_upgrade_is_one_stripe_update_and_splits_the_cycle_at_the_change(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    now = datetime.now(UTC)
    record_call(db, subscribed.org_id, 300, now - timedelta(days=3))
    record_call(db, subscribed.org_id, 150, now - timedelta(days=1))  # 450 of 500: 80 %
    during: list[dict[str, Any]] = []
    # A call reported while Stripe makes the change: counted in the cycle as it still is, metered
    # after the change, so Stripe bills it at the new price: it moves to the new part.
    stripe.on_update = lambda: during.append(record_call(db, subscribed.org_id, 100))
    items = stripe.items_by_price(subscribed.sub_id)
    flat_item = items[starter["stripe_price_id"]]["id"]
    metered_item = items[starter["stripe_metered_price_id"]]["id"]

    response = post(client, choice(pro), user=subscribed.owner)
    after = record_call(db, subscribed.org_id, 60)

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    change = plan_changes(db, subscribed.org_id)
    assert change == [
        {
            "id": change[0]["id"],
            "kind": "upgrade",
            "status": "applied",
            "from_plan_id": starter["id"],
            "from_billing_period": "monthly",
            "to_plan_id": pro["id"],
            "to_billing_period": "monthly",
            "error": None,
        }
    ]
    assert stripe.requests() == [("GET", sub_path(subscribed)), ("POST", sub_path(subscribed))]
    update = stripe.calls[1]
    assert update.form == {
        "items[0][id]": flat_item,
        "items[0][price]": pro["stripe_price_id"],
        "items[1][id]": metered_item,
        "items[1][price]": pro["stripe_metered_price_id"],
        "proration_behavior": "always_invoice",
        "payment_behavior": "pending_if_incomplete",
    }
    assert update.key == f"plan-change-{change[0]['id']}"
    effective_at = datetime.fromisoformat(body.pop("effective_at"))
    assert body == {
        "subscription_id": subscribed.sub_id,
        "plan_id": str(pro["id"]),
        "billing_period": "monthly",
        "effective": "now",
    }
    assert now - timedelta(minutes=1) < effective_at <= datetime.now(UTC)
    assert during[0]["alerts"] == [100]  # 550 of 500 before the split

    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"], row["stripe_metered_price_id"]) == (
        pro["id"],
        "monthly",
        pro["stripe_metered_price_id"],
    )
    assert row["pending_plan_id"] is None
    plan_changed = [
        a for a in audit(db, subscribed.org_id) if a["action"] == "subscription.plan_changed"
    ]
    assert len(plan_changed) == 1
    assert plan_changed[0]["details"]["from"]["plan_id"] == str(starter["id"])
    assert plan_changed[0]["details"]["from"]["billing_period"] == "monthly"
    assert plan_changed[0]["details"]["to"]["plan_id"] == str(pro["id"])
    assert plan_changed[0]["details"]["to"]["billing_period"] == "monthly"

    old, new = cycles(db, subscribed.sub_id)
    start, end = subscribed.metered_period
    split_at = effective_at  # the moment change-plan asked Stripe
    assert (old["period_start"], old["period_end"]) == (ts(start), split_at)
    assert (new["period_start"], new["period_end"]) == (split_at, ts(end))
    assert (old["status"], old["closed_by_change"]) == ("closed", True)
    assert (new["status"], new["closed_by_change"]) == ("active", False)
    assert old["stripe_metered_price_id"] == starter["stripe_metered_price_id"]
    assert new["stripe_metered_price_id"] == pro["stripe_metered_price_id"]
    # Old price, tiers from zero: 450 of 500, no overage, 80 % (100 % withdrawn with the move).
    assert figures(old) == {
        "included_minutes": 500,
        "minutes_used": 450,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [80],
    }
    # New price, tiers from zero: the call metered during the change and the one after.
    assert figures(new) == {
        "included_minutes": 2000,
        "minutes_used": 160,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [],
    }
    assert old["usage_rows_minutes"] == 450 and new["usage_rows_minutes"] == 160
    summary = db.execute("select public.usage_summary(%s) as s", (subscribed.org_id,)).fetchone()
    assert {
        k: summary["s"][k] for k in ("included_minutes", "minutes_used", "overage_minutes")
    } == {
        "included_minutes": 2000,
        "minutes_used": 160,
        "overage_minutes": 0,
    }
    assert summary["s"]["plan"]["id"] == str(pro["id"])
    assert datetime.fromisoformat(summary["s"]["period_start"]) == split_at
    assert (after["included_minutes"], after["minutes_used"], after["late"]) == (2000, 160, False)


def test_monthly_to_yearly_upgrade_bills_the_old_usage_at_the_old_terms(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    record_call(db, subscribed.org_id, 600, datetime.now(UTC) - timedelta(days=2))
    items = stripe.items_by_price(subscribed.sub_id)

    response = post(client, choice(pro, "yearly"), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["plan_id"], body["billing_period"], body["effective"]) == (
        str(pro["id"]),
        "yearly",
        "now",
    )
    (change,) = plan_changes(db, subscribed.org_id)
    assert [(c.method, c.path) for c in stripe.calls if c.method == "POST"] == [
        ("POST", sub_path(subscribed))
    ]
    update = stripe.forms("POST", sub_path(subscribed))[0]
    assert update == {
        "items[0][id]": items[starter["stripe_price_id"]]["id"],
        "items[0][price]": pro["stripe_yearly_price_id"],
        "items[1][id]": items[starter["stripe_metered_price_id"]]["id"],
        "items[1][price]": pro["stripe_metered_price_id"],
        "proration_behavior": "always_invoice",
        "payment_behavior": "pending_if_incomplete",
    }
    assert stripe.calls[-1].key == f"plan-change-{change['id']}"
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"]) == (pro["id"], "yearly")
    flat = stripe.items_by_price(subscribed.sub_id)[pro["stripe_yearly_price_id"]]
    assert row["current_period_end"] == ts(flat["current_period_end"])  # a year from the change
    old, new = cycles(db, subscribed.sub_id)
    assert figures(old) == {
        "included_minutes": 500,
        "minutes_used": 600,
        "overage_minutes": 100,
        "overage_cost_cents": 100 * 50,
        "alerts": [80, 100, 120],
    }
    assert figures(new) == {
        "included_minutes": 2000,
        "minutes_used": 0,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [],
    }
    assert new["period_end"] == ts(subscribed.metered_period[1])  # the metered month goes on
    actions = [(a["action"], a["details"]["to"]) for a in audit(db, subscribed.org_id)]
    assert ("subscription.plan_changed", {**ends(pro, "yearly"), "plan": pro["name"]}) in actions


def test_monthly_to_yearly_on_the_same_plan_keeps_the_cycle_whole(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    starter = plans["starter"]
    subscribed = subscribe(starter)
    record_call(db, subscribed.org_id, 450, datetime.now(UTC) - timedelta(days=2))

    response = post(client, choice(starter, "yearly"), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    update = stripe.forms("POST", sub_path(subscribed))
    assert len(update) == 1
    assert update[0]["items[0][price]"] == starter["stripe_yearly_price_id"]
    assert update[0]["items[1][price]"] == starter["stripe_metered_price_id"]
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"]) == (starter["id"], "yearly")
    (cycle,) = cycles(db, subscribed.sub_id)  # the metered price did not change: no split
    assert (cycle["period_start"], cycle["period_end"]) == tuple(map(ts, subscribed.metered_period))
    assert figures(cycle) == {
        "included_minutes": 500,
        "minutes_used": 450,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [80],
    }


def test_a_retried_upgrade_after_success_is_409_same_plan_without_stripe(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    first = post(client, choice(plans["pro"]), user=subscribed.owner)
    calls = len(stripe.calls)
    again = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert first.status_code == 200, first.get_json()
    assert (again.status_code, error_code(again)) == (409, "same_plan")
    assert len(stripe.calls) == calls
    assert len(cycles(db, subscribed.sub_id)) == 2
    assert [c["status"] for c in plan_changes(db, subscribed.org_id)] == ["applied"]


def test_a_call_that_ended_before_the_upgrade_reported_after_it_counts_late_in_the_new_part(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    before_change = datetime.now(UTC) - timedelta(hours=2)
    assert post(client, choice(plans["pro"]), user=subscribed.owner).status_code == 200

    # Stripe invoiced the old part's usage at the change: nothing more can be billed there.
    result = record_call(db, subscribed.org_id, 30, before_change)

    assert result["late"] is True
    old, new = cycles(db, subscribed.sub_id)
    assert (old["minutes_used"], new["minutes_used"]) == (0, 30)
    assert [a["action"] for a in audit(db, subscribed.org_id, "usage.late")] == ["usage.late"]


def test_the_upgrades_own_webhook_afterwards_changes_nothing_more(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    subscribed = subscribe(plans["starter"])
    record_call(db, subscribed.org_id, 450, datetime.now(UTC) - timedelta(days=1))
    assert post(client, choice(plans["pro"]), user=subscribed.owner).status_code == 200
    record_call(db, subscribed.org_id, 20)
    split = cycles(db, subscribed.sub_id)
    audited = audit(db, subscribed.org_id)

    event = event_object(
        "customer.subscription.updated",
        stripe.subscriptions[subscribed.sub_id],
        created=int(time.time()),
    )
    response = deliver(webhook, event)

    assert response.status_code == 200, response.get_json()
    assert [figures(c) for c in cycles(db, subscribed.sub_id)] == [figures(c) for c in split]
    assert [(c["period_start"], c["period_end"]) for c in cycles(db, subscribed.sub_id)] == [
        (c["period_start"], c["period_end"]) for c in split
    ]
    assert audit(db, subscribed.org_id) == audited


def test_the_upgrades_webhook_processed_before_the_answer_splits_once(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    """Stripe's customer.subscription.updated for our own update is processed while the update's
    answer is still on its way back to change-plan: one split, the same figures, one audit row."""
    subscribed = subscribe(plans["starter"])
    record_call(db, subscribed.org_id, 450, datetime.now(UTC) - timedelta(days=1))
    delivered: list[Any] = []

    def webhook_first() -> None:
        stripe.after_update = None
        event = event_object(
            "customer.subscription.updated",
            stripe.subscriptions[subscribed.sub_id],
            created=int(time.time()),
        )
        delivered.append(deliver(webhook.application.test_client(), event))

    stripe.after_update = webhook_first
    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert delivered[0].status_code == 200, delivered[0].get_json()
    assert response.status_code == 200, response.get_json()
    old, new = cycles(db, subscribed.sub_id)
    assert (old["minutes_used"], new["minutes_used"]) == (450, 0)
    assert (old["included_minutes"], new["included_minutes"]) == (500, 2000)
    plan_changed = [
        a for a in audit(db, subscribed.org_id) if a["action"] == "subscription.plan_changed"
    ]
    assert len(plan_changed) == 1
    assert plan_changes(db, subscribed.org_id)[0]["status"] == "applied"


def test_an_upgrade_replaces_a_pending_downgrade(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    stripe.calls.clear()

    response = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    upgrade = plan_changes(db, subscribed.org_id)[-1]
    assert stripe.requests() == [
        ("GET", sub_path(subscribed)),
        ("GET", f"/v1/subscription_schedules/{schedule_id}"),
        ("POST", f"/v1/subscription_schedules/{schedule_id}/release"),
        ("POST", sub_path(subscribed)),
    ]
    assert stripe.calls[2].key == f"plan-release-{upgrade['id']}"
    assert stripe.calls[3].key == f"plan-change-{upgrade['id']}"
    row = subscription_row(db, subscribed.sub_id)
    assert row["plan_id"] == plans["pro"]["id"]
    assert (row["pending_plan_id"], row["pending_billing_period"], row["pending_effective_at"]) == (
        None,
        None,
        None,
    )


def test_two_upgrades_in_one_period_split_it_twice(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["lite"])
    record_call(db, subscribed.org_id, 250, datetime.now(UTC) - timedelta(days=2))  # 50 over
    assert post(client, choice(plans["starter"]), user=subscribed.owner).status_code == 200
    record_call(db, subscribed.org_id, 400)
    time.sleep(1.1)  # a change splits at a whole second (Stripe's times are whole seconds)
    assert post(client, choice(plans["pro"]), user=subscribed.owner).status_code == 200
    record_call(db, subscribed.org_id, 10)

    parts = cycles(db, subscribed.sub_id)

    assert [figures(c) for c in parts] == [
        {
            "included_minutes": 200,
            "minutes_used": 250,
            "overage_minutes": 50,
            "overage_cost_cents": 50 * 60,
            "alerts": [80, 100, 120],
        },
        {
            "included_minutes": 500,
            "minutes_used": 400,
            "overage_minutes": 0,
            "overage_cost_cents": 0,
            "alerts": [80],
        },
        {
            "included_minutes": 2000,
            "minutes_used": 10,
            "overage_minutes": 0,
            "overage_cost_cents": 0,
            "alerts": [],
        },
    ]
    assert [c["status"] for c in parts] == ["closed", "closed", "active"]
    assert parts[0]["period_end"] == parts[1]["period_start"]
    assert parts[1]["period_end"] == parts[2]["period_start"]
    assert parts[2]["period_end"] == ts(subscribed.metered_period[1])


def test_an_upgrade_before_the_renewal_webhook_still_bills_the_earlier_usage_at_the_old_terms(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """The period renewed at Stripe an hour ago; its webhook is not processed yet (delayed,
    retried), so calls since opened the new cycle on the predicted (Starter) terms. The owner
    upgrades now: Stripe bills the 600 minutes before the change at Starter's price (100 over,
    5,000 cents on the change's invoice) and the rest at Pro's."""
    starter, pro = plans["starter"], plans["pro"]
    t = renewal_times(db)
    subscribed = subscribe(starter, metered_period=(t["prev"], t["b"]))
    record_call(db, subscribed.org_id, 600, ts(t["b"] + 300))
    sub = stripe.subscriptions[subscribed.sub_id]
    for item in sub["items"]["data"]:  # Stripe renewed it at B
        item.update(current_period_start=t["b"], current_period_end=t["next"])

    response = post(client, choice(pro), user=subscribed.owner)
    record_call(db, subscribed.org_id, 20)

    assert response.status_code == 200, response.get_json()
    split_at = datetime.fromisoformat(response.get_json()["effective_at"])
    parts = cycles(db, subscribed.sub_id)
    assert [(c["period_start"], c["period_end"]) for c in parts] == [
        (ts(t["prev"]), ts(t["b"])),
        (ts(t["b"]), split_at),
        (split_at, ts(t["next"])),
    ], f"not split at the change: {[(c['period_start'], figures(c)) for c in parts]}"
    assert figures(parts[1]) == {
        "included_minutes": 500,
        "minutes_used": 600,
        "overage_minutes": 100,
        "overage_cost_cents": 100 * 50,
        "alerts": [80, 100, 120],
    }
    assert figures(parts[2])["minutes_used"] == 20


# ---------------------------------------------------------------------------- 4. declined


def test_a_declined_upgrade_says_it_canceled_the_pending_downgrade(
    client: Any, webhook: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """The upgrade replaces a pending downgrade, so its schedule is released before the update;
    when the update is declined the customer is told the downgrade is gone too."""
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    stripe.decline_updates = 1

    declined = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert (declined.status_code, error_code(declined)) == (402, "payment_failed")
    message = declined.get_json()["error"]["message"]
    assert "stays on its plan" in message
    assert "The change scheduled for the period end was canceled." in message
    assert stripe.schedules[schedule_id]["status"] == "released"
    released = event_object(
        "customer.subscription.updated", stripe.subscriptions[subscribed.sub_id]
    )
    assert deliver(webhook, released).status_code == 200
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["pending_plan_id"]) == (plans["starter"]["id"], None)


def test_a_declined_upgrade_is_402_changes_nothing_and_can_be_retried(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    record_call(db, subscribed.org_id, 450, datetime.now(UTC) - timedelta(days=1))
    row_before = subscription_row(db, subscribed.sub_id)
    cycles_before = cycles(db, subscribed.sub_id)
    stripe.decline_updates = 1

    declined = post(client, choice(pro), user=subscribed.owner)

    assert (declined.status_code, error_code(declined)) == (402, "payment_failed")
    assert "canceled" not in declined.get_json()["error"]["message"]
    assert declined.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    row = subscription_row(db, subscribed.sub_id)
    for column in (
        "plan_id",
        "billing_period",
        "stripe_metered_price_id",
        "status",
        "pending_plan_id",
        "current_period_end",
    ):
        assert row[column] == row_before[column], column
    assert cycles(db, subscribed.sub_id) == cycles_before
    (failed,) = plan_changes(db, subscribed.org_id)
    assert (failed["kind"], failed["status"]) == ("upgrade", "payment_failed")
    assert [a["action"] for a in audit(db, subscribed.org_id)] == [
        "subscription.plan_change_failed"
    ]

    retried = post(client, choice(pro), user=subscribed.owner)

    assert retried.status_code == 200, retried.get_json()
    first, second = plan_changes(db, subscribed.org_id)
    assert [first["status"], second["status"]] == ["payment_failed", "applied"]
    keys = [c.key for c in stripe.calls if (c.method, c.path) == ("POST", sub_path(subscribed))]
    assert keys == [f"plan-change-{first['id']}", f"plan-change-{second['id']}"]
    assert subscription_row(db, subscribed.sub_id)["plan_id"] == pro["id"]
    assert len(cycles(db, subscribed.sub_id)) == 2


def test_a_stripe_failure_leaves_no_stuck_claim(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])

    def down() -> None:
        stripe.on_update = None
        raise httpx.ConnectError("Stripe is unreachable")

    stripe.on_update = down
    failed = post(client, choice(plans["pro"]), user=subscribed.owner)
    retried = post(client, choice(plans["pro"]), user=subscribed.owner)

    assert (failed.status_code, error_code(failed)) == (503, "stripe_unavailable")
    assert retried.status_code == 200, retried.get_json()
    assert [c["status"] for c in plan_changes(db, subscribed.org_id)] == ["failed", "applied"]


# ---------------------------------------------------------------------------- 5. downgrades


def phases_form(
    current: list[tuple[str, int | None]],
    start: int,
    end: int,
    following: list[tuple[str, int | None]],
    interval: str,
) -> dict[str, str]:
    form = {"end_behavior": "release", "proration_behavior": "none"}
    for n, items in enumerate([current, following]):
        for i, (price, quantity) in enumerate(items):
            form[f"phases[{n}][items][{i}][price]"] = price
            if quantity is not None:
                form[f"phases[{n}][items][{i}][quantity]"] = str(quantity)
    form["phases[0][start_date]"] = str(start)
    form["phases[0][end_date]"] = str(end)
    form["phases[1][duration][interval]"] = interval
    form["phases[1][duration][interval_count]"] = "1"
    return form


def test_a_downgrade_is_scheduled_for_the_period_end_then_canceled(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    starter, lite = plans["starter"], plans["lite"]
    subscribed = subscribe(starter)
    start, end = subscribed.metered_period

    response = post(client, choice(lite), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    (change,) = plan_changes(db, subscribed.org_id)
    assert (change["kind"], change["status"]) == ("downgrade", "scheduled")
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    schedule_path = f"/v1/subscription_schedules/{schedule_id}"
    assert stripe.requests() == [
        ("GET", sub_path(subscribed)),
        ("POST", "/v1/subscription_schedules"),
        ("GET", schedule_path),
        ("POST", schedule_path),
    ]
    assert stripe.calls[1].form == {"from_subscription": subscribed.sub_id}
    assert stripe.calls[1].key == f"plan-schedule-{change['id']}"
    assert stripe.calls[3].form == phases_form(
        [(starter["stripe_price_id"], 1), (starter["stripe_metered_price_id"], None)],
        start,
        end,
        [(lite["stripe_price_id"], 1), (lite["stripe_metered_price_id"], None)],
        "month",
    )
    answer = response.get_json()
    assert answer == {
        "subscription_id": subscribed.sub_id,
        "plan_id": str(lite["id"]),
        "billing_period": "monthly",
        "effective": "period_end",
        "effective_at": answer["effective_at"],
    }
    assert datetime.fromisoformat(answer["effective_at"]) == ts(end)
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"]) == (starter["id"], "monthly")
    assert (row["pending_plan_id"], row["pending_billing_period"], row["pending_effective_at"]) == (
        lite["id"],
        "monthly",
        ts(end),
    )
    (scheduled,) = audit(db, subscribed.org_id)
    assert scheduled["action"] == "subscription.plan_change_scheduled"
    assert scheduled["details"]["from"] == ends(starter, "monthly")
    assert scheduled["details"]["to"] == ends(lite, "monthly")
    (cycle,) = cycles(db, subscribed.sub_id)
    assert cycle["included_minutes"] == 500  # nothing changes before the period end

    # The same request again (a double click, a reload): the same answer, Stripe not asked.
    stripe.calls.clear()
    again = post(client, choice(lite), user=subscribed.owner)

    assert again.status_code == 200, again.get_json()
    assert again.get_json() == answer
    assert stripe.calls == []
    assert len(plan_changes(db, subscribed.org_id)) == 1

    canceled = post(client, {"cancel_pending": True}, user=subscribed.admin)

    assert canceled.status_code == 200, canceled.get_json()
    release = plan_changes(db, subscribed.org_id)[-1]
    assert (release["kind"], release["status"]) == ("cancel_pending", "released")
    assert stripe.requests() == [
        ("GET", sub_path(subscribed)),
        ("GET", schedule_path),
        ("POST", schedule_path + "/release"),
    ]
    assert stripe.calls[-1].key == f"plan-release-{release['id']}"
    body = canceled.get_json()
    assert {k: body[k] for k in ("subscription_id", "plan_id", "billing_period", "effective")} == {
        "subscription_id": subscribed.sub_id,
        "plan_id": str(starter["id"]),
        "billing_period": "monthly",
        "effective": "now",
    }
    row = subscription_row(db, subscribed.sub_id)
    assert (row["pending_plan_id"], row["pending_billing_period"], row["pending_effective_at"]) == (
        None,
        None,
        None,
    )
    assert [a["action"] for a in audit(db, subscribed.org_id)] == [
        "subscription.plan_change_scheduled",
        "subscription.plan_change_canceled",
    ]
    nothing = post(client, {"cancel_pending": True}, user=subscribed.owner)
    assert (nothing.status_code, error_code(nothing)) == (409, "nothing_pending")


def test_yearly_to_monthly_waits_for_the_end_of_the_paid_year(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    pro = plans["pro"]
    subscribed = subscribe(pro, "yearly")
    year_end = subscribed.flat_period[1]

    response = post(client, choice(pro, "monthly"), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["effective"] == "period_end"
    assert datetime.fromisoformat(response.get_json()["effective_at"]) == ts(year_end)
    schedule_path = (
        f"/v1/subscription_schedules/{stripe.subscriptions[subscribed.sub_id]['schedule']}"
    )
    assert stripe.forms("POST", schedule_path) == [
        phases_form(
            [(pro["stripe_yearly_price_id"], 1), (pro["stripe_metered_price_id"], None)],
            subscribed.metered_period[0],
            year_end,
            [(pro["stripe_price_id"], 1), (pro["stripe_metered_price_id"], None)],
            "month",
        )
    ]
    row = subscription_row(db, subscribed.sub_id)
    assert (row["billing_period"], row["pending_billing_period"], row["pending_effective_at"]) == (
        "yearly",
        "monthly",
        ts(year_end),
    )


def test_a_new_downgrade_replaces_the_pending_one_on_the_same_schedule(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    stripe.calls.clear()

    response = post(client, choice(plans["mini"]), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    second = plan_changes(db, subscribed.org_id)[-1]
    schedule_path = f"/v1/subscription_schedules/{schedule_id}"
    assert stripe.requests() == [
        ("GET", sub_path(subscribed)),
        ("GET", schedule_path),
        ("POST", schedule_path),
    ]
    assert stripe.calls[-1].key == f"plan-schedule-update-{second['id']}"
    assert stripe.calls[-1].form["phases[1][items][0][price]"] == plans["mini"]["stripe_price_id"]
    row = subscription_row(db, subscribed.sub_id)
    assert (row["pending_plan_id"], row["stripe_schedule_id"]) == (plans["mini"]["id"], schedule_id)


def test_a_downgrade_after_the_last_one_took_effect_starts_at_the_current_phase(
    client: Any, webhook: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """Starter -> Lite took effect at B; the schedule stays attached for its last phase (a month
    of Lite). Lite -> Mini then updates that schedule from its current phase: sending the first,
    finished phase's start was refused by Stripe for the whole month (502 on every retry)."""
    starter, lite, mini = plans["starter"], plans["lite"], plans["mini"]
    t = renewal_times(db)
    subscribed = subscribe(starter, metered_period=(t["prev"], t["b"]))
    assert post(client, choice(lite), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]

    # The renewal at B: Stripe enters the schedule's next phase and puts Lite's prices on.
    sub = stripe.subscriptions[subscribed.sub_id]
    sub["items"]["data"] = [
        stripe.item(subscribed.sub_id, lite["stripe_price_id"], (t["b"], t["next"])),
        stripe.item(subscribed.sub_id, lite["stripe_metered_price_id"], (t["b"], t["next"])),
    ]
    stripe.schedules[schedule_id]["current_phase"] = {"start_date": t["b"], "end_date": t["next"]}
    renewed = deliver(webhook, event_object("customer.subscription.updated", sub, created=t["b"]))
    assert renewed.status_code == 200, renewed.get_json()
    assert subscription_row(db, subscribed.sub_id)["plan_id"] == lite["id"]
    stripe.calls.clear()

    response = post(client, choice(mini), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert datetime.fromisoformat(response.get_json()["effective_at"]) == ts(t["next"])
    update = stripe.calls[-1]
    assert update.path == f"/v1/subscription_schedules/{schedule_id}"
    assert update.form == phases_form(
        [(lite["stripe_price_id"], 1), (lite["stripe_metered_price_id"], None)],
        t["b"],
        t["next"],
        [(mini["stripe_price_id"], 1), (mini["stripe_metered_price_id"], None)],
        "month",
    )
    row = subscription_row(db, subscribed.sub_id)
    assert (row["pending_plan_id"], row["stripe_schedule_id"]) == (mini["id"], schedule_id)


def test_cancel_pending_after_stripe_applied_it_is_409_and_our_copy_follows(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """The period ended and Stripe entered the schedule's next phase, its webhook not here yet:
    "you stay on Starter" would be false (the subscription is on Lite)."""
    starter, lite = plans["starter"], plans["lite"]
    subscribed = subscribe(starter)
    assert post(client, choice(lite), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    stripe.swap_price(subscribed.sub_id, starter["stripe_price_id"], lite["stripe_price_id"])
    stripe.swap_price(
        subscribed.sub_id, starter["stripe_metered_price_id"], lite["stripe_metered_price_id"]
    )

    response = post(client, {"cancel_pending": True}, user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "nothing_pending")
    assert "already taken effect" in response.get_json()["error"]["message"]
    assert stripe.schedules[schedule_id]["status"] == "active"  # nothing released
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["pending_plan_id"]) == (lite["id"], None)
    assert plan_changes(db, subscribed.org_id)[-1]["status"] == "failed"


@pytest.mark.parametrize("ending", [{"cancel_at_period_end": True}, {"cancel_at": "period_end"}])
def test_a_downgrade_of_a_subscription_set_to_end_is_409_and_schedules_nothing(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any, ending: Any
) -> None:
    """A schedule's end_behavior would replace the cancellation the customer chose."""
    subscribed = subscribe(plans["starter"])
    sub = stripe.subscriptions[subscribed.sub_id]
    sub.update(
        cancel_at_period_end=ending.get("cancel_at_period_end", False),
        cancel_at=subscribed.metered_period[1] if "cancel_at" in ending else None,
    )

    response = post(client, choice(plans["lite"]), user=subscribed.owner)

    assert (response.status_code, error_code(response)) == (409, "subscription_ending")
    assert ("POST", "/v1/subscription_schedules") not in stripe.requests()
    assert sub["schedule"] is None
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["pending_plan_id"]) == (plans["starter"]["id"], None)
    assert plan_changes(db, subscribed.org_id)[-1]["status"] == "failed"


def test_cancel_pending_on_an_older_price_of_the_plan_keeps_the_plan(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """The catalogue gave Starter a new flat price after this customer subscribed (they keep
    theirs): their subscription's price is not the plan's current one, and that is no change."""
    starter, lite = plans["starter"], plans["lite"]
    subscribed = subscribe(starter)
    assert post(client, choice(lite), user=subscribed.owner).status_code == 200
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]
    db.execute(
        "update billing_plans set stripe_price_id = %s where id = %s",
        (new_id("price_flat_m_v2"), starter["id"]),
    )

    response = post(client, {"cancel_pending": True}, user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["plan_id"] == str(starter["id"])
    assert stripe.schedules[schedule_id]["status"] == "released"


def test_choosing_the_current_plan_while_a_downgrade_is_pending_cancels_it(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    stripe.calls.clear()

    response = post(client, choice(plans["starter"]), user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["effective"] == "now"
    assert stripe.requests()[-1][1].endswith("/release")
    assert subscription_row(db, subscribed.sub_id)["pending_plan_id"] is None
    assert plan_changes(db, subscribed.org_id)[-1]["status"] == "released"


def test_cancel_pending_after_the_schedule_was_released_elsewhere_releases_nothing_twice(
    client: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    stripe.release(stripe.subscriptions[subscribed.sub_id]["schedule"])  # Dashboard; no event yet
    stripe.calls.clear()

    response = post(client, {"cancel_pending": True}, user=subscribed.owner)

    assert response.status_code == 200, response.get_json()
    assert not any(c.path.endswith("/release") for c in stripe.calls)
    assert subscription_row(db, subscribed.sub_id)["pending_plan_id"] is None


def test_a_metered_renewal_inside_the_paid_year_keeps_the_pending_change(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    pro = plans["pro"]
    t = renewal_times(db)
    subscribed = subscribe(
        pro,
        "yearly",
        metered_period=(t["prev"], t["b"]),
        flat_period=(t["b"] - 40 * DAY, t["b"] - 40 * DAY + YEAR),
    )
    assert (
        post(client, choice(plans["starter"], "yearly"), user=subscribed.owner).status_code == 200
    )
    metered = stripe.items_by_price(subscribed.sub_id)[pro["stripe_metered_price_id"]]
    metered.update(current_period_start=t["b"], current_period_end=t["next"])

    response = deliver(
        webhook,
        event_object(
            "customer.subscription.updated",
            stripe.subscriptions[subscribed.sub_id],
            created=t["b"],
        ),
    )

    assert response.status_code == 200, response.get_json()
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["pending_plan_id"]) == (pro["id"], plans["starter"]["id"])
    previous, current = cycles(db, subscribed.sub_id)
    assert (previous["status"], current["period_start"]) == ("closed", ts(t["b"]))
    assert current["included_minutes"] == 2000


# ---------------------------------------------------------------------------- 6. the webhook


def test_a_dashboard_change_is_applied_with_the_cycle_split_at_the_event(
    webhook: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    now = int(time.time())
    changed = now - 6 * 3600
    record_call(db, subscribed.org_id, 450, ts(changed - 3600))  # before the change
    record_call(db, subscribed.org_id, 100, ts(changed + 3600))  # after it: the new price
    stripe.swap_price(subscribed.sub_id, starter["stripe_price_id"], pro["stripe_price_id"])
    stripe.swap_price(
        subscribed.sub_id, starter["stripe_metered_price_id"], pro["stripe_metered_price_id"]
    )

    event = event_object(
        "customer.subscription.updated", stripe.subscriptions[subscribed.sub_id], created=changed
    )
    # As Stripe sends it: the items' previous prices say this event is the change.
    event["data"]["previous_attributes"] = {"items": {"data": []}}
    response = deliver(webhook, event)

    assert response.status_code == 200, response.get_json()
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"]) == (pro["id"], "monthly")
    (changed_audit,) = audit(db, subscribed.org_id)
    assert changed_audit["action"] == "subscription.plan_changed"
    assert changed_audit["actor"] == "stripe-webhook"
    assert changed_audit["details"]["from"]["plan_id"] == str(starter["id"])
    assert changed_audit["details"]["to"]["plan_id"] == str(pro["id"])
    old, new = cycles(db, subscribed.sub_id)
    assert old["period_end"] == new["period_start"] == ts(changed)
    assert figures(old) == {
        "included_minutes": 500,
        "minutes_used": 450,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [80],
    }
    assert figures(new) == {
        "included_minutes": 2000,
        "minutes_used": 100,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": [],
    }


def proration_invoice(
    subscribed: Subscribed, old_metered: str, usage: tuple[int, int], created: int
) -> dict[str, Any]:
    """The invoice Stripe makes at a mid-period change (always_invoice): the flat fee's
    prorations, and the old metered price's usage so far as an invoice item."""
    invoice = stripe_fixture("invoice")
    invoice_id = new_id("in")
    usage_line = stripe_fixture("line_item")
    usage_line.update(
        id=new_id("il"), invoice=invoice_id, period={"start": usage[0], "end": usage[1]}
    )
    usage_line["parent"] = {
        "type": "invoice_item_details",
        "subscription_item_details": None,
        "invoice_item_details": {
            "invoice_item": new_id("ii"),
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": subscribed.sub_id,
        },
    }
    usage_line["pricing"] = {
        "type": "price_details",
        "price_details": {"price": old_metered, "product": "prod_voice"},
        "unit_amount_decimal": "50",
    }
    proration = stripe_fixture("line_item")
    proration.update(
        id=new_id("il"),
        invoice=invoice_id,
        period={"start": usage[1], "end": subscribed.metered_period[1]},
    )
    proration["parent"] = {
        "type": "subscription_item_details",
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": new_id("ii"),
            "proration": True,
            "proration_details": {"credited_items": None},
            "subscription": subscribed.sub_id,
            "subscription_item": "si_flat",
        },
    }
    invoice.update(
        id=invoice_id,
        customer=subscribed.customer_id,
        status="paid",
        billing_reason="subscription_update",
        created=created,
        period_start=usage[1],
        period_end=usage[1],
    )
    invoice["lines"] = {"object": "list", "data": [usage_line, proration], "has_more": False}
    invoice["parent"] = {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {"metadata": {}, "subscription": subscribed.sub_id},
    }
    return invoice


def test_an_item_edit_that_keeps_the_prices_leaves_the_split_where_it_is(
    webhook: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any
) -> None:
    """A Dashboard change Starter -> Pro split the cycle; an edit of the items two hours later
    (metadata: Stripe's event lists the items in previous_attributes, their prices unchanged) is
    no price change: taken for one, it moved the split and put Pro's 100 minutes under Starter."""
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    changed = int(time.time()) - 6 * 3600
    record_call(db, subscribed.org_id, 450, ts(changed - 3600))
    record_call(db, subscribed.org_id, 100, ts(changed + 3600))
    sub = stripe.subscriptions[subscribed.sub_id]
    old_items = copy.deepcopy(sub["items"])
    stripe.swap_price(subscribed.sub_id, starter["stripe_price_id"], pro["stripe_price_id"])
    stripe.swap_price(
        subscribed.sub_id, starter["stripe_metered_price_id"], pro["stripe_metered_price_id"]
    )
    change = event_object("customer.subscription.updated", sub, created=changed)
    change["data"]["previous_attributes"] = {"items": old_items}
    assert deliver(webhook, change).status_code == 200
    split = cycles(db, subscribed.sub_id)
    assert [c["minutes_used"] for c in split] == [450, 100]

    before_edit = copy.deepcopy(sub["items"])
    for item in sub["items"]["data"]:
        item["metadata"] = {"note": "edited"}
    edit = event_object("customer.subscription.updated", sub, created=changed + 2 * 3600)
    edit["data"]["previous_attributes"] = {"items": before_edit}

    assert deliver(webhook, edit).status_code == 200
    after = cycles(db, subscribed.sub_id)
    assert [(c["period_start"], c["period_end"], c["minutes_used"]) for c in after] == [
        (c["period_start"], c["period_end"], c["minutes_used"]) for c in split
    ]
    assert after[1]["period_start"] == ts(changed)


@pytest.mark.parametrize(
    "first",
    [
        "the change's own customer.subscription.updated",
        "the change's invoice.paid",
        "an older customer.subscription.updated delivered late",
    ],
)
def test_a_dashboard_change_splits_at_the_change_whatever_the_delivery_order(
    webhook: Any, stripe: StripeBilling, plans: dict[str, Any], subscribe: Any, db: Any, first: str
) -> None:
    """Delivery order is not guaranteed (DESIGN: the state converges under any order). The
    change's invoice.paid (made seconds after it), or an older event of the subscription retried
    days late, may be processed before the change's own customer.subscription.updated; each
    fetches the subscription already on the new prices. The cycle must still split where Stripe
    splits the usage: at the change, not at our fetch, nor at the older event's time."""
    starter, pro = plans["starter"], plans["pro"]
    subscribed = subscribe(starter)
    now = int(time.time())
    changed = now - 6 * 3600
    record_call(db, subscribed.org_id, 450, ts(changed - 3600))
    record_call(db, subscribed.org_id, 100, ts(changed + 3600))
    old_items = copy.deepcopy(stripe.subscriptions[subscribed.sub_id]["items"])
    stripe.swap_price(subscribed.sub_id, starter["stripe_price_id"], pro["stripe_price_id"])
    stripe.swap_price(
        subscribed.sub_id, starter["stripe_metered_price_id"], pro["stripe_metered_price_id"]
    )
    invoice = proration_invoice(
        subscribed,
        starter["stripe_metered_price_id"],
        (subscribed.metered_period[0], changed),
        changed + 2,
    )
    stripe.invoices[invoice["id"]] = invoice
    change = event_object(
        "customer.subscription.updated", stripe.subscriptions[subscribed.sub_id], created=changed
    )
    change["data"]["previous_attributes"] = {"items": old_items}
    older = event_object(
        "customer.subscription.updated",
        stripe.subscriptions[subscribed.sub_id],
        created=now - 5 * DAY,
    )
    older["data"]["previous_attributes"] = {"metadata": {}}
    events = {
        "the change's own customer.subscription.updated": [change],
        "the change's invoice.paid": [
            event_object("invoice.paid", invoice, created=changed + 2),
            change,
        ],
        "an older customer.subscription.updated delivered late": [older, change],
    }[first]

    for event in events:
        response = deliver(webhook, event)
        assert response.status_code == 200, (event["type"], response.get_json())

    old, new = cycles(db, subscribed.sub_id)
    assert old["stripe_metered_price_id"] == starter["stripe_metered_price_id"]
    if "invoice" in first:
        assert (old["stripe_invoice_id"], new["stripe_invoice_id"]) == (invoice["id"], None)
    assert (old["minutes_used"], new["minutes_used"]) == (450, 100), (
        f"split at {new['period_start']}, the change was at {ts(changed)}"
    )


@pytest.mark.parametrize(("minutes", "alerts"), [(1000, []), (1700, [80])])
def test_a_renewal_onto_the_pending_plan_corrects_a_cycle_a_call_opened_first(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
    minutes: int,
    alerts: list[int],
) -> None:
    """Starter yearly (500 minutes) -> Pro monthly (2,000 minutes) at the end of the year. A call
    just after the boundary, reported before the renewal webhook, opened the new period's cycle
    on the old terms: "1,000 minutes on a 2,000-minute plan showed overage"."""
    starter, pro = plans["starter"], plans["pro"]
    t = renewal_times(db)
    subscribed = subscribe(
        starter, "yearly", metered_period=(t["prev"], t["b"]), flat_period=(t["year_ago"], t["b"])
    )
    scheduled = post(client, choice(pro, "monthly"), user=subscribed.owner)
    assert scheduled.status_code == 200, scheduled.get_json()
    assert datetime.fromisoformat(scheduled.get_json()["effective_at"]) == ts(t["b"])
    schedule_id = stripe.subscriptions[subscribed.sub_id]["schedule"]

    opened = record_call(db, subscribed.org_id, minutes, ts(t["b"] + 300))
    assert (opened["included_minutes"], opened["late"]) == (500, False)
    assert opened["overage_minutes"] == minutes - 500  # the bug report's figure

    # The renewal: the schedule's next phase puts Pro's prices on, its new items from B.
    sub = stripe.subscriptions[subscribed.sub_id]
    sub["items"]["data"] = [
        stripe.item(subscribed.sub_id, pro["stripe_price_id"], (t["b"], t["next"])),
        stripe.item(subscribed.sub_id, pro["stripe_metered_price_id"], (t["b"], t["next"])),
    ]
    sub["schedule"] = schedule_id  # still in its last phase
    response = deliver(
        webhook, event_object("customer.subscription.updated", sub, created=t["b"] + 1)
    )

    assert response.status_code == 200, response.get_json()
    row = subscription_row(db, subscribed.sub_id)
    assert (row["plan_id"], row["billing_period"]) == (pro["id"], "monthly")
    assert (row["pending_plan_id"], row["pending_billing_period"], row["pending_effective_at"]) == (
        None,
        None,
        None,
    )
    previous, current = cycles(db, subscribed.sub_id)  # no split at a boundary
    assert (previous["period_end"], previous["status"]) == (ts(t["b"]), "closed")
    assert (current["period_start"], current["period_end"]) == (ts(t["b"]), ts(t["next"]))
    assert current["stripe_metered_price_id"] == pro["stripe_metered_price_id"]
    assert figures(current) == {
        "included_minutes": 2000,
        "minutes_used": minutes,
        "overage_minutes": 0,
        "overage_cost_cents": 0,
        "alerts": alerts,
    }
    summary = db.execute("select public.usage_summary(%s) as s", (subscribed.org_id,)).fetchone()
    assert (summary["s"]["included_minutes"], summary["s"]["overage_minutes"]) == (2000, 0)
    assert [a["action"] for a in audit(db, subscribed.org_id)] == [
        "subscription.plan_change_scheduled",
        "subscription.plan_changed",
    ]


def test_a_state_without_a_schedule_clears_the_pending_change(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    subscribed = subscribe(plans["starter"])
    assert post(client, choice(plans["lite"]), user=subscribed.owner).status_code == 200
    assert subscription_row(db, subscribed.sub_id)["pending_plan_id"] == plans["lite"]["id"]

    stripe.release(stripe.subscriptions[subscribed.sub_id]["schedule"])  # in the Dashboard
    event = event_object(
        "customer.subscription.updated",
        stripe.subscriptions[subscribed.sub_id],
        created=int(time.time()),
    )
    response = deliver(webhook, event)

    assert response.status_code == 200, response.get_json()
    row = subscription_row(db, subscribed.sub_id)
    assert (
        row["pending_plan_id"],
        row["pending_billing_period"],
        row["pending_effective_at"],
        row["stripe_schedule_id"],
    ) == (None, None, None, None)
    assert row["plan_id"] == plans["starter"]["id"]


def test_a_state_fetched_before_the_schedule_existed_does_not_clear_the_pending_change(
    client: Any,
    webhook: Any,
    stripe: StripeBilling,
    plans: dict[str, Any],
    subscribe: Any,
    db: Any,
) -> None:
    """An event in flight while the owner schedules a downgrade: its fetch saw the subscription
    before the schedule was attached, and is applied after. Stripe still has the schedule, and
    the later events (the schedule's own customer.subscription.updated) must leave pending_*
    showing it."""
    subscribed = subscribe(plans["starter"])
    answers: list[Any] = []

    def downgrade_meanwhile() -> None:
        answers.append(
            post(client.application.test_client(), choice(plans["lite"]), user=subscribed.owner)
        )

    stripe.on_retrieve = downgrade_meanwhile  # runs after the webhook's fetch was answered
    in_flight = deliver(
        webhook,
        event_object(
            "customer.subscription.updated",
            stripe.subscriptions[subscribed.sub_id],
            created=int(time.time()) - 60,
        ),
    )
    assert in_flight.status_code == 200, in_flight.get_json()
    assert answers[0].status_code == 200, answers[0].get_json()
    # Stripe's event for the schedule being attached, delivered after.
    attached = deliver(
        webhook,
        event_object(
            "customer.subscription.updated",
            stripe.subscriptions[subscribed.sub_id],
            created=int(time.time()),
        ),
    )
    assert attached.status_code == 200, attached.get_json()

    row = subscription_row(db, subscribed.sub_id)
    assert stripe.subscriptions[subscribed.sub_id]["schedule"] is not None
    assert (row["pending_plan_id"], row["pending_billing_period"]) == (
        plans["lite"]["id"],
        "monthly",
    ), "Stripe will move the subscription to Lite at the period end; our row no longer says so"
