"""GET billing-overview through the real function: what a member's billing page shows, for whom.

Usage is reported through the real report-usage function (its meter faked with respx), so the
figures are the ones the agent's reports make; the cycle is compared with GET report-usage's.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from shared.errors import ConfigError
from tests.conftest import SERVICE_KEY, WEBSITE_URL, function_client, user_token
from tests.openapi_check import assert_documented
from tests.test_checkout import load_function
from tests.test_report_usage import meter, subscribe

__all__ = ["load_function", "meter", "subscribe"]  # fixtures, used by name

NOW = datetime.now(UTC).replace(microsecond=0)
SERVICE = {"Authorization": f"Bearer {SERVICE_KEY}"}


@pytest.fixture
def client(function_env: dict[str, str]) -> Any:
    return function_client("billing-overview", "billing_overview")


@pytest.fixture
def usage(function_env: dict[str, str]) -> Any:
    return function_client("report-usage", "report_usage")


def get(
    client: Any,
    user: str | None = None,
    *,
    query: str = "",
    token: str | None = None,
    origin: str | None = WEBSITE_URL,
) -> Any:
    headers = {"Origin": origin} if origin else {}
    token = token or (user_token(user) if user else None)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = client.get(f"/{query}", headers=headers)
    assert_documented("/billing-overview", "GET", response.status_code, response.get_json())
    return response


def overview_of(client: Any, user: str, query: str = "") -> dict[str, Any]:
    response = get(client, user, query=query)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def error_code(response: Any) -> str:
    return str(response.get_json()["error"]["code"])


def report(usage: Any, org_id: Any, minutes: int, ended_at: datetime) -> None:
    """One finished call of `minutes`, reported as the voice agent does."""
    body = {
        "org_id": str(org_id),
        "call_id": uuid.uuid4().hex,
        "call_duration_minutes": minutes,
        "ended_at": ended_at.isoformat(),
    }
    response = usage.post("/", json=body, headers=SERVICE)
    assert response.status_code == 202, response.get_json()  # recorded; its meter event queued


def report_usage_cycle(usage: Any, org_id: Any) -> dict[str, Any]:
    response = usage.get(f"/?org_id={org_id}", headers=SERVICE)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def minutes_by_day(calls: list[tuple[datetime, int]]) -> dict[str, int]:
    """{UTC day: minutes} of (ended_at, minutes) calls."""
    totals: Counter[str] = Counter()
    for ended_at, minutes in calls:
        totals[ended_at.date().isoformat()] += minutes
    return dict(totals)


def per_day(body: dict[str, Any]) -> dict[str, int]:
    """The chart's days with minutes."""
    return {day["date"]: day["minutes"] for day in body["daily_usage"] if day["minutes"]}


def days(first: date, last: date) -> list[str]:
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


@pytest.fixture
def team(make_user: Callable[..., str], make_org: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """An organisation (with a Stripe customer) with an owner, an admin and a member."""
    owner, admin, member = make_user(), make_user(), make_user()
    org = make_org(
        owner,
        name="Acme Voice",
        members={admin: "admin", member: "member"},
        stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}",
    )
    return {"owner": owner, "admin": admin, "member": member, "org": org}


def add_invoice(
    db: psycopg.Connection[Any], org: dict[str, Any], created: datetime, **fields: Any
) -> dict[str, Any]:
    invoice_id = f"in_{uuid.uuid4().hex[:14]}"
    values: dict[str, Any] = {
        "id": invoice_id,
        "organisation_id": org["id"],
        "stripe_customer_id": org["stripe_customer_id"] or "cus_x",
        "number": f"ACME-{invoice_id[-4:]}",
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "currency": "eur",
        "amount_due": 20400,
        "amount_paid": 20400,
        "amount_remaining": 0,
        "total": 20400,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_1/{invoice_id}",
        "invoice_pdf": f"https://pay.stripe.com/invoice/acct_1/{invoice_id}/pdf",
        "created": created,
        "stripe_state_at": created,
    }
    values.update(fields)
    columns = ", ".join(values)
    placeholders = ", ".join(f"%({key})s" for key in values)
    db.execute(f"insert into public.invoices ({columns}) values ({placeholders})", values)
    return values


# ------------------------------------------------------------------ who may see what


@pytest.mark.parametrize("who", ["owner", "admin", "member"])
def test_every_member_sees_the_organisation_with_their_role(
    client: Any, team: dict[str, Any], who: str
) -> None:
    response = get(client, team[who])

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["organisation"] == {
        "id": str(team["org"]["id"]),
        "name": "Acme Voice",
        "role": who,
    }
    assert response.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    named = get(client, team[who], query=f"?organisation_id={team['org']['id']}")
    assert named.get_json() == response.get_json()


