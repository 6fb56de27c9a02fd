"""POST create-portal-session: owners and admins of a subscribed organisation get Stripe's portal."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx

from tests.conftest import WEBSITE_URL, user_token
from tests.test_checkout import (
    PORTAL,
    FakeStripe,
    add_subscription,
    error_code,
    load_function,
    post,
    stripe_error,
)

__all__ = ["load_function"]  # a fixture, used by name


@pytest.fixture
def stripe_api() -> Iterator[FakeStripe]:
    with respx.mock(assert_all_called=False) as router:
        yield FakeStripe(router)


@pytest.fixture
def client(load_function: Callable[..., Any]) -> Any:
    return load_function("create-portal-session", "create_portal_session")


@pytest.fixture
def subscribed(
    db: Any,
    make_user: Callable[..., str],
    make_org: Callable[..., dict[str, Any]],
    make_plan: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """An owner, an admin and a member of an organisation with a customer and a subscription."""
    owner, admin, member = make_user(), make_user(), make_user()
    org = make_org(
        owner,
        members={admin: "admin", member: "member"},
        stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}",
    )
    add_subscription(db, org, make_plan(), "past_due")
    return {"owner": owner, "admin": admin, "member": member, "org": org}


@pytest.mark.parametrize("who", ["owner", "admin"])
def test_owner_or_admin_gets_a_portal_url_for_the_org_customer(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any], who: str
) -> None:
    response = post(client, {}, user=subscribed[who])

    assert response.status_code == 200, response.get_json()
    assert stripe_api.forms(PORTAL) == [
        {
            "customer": subscribed["org"]["stripe_customer_id"],
            "return_url": f"{WEBSITE_URL}/billing",
        }
    ]
    portal_url = response.get_json()["portal_url"]
    assert response.get_json() == {"portal_url": portal_url}
    assert portal_url.startswith("https://billing.stripe.com/p/session/bps_")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL


def test_return_path_and_organisation_id_are_honoured(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any]
) -> None:
    body = {"organisation_id": str(subscribed["org"]["id"]), "return_path": "/settings/billing?x=1"}
    response = post(client, body, user=subscribed["owner"])

    assert response.status_code == 200, response.get_json()
    assert stripe_api.forms(PORTAL)[0]["return_url"] == f"{WEBSITE_URL}/settings/billing?x=1"


@pytest.mark.parametrize(
    "path", ["https://evil.example", "//evil.example", "/\\evil", "/../x", "/%zz", ""]
)
def test_return_path_cannot_leave_the_website(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any], path: str
) -> None:
    response = post(client, {"return_path": path}, user=subscribed["owner"])

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == "return_path"
    assert stripe_api.calls == {}


def test_browser_cannot_name_the_customer(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any]
) -> None:
    response = post(client, {"customer": "cus_someone_else"}, user=subscribed["owner"])

    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert stripe_api.calls == {}


def test_a_json_body_sent_as_text_plain_is_415_and_stripe_is_not_called(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {user_token(subscribed['owner'])}", "Origin": WEBSITE_URL}
    response = client.post("/", data="{}", content_type="text/plain", headers=headers)

    assert (response.status_code, error_code(response)) == (415, "unsupported_media_type")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe_api.calls == {}


def test_member_and_outsider_get_403(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any], make_org: Callable[..., Any]
) -> None:
    member = post(client, {}, user=subscribed["member"])
    outsider_owner = make_org()["owner_id"]
    outsider = post(
        client, {"organisation_id": str(subscribed["org"]["id"])}, user=str(outsider_owner)
    )

    assert (member.status_code, error_code(member)) == (403, "forbidden")
    assert (outsider.status_code, error_code(outsider)) == (403, "forbidden")
    assert stripe_api.calls == {}


@pytest.mark.parametrize("has_customer", [False, True])
def test_no_customer_or_no_subscription_is_409_not_subscribed(
    client: Any,
    stripe_api: FakeStripe,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    has_customer: bool,
) -> None:
    owner = make_user()
    make_org(owner, stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}" if has_customer else None)
    response = post(client, {}, user=owner)

    assert (response.status_code, error_code(response)) == (409, "not_subscribed")
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert stripe_api.calls == {}


def test_a_canceled_subscription_still_opens_the_portal(
    client: Any,
    stripe_api: FakeStripe,
    db: Any,
    make_user: Callable[..., str],
    make_org: Callable[..., Any],
    make_plan: Callable[..., Any],
) -> None:
    owner = make_user()
    org = make_org(owner, stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}")
    add_subscription(db, org, make_plan(), "canceled")

    assert post(client, {}, user=owner).status_code == 200


def test_missing_token_is_401(client: Any, stripe_api: FakeStripe) -> None:
    response = post(client, {})
    assert (response.status_code, error_code(response)) == (401, "missing_token")


def test_cors_preflight_and_other_origins(
    client: Any, stripe_api: FakeStripe, subscribed: dict[str, Any]
) -> None:
    ours = client.options(
        "/", headers={"Origin": WEBSITE_URL, "Access-Control-Request-Method": "POST"}
    )
    theirs = post(client, {}, user=subscribed["owner"], origin="https://evil.example")

    assert ours.status_code == 204
    assert ours.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert (theirs.status_code, error_code(theirs)) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in theirs.headers
    assert stripe_api.calls == {}


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (
            stripe_error(400, "invalid_request_error", "No configuration provided; internal"),
            502,
            "stripe_error",
        ),
        (httpx.ConnectError("down"), 503, "stripe_unavailable"),
    ],
)
def test_stripe_errors_are_mapped(
    client: Any,
    stripe_api: FakeStripe,
    subscribed: dict[str, Any],
    failure: Any,
    status: int,
    code: str,
) -> None:
    stripe_api.failures[PORTAL].append(failure)
    response = post(client, {}, user=subscribed["owner"])

    assert (response.status_code, error_code(response)) == (status, code)
    assert "internal" not in response.get_data(as_text=True)
