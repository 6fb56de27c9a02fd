"""Stripe's side of the webhook tests (helpers only, no tests here).

Every object is built from Stripe's own examples (fixtures3.json) with our ids and times put in;
deliveries are signed with the real HMAC scheme; `StripeStandIn` answers the code's Stripe
requests through respx with each subscription as Stripe has it "now" (the tests move "now").
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
import respx
import stripe

from shared.stripe_api import API_VERSION
from tests.conftest import WEBHOOK_SECRET, function_client, stripe_fixture

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
MONTH = 30 * 86_400  # Stripe's months vary in length; the tests need periods that follow on
YEAR = 365 * 86_400


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def price_object(
    price_id: str, *, interval: str = "month", metered: bool = False
) -> dict[str, Any]:
    price = stripe_fixture("price")
    price.update(id=price_id, type="recurring", currency="eur")
    price["recurring"].update(
        interval=interval,
        interval_count=1,
        usage_type="metered" if metered else "licensed",
        meter="mtr_test_voice_minutes" if metered else None,
    )
    return price


def item_object(
    subscription_id: str,
    price_id: str,
    period: tuple[int, int],
    *,
    interval: str = "month",
    metered: bool = False,
) -> dict[str, Any]:
    item = stripe_fixture("subscription_item")
    item.update(
        id=f"si_{uuid.uuid5(uuid.NAMESPACE_URL, subscription_id + price_id).hex[:14]}",
        subscription=subscription_id,
        price=price_object(price_id, interval=interval, metered=metered),
        current_period_start=period[0],
        current_period_end=period[1],
    )
    if metered:
        item.pop("quantity", None)
    return item


def month(n: int) -> tuple[int, int]:
    """The n-th monthly period of a subscription started at T0."""
    return (T0 + n * MONTH, T0 + (n + 1) * MONTH)


def subscription_object(
    subscription_id: str,
    customer_id: str,
    plan: dict[str, Any],
    *,
    status: str = "active",
    billing_period: str = "monthly",
    month_index: int = 0,
    with_metered: bool = True,
    organisation_id: str | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    created: int = T0,
) -> dict[str, Any]:
    """A subscription on `plan` in its `month_index`-th month (yearly: the flat item is yearly)."""
    sub = stripe_fixture("subscription")
    metered_period = month(month_index)
    items = []
    if billing_period == "yearly":
        items.append(
            item_object(
                subscription_id, plan["stripe_yearly_price_id"], (T0, T0 + YEAR), interval="year"
            )
        )
    else:
        items.append(item_object(subscription_id, plan["stripe_price_id"], metered_period))
    if with_metered:
        items.append(
            item_object(
                subscription_id, plan["stripe_metered_price_id"], metered_period, metered=True
            )
        )
    metadata = (
        {
            "organisation_id": organisation_id,
            "plan_id": str(plan["id"]),
            "billing_period": billing_period,
        }
        if organisation_id
        else {}
    )
    sub.update(
        id=subscription_id,
        customer=customer_id,
        status=status,
        metadata=metadata,
        cancel_at_period_end=cancel_at_period_end,
        cancel_at=metered_period[1] if cancel_at_period_end else None,
        canceled_at=canceled_at,
        ended_at=canceled_at if status == "canceled" else None,
        created=created,
        start_date=created,
        billing_cycle_anchor=T0,
        currency="eur",
        trial_start=None,
        trial_end=None,
        pending_update=None,
        billing_mode={"type": "flexible", "flexible": {"proration_discounts": "included"}},
    )
    sub["items"] = {
        "object": "list",
        "data": items,
        "has_more": False,
        "url": f"/v1/subscription_items?subscription={subscription_id}",
    }
    return sub


def checkout_session_object(
    subscription_id: str | None,
    customer_id: str,
    *,
    organisation_id: str | None,
    plan: dict[str, Any] | None = None,
    billing_period: str = "monthly",
    in_metadata: bool = True,
) -> dict[str, Any]:
    session = stripe_fixture("checkout.session")
    metadata = (
        {
            "organisation_id": organisation_id,
            "plan_id": str(plan["id"]) if plan else "",
            "billing_period": billing_period,
        }
        if organisation_id and in_metadata
        else {}
    )
    session.update(
        id=new_id("cs_test"),
        mode="subscription" if subscription_id else "payment",
        status="complete",
        payment_status="paid",
        subscription=subscription_id,
        customer=customer_id,
        client_reference_id=organisation_id,
        metadata=metadata,
        payment_intent=None,
        currency="eur",
    )
    return session


def invoice_object(
    invoice_id: str,
    subscription_id: str | None,
    customer_id: str,
    *,
    billed: tuple[int, int],
    created: int,
    metered_price: str | None = None,
    status: str = "paid",
    billing_reason: str = "subscription_cycle",
) -> dict[str, Any]:
    """An invoice of `subscription_id` billing the usage of `billed` (period_start, period_end)."""
    invoice = stripe_fixture("invoice")
    line = stripe_fixture("line_item")
    line.update(id=new_id("il"), invoice=invoice_id, period={"start": billed[0], "end": billed[1]})
    line["parent"] = {
        "type": "subscription_item_details",
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None,
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription": subscription_id,
            "subscription_item": "si_metered",
        },
    }
    line["pricing"] = {
        "type": "price_details",
        "price_details": {"price": metered_price or "price_x", "product": "prod_voice"},
        "unit_amount_decimal": "50",
    }
    invoice.update(
        id=invoice_id,
        customer=customer_id,
        status=status,
        billing_reason=billing_reason,
        created=created,
        period_start=billed[0],
        period_end=billed[1],
        subscription=None,
    )
    invoice["lines"] = {"object": "list", "data": [line], "has_more": False, "url": "/v1/lines"}
    invoice["parent"] = (
        {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription_id},
        }
        if subscription_id
        else None
    )
    return invoice


def event_object(
    event_type: str, obj: dict[str, Any], *, event_id: str | None = None, created: int = T0
) -> dict[str, Any]:
    event = stripe_fixture("event")
    event.update(
        id=event_id or new_id("evt"),
        type=event_type,
        created=created,
        api_version=API_VERSION,
        data={"object": obj},
    )
    return event


def signature_header(
    body: str, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> str:
    return str(stripe.WebhookSignature.generate_signature_header(body, secret, timestamp))


# Every invoice an event carried, as the last delivered event showed it: Stripe has every invoice
# it sends an event about, so the stand-in serves these unless a test set `invoices[id]` itself.
# A new stand-in (a new test) starts with none: an earlier test's event retried by a repair run
# finds no invoice, as it finds no subscription.
sent_invoices: dict[str, dict[str, Any]] = {}


def remember_sent_invoice(body: str) -> None:
    try:
        obj = json.loads(body)["data"]["object"]
    except (ValueError, KeyError, TypeError):
        return
    if isinstance(obj, dict) and obj.get("object") == "invoice" and isinstance(obj.get("id"), str):
        sent_invoices[obj["id"]] = json.loads(json.dumps(obj))


def deliver(
    client: Any,
    event: dict[str, Any] | str | bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> Any:
    """POST `event` to the handler the way Stripe does, signed with `secret`."""
    body = event if isinstance(event, str | bytes) else json.dumps(event)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    remember_sent_invoice(text)
    return client.post(
        "/",
        data=body,
        headers={
            "Stripe-Signature": signature_header(text, secret=secret, timestamp=timestamp),
            "Content-Type": "application/json; charset=utf-8",
        },
    )


def deliver_together(webhook: Any, events: list[Any]) -> list[tuple[int, Any]]:
    """Deliver every event (a dict, or a body as sent) at the same moment, each on its own
    thread, as Stripe's concurrent deliveries do; (status, body) of each answer."""
    start = threading.Barrier(len(events))
    answers: list[tuple[int, Any]] = []

    def send(event: Any) -> None:
        client = webhook.application.test_client()
        start.wait()
        response = deliver(client, event)
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=send, args=(event,)) for event in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


