"""openapi.yaml against the real functions: every request the schema allows is served, and no
request at all gets a 5xx.

schemathesis generates requests from openapi.yaml, positive (the schema allows them) and negative
(it does not), and sends them in-process to the three JSON functions behind one WSGI app, with the
real database and valid credentials. Stripe is respx: Checkout and the portal answer with fixture
shapes (tests.test_checkout.FakeStripe); anything else (the meter) cannot be reached, so a usage
report stays pending (202). The webhook is left out: its body is only valid with a signature.

The schema's patterns are also checked against the validators they restate, character by
character, so the fuzzer is not the only thing that would notice them drifting apart.
"""

from __future__ import annotations

import calendar
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pydantic
import pytest
import respx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import FormatChecker
from schemathesis import GenerationMode
from werkzeug.exceptions import NotFound

from shared.cors import website_path
from shared.usage import UsageReport
from tests.conftest import ROOT, SERVICE_KEY, user_token
from tests.openapi_check import assert_documented, spec
from tests.test_checkout import FakeStripe

FUNCTIONS = {
    "/report-usage": "report_usage",
    "/create-checkout-session": "create_checkout_session",
    "/create-portal-session": "create_portal_session",
    "/change-plan": "change_plan",
    "/billing-overview": "billing_overview",
}
OPERATIONS = [
    ("/report-usage", "POST"),
    ("/report-usage", "GET"),
    ("/create-checkout-session", "POST"),
    ("/create-checkout-session", "OPTIONS"),
    ("/create-portal-session", "POST"),
    ("/create-portal-session", "OPTIONS"),
    ("/change-plan", "POST"),
    ("/change-plan", "OPTIONS"),
    ("/billing-overview", "GET"),
    ("/billing-overview", "OPTIONS"),
]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
SCHEMAS = spec()["components"]["schemas"]


