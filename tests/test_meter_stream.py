"""The hot path (issue 12): a report is one database round trip and never waits for Stripe; its
meter event reaches Stripe's v2 meter event stream in batches of up to 100 under a session token
reused until it expires, exactly once under the call's identifier, however many flushers run,
whatever Stripe answers, and also when nobody calls the flush (report-usage's own thread)."""

# The fixtures (client, meter, subscribed) come from test_report_usage; tests take them by name.
# ruff: noqa: F811

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from shared import meter_flush
from shared.db import get_database
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from tests.conftest import acting_as, function_client
from tests.test_report_usage import (  # noqa: F401
    client,
    customer_org,
    flush,
    identifier_for,
    invalid_field,
    meter,
    report,
    subscribe,
    subscribed,
    usage_row,
)
from tests.test_usage_flush import make_due


def statuses(db: Any, org_id: Any) -> dict[str, int]:
    """How many of the organisation's rows have each meter_status."""
    rows = db.execute(
        "select meter_status, count(*) as n from usage_records where organisation_id = %s"
        " group by meter_status",
        (org_id,),
    ).fetchall()
    return {row["meter_status"]: row["n"] for row in rows}


def stripe_requests(meter: Any) -> int:
    """Every request made to Stripe: sessions, stream requests and v1 meter events."""
    return len(meter.sessions) + len(meter.stream) + len(meter.keys)


def next_xid(db: Any) -> int:
    """The next transaction id Postgres will assign (reading it assigns none)."""
    row = db.execute("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint as x")
    return int(row.fetchone()["x"])


def queue_calls(db: Any, org_id: Any, count: int, prefix: str = "bulk") -> set[str]:
    """`count` calls of 61 s recorded through record_usage itself (quicker than HTTP): their
    meter events due; their identifiers."""
    db.execute(
        "select public.record_usage(p_org_id => %s, p_call_id => %s || n, p_duration_seconds => 61,"
        " p_ended_at => null) from generate_series(1, %s) as n",
        (org_id, prefix, count),
    )
    return {identifier_for(org_id, f"{prefix}{n}") for n in range(1, count + 1)}


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------ the report


