"""The meter event outbox: every report's meter event is queued, then delivered by the flush in
batches, once, under the call's identifier, whether the flush runs over HTTP, from the command
line, or twice at once; what Stripe does not take is retried later under the same identifier.
The v2 stream's own behaviour (batches, sessions, many flushers) is in test_meter_stream.py."""

# The fixtures (client, meter, subscribed) come from test_report_usage; tests take them by name.
# ruff: noqa: F811

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from ops import flush_usage
from shared.db import get_database
from shared.settings import get_settings
from tests.conftest import user_token
from tests.test_report_usage import (  # noqa: F401
    AUTH,
    client,
    customer_org,
    flush,
    identifier_for,
    invalid_field,
    meter,
    report,
    stripe_error,
    subscribe,
    subscribed,
    usage_row,
)


class ProcessKilled(BaseException):
    """The process dies (not an Exception: nothing of ours may catch it)."""


def make_due(db: Any, org_id: Any) -> None:
    """Let the organisation's leases and backoffs run out. Other organisations' pending events
    (left by other test files in the session's shared database) are parked: the flush is global
    by design, and they must not reach this test's meter."""
    db.execute(
        "update usage_records set meter_next_attempt_at = now()"
        " where organisation_id = %s and meter_status = 'pending'",
        (org_id,),
    )
    db.execute(
        "update usage_records set meter_next_attempt_at = 'infinity'"
        " where organisation_id <> %s and meter_status = 'pending'",
        (org_id,),
    )


@pytest.mark.parametrize("failure", [500, 429, "timeout"])
def test_a_pending_event_is_delivered_by_the_flush_with_the_same_identifier(
    client, meter, db, subscribed, failure
):
    org = subscribed["org"]
    meter.fail_next(failure)
    assert report(client, org["id"], "retry-me", call_duration_seconds=150).status_code == 202
    make_due(db, org["id"])
    assert flush(client) == {"sent": 0, "pending": 1, "failed": 0, "requests": 1}
    row = usage_row(db, org["id"], "retry-me")
    assert row["meter_status"] == "pending" and row["meter_next_attempt_at"] > datetime.now(UTC)
    # A 500 or no answer: Stripe may have it (resent only within its identifier window).
    assert (row["meter_outcome_unknown_at"] is not None) is (failure != 429)
    make_due(db, org["id"])

    assert flush(client)["sent"] == 1

    identifier = identifier_for(org["id"], "retry-me")
    row = usage_row(db, org["id"], "retry-me")
    assert row["meter_status"] == "sent" and row["meter_attempts"] == 2
    attempts = [form for form in meter.requests if form["identifier"] == identifier]
    assert len(attempts) == 2
    assert attempts[0] == attempts[1]  # the same event, identifier included
    assert attempts[0]["payload[value]"] == "3"
    # A key of its own per request: Stripe replays a key's first answer, a 500 included.
    keys = [request.key for request in meter.stream]
    assert len(keys) == 2 and None not in keys and keys[0] != keys[1]
    assert list(meter.events) == [identifier]


def test_backoff_grows_and_an_event_waits_until_it_is_due(client, meter, db, subscribed):
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "flaky")
    meter.fail_next(500, 500)
    report(client, org["id"], "flaky")
    make_due(db, org["id"])
    flush(client)  # the first attempt: a 500
    make_due(db, org["id"])
    flush(client)  # the second: a 500 again

    delays = db.execute(
        "select extract(epoch from meter_next_attempt_at - now()) as wait, meter_attempts,"
        " meter_error from usage_records where organisation_id = %s and call_id = 'flaky'",
        (org["id"],),
    ).fetchone()
    assert delays["meter_attempts"] == 2 and "500" in delays["meter_error"]
    assert 45 < delays["wait"] <= 60  # 15 s x 2^attempts: 30 s after the first, 60 s now

    flush(client)
    assert meter.sent(identifier) == 2  # not due yet: left alone
    make_due(db, org["id"])
    flush(client)
    assert meter.sent(identifier) == 3
    assert usage_row(db, org["id"], "flaky")["meter_status"] == "sent"


