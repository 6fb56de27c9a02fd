"""The meter event outbox: what Stripe did not take right away is delivered later, once, under the
same identifier, whether the flush runs over HTTP, from the command line, or twice at once."""

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
from tests.openapi_check import assert_documented
from tests.test_report_usage import (  # noqa: F401
    AUTH,
    client,
    customer_org,
    identifier_for,
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


def flush(client: Any, **body: Any) -> Any:
    response = client.post("/", json={"action": "flush", **body}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert_documented("/report-usage", "POST", 200, response.get_json())
    return response.get_json()


@pytest.mark.parametrize("failure", [500, 429, "timeout"])
def test_a_pending_event_is_delivered_by_the_flush_with_the_same_identifier(
    client, meter, db, subscribed, failure
):
    org = subscribed["org"]
    meter.fail_next(failure)
    assert report(client, org["id"], "retry-me", call_duration_seconds=150).status_code == 202
    make_due(db, org["id"])

    assert flush(client)["sent"] >= 1

    identifier = identifier_for(org["id"], "retry-me")
    row = usage_row(db, org["id"], "retry-me")
    assert row["meter_status"] == "sent" and row["meter_attempts"] == 2
    attempts = [
        (form, key)
        for form, key in zip(meter.requests, meter.keys, strict=True)
        if form["identifier"] == identifier
    ]
    assert len(attempts) == 2
    assert attempts[0][0] == attempts[1][0]  # the same parameters
    # A key of its own per attempt: Stripe replays a key's first answer, a 500 included.
    assert [key for _, key in attempts] == [f"{identifier}-1", f"{identifier}-2"]
    assert attempts[0][0]["payload[value]"] == "3"
    assert list(meter.events) == [identifier]


def test_backoff_grows_and_an_event_waits_until_it_is_due(client, meter, db, subscribed):
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "flaky")
    meter.fail_next(500, 500)
    report(client, org["id"], "flaky")
    make_due(db, org["id"])
    flush(client)

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
    meter.fail_next("timeout", "timeout")
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


@pytest.mark.parametrize("status", [401, 403])
def test_our_own_key_refused_keeps_the_event_for_later(client, meter, db, subscribed, status):
    """A revoked or restricted Stripe key is ours to fix: the usage waits, it is not given up."""
    org = subscribed["org"]
    meter.fail_next(status)
    response = report(client, org["id"], "key-rolled")
    assert response.status_code == 202 and response.get_json()["meter_status"] == "pending"
    assert str(status) in usage_row(db, org["id"], "key-rolled")["meter_error"]

    make_due(db, org["id"])
    assert flush(client)["sent"] >= 1
    assert usage_row(db, org["id"], "key-rolled")["meter_status"] == "sent"


def test_the_process_dying_right_after_the_commit_loses_nothing(client, meter, db, subscribed):
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "killed")

    def die() -> None:
        raise ProcessKilled

    meter.fail_next(die)  # Stripe records the event, the process dies before hearing back
    with pytest.raises(ProcessKilled):
        report(client, org["id"], "killed", call_duration_seconds=240)

    row = usage_row(db, org["id"], "killed")
    assert row["meter_status"] == "pending" and row["billed_minutes"] == 4
    flush(client)
    assert meter.sent(identifier) == 1  # the dead attempt's lease still holds

    make_due(db, org["id"])
    flush(client)
    assert usage_row(db, org["id"], "killed")["meter_status"] == "sent"
    assert meter.sent(identifier) == 2
    assert list(meter.events) == [identifier]  # Stripe refused the identifier again: one event
    repeat = report(client, org["id"], "killed", call_duration_seconds=240).get_json()
    assert repeat["duplicate"] is True and repeat["minutes_used"] == 4
    assert repeat["meter_status"] == "sent"


def test_a_lease_running_out_mid_request_still_bills_once(client, meter, db, subscribed):
    """The first attempt is still waiting for Stripe's answer when its lease ends and a flush
    sends the event again: Stripe refuses the identifier, which counts as sent."""
    org = subscribed["org"]
    identifier = identifier_for(org["id"], "slow")
    flushed: list[dict[str, int]] = []

    def flush_meanwhile() -> None:  # Stripe has taken the event; its answer is still on the way
        make_due(db, org["id"])
        flushed.append(flush(client.application.test_client()))

    meter.fail_next(flush_meanwhile)
    response = report(client, org["id"], "slow")

    assert flushed[0]["sent"] == 1 and response.status_code == 201
    assert meter.sent(identifier) == 2 and list(meter.events) == [identifier]
    row = usage_row(db, org["id"], "slow")
    assert (row["meter_status"], row["meter_attempts"], row["meter_error"]) == ("sent", 2, None)


def test_two_flushes_at_once_send_each_event_once(client, meter, db, subscribed):
    org = subscribed["org"]
    calls = [f"burst-{i}" for i in range(20)]
    meter.fail_next(*[500] * len(calls))
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
    assert {(s["meter_status"], s["meter_attempts"]) for s in statuses} == {("sent", 2)}


def test_claims_taken_at_the_same_moment_never_share_an_event(
    client, meter, db, database_url, subscribed
):
    org = subscribed["org"]
    meter.fail_next(*[500] * 5)
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
    meter.fail_next(500, stripe_error(400, "No such customer: 'cus_x'"))
    report(client, org["id"], "doomed")
    make_due(db, org["id"])
    result = flush(client)
    assert result["failed"] >= 1
    row = usage_row(db, org["id"], "doomed")
    assert row["meter_status"] == "failed" and "No such customer" in row["meter_error"]


def test_a_late_outcome_never_undoes_a_delivery(client, meter, db, subscribed):
    org = subscribed["org"]
    report(client, org["id"], "done")
    row = usage_row(db, org["id"], "done")
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
        ({"action": "flush", "limit": 1001}, "limit"),
        ({"action": "flush", "limit": "5"}, "limit"),
    ],
)
def test_a_bad_flush_request_is_422(client, body, field):
    response = client.post("/", json=body, headers=AUTH)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == field


def test_flush_needs_the_service_key(client):
    assert client.post("/", json={"action": "flush"}).status_code == 401
    user = {"Authorization": f"Bearer {user_token(str(uuid.uuid4()))}"}
    assert client.post("/", json={"action": "flush"}, headers=user).status_code == 403


def test_the_command_line_flush_delivers_and_says_what_it_did(
    client, meter, db, subscribed, capsys
):
    org = subscribed["org"]
    meter.fail_next("timeout")
    report(client, org["id"], "cli")
    make_due(db, org["id"])

    flush_usage.main(["--limit", "1000"])

    out = capsys.readouterr().out
    assert out.startswith("meter events: sent ") and "kept pending" in out and "failed" in out
    row = usage_row(db, org["id"], "cli")
    assert row["meter_status"] == "sent" and row["meter_sent_at"] <= datetime.now(UTC)


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--limit", "x"]])
def test_the_command_line_refuses_a_bad_limit(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flush_usage.main(argv)
    assert exit_info.value.code == 2