def test_a_report_is_one_database_round_trip_and_no_stripe_request(
    client, meter, db, subscribed, monkeypatch
):
    org = subscribed["org"]
    assert report(client, org["id"], "warm-up").status_code == 202  # the pool is open
    statements: list[tuple[bool, str]] = []
    execute = psycopg.Cursor.execute

    def traced(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if cursor.connection is not db:  # the function's own connections only
            statements.append((cursor.connection.autocommit, str(query)))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", traced)
    before = next_xid(db)
    response = report(client, org["id"], "one-trip", call_duration_seconds=125)
    assigned = next_xid(db) - before
    repeat = report(client, org["id"], "one-trip", call_duration_seconds=125)
    monkeypatch.undo()

    assert response.status_code == 202 and response.get_json()["minutes_used"] == 5
    assert repeat.status_code == 200 and repeat.get_json()["duplicate"] is True
    # One statement each, on an autocommit connection: one round trip, one transaction...
    assert len(statements) == 2, statements
    for autocommit, query in statements:
        assert autocommit and query.startswith("select public.record_usage(")
    # ... and the first report's writes are that one transaction, committed.
    assert assigned == 1
    row = usage_row(db, org["id"], "one-trip")
    assert row["meter_status"] == "pending" and row["meter_attempts"] == 0
    assert row["meter_claimed_at"] is None and row["meter_next_attempt_at"] <= datetime.now(UTC)
    # Stripe heard nothing: no session, no stream request, no v1 event.
    assert stripe_requests(meter) == 0 and meter.requests == []


# ------------------------------------------------------------------ batches and sessions


def test_250_reports_take_one_session_and_three_stream_requests(client, meter, db, subscribed):
    org = subscribed["org"]
    make_due(db, org["id"])  # other organisations' leftovers parked
    minutes = {f"r{i}": i % 7 + 1 for i in range(250)}
    for call_id, n in minutes.items():
        response = report(client, org["id"], call_id, call_duration_seconds=60 * n - 59)
        assert response.status_code == 202
    assert stripe_requests(meter) == 0

    assert flush(client) == {"sent": 250, "pending": 0, "failed": 0, "requests": 3}

    assert [(len(r.identifiers), r.status) for r in meter.stream] == [
        (100, 200),
        (100, 200),
        (50, 200),
    ]
    assert len(meter.sessions) == 1 and {r.token for r in meter.stream} == set(meter.sessions)
    expected = {identifier_for(org["id"], call_id): str(n) for call_id, n in minutes.items()}
    assert {i: e["payload[value]"] for i, e in meter.events.items()} == expected
    assert all(meter.sent(identifier) == 1 for identifier in expected)
    assert statuses(db, org["id"]) == {"sent": 250}
    assert stripe_requests(meter) == 4 <= 250 / 50  # at most one Stripe request per 50 reports


def test_a_flush_stops_at_its_limit_and_the_next_one_takes_the_rest(client, meter, db, subscribed):
    org = subscribed["org"]
    ours = queue_calls(db, org["id"], 250)
    make_due(db, org["id"])

    assert flush(client, limit=120) == {"sent": 120, "pending": 0, "failed": 0, "requests": 2}
    assert [len(r.identifiers) for r in meter.stream] == [100, 20]
    assert statuses(db, org["id"]) == {"sent": 120, "pending": 130}
    assert flush(client) == {"sent": 130, "pending": 0, "failed": 0, "requests": 2}
    assert set(meter.events) == ours and len(meter.requests) == 250


def test_the_session_is_reused_across_flushes_and_renewed_when_stripe_ends_it(
    client, meter, db, subscribed
):
    org = subscribed["org"]

    def report_and_flush(call_id: str) -> dict[str, int]:
        assert report(client, org["id"], call_id).status_code == 202
        make_due(db, org["id"])
        return flush(client)

    assert report_and_flush("s1")["sent"] == 1
    assert report_and_flush("s2")["sent"] == 1
    [first] = meter.sessions
    assert [(r.token, r.status) for r in meter.stream] == [(first, 200), (first, 200)]

    meter.advance(15 * 60)  # Stripe's clock: the session has expired
    assert report_and_flush("s3")["sent"] == 1

    third = identifier_for(org["id"], "s3")
    refused, resent = meter.stream[2:]
    assert (refused.token, refused.identifiers, refused.status) == (first, [third], 401)
    assert resent.token != first and (resent.identifiers, resent.status) == ([third], 200)
    assert len(meter.sessions) == 2 and resent.token in meter.sessions
    assert list(meter.events) == [identifier_for(org["id"], c) for c in ("s1", "s2", "s3")]
    assert meter.ignored == []  # the refused request took nothing: sent once
    row = usage_row(db, org["id"], "s3")
    assert row["meter_status"] == "sent" and row["meter_attempts"] == 1


def test_a_session_about_to_expire_is_replaced_before_it_is_used(client, meter, db, subscribed):
    org = subscribed["org"]
    meter.session_seconds = 30  # within a minute of its end as soon as it is made
    for call_id in ("e1", "e2"):
        report(client, org["id"], call_id)
        make_due(db, org["id"])
        assert flush(client)["sent"] == 1
    assert len(meter.sessions) == 2
    assert [r.status for r in meter.stream] == [200, 200]  # no request was refused
    assert meter.stream[0].token != meter.stream[1].token


# ------------------------------------------------------------------ many flushers


def test_four_flushers_at_once_send_every_event_exactly_once(function_env, meter, db, subscribed):
    org = subscribed["org"]
    ours = queue_calls(db, org["id"], 1000)
    make_due(db, org["id"])
    settings = get_settings()
    database = get_database(settings)
    # Four processes: each its own Stripe client and meter event session.
    streams = [meter_flush.MeterStream(make_stripe_client(settings), settings) for _ in range(4)]
    meter.delay = 0.005  # their requests overlap
    start = threading.Barrier(len(streams))

    def run(stream: meter_flush.MeterStream) -> meter_flush.FlushReport:
        start.wait()
        return meter_flush.flush(database, stream, limit=10_000)

    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        reports = list(pool.map(run, streams))

    assert sum(r.sent for r in reports) == 1000
    assert all(r.pending == r.failed == 0 for r in reports)
    assert all(r.status == 200 and 0 < len(r.identifiers) <= 100 for r in meter.stream)
    # Claims never overlapped: no event went in two requests, nor twice in one.
    sent = [identifier for request in meter.stream for identifier in request.identifiers]
    assert len(sent) == len(set(sent)) == 1000 and set(sent) == ours
    assert set(meter.events) == ours and meter.ignored == []
    assert len({r.token for r in meter.stream}) >= 2  # the work was shared
    rows = db.execute(
        "select meter_status, meter_attempts, count(*) as n from usage_records"
        " where organisation_id = %s group by 1, 2",
        (org["id"],),
    ).fetchall()
    assert [(r["meter_status"], r["meter_attempts"], r["n"]) for r in rows] == [("sent", 1, 1000)]


# ------------------------------------------------------------------ Stripe's answers


@pytest.mark.parametrize("where", ["session", "stream"])
def test_stripe_unreachable_keeps_every_event_pending_with_a_retry_time(
    client, meter, db, subscribed, where
):
    org = subscribed["org"]
    if where == "stream":  # a session made earlier; the stream is unreachable now
        report(client, org["id"], "before")
        make_due(db, org["id"])
        assert flush(client)["sent"] == 1
        meter.fail_next("connect")
    else:
        meter.fail_sessions("connect")
    calls = {"down-1": 1, "down-2": 2, "down-3": 3}
    for call_id, n in calls.items():
        report(client, org["id"], call_id, call_duration_minutes=n)
    make_due(db, org["id"])
    attempted = len(meter.stream)

    flushed = flush(client)

    assert (flushed["sent"], flushed["pending"], flushed["failed"]) == (0, 3, 0)
    # Without a session nothing is streamed; an unreachable stream is one attempted request.
    assert [r.status for r in meter.stream[attempted:]] == (
        [] if where == "session" else ["connect"]
    )
    for call_id in calls:
        row = usage_row(db, org["id"], call_id)
        assert row["meter_status"] == "pending" and row["meter_attempts"] == 1
        assert row["meter_next_attempt_at"] > datetime.now(UTC)
        assert row["meter_outcome_unknown_at"] is None  # surely not sent: resent at any age
        assert "APIConnectionError" in row["meter_error"]
    assert set(meter.events) <= {identifier_for(org["id"], "before")}
    assert flush(client)["requests"] == 0  # not due yet

    make_due(db, org["id"])
    assert flush(client) == {"sent": 3, "pending": 0, "failed": 0, "requests": 1}
    for call_id, n in calls.items():
        identifier = identifier_for(org["id"], call_id)
        assert meter.events[identifier]["payload[value]"] == str(n)
        assert meter.sent(identifier) == 1
        assert usage_row(db, org["id"], call_id)["meter_status"] == "sent"


def test_a_refusal_naming_one_event_fails_it_and_the_others_go_at_once(
    client, meter, db, subscribed
):
    org = subscribed["org"]
    calls = [f"named-{i}" for i in range(6)]
    for call_id in calls:
        report(client, org["id"], call_id)
    make_due(db, org["id"])
    meter.fail_next(invalid_field("events[3][payload][value]", "must be a whole number."))

    assert flush(client) == {"sent": 5, "pending": 0, "failed": 1, "requests": 2}

    refused, again = meter.stream
    named = refused.identifiers[3]
    assert again.identifiers == [i for i in refused.identifiers if i != named]
    by_identifier = {identifier_for(org["id"], c): c for c in calls}
    row = usage_row(db, org["id"], by_identifier[named])
    assert row["meter_status"] == "failed" and "must be a whole number" in row["meter_error"]
    assert row["billed_minutes"] == 2  # still counted in its cycle, for reconciliation
    others = [c for i, c in by_identifier.items() if i != named]
    for call_id in others:
        assert usage_row(db, org["id"], call_id)["meter_status"] == "sent"
    assert set(meter.events) == {identifier_for(org["id"], c) for c in others}

    make_due(db, org["id"])
    assert flush(client) == {"sent": 0, "pending": 0, "failed": 0, "requests": 0}
    assert usage_row(db, org["id"], by_identifier[named])["meter_status"] == "failed"


def test_a_batch_refused_whole_tells_each_organisation_only_the_kind_of_error(
    client, meter, db, customer_org, make_plan, subscribe, make_user
):
    """A batch carries several organisations' events; Stripe's message for the whole request may
    name one of them (here B's customer). Members read their rows' meter_error (RLS), so the
    rows get the kind of error and the log gets the message."""
    plan = make_plan()
    org_a, org_b = customer_org(), customer_org()
    subscribe(org_a, plan)
    subscribe(org_b, plan)
    member_a = make_user()
    db.execute(
        "insert into organisation_members (organisation_id, user_id, role)"
        " values (%s, %s, 'member')",
        (org_a["id"], member_a),
    )
    report(client, org_a["id"], "call-a")
    report(client, org_b["id"], "call-b")
    both_due(db, org_a["id"], org_b["id"])
    secret = f"No such customer: '{org_b['stripe_customer_id']}'"
    meter.fail_next(
        httpx.Response(
            400,
            json={
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "message": secret,
                }
            },
        )
    )

    assert flush(client)["sent"] == 0

    with acting_as(db, "authenticated", member_a) as cur:
        seen = cur.execute(
            "select meter_status, meter_error from public.usage_records where organisation_id = %s",
            (org_a["id"],),
        ).fetchall()
    assert [row[0] for row in seen] == ["pending"]  # kept for a retry
    assert seen[0][1].startswith("InvalidRequestError (400, resource_missing)")
    assert org_b["stripe_customer_id"] not in seen[0][1]
    assert len(meter.stream[0].identifiers) == 2  # one request carried both organisations
    both_due(db, org_a["id"], org_b["id"])
    assert flush(client)["sent"] == 2  # nothing lost