def test_backoff_stays_an_hour_however_many_attempts(client, meter, db, subscribed):
    org = subscribed["org"]
    meter.fail_next("timeout")
    report(client, org["id"], "stubborn")
    db.execute(  # weeks of hourly retries against an unreachable Stripe
        "update usage_records set meter_attempts = 5000, meter_next_attempt_at = now()"
        " where organisation_id = %s and call_id = 'stubborn'",
        (org["id"],),
    )

    assert flush(client)["pending"] == 1

    row = db.execute(
        "select meter_status, meter_attempts, extract(epoch from meter_next_attempt_at - now())"
        " as wait from usage_records where organisation_id = %s and call_id = 'stubborn'",
        (org["id"],),
    ).fetchone()
    assert row["meter_status"] == "pending" and row["meter_attempts"] == 5001
    assert 3500 < row["wait"] <= 3600


@pytest.mark.parametrize(
    ("refused", "status"), [("stream", 401), ("stream", 403), ("session", 401), ("session", 403)]
)
def test_our_own_key_refused_keeps_the_event_for_later(
    client, meter, db, subscribed, refused, status
):
    """A revoked or restricted Stripe key (or session token) is ours to fix: the usage waits, it
    is not given up."""
    org = subscribed["org"]
    if refused == "stream":
        # A session Stripe does not take (401) is replaced once; a 403 is not a session matter.
        meter.fail_next(*[status] * (2 if status == 401 else 1))
    else:
        meter.fail_sessions(status)
    response = report(client, org["id"], "key-rolled")
    assert response.status_code == 202 and response.get_json()["meter_status"] == "pending"
    make_due(db, org["id"])
    flushed = flush(client)
    assert (flushed["sent"], flushed["pending"], flushed["failed"]) == (0, 1, 0)
    tries = {"stream": 2 if status == 401 else 1, "session": 0}[refused]  # no session: no try
    assert len(meter.stream) == tries
    row = usage_row(db, org["id"], "key-rolled")
    assert row["meter_status"] == "pending" and str(status) in row["meter_error"]
    assert row["meter_outcome_unknown_at"] is None  # refused before the endpoint: not sent
    assert meter.events == {}

    make_due(db, org["id"])
    assert flush(client)["sent"] >= 1
    assert usage_row(db, org["id"], "key-rolled")["meter_status"] == "sent"


def test_a_flusher_dying_after_stripe_took_the_batch_bills_each_call_once(
    client, meter, db, subscribed
):
    org = subscribed["org"]
    calls = {f"killed-{n}": n for n in (2, 3, 4)}
    for call_id, minutes in calls.items():
        report(client, org["id"], call_id, call_duration_minutes=minutes)
    identifiers = {identifier_for(org["id"], call_id) for call_id in calls}
    make_due(db, org["id"])

    def die() -> None:
        raise ProcessKilled

    meter.fail_next(die)  # Stripe records the batch, the flusher dies before hearing back
    with pytest.raises(ProcessKilled):
        flush(client)

    assert set(meter.events) == identifiers
    for call_id in calls:
        row = usage_row(db, org["id"], call_id)
        assert row["meter_status"] == "pending" and row["meter_claimed_at"] is not None
        assert row["meter_next_attempt_at"] > datetime.now(UTC)  # the dead claim's lease
    assert flush(client)["requests"] == 0  # the lease still holds
    assert all(meter.sent(identifier) == 1 for identifier in identifiers)

    make_due(db, org["id"])  # the lease ends
    assert flush(client) == {"sent": 3, "pending": 0, "failed": 0, "requests": 1}
    for call_id in calls:
        row = usage_row(db, org["id"], call_id)
        assert row["meter_status"] == "sent" and row["meter_attempts"] == 2
        assert row["meter_outcome_unknown_at"] is not None  # the first attempt never reported
    assert all(meter.sent(identifier) == 2 for identifier in identifiers)  # same identifiers
    assert sorted(meter.ignored) == sorted(identifiers)  # Stripe ignored the repeats
    assert {i: e["payload[value]"] for i, e in meter.events.items()} == {
        identifier_for(org["id"], call_id): str(n) for call_id, n in calls.items()
    }
    repeat = report(client, org["id"], "killed-4", call_duration_minutes=4).get_json()
    assert repeat["duplicate"] is True and repeat["minutes_used"] == 9
    assert repeat["meter_status"] == "sent"