@pytest.fixture
def world(
    db: Any,
    function_env: dict[str, str],
    make_user: Callable[..., str],
    make_org: Callable[..., dict[str, Any]],
    make_plan: Callable[..., dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """A plan; an agent's organisation subscribed to it (with a customer and its current cycle);
    a buyer's organisation with no subscription yet."""
    plan = make_plan()
    agent_owner, buyer = make_user(), make_user()
    agent_org = make_org(agent_owner, stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}")
    start = datetime.now(UTC) - timedelta(days=10)
    subscription = db.execute(
        "insert into subscriptions (organisation_id, plan_id, stripe_subscription_id,"
        " stripe_customer_id, status, billing_period, current_period_start, current_period_end)"
        " values (%s, %s, %s, %s, 'active', 'monthly', %s, %s) returning id",
        (
            agent_org["id"],
            plan["id"],
            f"sub_{uuid.uuid4().hex[:14]}",
            agent_org["stripe_customer_id"],
            start,
            start + timedelta(days=30),
        ),
    ).fetchone()
    db.execute(
        "insert into billing_cycles (organisation_id, subscription_id, period_start, period_end,"
        " included_minutes, overage_rate_cents) values (%s, %s, %s, %s, %s, %s)",
        (
            agent_org["id"],
            subscription["id"],
            start,
            start + timedelta(days=30),
            plan["included_minutes"],
            plan["overage_rate_cents"],
        ),
    )
    yield {
        "plan": str(plan["id"]),
        "agent_org": str(agent_org["id"]),
        "agent_owner": agent_owner,
        "buyer_org": str(make_org(buyer)["id"]),
        "buyer": buyer,
    }
    # The meter was unreachable: settle what is still pending, or a later test's flush (global,
    # by design) would find these events due and deliver them among its own.
    db.execute(
        "update usage_records set meter_status = 'failed', meter_next_attempt_at = null,"
        " meter_error = 'the fuzz test left it undelivered'"
        " where organisation_id = %s and meter_status = 'pending'",
        (agent_org["id"],),
    )


@pytest.fixture
def app(world: dict[str, Any]) -> Iterator[Any]:
    """The three functions as deployed behind one WSGI app, Stripe faked."""
    from functions_framework import create_app

    mounts = {
        path: create_app(target, str(ROOT / "functions" / path.strip("/") / "main.py"))
        for path, target in FUNCTIONS.items()
    }
    with respx.mock(assert_all_called=False) as router:
        FakeStripe(router)
        # Added last, so it only takes what FakeStripe does not: the meter is unreachable.
        router.route().mock(side_effect=httpx.ConnectError("Stripe is not reachable in the fuzz"))
        yield routed_by_path(mounts)


def routed_by_path(mounts: dict[str, Any]) -> Any:
    """One WSGI app: `/name` is served by that function at its root, as Cloud Run serves each."""

    def route(environ: dict[str, Any], start_response: Any) -> Any:
        function = mounts.get(environ.get("PATH_INFO", ""))
        if function is None:
            return NotFound()(environ, start_response)
        return function({**environ, "PATH_INFO": "/"}, start_response)

    return route


def credentials(path: str, world: dict[str, Any]) -> dict[str, str]:
    """The right caller for each function: the service key, or an owner of the organisation."""
    if path == "/report-usage":
        return {"Authorization": f"Bearer {SERVICE_KEY}"}
    user = world["buyer"] if path == "/create-checkout-session" else world["agent_owner"]
    return {"Authorization": f"Bearer {user_token(user)}"}


def shifted_to_the_past(ended_at: str) -> str:
    """`ended_at` with its year moved back by whole 400-year Gregorian cycles (same weekdays and
    leap days, so still a valid date) until it is before this year.

    The schema allows any year, but the function refuses a time more than 5 minutes ahead of its
    clock, a rule of time that no schema can state (openapi.yaml says so in words).
    """
    year, rest = int(ended_at[:4]), ended_at[4:]
    limit = datetime.now(UTC).year - 1
    if year > limit:
        year -= 400 * -(-(year - limit) // 400)
    return f"{year:04d}{rest}"


def with_known_ids(case: Any, path: str, world: dict[str, Any], known: bool) -> None:
    """When `known`, the case names our rows instead of random uuids, so that valid requests
    reach the end of each function rather than stopping at 'not found'."""
    if not known:
        return
    body = case.body if isinstance(case.body, dict) else {}
    if path == "/report-usage":
        if case.method == "GET" and isinstance(case.query, dict) and "org_id" in case.query:
            case.query["org_id"] = world["agent_org"]
        if "org_id" in body:
            body["org_id"] = world["agent_org"]
    elif path == "/billing-overview":
        if isinstance(case.query, dict) and "organisation_id" in case.query:
            case.query["organisation_id"] = world["agent_org"]
    elif path == "/create-checkout-session":
        if "plan_id" in body:
            body["plan_id"] = world["plan"]
        if "organisation_id" in body:
            body["organisation_id"] = world["buyer_org"]
    else:
        if "organisation_id" in body:
            body["organisation_id"] = world["agent_org"]
        if path == "/change-plan" and "plan_id" in body:
            # Its current plan and period: a change to another would need Stripe's subscription
            # calls, which the fuzz does not fake (tests/test_change_plan.py does).
            body.update(plan_id=world["plan"], billing_period="monthly")


def expected_statuses(
    case: Any, path: str, world: dict[str, Any], reported: set[str]
) -> dict[int, str | None]:
    """What a request the schema allows must get: {status: error code (None for a success)}.

    The only refusals are about state the schema cannot know: an id that names no row (404,
    or 403 for an organisation, which outsiders cannot tell from one they are not in), and for
    change-plan the state of the subscription (409 same_plan, nothing_pending). No 401 or 403
    otherwise (the credentials are right), no other 409 (no subscription is bought in between, no
    request runs concurrently), no 422 (the schema states every rule of the body).
    """
    if case.method == "OPTIONS":
        return {204: None}
    body = case.body if isinstance(case.body, dict) else {}
    if path == "/report-usage" and case.method == "GET":
        known = case.query["org_id"] == world["agent_org"]
        return {200: None} if known else {404: "organisation_not_found"}
    if path == "/report-usage":
        if "action" in body:
            return {200: None}
        if body["org_id"] != world["agent_org"]:
            return {404: "organisation_not_found"}
        # A repeat answers 200 with the first result; a first report 201 (or 202: pending).
        return {200: None} if body["call_id"] in reported else {201: None, 202: None}
    own_org = world["buyer_org"] if path == "/create-checkout-session" else world["agent_org"]
    if path == "/billing-overview":
        asked = (case.query or {}).get("organisation_id", own_org)
        return {200: None} if asked == own_org else {403: "forbidden"}
    if body.get("organisation_id", own_org) != own_org:
        return {403: "forbidden"}
    if path == "/create-checkout-session" and body["plan_id"] != world["plan"]:
        return {404: "plan_not_found"}
    if path == "/change-plan":
        # The agent's organisation is on world's plan, monthly, with nothing pending.
        if body.get("cancel_pending"):
            return {409: "nothing_pending"}
        if body["plan_id"] != world["plan"]:
            return {404: "plan_not_found"}
        return {409: "same_plan"} if body["billing_period"] == "monthly" else {200: None}
    return {200: None}


def describe(case: Any, response: Any) -> str:
    return (
        f"{case.method} {case.path} query={case.query} body={case.body!r}"
        f" -> {response.status_code} {response.text[:500]}"
    )


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        (path, method, mode)
        for path, method in OPERATIONS
        for mode in EXAMPLES
        # A preflight has no input to get wrong: nothing negative to generate.
        if not (method == "OPTIONS" and mode is GenerationMode.NEGATIVE)
    ],
    ids=lambda value: getattr(value, "value", value).strip("/"),
)
def test_the_functions_serve_what_openapi_allows_and_never_answer_5xx(
    app: Any, world: dict[str, Any], path: str, method: str, mode: GenerationMode
) -> None:
    operation = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))[path][method]
    headers = credentials(path, world)
    reported: set[str] = set()

    @settings(
        max_examples=EXAMPLES[mode],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    # Mostly our rows (so most valid requests are served in full), sometimes random ids.
    @given(
        case=operation.as_strategy(generation_mode=mode), known=st.sampled_from([True, True, False])
    )
    def served(case: Any, known: bool) -> None:
        body = case.body if isinstance(case.body, dict) else {}
        if mode is GenerationMode.POSITIVE:
            with_known_ids(case, path, world, known)
            if isinstance(body.get("ended_at"), str):
                body["ended_at"] = shifted_to_the_past(body["ended_at"])
            expected = expected_statuses(case, path, world, reported)
        # Negative cases may also spoil the credentials (a 401 then, never a 5xx).
        response = case.call(app=app, headers=headers)
        media_types = {name.lower(): value for name, value in response.headers.items()}
        json_answer = media_types.get("content-type") == ["application/json"]
        assert json_answer or not response.content, describe(case, response)
        answer = response.json() if response.content else None

        assert response.status_code < 500, describe(case, response)
        assert_documented(path, method, response.status_code, answer)
        if mode is not GenerationMode.POSITIVE:
            # A request the schema refuses may still be served: the functions are lenient in
            # ways the schema does not promise (a time without an offset, a null id, ...).
            return
        assert response.status_code in expected, describe(case, response)
        code = expected[response.status_code]
        assert code is None or answer["error"]["code"] == code, describe(case, response)
        if path == "/report-usage" and method == "POST" and "action" not in body:
            if response.status_code in (201, 202):
                reported.add(body["call_id"])
            assert answer.get("duplicate", False) is (response.status_code == 200)

    served()


def test_every_operation_but_the_webhook_is_fuzzed() -> None:
    # A new function gets its place here: its caller in `credentials`, its rows in `world` and
    # `with_known_ids`, and the state-only refusals in `expected_statuses`.
    documented = {
        (path, method.upper())
        for path, operations in spec()["paths"].items()
        for method in operations
        if path != "/stripe-webhook-handler"
        and method in {"get", "post", "put", "delete", "options"}
    }
    assert documented == set(OPERATIONS)


# --- the schema's patterns are the validators' rules ---------------------------------------------


def pattern(*keys: str) -> re.Pattern[str]:
    """A pattern of openapi.yaml, compiled to match whole strings.

    `$` ends the input in the ECMA-262 dialect JSON Schema uses; Python's `$` also matches before
    a final newline, so the comparison uses `fullmatch` on the pattern without its anchors.
    """
    node: Any = SCHEMAS
    for key in keys:
        node = node[key]
    source: str = node["pattern"]
    assert source.startswith("^") and source.endswith("$")
    return re.compile(source[1:-1])


WEBSITE_PATH = pattern("WebsitePath")
CALL_ID = pattern("UsageReport", "properties", "call_id")
ENDED_AT = pattern("UsageReport", "properties", "ended_at")
# The pieces the path rule turns on: dots, slashes, `?`/`#`, escapes of them and of refused
# characters, the session template, characters outside RFC 3986.
PATH_PIECES = [
    *"/.?#%aZ09-_~!$&'()*+,;=:@{}\\ é\n\x7f",
    *("%2e", "%2E", "%2f", "%2F", "%3f", "%3F", "%23", "%5c", "%5C", "%00", "%0a", "%1F"),
    *("%7f", "%7F", "%41", "%c3%a9", "%25", "%zz", "%2", "{CHECKOUT_SESSION_ID}", "..", "//"),
]


def website_path_accepts(path: str) -> bool:
    try:
        website_path(path)
    except ValueError:
        return False
    return True


@settings(max_examples=300, derandomize=True, database=None)
@given(path=st.from_regex(WEBSITE_PATH, fullmatch=True))
def test_every_path_the_pattern_allows_is_on_the_website(path: str) -> None:
    assert website_path_accepts(path), path


@settings(max_examples=1500, derandomize=True, database=None)
@given(
    pieces=st.lists(st.sampled_from(PATH_PIECES), max_size=10),
    leading=st.sampled_from(["/", "", "\\", "%2F"]),
)
def test_the_path_pattern_allows_exactly_what_website_path_accepts(
    pieces: list[str], leading: str
) -> None:
    path = leading + "".join(pieces)
    assert (WEBSITE_PATH.fullmatch(path) is not None) == website_path_accepts(path), path


def call_id_accepted(call_id: str) -> bool:
    try:
        UsageReport.model_validate(
            {"org_id": str(uuid.uuid4()), "call_id": call_id, "call_duration_seconds": 1}
        )
    except pydantic.ValidationError:
        return False
    return True


@settings(max_examples=1500, derandomize=True, database=None)
@given(
    call_id=st.text(
        st.one_of(
            st.sampled_from(" \t\n\x00\x1c\x85\xa0\u2000\u3000\ufeffa"),
            # A lone surrogate is no Unicode text, so no JSON Schema string: the model refuses it.
            st.characters(exclude_categories=["Cs"]),
        ),
        max_size=12,
    )
)
def test_the_call_id_pattern_allows_exactly_what_the_model_accepts(call_id: str) -> None:
    allowed = CALL_ID.fullmatch(call_id) is not None and 1 <= len(call_id) <= 200
    assert allowed == call_id_accepted(call_id), repr(call_id)


@st.composite
def rfc3339_times(draw: st.DrawFn) -> str:
    """Date-times in the whole language of the schema's `ended_at`: RFC 3339 (a day the month
    has, seconds 00-59) in years 1000-9999, any fraction, `Z` or any offset up to 23:59."""
    year, month = draw(st.integers(1000, 9999)), draw(st.integers(1, 12))
    day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
    clock = draw(st.times()).strftime("%H:%M:%S")
    fraction = draw(st.sampled_from(["", "."]))
    fraction += draw(st.text("0123456789", min_size=1, max_size=12)) if fraction else ""
    offset = draw(
        st.one_of(
            st.just("Z"),
            st.builds(
                "{}{:02d}:{:02d}".format,
                st.sampled_from("+-"),
                st.integers(0, 23),
                st.integers(0, 59),
            ),
        )
    )
    return f"{year:04d}-{month:02d}-{day:02d}T{clock}{fraction}{offset}"


@settings(max_examples=500, derandomize=True, database=None)
@given(ended_at=rfc3339_times())
def test_every_past_ended_at_the_schema_allows_is_accepted(ended_at: str) -> None:
    assert ENDED_AT.fullmatch(ended_at) and FormatChecker().conforms(ended_at, "date-time")
    report = {
        "org_id": str(uuid.uuid4()),
        "call_id": "c",
        "call_duration_seconds": 1,
        "ended_at": shifted_to_the_past(ended_at),  # the fuzz test's shift, for the clock's rule
    }
    assert UsageReport.model_validate(report).ended_at is not None