CANCEL_PARAMS = frozenset(
    {
        "invoice_now",
        "prorate",
        "cancellation_details[comment]",
        "cancellation_details[feedback]",
        "expand[]",
    }
)


def stripe_error(
    status: int, error_type: str, message: str, code: str | None = None
) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"type": error_type, "message": message, "code": code}}
    )


class StripeStandIn:
    """Stripe's subscriptions as they are "now", served to our code through respx.

    `subscriptions[id]` is what a retrieve returns; `fail_retrieves` answers that many retrieves
    with a 500 (`fail_retrieves_after_item_add` arms it when an item is added); adding a
    subscription item honours the idempotency key, as Stripe does. A cancel (DELETE) takes
    Stripe's parameters only, refuses a canceled subscription as Stripe does (an idempotency key
    does nothing on DELETE), and `fail_cancels` answers that many with a 500.

    Invoices: a retrieve returns `invoices[id]` (None: deleted, 404), else the invoice as an event
    last carried it (`sent_invoices`); `fail_invoice_retrieves` answers that many with a 500. A
    list (`subscription`, `limit`, `starting_after`) pages through the same, newest first.
    """

    def __init__(self, router: respx.Router) -> None:
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.fail_retrieves = 0
        self.fail_retrieves_after_item_add = 0
        self.delay_seconds = 0.0
        self.retrieves: list[httpx.Request] = []
        self.item_requests: list[httpx.Request] = []
        self.cancels: list[httpx.Request] = []
        self.fail_cancels = 0
        self.metered_period: tuple[int, int] = month(0)
        self._items_by_key: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        router.get(path__regex=r"^/v1/subscriptions/(?P<subscription_id>[^/]+)$").mock(
            side_effect=self._retrieve
        )
        router.post("/v1/subscription_items").mock(side_effect=self._create_item)
        router.delete(path__regex=r"^/v1/subscriptions/(?P<subscription_id>[^/]+)$").mock(
            side_effect=self._cancel
        )
        sent_invoices.clear()
        self.invoices: dict[str, dict[str, Any] | None] = {}
        self.invoice_retrieves: list[httpx.Request] = []
        self.fail_invoice_retrieves = 0
        router.get(path__regex=r"^/v1/invoices/(?P<invoice_id>in_[^/]+)$").mock(
            side_effect=self._retrieve_invoice
        )
        router.get("/v1/invoices").mock(side_effect=self._list_invoices)

    def invoice(self, invoice_id: str) -> dict[str, Any] | None:
        if invoice_id in self.invoices:
            return self.invoices[invoice_id]
        return sent_invoices.get(invoice_id)

    def _retrieve_invoice(self, request: httpx.Request, invoice_id: str) -> httpx.Response:
        with self._lock:
            self.invoice_retrieves.append(request)
            if self.fail_invoice_retrieves > 0:
                self.fail_invoice_retrieves -= 1
                return stripe_error(500, "api_error", "An unknown error occurred.")
            invoice = self.invoice(invoice_id)
        if invoice is None:
            return stripe_error(
                404,
                "invalid_request_error",
                f"No such invoice: '{invoice_id}'",
                code="resource_missing",
            )
        return httpx.Response(200, json=invoice)

    def _list_invoices(self, request: httpx.Request) -> httpx.Response:
        params = dict(urllib.parse.parse_qsl(request.url.query.decode()))
        with self._lock:
            ids = {**sent_invoices, **self.invoices}
            invoices = [
                invoice
                for invoice_id in ids
                if (invoice := self.invoice(invoice_id))
                and ((invoice.get("parent") or {}).get("subscription_details") or {}).get(
                    "subscription"
                )
                == params.get("subscription")
            ]
        invoices.sort(key=lambda invoice: (-invoice["created"], invoice["id"]))
        if "starting_after" in params:
            after = [invoice["id"] for invoice in invoices].index(params["starting_after"])
            invoices = invoices[after + 1 :]
        limit = int(params.get("limit", 10))
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": invoices[:limit],
                "has_more": len(invoices) > limit,
                "url": "/v1/invoices",
            },
        )

    def _retrieve(self, request: httpx.Request, subscription_id: str) -> httpx.Response:
        time.sleep(self.delay_seconds)
        with self._lock:
            self.retrieves.append(request)
            if self.fail_retrieves > 0:
                self.fail_retrieves -= 1
                return stripe_error(500, "api_error", "An unknown error occurred.")
            sub = self.subscriptions.get(subscription_id)
            if sub is None:
                return stripe_error(
                    404,
                    "invalid_request_error",
                    f"No such subscription: '{subscription_id}'",
                    code="resource_missing",
                )
            return httpx.Response(200, json=sub)

    def _cancel(self, request: httpx.Request, subscription_id: str) -> httpx.Response:
        params = dict(urllib.parse.parse_qsl(request.url.query.decode(), keep_blank_values=True))
        with self._lock:
            self.cancels.append(request)
            if self.fail_cancels > 0:
                self.fail_cancels -= 1
                return stripe_error(500, "api_error", "An unknown error occurred.")
            unknown = set(params) - CANCEL_PARAMS
            if unknown:
                return stripe_error(
                    400,
                    "invalid_request_error",
                    f"Received unknown parameter: {min(unknown)}",
                    code="parameter_unknown",
                )
            sub = self.subscriptions.get(subscription_id)
            if sub is None:
                return stripe_error(
                    404,
                    "invalid_request_error",
                    f"No such subscription: '{subscription_id}'",
                    code="resource_missing",
                )
            if sub["status"] == "canceled":
                return stripe_error(
                    400,
                    "invalid_request_error",
                    "A canceled subscription can only update its cancellation_details and"
                    " metadata.",
                )
            now = sub["created"] + 60
            sub.update(status="canceled", canceled_at=now, ended_at=now, cancel_at=None)
            sub["cancellation_details"] = {
                "comment": params.get("cancellation_details[comment]"),
                "feedback": params.get("cancellation_details[feedback]"),
                "reason": "cancellation_requested",
            }
            return httpx.Response(200, json=sub)

    def _create_item(self, request: httpx.Request) -> httpx.Response:
        form = urllib.parse.parse_qs(request.content.decode())
        key = request.headers.get("Idempotency-Key", "")
        with self._lock:
            self.item_requests.append(request)
            if key in self._items_by_key:
                return httpx.Response(200, json=self._items_by_key[key])
            subscription_id, price_id = form["subscription"][0], form["price"][0]
            item = item_object(subscription_id, price_id, self.metered_period, metered=True)
            self.subscriptions[subscription_id]["items"]["data"].append(item)
            self._items_by_key[key] = item
            self.fail_retrieves += self.fail_retrieves_after_item_add
            return httpx.Response(200, json=item)


