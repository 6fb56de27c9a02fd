"""report-usage through the real function: minutes counted once in Postgres and on the Stripe
meter, under repeats, concurrency and bad input. Stripe is faked with respx (fixture shapes)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from calendar import monthrange
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import psycopg
import pytest
import respx
from jose import jwt

from shared.errors import ConfigError
from tests.conftest import (
    JWT_SECRET,
    SERVICE_KEY,
    STRIPE_KEY,
    function_client,
    stripe_fixture,
    user_token,
)
from tests.openapi_check import assert_documented

FIELDS = {
    "usage_record_id",
    "billed_minutes",
    "minutes_used",
    "included_minutes",
    "overage_minutes",
    "overage_cost_cents",
    "late",
    "meter_status",
    "alerts",
    "duplicate",
}
AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}


METER_EVENTS_BASE = "https://meter-events.stripe.com"  # the v2 stream's own host at Stripe
SESSION_SECONDS = 15 * 60  # a meter event session's life
STREAM_MOST = 100  # events per stream request
TOO_OLD = 35 * 86400  # Stripe counts no meter event older than 35 days
AHEAD = 5 * 60  # nor one more than 5 minutes ahead


def stripe_error(status: int, message: str, *, code: str | None = None) -> httpx.Response:
    kind = {400: "invalid_request_error", 429: "invalid_request_error"}.get(status, "api_error")
    error = {"type": kind, "message": message, "code": code}
    return httpx.Response(status, json={"error": error})


def invalid_field(param: str, problem: str) -> httpx.Response:
    """A v2 request whose fields are wrong, refused whole."""
    error = {
        "type": "invalid_request_error",
        "code": "invalid_fields",
        "message": f"Invalid {param}: {problem}",
        "param": param,
    }
    return httpx.Response(400, json={"error": error})


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_rfc3339(value: Any) -> int | None:
    """Seconds since the epoch of an RFC 3339 time with its offset, else None."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return int(parsed.timestamp()) if parsed.tzinfo else None


@dataclass
class StreamRequest:
    """One POST /v2/billing/meter_event_stream: its token, its events' identifiers in order, and
    what became of it (an HTTP status, or "timeout" / "connect" when no answer came), its key."""

    token: str
    identifiers: list[str]
    status: int | str
    key: str | None = None  # its Idempotency-Key