def test_a_flusher_dying_after_its_claim_before_sending_sends_once_later(
    client, meter, db, database_url, subscribed
):
    org = subscribed["org"]
    report(client, org["id"], "claimed-then-killed", call_duration_seconds=61)
    make_due(db, org["id"])
    identifier = identifier_for(org["id"], "claimed-then-killed")
    with psycopg.connect(database_url) as dead:  # its claim commits, then it dies
        [claimed] = dead.execute(
            "select public.claim_meter_events(p_limit => 100, p_lease_seconds => 300)"
        ).fetchone()
    assert [event["identifier"] for event in claimed] == [identifier]

    assert flush(client)["requests"] == 0  # leased to the dead flusher
    make_due(db, org["id"])
    assert flush(client) == {"sent": 1, "pending": 0, "failed": 0, "requests": 1}

    row = usage_row(db, org["id"], "claimed-then-killed")
    assert row["meter_status"] == "sent" and row["meter_attempts"] == 2
    assert meter.sent(identifier) == 1 and list(meter.events) == [identifier]
    assert meter.events[identifier]["payload[value]"] == "2"


def test_a_lease_running_out_mid_request_still_bills_once(client, meter, db, subscribed):
    """The first attempt is still waiting for Stripe's answer when its lease ends and a flush
    sends the event again: Stripe ignores the identifier it has, and the row is sent."""
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "slow")
    flushed: list[dict[str, int]] = []

    def flush_meanwhile() -> None:  # Stripe has taken the batch; its answer is still on the way
        make_due(db, org["id"])
        flushed.append(flush(client.application.test_client()))

    assert report(client, org["id"], "slow").status_code == 202
    make_due(db, org["id"])
    meter.fail_next(flush_meanwhile)
    first = flush(client)

    assert flushed[0]["sent"] == 1 and first["sent"] == 1  # the late answer changes nothing
    assert meter.sent(identifier) == 2 and list(meter.events) == [identifier]
    assert meter.ignored == [identifier]
    row = usage_row(db, org["id"], "slow")
    assert (row["meter_status"], row["meter_attempts"], row["meter_error"]) == ("sent", 2, None)


def test_two_flushes_at_once_send_each_event_once(client, meter, db, subscribed):
    org = subscribed["org"]
    calls = [f"burst-{i}" for i in range(20)]
    for call_id in calls:
        assert report(client, org["id"], call_id).status_code == 202
    make_due(db, org["id"])
    meter.requests.clear()
    meter.delay = 0.01  # both flushes are surely sending at the same time

    start = threading.Barrier(2)

    def one(_: int) -> dict[str, int]:
        start.wait()
        return flush(client.application.test_client(), limit=50)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(2)))

    ours = {identifier_for(org["id"], call_id) for call_id in calls}
    assert all(meter.sent(identifier) == 1 for identifier in ours)
    assert ours <= set(meter.events)
    assert sum(r["sent"] for r in results) >= len(calls)
    statuses = db.execute(
        "select meter_status, meter_attempts from usage_records where organisation_id = %s",
        (org["id"],),
    ).fetchall()
    assert {(s["meter_status"], s["meter_attempts"]) for s in statuses} == {("sent", 1)}


def test_claims_taken_at_the_same_moment_never_share_an_event(
    client, meter, db, database_url, subscribed
):
    org = subscribed["org"]
    for i in range(5):
        report(client, org["id"], f"claim-{i}")
    make_due(db, org["id"])
    ours = {identifier_for(org["id"], f"claim-{i}") for i in range(5)}
    claim = "select public.claim_meter_events(p_limit => 1000, p_lease_seconds => 300)"

    with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b:
        b.execute("set lock_timeout = '2s'")  # waiting on a's claim would be a bug too
        first = {e["identifier"] for e in a.execute(claim).fetchone()[0]}
        second = {e["identifier"] for e in b.execute(claim).fetchone()[0]}  # a not committed
        a.commit()
        b.commit()
        after = {e["identifier"] for e in b.execute(claim).fetchone()[0]}  # leases hold

    assert ours <= first
    assert not ours & second and not ours & after


