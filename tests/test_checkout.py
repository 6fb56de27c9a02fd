"""POST create-checkout-session through the real function, a real Postgres, and Stripe faked by respx.

The fake keeps idempotency keys the way Stripe does (same key and form: the first answer again;
same key, other form: refused), so "one customer" and "one session" are Stripe's real guarantees.
It keeps its Checkout Sessions too: expiring one that is not open is refused as Stripe does, and
a paid one stays paid.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwt

from shared import auth
from shared.cors import website_origin, website_path
from shared.errors import ConfigError
from shared.settings import get_settings
from tests.conftest import (
    WEBSITE_URL,
    acting_as,
    function_client,
    stripe_fixture,
    user_token,
)

API = "https://api.stripe.com"
CUSTOMERS, SESSIONS, PORTAL = (
    "/v1/customers",
    "/v1/checkout/sessions",
    "/v1/billing_portal/sessions",
)
SESSION_URL = rf"{re.escape(API)}/v1/checkout/sessions/(?P<session_id>[^/]+)"
EXPIRE = "expire"
SETUP_FEE = "price_setup_fee_test"
DEFAULT_SUCCESS = f"{WEBSITE_URL}/billing/success?session_id={{CHECKOUT_SESSION_ID}}"
DEFAULT_CANCEL = f"{WEBSITE_URL}/billing/cancel"


def stripe_error(status: int, kind: str, message: str, code: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message, "code": code}})


class FakeStripe:
    """Stripe's customer, Checkout and portal endpoints over respx, with Stripe's idempotency."""

    def __init__(self, router: respx.MockRouter, *, idempotent_customers: bool = True) -> None:
        self.router = router
        self.idempotent_customers = idempotent_customers
        self.calls: dict[str, list[tuple[dict[str, str], str | None]]] = defaultdict(list)
        self.failures: dict[str, list[Any]] = defaultdict(list)
        self.sessions: dict[str, dict[str, Any]] = {}  # Stripe's side: status open/complete/expired
        self.expire_requests: list[httpx.Request] = []
        self.before_create: Callable[[], None] | None = None  # a click landing mid-request
        self._replays: dict[tuple[str, str], tuple[dict[str, str], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        builders = {CUSTOMERS: self._customer, SESSIONS: self._new_session, PORTAL: self._portal}
        for path, build in builders.items():
            router.post(API + path).mock(side_effect=self._handler(path, build))
        router.post(url__regex=SESSION_URL + "/expire$").mock(side_effect=self._expire)
        router.get(url__regex=SESSION_URL + "$").mock(side_effect=self._retrieve)

    def open_sessions(self) -> list[str]:
        return [i for i, session in self.sessions.items() if session["status"] == "open"]

    def complete(self, session_id: str) -> str:
        """The customer pays: the session is complete and has made a subscription (its id)."""
        subscription = f"sub_{uuid.uuid4().hex[:14]}"
        self.sessions[session_id].update(
            status="complete", payment_status="paid", subscription=subscription
        )
        return subscription

    def _expire(self, request: httpx.Request, session_id: str) -> httpx.Response:
        with self._lock:
            self.expire_requests.append(request)
            if self.failures[EXPIRE]:
                failure = self.failures[EXPIRE].pop(0)
                if isinstance(failure, Exception):
                    raise failure
                return failure  # type: ignore[no-any-return]
            session = self.sessions.get(session_id)
            if session is None:
                message = f"No such checkout.session: '{session_id}'"
                return stripe_error(404, "invalid_request_error", message, "resource_missing")
            if session["status"] != "open":
                message = (
                    'Only Checkout Sessions with a status in ["open"] can be expired. This'
                    f" Checkout Session has a status of `{session['status']}`."
                )
                return stripe_error(400, "invalid_request_error", message)
            session.update(status="expired", url=None)
            return httpx.Response(200, json=session)

    def _retrieve(self, request: httpx.Request, session_id: str) -> httpx.Response:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None:
            message = f"No such checkout.session: '{session_id}'"
            return stripe_error(404, "invalid_request_error", message, "resource_missing")
        return httpx.Response(200, json=session)

    def _new_session(self, form: dict[str, str]) -> dict[str, Any]:
        session = self._session(form)
        self.sessions[session["id"]] = copy.deepcopy(session)
        return session

    def forms(self, path: str) -> list[dict[str, str]]:
        return [form for form, _ in self.calls[path]]

    def keys(self, path: str) -> list[str | None]:
        return [key for _, key in self.calls[path]]

    def _handler(
        self, path: str, build: Callable[[dict[str, str]], dict[str, Any]]
    ) -> Callable[[httpx.Request], httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            form = dict(urllib.parse.parse_qsl(request.content.decode(), keep_blank_values=True))
            key = request.headers.get("Idempotency-Key")
            if path == SESSIONS and self.before_create:
                self.before_create()
            with self._lock:
                self.calls[path].append((form, key))
                if self.failures[path]:
                    failure = self.failures[path].pop(0)
                    if isinstance(failure, Exception):
                        raise failure
                    return failure
                remembered = self._replays.get((path, key or ""))
                if remembered is not None:
                    if remembered[0] != form:
                        return stripe_error(400, "idempotency_error", "Keys reused.")
                    return httpx.Response(200, json=remembered[1])
                body = build(form)
                if key and (path != CUSTOMERS or self.idempotent_customers):
                    self._replays[(path, key)] = (form, body)
            return httpx.Response(200, json=body)

        return handle

    @staticmethod
    def _customer(form: dict[str, str]) -> dict[str, Any]:
        customer = stripe_fixture("customer")
        customer.update(
            id=f"cus_{uuid.uuid4().hex[:14]}",
            email=form.get("email"),
            name=form.get("name"),
            metadata={"organisation_id": form["metadata[organisation_id]"]},
        )
        return customer

    @staticmethod
    def _session(form: dict[str, str]) -> dict[str, Any]:
        session = stripe_fixture("checkout.session")
        session_id = f"cs_test_{uuid.uuid4().hex}"
        session.update(
            id=session_id,
            url=f"https://checkout.stripe.com/c/pay/{session_id}",
            mode=form["mode"],
            customer=form["customer"],
            client_reference_id=form["client_reference_id"],
            metadata={k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
            success_url=form["success_url"],
            cancel_url=form["cancel_url"],
            expires_at=int(time.time()) + 86400,
            status="open",
            payment_status="unpaid",
            subscription=None,
        )
        return session

    @staticmethod
    def _portal(form: dict[str, str]) -> dict[str, Any]:
        session = stripe_fixture("billing_portal.session")
        session_id = f"bps_{uuid.uuid4().hex[:24]}"
        session.update(
            id=session_id,
            customer=form["customer"],
            return_url=form["return_url"],
            url=f"https://billing.stripe.com/p/session/{session_id}",
        )
        return session


@pytest.fixture
def stripe_api() -> Iterator[FakeStripe]:
    with respx.mock(assert_all_called=False) as router:
        yield FakeStripe(router)


@pytest.fixture
def load_function(
    function_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """Load a browser function with the test environment, changed by `env` (None deletes)."""

    def load(name: str, target: str, **env: str | None) -> Any:
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return function_client(name, target)

    return load


@pytest.fixture
def client(load_function: Callable[..., Any]) -> Any:
    return load_function(
        "create-checkout-session", "create_checkout_session", STRIPE_SETUP_FEE_PRICE_ID=SETUP_FEE
    )


def post(
    client: Any,
    body: Any,
    *,
    user: str | None = None,
    token: str | None = None,
    origin: str | None = WEBSITE_URL,
) -> Any:
    headers = {"Content-Type": "application/json"}
    if origin:
        headers["Origin"] = origin
    token = token or (user_token(user) if user else None)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post("/", data=data, headers=headers)


def clicks_at_once(client: Any, user: str, orders: list[Any]) -> list[Any]:
    """Every order POSTed by `user` at the same moment, each from its own thread (a double click,
    several tabs); the responses in order."""
    start = threading.Barrier(len(orders))

    def click(order: Any) -> Any:
        own_client = client.application.test_client()
        start.wait()
        return post(own_client, order, user=user)

    with ThreadPoolExecutor(max_workers=len(orders)) as pool:
        return list(pool.map(click, orders))


def error_code(response: Any) -> str:
    return str(response.get_json()["error"]["code"])


def add_subscription(
    db: psycopg.Connection[Any], org: dict[str, Any], plan: dict[str, Any], status: str
) -> None:
    db.execute(
        "insert into public.subscriptions (organisation_id, plan_id, stripe_subscription_id,"
        " stripe_customer_id, status, billing_period) values (%s, %s, %s, %s, %s, 'monthly')",
        (
            org["id"],
            plan["id"],
            f"sub_{uuid.uuid4().hex[:14]}",
            f"cus_{uuid.uuid4().hex[:8]}",
            status,
        ),
    )


def stored_customer(db: psycopg.Connection[Any], org: dict[str, Any]) -> str | None:
    row = db.execute(
        "select stripe_customer_id from public.organisations where id = %s", (org["id"],)
    ).fetchone()
    assert row is not None
    return row["stripe_customer_id"]


def audit_rows(db: psycopg.Connection[Any], org: dict[str, Any]) -> list[dict[str, Any]]:
    return db.execute(
        "select actor, action, details from public.audit_log where organisation_id = %s",
        (org["id"],),
    ).fetchall()


@pytest.fixture
def buyer(make_user: Callable[..., str], make_org: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """An owner (known email) of one organisation without a Stripe customer yet."""
    email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    owner = make_user(email=email)
    return {"user": owner, "email": email, "org": make_org(owner, name="Acme Voice")}


# --- the happy paths and the exact form sent to Stripe ------------------------------------------


def test_monthly_checkout_sends_exactly_our_plan_customer_and_metadata(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    plan, org = make_plan(), buyer["org"]
    response = post(
        client,
        {
            "plan_id": str(plan["id"]),
            "billing_period": "monthly",
            "organisation_id": str(org["id"]),
        },
        user=buyer["user"],
    )

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    customer_id = stored_customer(db, org)
    assert stripe_api.forms(CUSTOMERS) == [
        {"email": buyer["email"], "name": "Acme Voice", "metadata[organisation_id]": str(org["id"])}
    ]
    assert stripe_api.keys(CUSTOMERS) == [f"customer-{org['id']}"]
    metadata = {
        "organisation_id": str(org["id"]),
        "plan_id": str(plan["id"]),
        "billing_period": "monthly",
    }
    assert stripe_api.forms(SESSIONS) == [
        {
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": str(org["id"]),
            "line_items[0][price]": plan["stripe_price_id"],
            "line_items[0][quantity]": "1",
            "line_items[1][price]": plan["stripe_metered_price_id"],
            "line_items[2][price]": SETUP_FEE,
            "line_items[2][quantity]": "1",
            **{f"metadata[{k}]": v for k, v in metadata.items()},
            **{f"subscription_data[metadata][{k}]": v for k, v in metadata.items()},
            "success_url": DEFAULT_SUCCESS,
            "cancel_url": DEFAULT_CANCEL,
        }
    ]
    assert body == {
        "checkout_url": f"https://checkout.stripe.com/c/pay/{body['session_id']}",
        "session_id": body["session_id"],
    }
    assert audit_rows(db, org) == [
        {
            "actor": buyer["user"],
            "action": "checkout.created",
            "details": {
                "plan_id": str(plan["id"]),
                "billing_period": "monthly",
                "session_id": body["session_id"],
            },
        }
    ]


def test_yearly_checkout_has_the_yearly_flat_price_and_setup_fee_only(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    plan = make_plan()
    response = post(
        client, {"plan_id": str(plan["id"]), "billing_period": "yearly"}, user=buyer["user"]
    )

    assert response.status_code == 200, response.get_json()
    [form] = stripe_api.forms(SESSIONS)
    items = {k: v for k, v in form.items() if k.startswith("line_items")}
    assert items == {
        "line_items[0][price]": plan["stripe_yearly_price_id"],
        "line_items[0][quantity]": "1",
        "line_items[1][price]": SETUP_FEE,
        "line_items[1][quantity]": "1",
    }
    assert (
        form["metadata[billing_period]"]
        == form["subscription_data[metadata][billing_period]"]
        == "yearly"
    )


@pytest.mark.parametrize(
    ("history", "fee_configured", "charged"),
    [
        (None, True, True),
        ("canceled", True, False),
        ("incomplete_expired", True, True),
        (None, False, False),
    ],
)
def test_setup_fee_only_when_configured_and_never_subscribed(
    load_function: Callable[..., Any],
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
    history: str | None,
    fee_configured: bool,
    charged: bool,
) -> None:
    client = load_function(
        "create-checkout-session",
        "create_checkout_session",
        STRIPE_SETUP_FEE_PRICE_ID=SETUP_FEE if fee_configured else None,
    )
    plan = make_plan()
    if history:
        add_subscription(db, buyer["org"], plan, history)

    response = post(
        client, {"plan_id": str(plan["id"]), "billing_period": "monthly"}, user=buyer["user"]
    )

    assert response.status_code == 200, response.get_json()
    [form] = stripe_api.forms(SESSIONS)
    assert (SETUP_FEE in form.values()) is charged
    assert ("line_items[2][price]" in form) is charged


def test_existing_customer_is_used_and_none_created(
    client: Any,
    stripe_api: FakeStripe,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    owner = make_user()
    org = make_org(owner, stripe_customer_id=f"cus_{uuid.uuid4().hex[:12]}")
    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=owner
    )

    assert response.status_code == 200, response.get_json()
    assert stripe_api.calls[CUSTOMERS] == []
    assert stripe_api.forms(SESSIONS)[0]["customer"] == org["stripe_customer_id"]


def test_an_admin_may_buy(
    client: Any,
    stripe_api: FakeStripe,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    owner_email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    admin = make_user()
    org = make_org(make_user(email=owner_email), members={admin: "admin"})
    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=admin
    )

    assert response.status_code == 200, response.get_json()
    assert stripe_api.forms(SESSIONS)[0]["client_reference_id"] == str(org["id"])
    # The customer is the organisation's: the owner's email, not the admin who clicked.
    assert stripe_api.forms(CUSTOMERS)[0]["email"] == owner_email


# --- who may buy for which organisation ---------------------------------------------------------


def test_plain_member_gets_403(
    client: Any,
    stripe_api: FakeStripe,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    member = make_user()
    make_org(members={member: "member"})
    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=member
    )

    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert stripe_api.calls == {}


def test_owner_of_a_buying_for_b_gets_the_same_403_as_for_a_missing_org(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    other = make_org()
    plan_id = str(make_plan()["id"])

    for_b = post(
        client,
        {"plan_id": plan_id, "billing_period": "monthly", "organisation_id": str(other["id"])},
        user=buyer["user"],
    )
    for_nothing = post(
        client,
        {"plan_id": plan_id, "billing_period": "monthly", "organisation_id": str(uuid.uuid4())},
        user=buyer["user"],
    )

    assert (for_b.status_code, error_code(for_b)) == (403, "forbidden")
    assert for_nothing.get_json() == for_b.get_json()
    assert for_nothing.status_code == 403
    assert stripe_api.calls == {}


@pytest.mark.parametrize("gone", ["removed_from_the_organisation", "deleted_user"])
def test_a_still_valid_token_of_someone_no_longer_an_admin_gets_403(
    client: Any,
    stripe_api: FakeStripe,
    db: Any,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
    gone: str,
) -> None:
    admin = make_user()
    org = make_org(members={admin: "admin"})
    token = user_token(admin)
    if gone == "deleted_user":
        db.execute("delete from auth.users where id = %s", (admin,))
    else:
        db.execute(
            "delete from public.organisation_members where organisation_id = %s and user_id = %s",
            (org["id"], admin),
        )
    body = {
        "plan_id": str(make_plan()["id"]),
        "billing_period": "monthly",
        "organisation_id": str(org["id"]),
    }
    response = post(client, body, token=token)

    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert stripe_api.calls == {}


def test_outsider_learns_nothing_about_b_even_with_a_bad_plan(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_org: Callable[..., Any]
) -> None:
    other = make_org()
    response = post(
        client,
        {
            "plan_id": str(uuid.uuid4()),
            "billing_period": "yearly",
            "organisation_id": str(other["id"]),
        },
        user=buyer["user"],
    )
    assert (response.status_code, error_code(response)) == (403, "forbidden")


def test_several_memberships_need_organisation_id(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    second = make_org(members={buyer["user"]: "admin"})
    plan_id = str(make_plan()["id"])

    response = post(client, {"plan_id": plan_id, "billing_period": "monthly"}, user=buyer["user"])
    assert (response.status_code, error_code(response)) == (422, "organisation_id_required")
    assert "organisation_id" in response.get_json()["error"]["message"]

    chosen = post(
        client,
        {"plan_id": plan_id, "billing_period": "monthly", "organisation_id": str(second["id"])},
        user=buyer["user"],
    )
    assert chosen.status_code == 200, chosen.get_json()
    assert stripe_api.forms(SESSIONS)[0]["client_reference_id"] == str(second["id"])


def test_user_without_organisation_gets_404(
    client: Any,
    stripe_api: FakeStripe,
    make_user: Callable[..., str],
    make_plan: Callable[..., Any],
) -> None:
    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=make_user()
    )
    assert (response.status_code, error_code(response)) == (404, "organisation_not_found")


# --- which plan and period ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["inactive", "unknown"])
def test_only_active_plans_are_sold(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    which: str,
) -> None:
    plan_id = str(make_plan(active=False)["id"]) if which == "inactive" else str(uuid.uuid4())
    response = post(client, {"plan_id": plan_id, "billing_period": "monthly"}, user=buyer["user"])

    assert (response.status_code, error_code(response)) == (404, "plan_not_found")
    assert stripe_api.calls == {}


def test_yearly_only_where_the_plan_has_a_yearly_price(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    plan = make_plan(yearly_price_cents=None, stripe_yearly_price_id=None)
    response = post(
        client, {"plan_id": str(plan["id"]), "billing_period": "yearly"}, user=buyer["user"]
    )

    assert (response.status_code, error_code(response)) == (422, "yearly_not_offered")
    assert stripe_api.calls == {}


def test_a_plan_without_stripe_prices_is_not_sold(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    plan = make_plan(stripe_metered_price_id=None)
    response = post(
        client, {"plan_id": str(plan["id"]), "billing_period": "monthly"}, user=buyer["user"]
    )

    assert (response.status_code, error_code(response)) == (409, "plan_not_ready")
    assert stripe_api.calls == {}


@pytest.mark.parametrize("status", ["active", "trialing", "past_due", "unpaid"])
def test_live_subscription_is_409_already_subscribed(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
    status: str,
) -> None:
    plan = make_plan()
    add_subscription(db, buyer["org"], plan, status)
    response = post(
        client, {"plan_id": str(plan["id"]), "billing_period": "monthly"}, user=buyer["user"]
    )

    assert (response.status_code, error_code(response)) == (409, "already_subscribed")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe_api.calls == {}


@pytest.mark.parametrize(
    "field",
    [
        {"price": "price_cheap"},
        {"price_id": "price_cheap"},
        {"customer": "cus_someone_else"},
        {"line_items": [{"price": "price_cheap", "quantity": 1}]},
    ],
)
def test_browser_cannot_send_prices_or_customers(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    field: dict[str, Any],
) -> None:
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly", **field}
    response = post(client, body, user=buyer["user"])

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == next(iter(field))
    assert stripe_api.calls == {}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"plan_id": "not-a-uuid", "billing_period": "monthly"}, 422, "plan_id"),
        ({"billing_period": "monthly"}, 422, "plan_id"),
        ({"plan_id": str(uuid.uuid4()), "billing_period": "weekly"}, 422, "billing_period"),
        (
            {"plan_id": str(uuid.uuid4()), "billing_period": "monthly", "organisation_id": "x"},
            422,
            "organisation_id",
        ),
        (["monthly"], 422, "body"),
        ("{not json", 400, None),
    ],
)
def test_bad_bodies_are_4xx_naming_the_field(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    body: Any,
    status: int,
    field: str | None,
) -> None:
    response = post(client, body, user=buyer["user"])

    assert response.status_code == status
    assert response.get_json()["error"].get("field") == field


def test_a_json_body_sent_as_text_plain_is_415_and_nothing_is_opened(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    # text/plain is what a page gets without a preflight: the body must say it is JSON.
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    headers = {"Authorization": f"Bearer {user_token(buyer['user'])}", "Origin": WEBSITE_URL}
    response = client.post(
        "/", data=json.dumps(body), content_type="text/plain;charset=UTF-8", headers=headers
    )

    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe_api.calls == {}
    assert db.execute(
        "select count(*) as n from public.checkout_sessions where organisation_id = %s",
        (buyer["org"]["id"],),
    ).fetchone() == {"n": 0}


# --- redirects stay on the website --------------------------------------------------------------


@pytest.mark.parametrize("field", ["success_path", "cancel_path"])
@pytest.mark.parametrize(
    "path",
    [
        "https://evil.example/phish",
        "//evil.example/phish",
        "/\\evil.example",
        "\\\\evil.example",
        "/%5cevil.example",
        "/%2F%2Fevil.example",
        "/../../evil",
        "/billing/%2e%2e/%2e%2e/x",
        "/ok\r\nLocation: https://evil.example",
        "/ok%0d%0a",
        "/100%",
        "/%zz",
        "/a%2",
        "javascript:alert(1)",
        "evil.example",
        "",
        "/" + "a" * 1000,
    ],
)
def test_redirect_paths_cannot_leave_the_website(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    field: str,
    path: str,
) -> None:
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly", field: path}
    response = post(client, body, user=buyer["user"])

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == field
    assert stripe_api.calls == {}


def test_custom_paths_become_urls_on_the_website(
    load_function: Callable[..., Any],
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
) -> None:
    client = load_function(
        "create-checkout-session", "create_checkout_session", WEBSITE_URL=WEBSITE_URL + ":443/app/"
    )
    body = {
        "plan_id": str(make_plan()["id"]),
        "billing_period": "monthly",
        "success_path": "/welcome?plan=starter&cs={CHECKOUT_SESSION_ID}#top",
        "cancel_path": "/pricing",
    }
    response = post(client, body, user=buyer["user"])

    assert response.status_code == 200, response.get_json()
    [form] = stripe_api.forms(SESSIONS)
    assert (
        form["success_url"] == f"{WEBSITE_URL}/welcome?plan=starter&cs={{CHECKOUT_SESSION_ID}}#top"
    )
    assert form["cancel_url"] == f"{WEBSITE_URL}/pricing"


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443/x/y", "https://app.example.com"),
        ("http://localhost:3000/", "http://localhost:3000"),
    ],
)
def test_website_origin_is_spelled_like_a_browser_origin(url: str, origin: str) -> None:
    assert website_origin(url) == origin


@pytest.mark.parametrize(
    "url", ["app.example.com", "ftp://app.example.com", "https://user@app.example.com", None]
)
def test_website_url_must_be_an_http_origin(url: str | None) -> None:
    with pytest.raises(ConfigError, match="WEBSITE_URL"):
        website_origin(url)


@pytest.mark.parametrize(
    "path", ["/billing/success?session_id={CHECKOUT_SESSION_ID}", "/search?q=a%20b%2Fc#top"]
)
def test_good_paths_pass_unchanged(path: str) -> None:
    assert website_path(path) == path


# --- authentication -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _tampered(user_id: str) -> str:
    header, _, signature = user_token(user_id).split(".")
    payload = {
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "exp": int(time.time()) + 3600,
    }
    return f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"


def _alg_none(user_id: str) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = {
        "sub": user_id,
        "aud": "authenticated",
        "role": "authenticated",
        "exp": int(time.time()) + 3600,
    }
    return f"{header}.{_b64(json.dumps(payload).encode())}."


ATTACKS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "missing": (lambda user: None, "missing_token"),
    "garbage": (lambda user: "not.a.jwt", "invalid_token"),
    "expired": (lambda user: user_token(user, exp=int(time.time()) - 60), "token_expired"),
    "tampered": (_tampered, "invalid_token"),
    "alg_none": (_alg_none, "invalid_token"),
    "wrong_audience": (lambda user: user_token(user, aud="someone-else"), "invalid_token"),
    "other_secret": (
        lambda user: jwt.encode(
            {
                "sub": user,
                "aud": "authenticated",
                "role": "authenticated",
                "exp": int(time.time()) + 60,
            },
            "another-secret-another-secret-another-secret",
            algorithm="HS256",
        ),
        "invalid_token",
    ),
    "service_role": (lambda user: user_token(user, role="service_role"), "invalid_token"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_bad_tokens_are_401_with_a_code_and_readable_by_the_website(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    attack: str,
) -> None:
    forge, code = ATTACKS[attack]
    token = forge(buyer["user"])
    headers = {"Content-Type": "application/json", "Origin": WEBSITE_URL}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    response = client.post("/", data=json.dumps(body), headers=headers)

    assert (response.status_code, error_code(response)) == (401, code)
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe_api.calls == {}


def test_asymmetric_tokens_from_the_project_jwks_are_accepted(
    load_function: Callable[..., Any],
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
) -> None:
    auth.clear_jwks_cache()
    client = load_function(
        "create-checkout-session", "create_checkout_session", SUPABASE_JWT_SECRET=None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "kid": "k1",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    stripe_api.router.get("https://project-ref.supabase.co/auth/v1/.well-known/jwks.json").respond(
        json={"keys": [jwk]}
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    claims = {
        "sub": buyer["user"],
        "aud": "authenticated",
        "role": "authenticated",
        "exp": int(time.time()) + 600,
    }
    token = jwt.encode(claims, pem.decode(), algorithm="ES256", headers={"kid": "k1"})

    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, token=token
    )
    legacy = post(
        client,
        {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"},
        token=user_token(buyer["user"]),
    )
    auth.clear_jwks_cache()

    assert response.status_code == 200, response.get_json()
    assert (legacy.status_code, error_code(legacy)) == (401, "invalid_token")


# --- CORS ---------------------------------------------------------------------------------------


def test_preflight_from_the_website(client: Any) -> None:
    response = client.options(
        "/",
        headers={
            "Origin": WEBSITE_URL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"POST", "OPTIONS"}
    assert set(response.headers["Access-Control-Allow-Headers"].split(", ")) == {
        "authorization",
        "content-type",
    }
    assert response.headers["Vary"] == "Origin"
    # Bearer tokens, not cookies: the browser is never told to send credentials.
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "null",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com/",
    ],
)
def test_other_origins_get_403_and_no_cors_headers(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    origin: str,
) -> None:
    preflight = client.options(
        "/", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    request = post(client, body, user=buyer["user"], origin=origin)

    for response in (preflight, request):
        assert (response.status_code, error_code(response)) == (403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in response.headers
        assert response.headers["Vary"] == "Origin"
    assert stripe_api.calls == {}


def test_success_and_method_errors_carry_cors_headers(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    ok = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=buyer["user"]
    )
    wrong_method = client.get("/", headers={"Origin": WEBSITE_URL})

    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert (wrong_method.status_code, error_code(wrong_method)) == (405, "method_not_allowed")
    assert wrong_method.headers["Access-Control-Allow-Origin"] == WEBSITE_URL


def test_requests_without_origin_are_not_browsers_and_still_work(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    response = post(
        client,
        {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"},
        user=buyer["user"],
        origin=None,
    )
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


# --- double clicks, concurrency, retries --------------------------------------------------------


def test_a_double_click_returns_the_same_session(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    first = post(client, body, user=buyer["user"])
    second = post(client, body, user=buyer["user"])

    assert first.status_code == second.status_code == 200
    assert second.get_json() == first.get_json()
    assert len(stripe_api.calls[SESSIONS]) == 1
    assert len(audit_rows(db, buyer["org"])) == 1


def test_another_plan_or_period_is_another_session(
    client: Any, stripe_api: FakeStripe, buyer: dict[str, Any], make_plan: Callable[..., Any]
) -> None:
    plan, other = str(make_plan()["id"]), str(make_plan()["id"])
    ids = {
        post(client, {"plan_id": p, "billing_period": period}, user=buyer["user"]).get_json()[
            "session_id"
        ]
        for p, period in [(plan, "monthly"), (plan, "yearly"), (other, "monthly")]
    }
    assert len(ids) == 3


@pytest.mark.parametrize(
    "aging",
    ["created_at = now() - interval '61 seconds'", "expires_at = now() - interval '1 second'"],
)
def test_an_old_or_expired_session_is_not_reused(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
    aging: str,
) -> None:
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    first = post(client, body, user=buyer["user"]).get_json()
    db.execute(
        f"update public.checkout_sessions set {aging} where stripe_session_id = %s",
        (first["session_id"],),
    )
    second = post(client, body, user=buyer["user"]).get_json()

    assert second["session_id"] != first["session_id"]
    first_key, second_key = stripe_api.keys(SESSIONS)
    assert first_key != second_key


def test_a_click_after_a_failed_one_reuses_its_idempotency_key(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    stripe_api.failures[SESSIONS].append(httpx.ConnectError("connection reset"))
    body = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}
    failed = post(client, body, user=buyer["user"])
    retried = post(client, body, user=buyer["user"])

    assert (failed.status_code, error_code(failed)) == (503, "stripe_unavailable")
    assert retried.status_code == 200
    first_key, second_key = stripe_api.keys(SESSIONS)
    assert first_key == second_key
    assert first_key and first_key.startswith("checkout-")
    assert len(audit_rows(db, buyer["org"])) == 1


def test_twenty_concurrent_clicks_make_one_customer_and_one_session(
    client: Any, buyer: dict[str, Any], make_plan: Callable[..., Any], db: Any
) -> None:
    order = {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}

    # Worst case for customers: Stripe forgets the key (past its 24 hours) and makes a new one per
    # request, so only our SQL can keep the organisation to one customer.
    with respx.mock(assert_all_called=False) as router:
        stripe_api = FakeStripe(router, idempotent_customers=False)
        responses = clicks_at_once(client, buyer["user"], [order] * 20)

    assert [r.status_code for r in responses] == [200] * 20, [r.get_json() for r in responses]
    assert len({r.get_json()["session_id"] for r in responses}) == 1
    assert set(stripe_api.keys(CUSTOMERS)) == {f"customer-{buyer['org']['id']}"}
    assert {form["customer"] for form in stripe_api.forms(SESSIONS)} == {
        stored_customer(db, buyer["org"])
    }
    assert len(set(stripe_api.keys(SESSIONS))) == 1
    assert len(audit_rows(db, buyer["org"])) == 1


def test_the_first_stored_customer_wins(db: Any, make_org: Callable[..., Any]) -> None:
    org = make_org()
    first = db.execute(
        "select public.set_organisation_customer(%s, 'cus_first')", (org["id"],)
    ).fetchone()
    second = db.execute(
        "select public.set_organisation_customer(%s, 'cus_second')", (org["id"],)
    ).fetchone()

    assert (
        first["set_organisation_customer"]
        == second["set_organisation_customer"]
        == {"stripe_customer_id": "cus_first"}
    )


# --- one open session per organisation ---------------------------------------------------------


def choice(plan: dict[str, Any], period: str = "monthly") -> dict[str, str]:
    return {"plan_id": str(plan["id"]), "billing_period": period}


def session_rows(db: psycopg.Connection[Any], org: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(plan id, Stripe session id, status) of the organisation's checkout rows, oldest first."""
    rows = db.execute(
        "select plan_id::text as plan_id, stripe_session_id, status from public.checkout_sessions"
        " where organisation_id = %s order by created_at",
        (org["id"],),
    ).fetchall()
    return [(row["plan_id"], row["stripe_session_id"], row["status"]) for row in rows]