def both_due(db: Any, org_a: Any, org_b: Any) -> None:
    make_due(db, org_a)  # parks every other organisation's events
    db.execute(
        "update usage_records set meter_next_attempt_at = now()"
        " where organisation_id = %s and meter_status = 'pending'",
        (org_b,),
    )


def test_stripe_validates_streamed_events_afterwards(client, meter, db, subscribed):
    """The stream answers {} and counts what is valid: an event it cannot count is reported
    later (test_meter_errors), never refused in the answer."""
    org = subscribed["org"]
    report(client, org["id"], "valid")
    make_due(db, org["id"])
    [event] = db.execute(
        "select public.claim_meter_events(p_limit => 100, p_lease_seconds => 60) as e"
    ).fetchone()["e"]
    assert event["identifier"] == identifier_for(org["id"], "valid")
    stream = meter_flush.MeterStream(make_stripe_client(get_settings()), get_settings())
    old = {**event, "identifier": "mb_old", "timestamp": event["timestamp"] - 40 * 86400}

    sent = stream.send([event, old])
    assert (sent.outcomes, sent.requests) == ([("sent", None), ("sent", None)], 1)

    assert list(meter.events) == [event["identifier"]]
    assert meter.invalid == [("mb_old", "timestamp_too_far_in_past")]