def test_a_permanent_refusal_during_a_flush_is_kept_as_failed(client, meter, db, subscribed):
    org = subscribed["org"]
    refusal = invalid_field("events[0][payload][stripe_customer_id]", "No such customer: 'cus_x'")
    meter.fail_next(500, refusal)
    report(client, org["id"], "doomed")
    make_due(db, org["id"])
    assert flush(client)["pending"] == 1  # the 500: retried later
    make_due(db, org["id"])
    assert flush(client) == {"sent": 0, "pending": 0, "failed": 1, "requests": 1}
    row = usage_row(db, org["id"], "doomed")
    assert row["meter_status"] == "failed" and "No such customer" in row["meter_error"]
    assert meter.events == {}


def test_a_refusal_naming_no_event_keeps_the_whole_batch_for_a_retry(client, meter, db, subscribed):
    """A 400 that does not say which event is wrong cannot fail any one of them for good."""
    org = subscribed["org"]
    for call_id in ("whole-1", "whole-2"):
        report(client, org["id"], call_id)
    make_due(db, org["id"])
    meter.fail_next(stripe_error(400, "Something about this request is wrong."))
    assert flush(client) == {"sent": 0, "pending": 2, "failed": 0, "requests": 1}
    make_due(db, org["id"])
    assert flush(client) == {"sent": 2, "pending": 0, "failed": 0, "requests": 1}
    assert set(meter.events) == {identifier_for(org["id"], c) for c in ("whole-1", "whole-2")}


def test_a_late_outcome_never_undoes_a_delivery(client, meter, db, subscribed):
    org = subscribed["org"]
    report(client, org["id"], "done")
    make_due(db, org["id"])
    flush(client)
    row = usage_row(db, org["id"], "done")
    assert row["meter_status"] == "sent"
    database = get_database(get_settings())
    for outcome in ("retry", "failed"):
        late = database.call(
            "record_meter_result",
            p_usage_record_id=str(row["id"]),
            p_attempt=row["meter_attempts"],
            p_outcome=outcome,
            p_error="a slow attempt timing out",
        )
        assert late == {"meter_status": "sent"}
    assert usage_row(db, org["id"], "done")["meter_error"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "nope"}, "action"),
        ({"action": "flush", "limit": 0}, "limit"),
        ({"action": "flush", "limit": 10001}, "limit"),
        ({"action": "flush", "limit": "5"}, "limit"),
    ],
)
def test_a_bad_flush_request_is_422(client, body, field):
    response = client.post("/", json=body, headers=AUTH)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == field


def test_a_report_carrying_action_is_422_and_records_nothing(client, db, subscribed):
    org = subscribed["org"]
    body = {"action": "flush", "org_id": org["id"], "call_id": "mixed", "call_duration_seconds": 60}
    response = client.post("/", json=body, headers=AUTH)
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] in {"org_id", "call_id", "call_duration_seconds"}
    answer = client.post("/", json={**body, "action": None}, headers=AUTH)
    assert answer.status_code == 422  # `action` makes it a command, whatever its value
    assert (
        db.execute("select count(*) as n from usage_records where call_id = 'mixed'").fetchone()[
            "n"
        ]
        == 0
    )


def test_flush_needs_the_service_key(client):
    assert client.post("/", json={"action": "flush"}).status_code == 401
    user = {"Authorization": f"Bearer {user_token(str(uuid.uuid4()))}"}
    assert client.post("/", json={"action": "flush"}, headers=user).status_code == 403


def test_the_command_line_flush_delivers_and_says_what_it_did(
    client, meter, db, subscribed, capsys
):
    org = subscribed["org"]
    report(client, org["id"], "cli")
    make_due(db, org["id"])

    flush_usage.main(["--limit", "1000"])

    out = capsys.readouterr().out
    assert out == "meter events: sent 1, kept pending 0, failed 0\n"
    assert list(meter.events) == [identifier_for(org["id"], "cli")]
    row = usage_row(db, org["id"], "cli")
    assert row["meter_status"] == "sent" and row["meter_sent_at"] <= datetime.now(UTC)


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--limit", "10001"], ["--limit", "x"]])
def test_the_command_line_refuses_a_bad_limit(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flush_usage.main(argv)
    assert exit_info.value.code == 2