def expired_paths(stripe_api: FakeStripe) -> list[str]:
    return [request.url.path for request in stripe_api.expire_requests]


def test_a_click_on_another_plan_expires_the_open_session_before_opening_its_own(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    open_when_created: list[list[str]] = []
    stripe_api.before_create = lambda: open_when_created.append(stripe_api.open_sessions())

    first = post(client, choice(plan_a), user=buyer["user"])
    second = post(client, choice(plan_b), user=buyer["user"])

    assert first.status_code == second.status_code == 200, second.get_json()
    a, b = first.get_json()["session_id"], second.get_json()["session_id"]
    [request] = stripe_api.expire_requests
    assert (request.method, request.url.path, request.content) == (
        "POST",
        f"/v1/checkout/sessions/{a}/expire",
        b"",
    )
    assert open_when_created == [[], []]  # A was expired before B was opened
    assert stripe_api.open_sessions() == [b]
    assert session_rows(db, buyer["org"]) == [
        (str(plan_a["id"]), a, "expired"),
        (str(plan_b["id"]), b, "open"),
    ]
    assert {
        "actor": buyer["user"],
        "action": "checkout.expired",
        "details": {"plan_id": str(plan_a["id"]), "billing_period": "monthly", "session_id": a},
    } in audit_rows(db, buyer["org"])

    # Back to A within the minute: its session is gone, so a new one; A is not expired twice.
    third = post(client, choice(plan_a), user=buyer["user"])

    assert third.status_code == 200, third.get_json()
    c = third.get_json()["session_id"]
    assert c not in (a, b)
    assert expired_paths(stripe_api) == [
        f"/v1/checkout/sessions/{a}/expire",
        f"/v1/checkout/sessions/{b}/expire",
    ]
    assert stripe_api.open_sessions() == [c]


def test_a_later_click_on_the_same_plan_expires_the_old_session(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    body = choice(make_plan())
    first = post(client, body, user=buyer["user"]).get_json()["session_id"]
    db.execute(
        "update public.checkout_sessions set created_at = now() - interval '2 hours'"
        " where stripe_session_id = %s",
        (first,),
    )
    second = post(client, body, user=buyer["user"]).get_json()["session_id"]

    assert expired_paths(stripe_api) == [f"/v1/checkout/sessions/{first}/expire"]
    assert stripe_api.open_sessions() == [second]


def test_a_session_paid_before_the_next_click_stops_it_with_409(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    org = buyer["org"]
    a = post(client, choice(plan_a), user=buyer["user"]).get_json()["session_id"]
    subscription = stripe_api.complete(a)  # paid; its webhook has not arrived yet

    second = post(client, choice(plan_b), user=buyer["user"])
    again = post(client, choice(plan_a), user=buyer["user"])

    for response in (second, again):
        assert (response.status_code, error_code(response)) == (409, "checkout_completed")
        assert "wait a moment and reload" in response.get_json()["error"]["message"]
    assert len(stripe_api.calls[SESSIONS]) == 1
    assert stripe_api.sessions[a]["status"] == "complete"
    # Stripe was asked once: the completion is recorded, with the subscription it made.
    assert expired_paths(stripe_api) == [f"/v1/checkout/sessions/{a}/expire"]
    assert session_rows(db, org)[0] == (str(plan_a["id"]), a, "complete")

    # The webhook lands: the live subscription now answers; once it has ended, a new purchase.
    db.execute(
        "insert into public.subscriptions (organisation_id, plan_id, stripe_subscription_id,"
        " stripe_customer_id, status, billing_period) values (%s, %s, %s, %s, 'active', 'monthly')",
        (org["id"], plan_a["id"], subscription, stored_customer(db, org)),
    )
    subscribed = post(client, choice(plan_b), user=buyer["user"])
    db.execute(
        "update public.subscriptions set status = 'canceled' where stripe_subscription_id = %s",
        (subscription,),
    )
    after_the_end = post(client, choice(plan_b), user=buyer["user"])

    assert (subscribed.status_code, error_code(subscribed)) == (409, "already_subscribed")
    assert after_the_end.status_code == 200, after_the_end.get_json()
    assert len(stripe_api.calls[SESSIONS]) == 2
    assert len(stripe_api.expire_requests) == 1


def test_another_choice_while_a_session_is_being_opened_gets_409_in_progress(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    during: list[Any] = []

    def click_b_while_a_is_at_stripe() -> None:
        stripe_api.before_create = None
        during.append(post(client, choice(plan_b), user=buyer["user"]))

    stripe_api.before_create = click_b_while_a_is_at_stripe
    first = post(client, choice(plan_a), user=buyer["user"])

    assert first.status_code == 200, first.get_json()
    [in_progress] = during
    assert (in_progress.status_code, error_code(in_progress)) == (409, "checkout_in_progress")
    assert len(stripe_api.calls[SESSIONS]) == 1
    # The browser retries once A's session exists: B replaces it.
    retried = post(client, choice(plan_b), user=buyer["user"])

    assert retried.status_code == 200, retried.get_json()
    a, b = first.get_json()["session_id"], retried.get_json()["session_id"]
    assert expired_paths(stripe_api) == [f"/v1/checkout/sessions/{a}/expire"]
    assert stripe_api.open_sessions() == [b]


def test_concurrent_clicks_on_two_plans_leave_one_open_session(
    client: Any, buyer: dict[str, Any], make_plan: Callable[..., Any], db: Any
) -> None:
    plans = [make_plan(), make_plan()]

    with respx.mock(assert_all_called=False) as router:
        stripe_api = FakeStripe(router)
        responses = clicks_at_once(client, buyer["user"], [choice(plans[i % 2]) for i in range(10)])

    outcomes = {(r.status_code, r.get_json().get("error", {}).get("code")) for r in responses}
    assert outcomes <= {(200, None), (409, "checkout_in_progress")}, outcomes
    [survivor] = stripe_api.open_sessions()
    answered = {r.get_json()["session_id"] for r in responses if r.status_code == 200}
    assert survivor in answered
    assert {stripe_api.sessions[s]["status"] for s in answered - {survivor}} <= {"expired"}
    assert [row[1] for row in session_rows(db, buyer["org"]) if row[2] == "open"] == [survivor]


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection reset"),
        stripe_error(429, "invalid_request_error", "Too many requests", "rate_limit"),
    ],
)
def test_stripe_down_while_expiring_opens_nothing_until_a_retry(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
    failure: Any,
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    a = post(client, choice(plan_a), user=buyer["user"]).get_json()["session_id"]
    stripe_api.failures[EXPIRE].append(failure)

    failed = post(client, choice(plan_b), user=buyer["user"])

    assert (failed.status_code, error_code(failed)) == (503, "stripe_unavailable")
    assert len(stripe_api.calls[SESSIONS]) == 1
    assert stripe_api.open_sessions() == [a]
    assert session_rows(db, buyer["org"])[0] == (str(plan_a["id"]), a, "open")

    retried = post(client, choice(plan_b), user=buyer["user"])

    assert retried.status_code == 200, retried.get_json()
    assert stripe_api.open_sessions() == [retried.get_json()["session_id"]]


@pytest.mark.parametrize("at_stripe", ["expired", "unknown"])
def test_a_session_stripe_no_longer_has_open_is_recorded_and_passed_over(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
    at_stripe: str,
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    a = post(client, choice(plan_a), user=buyer["user"]).get_json()["session_id"]
    if at_stripe == "expired":  # its 24 hours ran out, or a killed request expired it
        stripe_api.sessions[a]["status"] = "expired"
    else:  # another Stripe account (keys changed, the local stand-in reset): nobody can pay it
        del stripe_api.sessions[a]

    second = post(client, choice(plan_b), user=buyer["user"])

    assert second.status_code == 200, second.get_json()
    assert session_rows(db, buyer["org"])[0] == (str(plan_a["id"]), a, "expired")
    assert len(stripe_api.calls[SESSIONS]) == 2


def test_a_session_stripe_refuses_to_expire_while_open_is_a_502_and_opens_nothing(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    db: Any,
) -> None:
    plan_a, plan_b = make_plan(), make_plan()
    a = post(client, choice(plan_a), user=buyer["user"]).get_json()["session_id"]
    stripe_api.failures[EXPIRE].append(stripe_error(400, "invalid_request_error", "Refused."))

    refused = post(client, choice(plan_b), user=buyer["user"])

    assert (refused.status_code, error_code(refused)) == (502, "stripe_error")
    assert stripe_api.open_sessions() == [a]
    assert len(stripe_api.calls[SESSIONS]) == 1


# --- Stripe failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "failure", "status", "code"),
    [
        (
            SESSIONS,
            stripe_error(
                400,
                "invalid_request_error",
                "No such price: 'price_internal_xyz'",
                "resource_missing",
            ),
            502,
            "stripe_error",
        ),
        (
            CUSTOMERS,
            stripe_error(400, "invalid_request_error", "Invalid email: 'internal'"),
            502,
            "stripe_error",
        ),
        (
            SESSIONS,
            stripe_error(429, "invalid_request_error", "Too many requests", "rate_limit"),
            503,
            "stripe_unavailable",
        ),
        (SESSIONS, httpx.ConnectError("no route to api.stripe.com"), 503, "stripe_unavailable"),
        (CUSTOMERS, httpx.ReadTimeout("timed out"), 503, "stripe_unavailable"),
    ],
)
def test_stripe_errors_are_mapped_and_tell_nothing_of_stripe(
    client: Any,
    stripe_api: FakeStripe,
    buyer: dict[str, Any],
    make_plan: Callable[..., Any],
    path: str,
    failure: Any,
    status: int,
    code: str,
) -> None:
    stripe_api.failures[path].append(failure)
    response = post(
        client, {"plan_id": str(make_plan()["id"]), "billing_period": "monthly"}, user=buyer["user"]
    )

    assert (response.status_code, error_code(response)) == (status, code)
    text = response.get_data(as_text=True)
    for secret in ("internal", "price_", "stripe.com", "Too many", "rate_limit"):
        assert secret not in text
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL


# --- start-up configuration and storage ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STRIPE_SECRET_KEY": None}, "STRIPE_SECRET_KEY"),
        ({"STRIPE_SECRET_KEY": "sk_test_xxx"}, "STRIPE_SECRET_KEY"),
        ({"WEBSITE_URL": None}, "WEBSITE_URL"),
        ({"WEBSITE_URL": "app.example.com"}, "WEBSITE_URL"),
        ({"DATABASE_URL": None, "SUPABASE_URL": None}, "DATABASE_URL"),
        ({"SUPABASE_JWT_SECRET": None, "SUPABASE_URL": None}, "SUPABASE_JWT_SECRET"),
        ({"SUPABASE_JWT_SECRET": "changeme"}, "SUPABASE_JWT_SECRET"),
        ({"STRIPE_SETUP_FEE_PRICE_ID": "prod_123"}, "STRIPE_SETUP_FEE_PRICE_ID"),
    ],
)
@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("create-checkout-session", "create_checkout_session"),
        ("create-portal-session", "create_portal_session"),
    ],
)
def test_missing_configuration_stops_the_start_naming_it(
    load_function: Callable[..., Any],
    env: dict[str, str | None],
    named: str,
    name: str,
    target: str,
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_function(name, target, **env)


def test_jwks_alone_is_enough_configuration(load_function: Callable[..., Any]) -> None:
    assert load_function(
        "create-checkout-session", "create_checkout_session", SUPABASE_JWT_SECRET=None
    )


def test_end_users_cannot_read_checkout_sessions(db: Any, buyer: dict[str, Any]) -> None:
    with (
        acting_as(db, "authenticated", buyer["user"]) as cur,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        cur.execute("select * from public.checkout_sessions")