# ------------------------------------------------------------------ report-usage's own flush


@pytest.fixture
def background(function_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """report-usage with its flushing thread on, after `delay` seconds or 100 queued events."""

    def start(delay: float) -> Any:
        monkeypatch.setenv("METER_FLUSH_DELAY_SECONDS", str(delay))
        monkeypatch.setenv("DATABASE_POOL_SIZE", "20")
        get_settings.cache_clear()
        return function_client("report-usage", "report_usage")

    return start


def test_queued_events_reach_stripe_after_the_delay_without_a_flush_call(
    background, meter, db, subscribed
):
    org = subscribed["org"]
    make_due(db, org["id"])  # other organisations' leftovers parked
    app = background(0.5)
    calls = {f"bg-{n}": n for n in (1, 2, 3)}
    for call_id, n in calls.items():
        assert report(app, org["id"], call_id, call_duration_minutes=n).status_code == 202

    expected = {identifier_for(org["id"], c): str(n) for c, n in calls.items()}
    assert wait_for(lambda: set(meter.events) == set(expected), 5), meter.stream
    assert {i: e["payload[value]"] for i, e in meter.events.items()} == expected
    assert wait_for(lambda: statuses(db, org["id"]) == {"sent": 3}, 5)
    assert all(meter.sent(identifier) == 1 for identifier in expected)


def test_a_hundred_queued_events_are_flushed_at_once(background, meter, db, subscribed):
    org = subscribed["org"]
    make_due(db, org["id"])
    app = background(50)  # the delay alone would take 50 s
    for i in range(99):
        assert report(app, org["id"], f"hundred-{i}").status_code == 202
    time.sleep(0.3)
    assert meter.stream == []  # 99 queued: still waiting
    assert report(app, org["id"], "hundred-99").status_code == 202

    assert wait_for(lambda: statuses(db, org["id"]) == {"sent": 100}, 10), meter.stream
    assert [(len(r.identifiers), r.status) for r in meter.stream] == [(100, 200)]
    assert set(meter.events) == {identifier_for(org["id"], f"hundred-{i}") for i in range(100)}