class FakeMeter:
    """Stripe's meter, both ways in, with Stripe's semantics (fixture shapes).

    v1 `POST /v1/billing/meter_events` (form-encoded, one event; reconciliation's repairs use it):
    identifiers unique, an Idempotency-Key replays its first answer (a 500 included, as Stripe
    documents; 429, 401 and 403 are answered before the endpoint runs, so they are not kept),
    timestamps older than 35 days refused.

    v2: `POST /v2/billing/meter_event_session` (the secret key) answers a session whose
    `authentication_token` lives 15 minutes on the fake's clock (`advance` moves it on);
    `POST https://meter-events.stripe.com/v2/billing/meter_event_stream` (Bearer: a live
    session's token; an expired one is a 401 `temporary_session_expired`, an unknown one a 401)
    takes `{"events": [...]}`, 1 to 100 events of event_name, identifier, payload (strings) and
    an RFC 3339 timestamp. A request breaking that shape is refused whole (400 `invalid_fields`
    naming the `param`); otherwise it answers `{}` and validates each event afterwards, as Stripe
    does: an identifier already on the meter is ignored (`ignored`), an event too old or too far
    ahead is not counted (`invalid`, what the next error report would sample).

    `events`: what the meter counts, by identifier, each as a v1 form (timestamp in seconds).
    `requests`: every event that reached Stripe, in order, as such a form (a stream request: each
    of its events).
    `stream`: every stream request. `fail_next` queues failures of the next meter requests (v1 or
    stream): 500, 429, 401, 403, "timeout" (no answer, Stripe took nothing), "connect" (no
    connection), a Stripe answer as an httpx.Response, or a callable that raises (Stripe took the
    request, then the caller died before hearing back). `fail_sessions` does the same for session
    requests (a status or "connect")."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[str, dict[str, str]] = {}
        self.requests: list[dict[str, str]] = []
        self.keys: list[str | None] = []
        self.replies: dict[str, tuple[int, Any]] = {}
        self.failures: list[Any] = []
        self.session_failures: list[Any] = []
        self.delay = 0.0
        self.offset = 0.0
        self.session_seconds = SESSION_SECONDS
        self.sessions: dict[str, float] = {}  # token: when it expires, on the fake's clock
        self.stream: list[StreamRequest] = []
        self.ignored: list[str] = []
        self.invalid: list[tuple[str, str]] = []

    def mount(self, router: respx.Router) -> None:
        router.post("https://api.stripe.com/v1/billing/meter_events").mock(side_effect=self)
        router.post("https://api.stripe.com/v2/billing/meter_event_session").mock(
            side_effect=self.create_session
        )
        router.post(f"{METER_EVENTS_BASE}/v2/billing/meter_event_stream").mock(
            side_effect=self.stream_events
        )

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Time passes at Stripe (sessions expire)."""
        with self.lock:
            self.offset += seconds

    def fail_next(self, *failures: Any) -> None:
        with self.lock:
            self.failures.extend(failures)

    def fail_sessions(self, *failures: Any) -> None:
        with self.lock:
            self.session_failures.extend(failures)

    def sent(self, identifier: str) -> int:
        """How many requests carried this identifier."""
        with self.lock:
            return sum(form["identifier"] == identifier for form in self.requests)

    def taken(self) -> list[StreamRequest]:
        """The stream requests Stripe answered 200."""
        with self.lock:
            return [request for request in self.stream if request.status == 200]

    # -- v1: one event per request, form-encoded

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = {key: values[0] for key, values in parse_qs(request.content.decode()).items()}
        key = request.headers.get("Idempotency-Key")
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
            if failure == "connect":  # it never reached Stripe
                raise httpx.ConnectError("connection refused", request=request)
            self.requests.append(form)
            self.keys.append(key)
        if self.delay:
            time.sleep(self.delay)
        if failure == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if failure in (429, 401, 403):
            return stripe_error(failure, "Stripe is having a moment.")
        with self.lock:
            if key is not None and key in self.replies:
                status, body = self.replies[key]
            else:
                if failure == 500:
                    status, body = 500, {"error": {"type": "api_error", "message": "Stripe erred."}}
                elif isinstance(failure, httpx.Response):
                    status, body = failure.status_code, failure.json()
                else:
                    status, body = self.accept(form)
                if key is not None:
                    self.replies[key] = (status, body)
        if callable(failure):
            failure()  # Stripe took the event, then the caller died before hearing back
        return httpx.Response(status, json=body)

    def accept(self, form: dict[str, str]) -> tuple[int, Any]:
        identifier = form["identifier"]
        if identifier in self.events:
            message = f"An event already exists with identifier {identifier}."
            return 400, {"error": {"type": "invalid_request_error", "message": message}}
        if int(form["timestamp"]) < self.now() - TOO_OLD:
            message = "Timestamp must be within the past 35 calendar days."
            error = {"type": "invalid_request_error", "message": message, "param": "timestamp"}
            return 400, {"error": {**error, "code": "timestamp_too_far_in_past"}}
        self.events[identifier] = form
        event = stripe_fixture("billing.meter_event")
        event.update(
            event_name=form["event_name"],
            identifier=identifier,
            timestamp=int(form["timestamp"]),
            payload={
                "stripe_customer_id": form["payload[stripe_customer_id]"],
                "value": form["payload[value]"],
            },
        )
        return 200, event

    # -- v2: sessions, and the stream

    def create_session(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            failure = self.session_failures.pop(0) if self.session_failures else None
        if failure == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(failure, int):
            return stripe_error(failure, "Stripe is having a moment.")
        if request.headers.get("Authorization") != f"Bearer {STRIPE_KEY}":
            return stripe_error(401, "Invalid API Key provided.")
        with self.lock:
            now = self.now()
            token = f"ek_test_{uuid.uuid4().hex}"
            self.sessions[token] = now + self.session_seconds
        session = {
            "id": f"mes_test_{uuid.uuid4().hex[:24]}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": rfc3339(now),
            "expires_at": rfc3339(now + self.session_seconds),
            "livemode": False,
        }
        return httpx.Response(200, json=session)

    def stream_events(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = request.headers.get("Idempotency-Key")
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            return invalid_field("body", "must be JSON.")
        given = body.get("events") if isinstance(body, dict) else None
        events = [e for e in given if isinstance(e, dict)] if isinstance(given, list) else []
        sent = StreamRequest(token, [str(e.get("identifier")) for e in events], 0, key)
        with self.lock:
            self.stream.append(sent)
            failure = self.failures.pop(0) if self.failures else None
            if failure == "connect":  # it never reached Stripe
                sent.status = failure
                raise httpx.ConnectError("connection refused", request=request)
            self.requests.extend(self.as_form(event) for event in events)
        if self.delay:
            time.sleep(self.delay)
        if failure == "timeout":
            sent.status = failure
            raise httpx.ReadTimeout("timed out", request=request)
        if failure in (429, 401, 403):
            sent.status = failure
            return stripe_error(failure, "Stripe is having a moment.")
        with self.lock:
            expires = self.sessions.get(token)
            if expires is None:
                sent.status = 401
                return stripe_error(401, "Invalid meter event session token provided.")
            if self.now() >= expires:
                sent.status = 401
                message = "The meter event session has expired. Create a new one."
                error = {
                    "type": "temporary_session_expired",
                    "code": "billing_meter_event_session_expired",
                    "message": message,
                }
                return httpx.Response(401, json={"error": error})
            if key is not None and key in self.replies:
                status, answer = self.replies[key]
            else:
                if failure == 500:
                    status, answer = 500, {"error": {"type": "api_error", "message": "Erred."}}
                elif isinstance(failure, httpx.Response):
                    status, answer = failure.status_code, failure.json()
                else:
                    refused = self.refusal(given)
                    if refused is not None:
                        status, answer = refused.status_code, refused.json()
                    else:
                        status, answer = 200, {}
                        for event in events:
                            self.ingest(event)
                if key is not None:
                    self.replies[key] = (status, answer)
            sent.status = status
        if callable(failure):
            failure()  # Stripe took the batch, then the caller died before hearing back
        return httpx.Response(status, json=answer)

    @staticmethod
    def refusal(events: Any) -> httpx.Response | None:
        """The request's shape checked, as Stripe does before answering."""
        if not isinstance(events, list) or not 1 <= len(events) <= STREAM_MOST:
            return invalid_field("events", f"a list of 1 to {STREAM_MOST} meter events.")
        for i, event in enumerate(events):
            at = f"events[{i}]"
            if not isinstance(event, dict):
                return invalid_field(at, "must be an object.")
            if not isinstance(event.get("event_name"), str) or not event["event_name"]:
                return invalid_field(f"{at}[event_name]", "is required.")
            payload = event.get("payload")
            if not isinstance(payload, dict) or not all(
                isinstance(v, str) for v in payload.values()
            ):
                return invalid_field(f"{at}[payload]", "must be an object of strings.")
            identifier = event.get("identifier")
            if identifier is not None and (
                not isinstance(identifier, str) or len(identifier) > 100
            ):
                return invalid_field(f"{at}[identifier]", "at most 100 characters.")
            if "timestamp" in event and parse_rfc3339(event["timestamp"]) is None:
                return invalid_field(f"{at}[timestamp]", "must be an RFC 3339 time.")
        return None

    def ingest(self, event: dict[str, Any]) -> None:
        """One accepted event validated afterwards (the lock held)."""
        form = self.as_form(event)
        identifier = form["identifier"]
        if identifier in self.events:
            self.ignored.append(identifier)
            return
        now = self.now()
        if int(form["timestamp"]) < now - TOO_OLD:
            self.invalid.append((identifier, "timestamp_too_far_in_past"))
        elif int(form["timestamp"]) > now + AHEAD:
            self.invalid.append((identifier, "timestamp_in_future"))
        else:
            self.events[identifier] = form

    def as_form(self, event: dict[str, Any]) -> dict[str, str]:
        """A streamed event as the v1 form that says the same."""
        payload = event.get("payload") if isinstance(event.get("payload"), dict) else {}
        seconds = parse_rfc3339(event.get("timestamp", rfc3339(self.now())))
        return {
            "event_name": str(event.get("event_name")),
            "identifier": str(event.get("identifier") or f"mev_{uuid.uuid4().hex}"),
            "payload[stripe_customer_id]": str(payload.get("stripe_customer_id")),
            "payload[value]": str(payload.get("value")),
            "timestamp": str(seconds if seconds is not None else event.get("timestamp")),
        }


@pytest.fixture
def meter() -> Iterator[FakeMeter]:
    fake = FakeMeter()
    with respx.mock(assert_all_called=False) as stripe_mock:
        fake.mount(stripe_mock)
        yield fake


@pytest.fixture
def client(function_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DATABASE_POOL_SIZE", "20")
    return function_client("report-usage", "report_usage")


def identifier_for(org_id: Any, call_id: str) -> str:
    return "mb_" + hashlib.sha256(f"{org_id}:{call_id}".encode()).hexdigest()


def at(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


NOW = datetime.now(UTC).replace(microsecond=0)


def month_after(moment: datetime) -> datetime:
    """Stripe's next monthly boundary: the same day a month later, clamped to the month's end."""
    year, month = moment.year + moment.month // 12, moment.month % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, monthrange(year, month)[1]))


@pytest.fixture
def subscribe(db: Any) -> Callable[..., dict[str, Any]]:
    """A subscription for `org` on `plan`, with (by default) its cycle for [start, end)."""

    def make(
        org: dict[str, Any],
        plan: dict[str, Any],
        *,
        start: datetime = NOW - timedelta(days=10),
        end: datetime | None = None,
        status: str = "active",
        cycle: bool = True,
    ) -> dict[str, Any]:
        end = end or month_after(start)
        sub = db.execute(
            "insert into subscriptions (organisation_id, plan_id, stripe_subscription_id,"
            " stripe_customer_id, status, billing_period, current_period_start,"
            " current_period_end) values (%s, %s, %s, %s, %s, 'monthly', %s, %s) returning *",
            (
                org["id"],
                plan["id"],
                f"sub_{uuid.uuid4().hex[:14]}",
                org["stripe_customer_id"],
                status,
                start,
                end,
            ),
        ).fetchone()
        if cycle:
            db.execute(
                "insert into billing_cycles (organisation_id, subscription_id, period_start,"
                " period_end, included_minutes, overage_rate_cents)"
                " values (%s, %s, %s, %s, %s, %s)",
                (
                    org["id"],
                    sub["id"],
                    start,
                    end,
                    plan["included_minutes"],
                    plan["overage_rate_cents"],
                ),
            )
        return dict(sub)

    return make


@pytest.fixture
def customer_org(make_org: Callable[..., dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return lambda: make_org(stripe_customer_id=f"cus_{uuid.uuid4().hex[:14]}")


@pytest.fixture
def subscribed(
    customer_org: Callable[[], dict[str, Any]],
    make_plan: Callable[..., dict[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """An organisation with an active subscription (500 included minutes, 50 cents over)."""
    org, plan = customer_org(), make_plan()
    return {"org": org, "plan": plan, "sub": subscribe(org, plan)}


def report(client: Any, org_id: Any, call_id: str | None = None, **fields: Any) -> Any:
    body: dict[str, Any] = {"org_id": str(org_id), "call_id": call_id or uuid.uuid4().hex}
    if "call_duration_minutes" not in fields:
        fields.setdefault("call_duration_seconds", 61)
    body.update(fields)
    response = client.post("/", json=body, headers=AUTH)
    assert_documented("/report-usage", "POST", response.status_code, response.get_json())
    return response


def flush(client: Any, **body: Any) -> dict[str, int]:
    """POST {"action": "flush"}: the due meter events delivered; what became of them."""
    response = client.post("/", json={"action": "flush", **body}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert_documented("/report-usage", "POST", 200, response.get_json())
    result: dict[str, int] = response.get_json()
    return result


def current_cycle(client: Any, query: str) -> Any:
    response = client.get(f"/{query}", headers=AUTH)
    assert_documented("/report-usage", "GET", response.status_code, response.get_json())
    return response


def cycles_of(db: Any, sub_id: Any) -> list[dict[str, Any]]:
    return db.execute(
        "select * from billing_cycles where subscription_id = %s order by period_start", (sub_id,)
    ).fetchall()


def cycle_state(db: Any, sub_id: Any) -> list[dict[str, Any]]:
    """The cycles as a repeat must leave them: every column but `updated_at` (a repeat's minutes
    are added and taken back in its transaction, sql/0070, which touches the timestamp)."""
    return [{k: v for k, v in c.items() if k != "updated_at"} for c in cycles_of(db, sub_id)]


def usage_row(db: Any, org_id: Any, call_id: str) -> dict[str, Any]:
    return db.execute(
        "select * from usage_records where organisation_id = %s and call_id = %s",
        (org_id, call_id),
    ).fetchone()


# ------------------------------------------------------------------ recording a call


def test_first_report_bills_rounded_minutes_and_sends_one_meter_event(
    client, meter, db, subscribed
):
    org, ended = subscribed["org"], NOW - timedelta(minutes=3)
    response = report(client, org["id"], "call-1", call_duration_seconds=61, ended_at=at(ended))

    assert response.status_code == 202  # recorded; its meter event queued for the flush
    body = response.get_json()
    assert set(body) == FIELDS
    assert body["billed_minutes"] == 2
    assert body["minutes_used"] == 2 and body["included_minutes"] == 500
    assert body["overage_minutes"] == 0 and body["overage_cost_cents"] == 0
    assert body["meter_status"] == "pending" and body["alerts"] == [] and body["duplicate"] is False
    assert meter.requests == []  # the report did not wait for Stripe

    assert flush(client) == {"sent": 1, "pending": 0, "failed": 0, "requests": 1}

    identifier = identifier_for(org["id"], "call-1")
    assert len(identifier) <= 100
    assert meter.requests == [
        {
            "event_name": "voice_call_minutes",
            "identifier": identifier,
            "payload[stripe_customer_id]": org["stripe_customer_id"],
            "payload[value]": "2",
            "timestamp": str(int(ended.timestamp())),
        }
    ]
    assert [(r.identifiers, r.status) for r in meter.stream] == [([identifier], 200)]
    assert meter.stream[0].token in meter.sessions  # authenticated by a meter event session
    assert list(meter.events) == [identifier]
    row = usage_row(db, org["id"], "call-1")
    assert str(row["id"]) == body["usage_record_id"]
    assert row["meter_status"] == "sent" and row["meter_identifier"] == identifier
    assert row["ended_at"] == ended and row["billed_minutes"] == 2
    assert cycles_of(db, subscribed["sub"]["id"])[0]["minutes_used"] == 2


@pytest.mark.parametrize(
    ("field", "value", "minutes"),
    [
        ("call_duration_seconds", 0.001, 1),
        ("call_duration_seconds", 60, 1),
        ("call_duration_seconds", 60.5, 2),
        ("call_duration_seconds", 86400, 1440),
        ("call_duration_minutes", 2, 2),
        ("call_duration_minutes", 2.01, 3),
        ("call_duration_minutes", 0.5, 1),
    ],
)
def test_minutes_are_rounded_up(client, meter, subscribed, field, value, minutes):
    response = report(client, subscribed["org"]["id"], **{field: value})
    assert response.status_code == 202
    assert response.get_json()["billed_minutes"] == minutes
    assert flush(client)["sent"] == 1
    [sent] = meter.events.values()
    assert sent["payload[value]"] == str(minutes)


@pytest.mark.parametrize("field", ["call_duration_seconds", "call_duration_minutes"])
def test_zero_length_call_bills_nothing_and_sends_nothing(client, meter, db, subscribed, field):
    response = report(client, subscribed["org"]["id"], "zero", **{field: 0})
    assert response.status_code == 201
    body = response.get_json()
    assert body["billed_minutes"] == 0 and body["minutes_used"] == 0
    assert body["meter_status"] == "skipped"
    assert flush(client)["requests"] == 0
    assert meter.requests == []
    assert usage_row(db, subscribed["org"]["id"], "zero")["meter_status"] == "skipped"


def test_repeat_returns_the_first_result_and_changes_nothing(client, meter, db, subscribed):
    org = subscribed["org"]
    first = report(client, org["id"], "again", call_duration_seconds=600)
    report(client, org["id"], "other", call_duration_seconds=60)
    before = cycle_state(db, subscribed["sub"]["id"])

    repeat = report(client, org["id"], "again", call_duration_seconds=9000)

    assert first.status_code == 202 and repeat.status_code == 200
    assert repeat.get_json() == {**first.get_json(), "duplicate": True}
    assert repeat.get_json()["minutes_used"] == 10  # the totals right after the first report
    assert cycle_state(db, subscribed["sub"]["id"]) == before
    assert flush(client)["sent"] == 2
    assert meter.sent(identifier_for(org["id"], "again")) == 1
    assert meter.events[identifier_for(org["id"], "again")]["payload[value]"] == "10"
    # Once delivered, a repeat says so; everything else is still the first result.
    after = report(client, org["id"], "again", call_duration_seconds=1)
    assert after.status_code == 200
    assert after.get_json() == {**first.get_json(), "duplicate": True, "meter_status": "sent"}
    assert cycle_state(db, subscribed["sub"]["id"]) == before
    assert meter.sent(identifier_for(org["id"], "again")) == 1


def test_the_same_call_id_in_two_organisations_is_two_calls(
    client, meter, subscribed, customer_org, subscribe
):
    other = customer_org()
    subscribe(other, subscribed["plan"])
    first = report(client, subscribed["org"]["id"], "shared-id")
    second = report(client, other["id"], "shared-id")
    assert first.status_code == second.status_code == 202
    assert first.get_json()["usage_record_id"] != second.get_json()["usage_record_id"]
    assert flush(client)["sent"] == 2
    assert set(meter.events) == {
        identifier_for(subscribed["org"]["id"], "shared-id"),
        identifier_for(other["id"], "shared-id"),
    }


def test_fifty_concurrent_identical_reports_count_once(client, meter, db, subscribed):
    org, app = subscribed["org"], client.application
    start = threading.Barrier(50)

    def one(_: int) -> Any:
        start.wait()
        return report(app.test_client(), org["id"], "storm", call_duration_seconds=125)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(one, range(50)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [202]
    bodies = [r.get_json() for r in responses]
    assert {b["usage_record_id"] for b in bodies} == {bodies[0]["usage_record_id"]}
    assert all(b["billed_minutes"] == 3 and b["minutes_used"] == 3 for b in bodies)
    assert meter.requests == []
    assert flush(client)["sent"] == 1
    assert meter.sent(identifier_for(org["id"], "storm")) == 1
    assert meter.events[identifier_for(org["id"], "storm")]["payload[value]"] == "3"
    count = db.execute(
        "select count(*) as n from usage_records where organisation_id = %s", (org["id"],)
    ).fetchone()
    assert count["n"] == 1
    assert cycles_of(db, subscribed["sub"]["id"])[0]["minutes_used"] == 3


def test_two_hundred_concurrent_calls_add_up_to_the_minute(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan(included_minutes=100, overage_rate_cents=7)
    sub = subscribe(org, plan)
    durations = [(i * 37) % 400 for i in range(200)]  # 0 to 399 seconds, zeros included
    app = client.application

    def one(i: int) -> Any:
        return report(app.test_client(), org["id"], f"c{i}", call_duration_seconds=durations[i])

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(one, range(200)))

    # Zero-length calls have no meter event (201); every other call's is queued (202).
    assert [r.status_code for r in responses] == [202 if d else 201 for d in durations]
    metered = [d for d in durations if d > 0]
    assert flush(client) == {"sent": len(metered), "pending": 0, "failed": 0, "requests": 2}
    billed = sum(-(-d // 60) for d in durations)
    cycle = cycles_of(db, sub["id"])[0]
    assert cycle["minutes_used"] == billed == sum(r.get_json()["billed_minutes"] for r in responses)
    assert cycle["overage_minutes"] == billed - 100
    assert cycle["overage_cost_cents"] == (billed - 100) * 7
    # Each report saw its own total: the running totals are a permutation of the prefix sums.
    assert max(r.get_json()["minutes_used"] for r in responses) == billed
    assert len(meter.events) == len(metered) == len(meter.requests)
    assert sum(int(e["payload[value]"]) for e in meter.events.values()) == billed
    alerts = db.execute(
        "select threshold_percent from usage_alerts where billing_cycle_id = %s", (cycle["id"],)
    ).fetchall()
    assert sorted(a["threshold_percent"] for a in alerts) == [80, 100, 120]
    crossed = sorted(t for r in responses for t in r.get_json()["alerts"])
    assert crossed == [80, 100, 120]


# ------------------------------------------------------------------ cycles and alerts


def test_alerts_fire_once_each(client, meter, db, customer_org, make_plan, subscribe):
    org, plan = customer_org(), make_plan(included_minutes=10, overage_rate_cents=50)
    sub = subscribe(org, plan)
    steps = [(7, []), (1, [80]), (2, [100]), (1, []), (1, [120]), (5, [])]
    seen = []
    for i, (minutes, alerts) in enumerate(steps):
        body = report(client, org["id"], f"a{i}", call_duration_minutes=minutes).get_json()
        seen.append(body["alerts"])
        assert body["alerts"] == alerts, i
    assert report(client, org["id"], "a1", call_duration_minutes=1).get_json()["alerts"] == [80]

    cycle = cycles_of(db, sub["id"])[0]
    assert (cycle["minutes_used"], cycle["overage_minutes"], cycle["overage_cost_cents"]) == (
        17,
        7,
        350,
    )
    rows = db.execute(
        "select threshold_percent from usage_alerts where billing_cycle_id = %s order by 1",
        (cycle["id"],),
    ).fetchall()
    assert [r["threshold_percent"] for r in rows] == [80, 100, 120]


def test_one_long_call_crosses_every_threshold(client, meter, customer_org, make_plan, subscribe):
    org, plan = customer_org(), make_plan(included_minutes=10)
    subscribe(org, plan)
    body = report(client, org["id"], call_duration_minutes=13).get_json()
    assert body["alerts"] == [80, 100, 120]
    assert body["overage_minutes"] == 3 and body["overage_cost_cents"] == 150


def test_no_included_minutes_means_no_alerts(client, meter, customer_org, make_plan, subscribe):
    org, plan = customer_org(), make_plan(included_minutes=0, overage_rate_cents=9)
    subscribe(org, plan)
    body = report(client, org["id"], call_duration_minutes=4).get_json()
    assert body["alerts"] == [] and body["overage_cost_cents"] == 36


# Money is minor units of the plan's currency, and in some currencies 2^31 of them is not much:
# Stripe counts IDR in hundredths (docs.stripe.com/currencies), so 2^31 - 1 is IDR 21.5 million,
# about USD 1,300. At IDR 15,000 a minute, one day-long call is more than that.
IDR_RATE = 1_500_000
DAY_CALL_COST = 1440 * IDR_RATE  # 2,160,000,000


@pytest.mark.parametrize("cycle", [True, False], ids=["in-its-cycle", "opening-its-cycle"])
def test_overage_past_two_to_the_31_minor_units_is_recorded(
    client, meter, db, customer_org, make_plan, subscribe, cycle
):
    org = customer_org()
    plan = make_plan(
        currency="idr",
        included_minutes=0,
        overage_rate_cents=IDR_RATE,
        monthly_price_cents=2_500_000_000,  # IDR 25 million
        yearly_price_cents=27_000_000_000,
    )
    sub = subscribe(org, plan, cycle=cycle)

    first = report(client, org["id"], "day-long", call_duration_seconds=86400)

    assert first.status_code == 202, first.get_json()
    assert DAY_CALL_COST > 2**31 - 1
    assert first.get_json()["overage_cost_cents"] == DAY_CALL_COST
    assert cycles_of(db, sub["id"])[0]["overage_cost_cents"] == DAY_CALL_COST
    assert usage_row(db, org["id"], "day-long")["cycle_overage_cost_cents"] == DAY_CALL_COST
    repeat = report(client, org["id"], "day-long", call_duration_seconds=86400)
    assert repeat.status_code == 200
    assert repeat.get_json() == {**first.get_json(), "duplicate": True}
    second = report(client, org["id"], "next", call_duration_seconds=60)
    assert second.get_json()["overage_cost_cents"] == DAY_CALL_COST + IDR_RATE
    assert flush(client)["sent"] == 2
    assert meter.events[identifier_for(org["id"], "day-long")]["payload[value]"] == "1440"


def test_refiguring_a_cycle_past_two_to_the_31_minor_units(db, customer_org, make_plan, subscribe):
    """A plan change refigures the cycle it keeps (sql/0050's refigure_cycle)."""
    org = customer_org()
    plan = make_plan(currency="idr", included_minutes=0, overage_rate_cents=IDR_RATE)
    sub = subscribe(org, plan)
    db.execute(
        "update billing_cycles set minutes_used = 1440 where subscription_id = %s", (sub["id"],)
    )
    db.execute(
        "select private.refigure_cycle(id) from billing_cycles where subscription_id = %s",
        (sub["id"],),
    )
    [refigured] = cycles_of(db, sub["id"])
    assert (refigured["overage_minutes"], refigured["overage_cost_cents"]) == (1440, DAY_CALL_COST)


def metered_period(db: Any, sub_id: Any, moment: str) -> tuple[datetime, datetime]:
    """The monthly metered period report-usage opens for a call ending at `moment`.

    Periods long past are billed late (in the current cycle, see test_late_usage.py), so the
    calendar rule is checked on the SQL function that computes it, at fixed dates."""
    row = db.execute(
        "select lower(p) as start, upper(p) as end"
        " from private.metered_period(%s, %s::timestamptz) as p",
        (sub_id, moment),
    ).fetchone()
    return row["start"], row["end"]


def test_periods_after_the_known_one_follow_the_monthly_grid_without_drift(
    db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan(included_minutes=300)
    jan31 = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    feb28 = datetime(2026, 2, 28, 10, 0, tzinfo=UTC)
    mar31 = datetime(2026, 3, 31, 10, 0, tzinfo=UTC)
    sub = subscribe(org, plan, start=jan31, end=feb28)

    assert metered_period(db, sub["id"], "2026-03-15T12:00:00Z") == (feb28, mar31)
    assert metered_period(db, sub["id"], "2026-03-31T09:59:59Z") == (feb28, mar31)
    assert metered_period(db, sub["id"], "2026-03-31T10:00:00Z") == (
        mar31,
        datetime(2026, 4, 30, 10, 0, tzinfo=UTC),
    )


def test_a_period_after_an_irregular_one_starts_where_it_ended(
    db, customer_org, make_plan, subscribe
):
    """A period off the monthly grid (a trial, an anchor reset) is followed by one starting at
    its end: the call goes to that new cycle, never to the ended one that does not contain it."""
    org, plan = customer_org(), make_plan()
    trial_start = datetime(2026, 1, 20, 10, 0, tzinfo=UTC)
    trial_end = datetime(2026, 2, 3, 10, 0, tzinfo=UTC)
    sub = subscribe(org, plan, start=trial_start, end=trial_end)

    march3 = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
    assert metered_period(db, sub["id"], "2026-02-05T12:00:00Z") == (trial_end, march3)
    assert metered_period(db, sub["id"], at(trial_end)) == (trial_end, march3)


def test_calls_after_the_known_period_open_the_next_cycles(
    client, meter, db, customer_org, make_plan, subscribe
):
    """Calls now, after a period the webhook has not renewed yet, open the periods that follow
    on the grid, each once, with the terms of the subscription's metered price."""
    org, plan = customer_org(), make_plan(included_minutes=300)
    start = NOW - timedelta(days=45)
    sub = subscribe(org, plan, start=start, end=month_after(start))

    report(client, org["id"], "now-1", call_duration_minutes=5, ended_at=at(NOW))
    report(client, org["id"], "now-2", call_duration_minutes=2, ended_at=at(NOW))

    cycles = cycles_of(db, sub["id"])
    assert [(c["period_start"], c["minutes_used"]) for c in cycles] == [
        (start, 0),
        (month_after(start), 7),
    ]
    assert all(c["included_minutes"] == 300 and c["overage_rate_cents"] == 50 for c in cycles)
    assert usage_row(db, org["id"], "now-1")["billing_cycle_id"] == cycles[1]["id"]


def test_a_call_in_a_short_first_period_without_a_cycle_opens_that_period(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    trial_start, trial_end = NOW - timedelta(days=3), NOW + timedelta(days=11)
    sub = subscribe(org, plan, start=trial_start, end=trial_end, status="trialing", cycle=False)

    body = report(client, org["id"], "in-trial", call_duration_minutes=3).get_json()

    assert body["meter_status"] == "pending" and body["minutes_used"] == 3
    assert flush(client)["sent"] == 1
    assert usage_row(db, org["id"], "in-trial")["meter_status"] == "sent"
    assert meter.events[identifier_for(org["id"], "in-trial")]["payload[value]"] == "3"
    cycles = cycles_of(db, sub["id"])
    assert [(c["period_start"], c["period_end"]) for c in cycles] == [(trial_start, trial_end)]


def test_a_subscription_without_cycles_opens_its_current_period(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub = subscribe(org, plan, cycle=False)
    body = report(client, org["id"], call_duration_minutes=3).get_json()
    cycles = cycles_of(db, sub["id"])
    assert len(cycles) == 1 and cycles[0]["minutes_used"] == 3 == body["minutes_used"]
    assert cycles[0]["period_start"] == sub["current_period_start"]


def test_no_subscription_is_recorded_and_skipped(client, meter, db, customer_org):
    org = customer_org()
    response = report(client, org["id"], "free", call_duration_seconds=300)
    assert response.status_code == 201
    body = response.get_json()
    assert body["billed_minutes"] == 5 and body["meter_status"] == "skipped"
    assert body["minutes_used"] is None and body["alerts"] == []
    assert flush(client)["requests"] == 0
    assert meter.requests == []
    assert usage_row(db, org["id"], "free")["billed_minutes"] == 5


def test_a_call_before_the_first_period_is_recorded_unmetered(client, meter, db, subscribed):
    org = subscribed["org"]
    response = report(client, org["id"], "early", ended_at=at(NOW - timedelta(days=40)))
    assert response.status_code == 201
    assert response.get_json()["meter_status"] == "skipped"
    assert len(cycles_of(db, subscribed["sub"]["id"])) == 1
    assert flush(client)["requests"] == 0
    assert meter.requests == []


def test_a_cancelled_subscription_is_not_metered(client, meter, customer_org, make_plan, subscribe):
    org = customer_org()
    subscribe(org, make_plan(), status="canceled", cycle=False)
    assert report(client, org["id"]).get_json()["meter_status"] == "skipped"


def test_a_late_report_after_cancellation_counts_in_its_period(
    client, meter, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    ended = subscribe(org, make_plan(), status="canceled")
    ended_at = NOW - timedelta(hours=2)
    body = report(client, org["id"], "late", ended_at=at(ended_at)).get_json()
    assert body["meter_status"] == "pending" and body["minutes_used"] == 2
    assert cycles_of(db, ended["id"])[0]["minutes_used"] == 2
    assert flush(client)["sent"] == 1
    sent = meter.events[identifier_for(org["id"], "late")]
    assert sent["payload[value]"] == "2" and sent["timestamp"] == str(int(ended_at.timestamp()))


def test_a_new_subscription_wins_over_a_cancelled_one(
    client, meter, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    old = subscribe(org, make_plan(), status="canceled")
    new = subscribe(org, make_plan(included_minutes=42), start=NOW - timedelta(days=1), cycle=False)
    body = report(client, org["id"], "after-resubscribing").get_json()
    assert body["included_minutes"] == 42
    assert cycles_of(db, old["id"])[0]["minutes_used"] == 0
    assert cycles_of(db, new["id"])[0]["minutes_used"] == 2


def test_a_report_racing_a_subscription_update_does_not_deadlock(
    client, meter, db, database_url, subscribed
):
    """The webhook's apply_subscription_state locks the subscription, then its cycle; a report
    locks only the cycle (sql/0070), so it waits for the webhook's cycle lock and neither is
    aborted; while the webhook holds only the subscription, a report does not wait at all."""
    org, plan, sub = subscribed["org"], subscribed["plan"], subscribed["sub"]
    cycle = cycles_of(db, sub["id"])[0]
    period = {
        "current_period_start": int(cycle["period_start"].timestamp()),
        "current_period_end": int(cycle["period_end"].timestamp()),
    }
    state = {
        "stripe_subscription_id": sub["stripe_subscription_id"],
        "stripe_customer_id": org["stripe_customer_id"],
        "status": "active",
        "items": [
            {"price_id": plan["stripe_price_id"], "usage_type": "licensed", **period},
            {"price_id": plan["stripe_metered_price_id"], "usage_type": "metered", **period},
        ],
    }
    # The webhook's connection closes first on a failure: the report is then no longer held up.
    with ThreadPoolExecutor(1) as pool, psycopg.connect(database_url) as webhook:
        # The webhook's first step: the subscription row, locked until it commits.
        webhook.execute("select 1 from subscriptions where id = %s for update", (sub["id"],))
        before = report(client.application.test_client(), org["id"], "while-held")
        assert before.status_code == 202  # the subscription lock holds no report up
        # Its next: the cycle (sync_cycles), which the report must wait for.
        webhook.execute("select 1 from billing_cycles where id = %s for update", (cycle["id"],))
        racing = pool.submit(report, client.application.test_client(), org["id"], "racing")
        waiting = (
            "select count(*) as n from pg_stat_activity where datname = current_database()"
            " and wait_event_type = 'Lock' and query like %s"
        )
        deadline = time.monotonic() + 5
        while db.execute(waiting, ("%record_usage%",)).fetchone()["n"] == 0:
            assert time.monotonic() < deadline, "the report never waited for the webhook"
            time.sleep(0.01)
        webhook.execute(
            "select public.apply_subscription_state(p_state => %s::jsonb, p_state_at => now())",
            (json.dumps(state),),
        )
        webhook.commit()
        response = racing.result(timeout=10)

    assert response.status_code == 202, response.get_json()
    assert response.get_json()["minutes_used"] == 4
    assert cycles_of(db, sub["id"])[0]["minutes_used"] == 4


# ------------------------------------------------------------------ Stripe's answers


def test_stripe_refusing_for_good_marks_failed_with_its_reason(client, meter, db, subscribed):
    org = subscribed["org"]
    meter.fail_next(invalid_field("events[0][payload]", "the value must be an integer."))
    response = report(client, org["id"], "refused")
    assert response.status_code == 202
    assert flush(client) == {"sent": 0, "pending": 0, "failed": 1, "requests": 1}
    assert meter.events == {}
    row = usage_row(db, org["id"], "refused")
    assert row["meter_status"] == "failed" and "must be an integer" in row["meter_error"]
    assert row["billed_minutes"] == 2  # the minutes are still counted in the cycle
    assert cycles_of(db, subscribed["sub"]["id"])[0]["minutes_used"] == 2


def test_identifier_already_at_stripe_counts_as_sent(client, meter, db, subscribed):
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "known")
    meter.events[identifier] = {"identifier": identifier}  # e.g. sent before a key expired
    response = report(client, org["id"], "known")
    assert response.status_code == 202 and response.get_json()["meter_status"] == "pending"
    assert flush(client)["sent"] == 1
    assert meter.ignored == [identifier]  # Stripe kept the first, ignored this one
    assert meter.events[identifier] == {"identifier": identifier}
    assert usage_row(db, org["id"], "known")["meter_status"] == "sent"


@pytest.mark.parametrize("failure", [500, 429, "timeout"])
def test_stripe_unavailable_keeps_the_event_pending(client, meter, db, subscribed, failure):
    org = subscribed["org"]
    meter.fail_next(failure)
    response = report(client, org["id"], "busy")
    assert response.status_code == 202
    assert response.get_json()["meter_status"] == "pending"
    assert flush(client) == {"sent": 0, "pending": 1, "failed": 0, "requests": 1}
    assert meter.events == {}
    row = usage_row(db, org["id"], "busy")
    assert row["meter_status"] == "pending" and row["meter_attempts"] == 1
    assert row["meter_error"] and row["meter_next_attempt_at"] > datetime.now(UTC)
    assert cycles_of(db, subscribed["sub"]["id"])[0]["minutes_used"] == 2
    repeat = report(client, org["id"], "busy")
    assert repeat.status_code == 200 and repeat.get_json()["meter_status"] == "pending"


# ------------------------------------------------------------------ bad requests


@pytest.mark.parametrize("name", ["STRIPE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"])
def test_the_function_does_not_start_without_its_secrets(function_env, monkeypatch, name):
    from shared.settings import get_settings

    monkeypatch.setenv(name, "changeme")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match=name):
        function_client("report-usage", "report_usage")


def test_auth_is_required_and_users_are_refused(client, subscribed):
    org_id = str(subscribed["org"]["id"])
    body = {"org_id": org_id, "call_id": "x", "call_duration_seconds": 1}
    assert client.post("/", json=body).status_code == 401
    wrong = client.post("/", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    user = {"Authorization": f"Bearer {user_token(str(uuid.uuid4()))}"}
    refused = client.post("/", json=body, headers=user)
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "service_key_required"
    assert client.get(f"/?org_id={org_id}", headers=user).status_code == 403
    assert client.post("/", json={"action": "flush"}, headers=user).status_code == 403


def test_a_service_role_jwt_is_accepted(client, meter, subscribed):
    claims = {"role": "service_role", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    body = {"org_id": str(subscribed["org"]["id"]), "call_id": "jwt", "call_duration_seconds": 1}
    response = client.post("/", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 202


def test_unknown_organisation_is_404(client, meter):
    response = report(client, uuid.uuid4())
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "organisation_not_found"
    assert current_cycle(client, f"?org_id={uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client, method):
    response = client.open("/", method=method, headers=AUTH)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"


ORG = "00000000-0000-4000-8000-000000000000"
VALID = {"org_id": ORG, "call_id": "c", "call_duration_seconds": 30}
FUTURE = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"org_id": None}, "org_id"),
        ({"org_id": "not-a-uuid"}, "org_id"),
        ({"call_id": ""}, "call_id"),
        ({"call_id": "   "}, "call_id"),
        ({"call_id": "x" * 201}, "call_id"),
        ({"call_id": 12345}, "call_id"),
        ({"call_id": "a\u0000b"}, "call_id"),
        ({"call_id": "\ud800"}, "call_id"),
        ({"call_duration_seconds": -1}, "call_duration_seconds"),
        ({"call_duration_seconds": float("nan")}, "call_duration_seconds"),
        ({"call_duration_seconds": float("inf")}, "call_duration_seconds"),
        ({"call_duration_seconds": -float("inf")}, "call_duration_seconds"),
        ({"call_duration_seconds": 86400.5}, "call_duration_seconds"),
        ({"call_duration_seconds": 10**400}, "call_duration_seconds"),
        ({"call_duration_seconds": "61"}, "call_duration_seconds"),
        ({"call_duration_seconds": True}, "call_duration_seconds"),
        ({"call_duration_seconds": None}, "call_duration_seconds"),
        ({"call_duration_minutes": 2}, "call_duration_seconds"),
        ({"call_duration_seconds": None, "call_duration_minutes": 1441}, "call_duration_minutes"),
        ({"call_duration_seconds": None, "call_duration_minutes": -0.5}, "call_duration_minutes"),
        (
            {"call_duration_seconds": None, "call_duration_minutes": float("nan")},
            "call_duration_minutes",
        ),
        ({"ended_at": "yesterday"}, "ended_at"),
        ({"ended_at": "2026-13-01T00:00:00Z"}, "ended_at"),
        ({"ended_at": 1763790000}, "ended_at"),
        ({"ended_at": FUTURE}, "ended_at"),
        ({"ended_at": "0001-01-01T00:00:00+14:00"}, "ended_at"),
        ({"ended_at": "9999-12-31T23:59:59-14:00"}, "ended_at"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(client, change, field):
    body = {key: value for key, value in {**VALID, **change}.items() if value is not None}
    response = client.post(
        "/", data=json.dumps(body), content_type="application/json", headers=AUTH
    )
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and error["field"] == field


@pytest.mark.parametrize(
    "key", ["endedAt", "EndedAt", "ended-at", "endedat", "callDurationSeconds"]
)
def test_one_of_our_fields_spelt_another_way_is_422_and_records_nothing(
    client, db, subscribed, key
):
    """Ignored, `endedAt` would bill a call of last month as ended now, in this period."""
    org = subscribed["org"]
    ended = (NOW - timedelta(days=40)).isoformat()
    body = {
        "org_id": str(org["id"]),
        "call_id": "misspelt",
        "call_duration_seconds": 61,
        key: ended,
    }
    response = client.post("/", json=body, headers=AUTH)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and error["field"] == key
    assert "did you mean" in error["message"]
    assert_documented("/report-usage", "POST", 422, response.get_json())
    assert usage_row(db, org["id"], "misspelt") is None


def test_fields_of_the_agents_own_are_ignored(client, db, subscribed):
    org = subscribed["org"]
    response = report(client, org["id"], "own-fields", agent_id="a-7", transcript={"words": 12})
    assert response.status_code == 202
    assert usage_row(db, org["id"], "own-fields")["billed_minutes"] == 2


@pytest.mark.parametrize("raw", ["[]", '"text"', "null", "42"])
def test_a_body_that_is_not_an_object_is_422(client, raw):
    response = client.post("/", data=raw, content_type="application/json", headers=AUTH)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "body"


def test_invalid_json_is_400(client):
    response = client.post("/", data="{nope", content_type="application/json", headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_of_another_media_type_is_415_and_nothing_is_recorded(
    client, meter, db, subscribed, content_type
):
    org_id = str(subscribed["org"]["id"])
    body = json.dumps({"org_id": org_id, "call_id": "plain", "call_duration_seconds": 61})
    response = client.post("/", data=body, content_type=content_type, headers=AUTH)

    assert response.status_code == 415, response.get_json()
    assert response.get_json()["error"]["code"] == "unsupported_media_type"
    assert_documented("/report-usage", "POST", 415, response.get_json())
    assert usage_row(db, org_id, "plain") is None
    assert meter.requests == []


def test_an_ended_at_without_offset_is_utc_and_five_minutes_ahead_is_fine(
    client, meter, db, subscribed
):
    org = subscribed["org"]
    naive = (NOW - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    assert report(client, org["id"], "naive", ended_at=naive).status_code == 202
    assert usage_row(db, org["id"], "naive")["ended_at"] == NOW - timedelta(hours=1)
    soon = at(datetime.now(UTC) + timedelta(minutes=4))
    assert report(client, org["id"], "soon", ended_at=soon).status_code == 202
    assert flush(client)["sent"] == 2
    sent = meter.events[identifier_for(org["id"], "soon")]
    assert sent["timestamp"] == str(int(datetime.fromisoformat(soon).timestamp()))


def test_ended_at_defaults_to_now(client, meter, db, subscribed):
    org = subscribed["org"]
    before = datetime.now(UTC) - timedelta(seconds=5)
    assert report(client, org["id"], "now").status_code == 202
    assert usage_row(db, org["id"], "now")["ended_at"] >= before


# ------------------------------------------------------------------ GET the current cycle


def test_get_shows_the_current_cycle(client, meter, subscribed):
    org, plan = subscribed["org"], subscribed["plan"]
    report(client, org["id"], call_duration_minutes=502)
    response = current_cycle(client, f"?org_id={org['id']}")
    assert response.status_code == 200
    body = response.get_json()
    assert body == {
        "org_id": str(org["id"]),
        "plan": {"id": str(plan["id"]), "name": plan["name"]},
        "subscription_status": "active",
        "period_start": body["period_start"],
        "period_end": body["period_end"],
        "included_minutes": 500,
        "minutes_used": 502,
        "overage_minutes": 2,
        "overage_cost_cents": 100,
        "currency": "eur",
        "allowed": True,
    }
    sub = subscribed["sub"]
    assert datetime.fromisoformat(body["period_start"]) == sub["current_period_start"]
    assert datetime.fromisoformat(body["period_end"]) == sub["current_period_end"]


def test_get_for_an_organisation_without_subscription(client, customer_org):
    org = customer_org()
    body = current_cycle(client, f"?org_id={org['id']}").get_json()
    assert body == {
        "org_id": str(org["id"]),
        "plan": None,
        "subscription_status": None,
        "period_start": None,
        "period_end": None,
        "included_minutes": None,
        "minutes_used": None,
        "overage_minutes": None,
        "overage_cost_cents": None,
        "currency": None,
        "allowed": False,
    }


@pytest.mark.parametrize(
    ("status", "allowed"),
    [
        ("trialing", True),
        ("past_due", True),
        ("unpaid", False),
        ("canceled", False),
        ("incomplete", False),
        ("paused", False),
    ],
)
def test_get_allows_calls_only_on_a_live_paid_up_subscription(
    client, customer_org, make_plan, subscribe, status, allowed
):
    org = customer_org()
    subscribe(org, make_plan(), status=status)
    body = current_cycle(client, f"?org_id={org['id']}").get_json()
    assert body["subscription_status"] == status and body["allowed"] is allowed


def test_get_before_any_usage_shows_the_period_unused(client, customer_org, make_plan, subscribe):
    org = customer_org()
    sub = subscribe(org, make_plan(included_minutes=250), cycle=False)
    body = current_cycle(client, f"?org_id={org['id']}").get_json()
    assert body["minutes_used"] == 0 and body["included_minutes"] == 250
    assert datetime.fromisoformat(body["period_start"]) == sub["current_period_start"]


@pytest.mark.parametrize("query", ["", "?org_id=", "?org_id=nope"])
def test_get_needs_a_valid_org_id(client, query):
    response = current_cycle(client, query)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "org_id"