def test_an_outsider_gets_the_same_403_for_another_organisation_and_a_missing_one(
    client: Any, team: dict[str, Any], make_org: Callable[..., dict[str, Any]]
) -> None:
    outsider = str(make_org(name="Other Voice")["owner_id"])
    theirs = get(client, outsider, query=f"?organisation_id={team['org']['id']}")
    missing = get(client, outsider, query=f"?organisation_id={uuid.uuid4()}")

    assert (theirs.status_code, error_code(theirs)) == (403, "forbidden")
    assert theirs.get_json() == missing.get_json()
    assert "Acme" not in theirs.get_data(as_text=True)
    assert theirs.headers["Access-Control-Allow-Origin"] == WEBSITE_URL


def test_a_user_of_several_organisations_must_say_which(
    client: Any, team: dict[str, Any], make_org: Callable[..., dict[str, Any]]
) -> None:
    second = make_org(name="Second Voice", members={team["member"]: "member"})
    unnamed = get(client, team["member"])
    named = get(client, team["member"], query=f"?organisation_id={second['id']}")

    assert (unnamed.status_code, error_code(unnamed)) == (422, "organisation_id_required")
    assert "organisation_id" in unnamed.get_json()["error"]["message"]
    assert named.status_code == 200
    assert named.get_json()["organisation"]["name"] == "Second Voice"


def test_a_user_of_no_organisation_gets_404(client: Any, make_user: Callable[..., str]) -> None:
    response = get(client, make_user())
    assert (response.status_code, error_code(response)) == (404, "organisation_not_found")


@pytest.mark.parametrize(
    ("query", "field"),
    [("?organisation_id=acme", "organisation_id"), ("?organization_id=x", "organization_id")],
)
def test_a_bad_or_unknown_parameter_is_422_naming_it(
    client: Any, team: dict[str, Any], query: str, field: str
) -> None:
    response = get(client, team["owner"], query=query)
    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert response.get_json()["error"]["field"] == field


def test_without_a_good_token_it_is_401(client: Any, team: dict[str, Any]) -> None:
    missing = get(client)
    forged = get(client, token=user_token(team["owner"]) + "x")
    expired = get(client, token=user_token(team["owner"], exp=int(NOW.timestamp()) - 60))

    assert (missing.status_code, error_code(missing)) == (401, "missing_token")
    assert (forged.status_code, error_code(forged)) == (401, "invalid_token")
    assert (expired.status_code, error_code(expired)) == (401, "token_expired")
    assert missing.headers["Access-Control-Allow-Origin"] == WEBSITE_URL