def subscription_row(
    db: psycopg.Connection[Any], stripe_subscription_id: str
) -> dict[str, Any] | None:
    row: dict[str, Any] | None = db.execute(
        "select * from subscriptions where stripe_subscription_id = %s", (stripe_subscription_id,)
    ).fetchone()
    return row


def cycle_rows(db: psycopg.Connection[Any], stripe_subscription_id: str) -> list[dict[str, Any]]:
    return db.execute(
        "select c.* from billing_cycles c join subscriptions s on s.id = c.subscription_id"
        " where s.stripe_subscription_id = %s order by c.period_start",
        (stripe_subscription_id,),
    ).fetchall()


def audit_rows(db: psycopg.Connection[Any], organisation_id: Any) -> list[dict[str, Any]]:
    return db.execute(
        "select action, actor, details from audit_log where organisation_id = %s order by id",
        (organisation_id,),
    ).fetchall()


def event_row(db: psycopg.Connection[Any], event_id: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = db.execute(
        "select * from stripe_events where id = %s", (event_id,)
    ).fetchone()
    return row


def ts(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


@pytest.fixture
def webhook(function_env: dict[str, str]) -> Any:
    return function_client("stripe-webhook-handler", "stripe_webhook_handler")


@pytest.fixture
def stripe_api() -> Any:
    with respx.mock(base_url="https://api.stripe.com", assert_all_called=False) as router:
        yield StripeStandIn(router)


@dataclass
class Buyer:
    org: dict[str, Any]
    plan: dict[str, Any]
    sub_id: str
    customer_id: str

    @property
    def org_id(self) -> str:
        return str(self.org["id"])

    def subscription(self, **changes: Any) -> dict[str, Any]:
        changes.setdefault("organisation_id", self.org_id)
        plan = changes.pop("plan", self.plan)
        return subscription_object(self.sub_id, self.customer_id, plan, **changes)

    def checkout_event(self, billing_period: str = "monthly") -> dict[str, Any]:
        session = checkout_session_object(
            self.sub_id,
            self.customer_id,
            organisation_id=self.org_id,
            plan=self.plan,
            billing_period=billing_period,
        )
        return event_object("checkout.session.completed", session)

    def subscription_event(self, event_type: str, **changes: Any) -> dict[str, Any]:
        return event_object(event_type, self.subscription(**changes))

    def invoice_event(
        self, event_type: str, billed: tuple[int, int], created: int
    ) -> dict[str, Any]:
        invoice = invoice_object(
            new_id("in"),
            self.sub_id,
            self.customer_id,
            billed=billed,
            created=created,
            metered_price=self.plan["stripe_metered_price_id"],
            status="paid" if event_type == "invoice.paid" else "open",
        )
        return event_object(event_type, invoice, created=created)


@pytest.fixture
def buyer(make_org: Any, make_plan: Any) -> Buyer:
    return Buyer(make_org(), make_plan(), new_id("sub"), new_id("cus"))


def subscribed(buyer: Buyer, stripe_api: StripeStandIn, webhook: Any, **state: Any) -> None:
    """The buyer's checkout completed and was processed."""
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(**state)
    response = deliver(webhook, buyer.checkout_event(state.get("billing_period", "monthly")))
    assert response.status_code == 200, response.get_json()