def test_cors_preflight_other_origins_and_other_methods(client: Any, team: dict[str, Any]) -> None:
    ours = client.options(
        "/",
        headers={
            "Origin": WEBSITE_URL,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    theirs = get(client, team["owner"], origin="https://evil.example")
    post = client.post("/", headers={"Origin": WEBSITE_URL}, json={})

    assert ours.status_code == 204
    assert ours.headers["Access-Control-Allow-Origin"] == WEBSITE_URL
    assert ours.headers["Access-Control-Allow-Methods"] == "GET, OPTIONS"
    assert "authorization" in ours.headers["Access-Control-Allow-Headers"]
    assert (theirs.status_code, error_code(theirs)) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in theirs.headers
    assert (post.status_code, post.headers["Allow"]) == (405, "GET, OPTIONS")


def test_a_request_without_origin_is_left_to_the_token(client: Any, team: dict[str, Any]) -> None:
    response = get(client, team["owner"], origin=None)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WEBSITE_URL": None}, "WEBSITE_URL"),
        ({"WEBSITE_URL": "app.example.com"}, "WEBSITE_URL"),
        ({"DATABASE_URL": None, "SUPABASE_URL": None}, "DATABASE_URL"),
        ({"SUPABASE_JWT_SECRET": "changeme"}, "SUPABASE_JWT_SECRET"),
    ],
)
def test_missing_configuration_stops_the_start_naming_it(
    load_function: Callable[..., Any], env: dict[str, str | None], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_function("billing-overview", "billing_overview", **env)


def test_it_needs_no_stripe_key(load_function: Callable[..., Any], team: dict[str, Any]) -> None:
    client = load_function("billing-overview", "billing_overview", STRIPE_SECRET_KEY=None)
    assert get(client, team["owner"]).status_code == 200


# ------------------------------------------------------------------ what it shows


def test_before_a_subscription_the_page_has_plans_and_no_cycle(
    client: Any,
    usage: Any,
    db: psycopg.Connection[Any],
    team: dict[str, Any],
    make_plan: Callable[..., dict[str, Any]],
) -> None:
    on_sale, retired = make_plan(sort_order=-5), make_plan(active=False)
    body = overview_of(client, team["member"])

    assert body["subscription"] is None
    assert body["cycle"] == report_usage_cycle(usage, team["org"]["id"])
    assert body["cycle"]["allowed"] is False
    assert (body["daily_usage"], body["alerts"], body["invoices"]) == ([], [], [])
    plans = {plan["id"]: plan for plan in body["plans"]}
    assert plans[str(on_sale["id"])] == {
        "id": str(on_sale["id"]),
        "name": on_sale["name"],
        "currency": "eur",
        "included_minutes": 500,
        "monthly_price_cents": 20400,
        "yearly_price_cents": 220320,
        "overage_rate_cents": 50,
        "active": True,
    }
    assert str(retired["id"]) not in plans
    active = db.execute("select id, sort_order, name from billing_plans where active").fetchall()
    in_order = sorted(active, key=lambda plan: (plan["sort_order"], plan["name"]))
    assert list(plans) == [str(plan["id"]) for plan in in_order]


def test_the_cycle_is_report_usages_and_the_chart_has_every_day_with_the_minutes(
    client: Any,
    usage: Any,
    meter: Any,
    team: dict[str, Any],
    make_plan: Callable[..., dict[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
) -> None:
    plan = make_plan()
    start = NOW - timedelta(days=3)
    subscribe(team["org"], plan, start=start)
    calls = [(start + timedelta(minutes=5), 30), (start + timedelta(hours=30), 45)]
    calls += [(NOW - timedelta(minutes=10), 12), (NOW - timedelta(minutes=5), 3)]
    for ended_at, minutes in calls:
        report(usage, team["org"]["id"], minutes, ended_at)

    body = overview_of(client, team["member"])

    cycle = body["cycle"]
    assert cycle == report_usage_cycle(usage, team["org"]["id"])
    assert (cycle["minutes_used"], cycle["included_minutes"], cycle["allowed"]) == (90, 500, True)
    assert [day["date"] for day in body["daily_usage"]] == days(start.date(), NOW.date())
    assert per_day(body) == minutes_by_day(calls)
    assert sum(day["minutes"] for day in body["daily_usage"]) == cycle["minutes_used"]
    subscription = body["subscription"]
    assert subscription["status"] == "active"
    assert subscription["plan"]["id"] == str(plan["id"])
    assert subscription["billing_period"] == "monthly"
    assert subscription["cancel_at_period_end"] is False
    assert subscription["pending"] is None
    assert datetime.fromisoformat(subscription["current_period_end"]) > NOW


def test_the_banners_thresholds_appear_as_they_are_crossed(
    client: Any,
    usage: Any,
    meter: Any,
    team: dict[str, Any],
    make_plan: Callable[..., dict[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
) -> None:
    subscribe(team["org"], make_plan(included_minutes=100))
    org_id = team["org"]["id"]

    report(usage, org_id, 79, NOW - timedelta(hours=2))
    assert overview_of(client, team["member"])["alerts"] == []
    report(usage, org_id, 1, NOW - timedelta(hours=1))
    after_80 = overview_of(client, team["member"])["alerts"]
    report(usage, org_id, 25, NOW - timedelta(minutes=30))
    body = overview_of(client, team["member"])

    assert [alert["threshold_percent"] for alert in after_80] == [80]
    assert [alert["threshold_percent"] for alert in body["alerts"]] == [80, 100]
    assert body["alerts"][0] == after_80[0]
    assert body["cycle"]["overage_minutes"] == 5


def test_a_pending_downgrade_and_a_cancellation_are_shown(
    client: Any,
    db: psycopg.Connection[Any],
    team: dict[str, Any],
    make_plan: Callable[..., dict[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
) -> None:
    growth, starter = make_plan(name=f"Growth {uuid.uuid4().hex[:6]}"), make_plan()
    sub = subscribe(team["org"], growth)
    db.execute(
        "update subscriptions set pending_plan_id = %s, pending_billing_period = 'monthly',"
        " pending_effective_at = current_period_end, cancel_at_period_end = true where id = %s",
        (starter["id"], sub["id"]),
    )

    subscription = overview_of(client, team["member"])["subscription"]

    assert subscription["plan"]["name"] == growth["name"]
    assert subscription["cancel_at_period_end"] is True
    assert subscription["pending"]["plan"]["id"] == str(starter["id"])
    assert subscription["pending"]["billing_period"] == "monthly"
    effective = datetime.fromisoformat(subscription["pending"]["effective_at"])
    assert effective == datetime.fromisoformat(subscription["current_period_end"])
    assert effective == sub["current_period_end"]


def test_invoices_newest_first_with_their_links_and_none_of_another_organisation(
    client: Any,
    db: psycopg.Connection[Any],
    team: dict[str, Any],
    make_org: Callable[..., dict[str, Any]],
) -> None:
    other = make_org(name="Other Voice", stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}")
    ours = [add_invoice(db, team["org"], NOW - timedelta(days=n)) for n in (40, 10, 70)]
    ours.append(add_invoice(db, team["org"], NOW, status="open", amount_paid=0, total=1234))
    theirs = add_invoice(db, other, NOW - timedelta(days=5))

    invoices = overview_of(client, team["member"])["invoices"]

    newest_first = sorted(ours, key=lambda invoice: invoice["created"], reverse=True)
    assert [invoice["id"] for invoice in invoices] == [invoice["id"] for invoice in newest_first]
    first = invoices[0]
    assert first["status"] == "open"
    assert (first["total"], first["currency"]) == (1234, "eur")
    assert first["number"] == ours[-1]["number"]
    assert datetime.fromisoformat(first["created"]) == NOW
    assert first["hosted_invoice_url"] == ours[-1]["hosted_invoice_url"]
    assert first["invoice_pdf"] == ours[-1]["invoice_pdf"]
    assert theirs["id"] not in str(invoices)


def test_the_list_stops_at_the_24_newest_invoices(
    client: Any, db: psycopg.Connection[Any], team: dict[str, Any]
) -> None:
    made = [add_invoice(db, team["org"], NOW - timedelta(days=n)) for n in range(30)]
    invoices = overview_of(client, team["owner"])["invoices"]
    assert [invoice["id"] for invoice in invoices] == [invoice["id"] for invoice in made[:24]]


@pytest.mark.parametrize(
    "query",
    [
        "?organisation_id={b}",
        "?organisation_id={b}&organisation_id={a}",
        "?organisation_id={a}&organisation_id={b}",
        "?organisation_id={A}",
    ],
)
def test_no_parameter_shows_a_member_another_organisations_invoices(
    client: Any,
    db: psycopg.Connection[Any],
    team: dict[str, Any],
    make_org: Callable[..., dict[str, Any]],
    query: str,
) -> None:
    org_b = make_org(name="Other Voice", stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}")
    secret = add_invoice(db, org_b, NOW)
    a, b = str(team["org"]["id"]), str(org_b["id"])
    response = get(client, team["member"], query=query.format(a=a, b=b, A=a.upper()))

    assert response.status_code in (200, 403), response.get_json()
    text = response.get_data(as_text=True)
    assert secret["id"] not in text and secret["hosted_invoice_url"] not in text
    assert b not in text
    if response.status_code == 200:
        assert response.get_json()["organisation"]["id"] == a


def test_a_period_split_by_an_upgrade_charts_all_its_parts(
    client: Any,
    usage: Any,
    meter: Any,
    db: psycopg.Connection[Any],
    team: dict[str, Any],
    make_plan: Callable[..., dict[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
) -> None:
    """Before the change: 90 of Starter's 100 (alerts at 80); after: 30 of Growth's 1000, the
    cycle shown (no alerts). The chart is the whole period: 120 minutes from its first day."""
    starter = make_plan(included_minutes=100)
    start = NOW - timedelta(days=4)
    sub = subscribe(team["org"], starter, start=start)
    org_id = team["org"]["id"]
    before, after = start + timedelta(hours=2), NOW - timedelta(minutes=20)
    report(usage, org_id, 90, before)
    change = NOW - timedelta(days=1)
    db.execute(
        "select private.split_cycle(c, %s, 'price_growth_metered', 1000, 40, %s)"
        " from billing_cycles c where c.subscription_id = %s",
        (change, change, sub["id"]),
    )
    report(usage, org_id, 30, after)

    body = overview_of(client, team["member"])

    cycle = body["cycle"]
    assert cycle == report_usage_cycle(usage, org_id)
    assert (cycle["minutes_used"], cycle["included_minutes"]) == (30, 1000)
    assert datetime.fromisoformat(cycle["period_start"]) == change
    assert body["alerts"] == []
    assert [day["date"] for day in body["daily_usage"]] == days(start.date(), NOW.date())
    assert per_day(body) == minutes_by_day([(before, 90), (after, 30)])
