"""Late usage and Stripe's time windows (DESIGN.md, "Late usage"): a call Stripe can no longer bill
in its own cycle is counted once, in the current cycle, metered now; an event whose outcome we
never learned is never resent past Stripe's identifier window; failed usage can be put back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.test_report_usage import (
    AUTH,
    NOW,
    at,
    cycles_of,
    identifier_for,
    invalid_field,
    month_after,
    report,
    usage_row,
)

# The fixtures `meter`, `client`, `subscribe`, `customer_org`, `subscribed`.
pytest_plugins = ("tests.test_report_usage",)


@pytest.fixture(autouse=True)
def park_leftovers(db: Any) -> Any:
    """Events these tests leave pending (a backoff of a few minutes) are parked afterwards: the
    session's database is shared, and a later test's flush must not deliver them to its meter."""
    started = db.execute("select clock_timestamp() as t").fetchone()["t"]
    yield
    db.execute(
        "update usage_records set meter_next_attempt_at = 'infinity'"
        " where meter_status = 'pending' and created_at >= %s",
        (started,),
    )


def flush(client: Any) -> dict[str, int]:
    response = client.post("/", json={"action": "flush"}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    body: dict[str, int] = response.get_json()
    return body


def two_periods(
    org: dict[str, Any], plan: dict[str, Any], subscribe: Any, db: Any, *, ended_ago: timedelta
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A subscription whose previous period ended `ended_ago`, and its current cycle."""
    boundary = NOW - ended_ago
    start = boundary - (month_after(boundary) - boundary)
    sub = subscribe(org, plan, start=start, end=boundary)
    db.execute(
        "update subscriptions set current_period_start = %s, current_period_end = %s where id = %s",
        (boundary, month_after(boundary), sub["id"]),
    )
    db.execute(
        "insert into billing_cycles (organisation_id, subscription_id, period_start, period_end,"
        " included_minutes, overage_rate_cents) values (%s, %s, %s, %s, %s, %s)",
        (
            org["id"],
            sub["id"],
            boundary,
            month_after(boundary),
            plan["included_minutes"],
            plan["overage_rate_cents"],
        ),
    )
    previous, current = cycles_of(db, sub["id"])
    return sub, previous, current


def audit(db: Any, org_id: Any, action: str) -> list[dict[str, Any]]:
    return db.execute(
        "select details from audit_log where organisation_id = %s and action = %s order by id",
        (org_id, action),
    ).fetchall()


def test_a_call_in_an_invoiced_cycle_counts_late_in_the_current_one(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan(included_minutes=10)
    sub, previous, current = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=20))
    db.execute(
        "update billing_cycles set stripe_invoice_id = 'in_1' where id = %s", (previous["id"],)
    )

    ended = previous["period_end"] - timedelta(minutes=5)
    response = report(client, org["id"], "offline", call_duration_minutes=3, ended_at=at(ended))

    assert response.status_code == 202
    body = response.get_json()
    assert body["late"] is True and body["minutes_used"] == 3 and body["meter_status"] == "pending"
    assert flush(client)["sent"] == 1
    previous_after, current_after = cycles_of(db, sub["id"])
    assert previous_after["minutes_used"] == 0  # nothing enters an invoiced cycle
    assert current_after["minutes_used"] == 3
    row = usage_row(db, org["id"], "offline")
    assert row["late"] and row["billing_cycle_id"] == current["id"]
    assert row["ended_at"] == ended and row["metered_at"] >= NOW and row["meter_status"] == "sent"
    sent = meter.events[identifier_for(org["id"], "offline")]
    assert int(sent["timestamp"]) >= int(NOW.timestamp())  # metered when counted, not when it ended
    [entry] = audit(db, org["id"], "usage.late")
    assert entry["details"]["reason"] == "invoiced" and entry["details"]["call_id"] == "offline"

    repeat = report(client, org["id"], "offline", call_duration_minutes=3, ended_at=at(ended))
    assert repeat.status_code == 200 and repeat.get_json()["late"] is True
    assert cycles_of(db, sub["id"])[1]["minutes_used"] == 3


def test_a_call_of_the_previous_period_within_its_grace_hour_counts_there(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub, previous, _ = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=20))
    ended = previous["period_end"] - timedelta(minutes=1)
    body = report(client, org["id"], "in-grace", ended_at=at(ended)).get_json()
    assert flush(client)["sent"] == 1

    assert body["late"] is False
    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [2, 0]
    sent = meter.events[identifier_for(org["id"], "in-grace")]
    assert int(sent["timestamp"]) == int(ended.timestamp())


def test_a_call_of_a_period_past_its_grace_counts_late(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub, previous, _ = two_periods(org, plan, subscribe, db, ended_ago=timedelta(hours=2))
    body = report(
        client, org["id"], "past-grace", ended_at=at(previous["period_end"] - timedelta(hours=3))
    ).get_json()

    assert body["late"] is True
    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [0, 2]
    assert audit(db, org["id"], "usage.late")[0]["details"]["reason"] == "grace_passed"


def test_a_call_older_than_stripe_accepts_is_billed_late_not_refused(
    client, meter, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    sub = subscribe(org, make_plan(), start=NOW - timedelta(days=50), end=NOW + timedelta(days=10))
    response = report(client, org["id"], "old", ended_at=at(NOW - timedelta(days=40)))

    assert response.status_code == 202
    body = response.get_json()
    assert body["late"] is True and body["meter_status"] == "pending"
    assert flush(client) == {"sent": 1, "pending": 0, "failed": 0, "requests": 1}
    assert usage_row(db, org["id"], "old")["meter_status"] == "sent"
    sent = meter.events[identifier_for(org["id"], "old")]  # metered now: Stripe counts it
    assert int(sent["timestamp"]) >= int(NOW.timestamp())
    assert cycles_of(db, sub["id"])[0]["minutes_used"] == 2


def test_late_usage_without_a_live_subscription_is_recorded_and_counted_nowhere(
    client, meter, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    start = NOW - timedelta(days=40)
    sub = subscribe(org, make_plan(), start=start, end=month_after(start), status="canceled")
    body = report(client, org["id"], "after-the-end", ended_at=at(start + timedelta(days=1)))

    assert body.get_json()["late"] is True and body.get_json()["meter_status"] == "skipped"
    assert cycles_of(db, sub["id"])[0]["minutes_used"] == 0
    row = usage_row(db, org["id"], "after-the-end")
    assert row["billing_cycle_id"] is None and "no live subscription" in row["meter_error"]
    assert flush(client)["requests"] == 0
    assert not meter.requests


def test_an_outage_across_the_period_end_is_retried_within_the_grace_hour(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    _, previous, _ = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=10))
    meter.fail_next(429)
    report(client, org["id"], "outage", ended_at=at(previous["period_end"] - timedelta(minutes=2)))
    assert flush(client)["pending"] == 1
    db.execute(
        "update usage_records set meter_attempts = 9 where organisation_id = %s", (org["id"],)
    )
    # The ninth failure would wait an hour, past the grace hour: it waits 5 minutes at most.
    row = usage_row(db, org["id"], "outage")
    db.execute(
        "select public.record_meter_result(%s, %s, 'retry', 'still down')",
        (row["id"], row["meter_attempts"]),
    )
    row = usage_row(db, org["id"], "outage")
    assert row["meter_status"] == "pending"
    assert row["meter_next_attempt_at"] <= datetime.now(UTC) + timedelta(minutes=5, seconds=5)


def test_an_event_undelivered_after_the_grace_hour_moves_to_the_current_cycle(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub, previous, current = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=30))
    meter.fail_next(429)  # Stripe never took it
    report(
        client, org["id"], "stuck", call_duration_minutes=4, ended_at=at(NOW - timedelta(hours=1))
    )
    assert flush(client)["pending"] == 1
    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [4, 0]
    # The grace hour ends while it waits.
    db.execute(
        "update billing_cycles set period_end = period_end - interval '1 hour' where id = %s",
        (previous["id"],),
    )
    db.execute(
        "update usage_records set meter_next_attempt_at = now() where organisation_id = %s",
        (org["id"],),
    )

    flush(client)

    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [0, 4]  # counted once
    row = usage_row(db, org["id"], "stuck")
    assert row["late"] and row["billing_cycle_id"] == current["id"]
    assert row["meter_status"] == "sent" and row["metered_at"] > row["ended_at"]
    identifier = identifier_for(org["id"], "stuck")
    assert int(meter.events[identifier]["timestamp"]) >= int(row["metered_at"].timestamp())
    assert audit(db, org["id"], "usage.late")[0]["details"]["from_cycle"] == str(previous["id"])


def test_an_unknown_outcome_past_the_grace_hour_is_unconfirmed_not_resent(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub, previous, _ = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=30))
    meter.fail_next("timeout")  # Stripe may have it
    report(client, org["id"], "maybe", ended_at=at(NOW - timedelta(hours=1)))
    assert flush(client)["pending"] == 1
    assert usage_row(db, org["id"], "maybe")["meter_outcome_unknown_at"] is not None
    db.execute(
        "update billing_cycles set period_end = period_end - interval '1 hour' where id = %s",
        (previous["id"],),
    )
    db.execute(
        "update usage_records set meter_next_attempt_at = now() where organisation_id = %s",
        (org["id"],),
    )
    sent_before = meter.sent(identifier_for(org["id"], "maybe"))

    flush(client)

    row = usage_row(db, org["id"], "maybe")
    assert row["meter_status"] == "unconfirmed" and "reconcil" in row["meter_error"]
    assert meter.sent(identifier_for(org["id"], "maybe")) == sent_before
    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [2, 0]


@pytest.mark.parametrize(("failure", "resent"), [("timeout", False), (500, False), (429, True)])
def test_after_23_hours_only_an_event_stripe_surely_lacks_is_resent(
    client, meter, db, subscribed, failure, resent
):
    org = subscribed["org"]
    meter.fail_next(failure)
    report(client, org["id"], "day-old")
    assert flush(client)["pending"] == 1
    db.execute(
        "update usage_records set meter_next_attempt_at = now(),"
        " meter_outcome_unknown_at = meter_outcome_unknown_at - interval '23 hours'"
        " where organisation_id = %s",
        (org["id"],),
    )

    flush(client)

    row = usage_row(db, org["id"], "day-old")
    assert row["meter_status"] == ("sent" if resent else "unconfirmed")
    assert meter.sent(identifier_for(org["id"], "day-old")) == (2 if resent else 1)


def test_a_process_killed_mid_attempt_leaves_the_outcome_unknown(client, meter, db, subscribed):
    org = subscribed["org"]
    row = db.execute(
        "select public.record_usage(%s, 'killed', 61, null, 30) as result", (org["id"],)
    ).fetchone()
    assert row["result"]["meter"]["attempt"] == 1  # claimed; the process dies before sending
    claimed = usage_row(db, org["id"], "killed")
    db.execute(
        "update usage_records set meter_next_attempt_at = now() where id = %s", (claimed["id"],)
    )

    flush(client)

    row = usage_row(db, org["id"], "killed")
    assert row["meter_status"] == "sent"
    assert row["meter_outcome_unknown_at"] == claimed["meter_claimed_at"]


def requeue(db: Any, **params: Any) -> dict[str, Any]:
    args = {"p_organisation_id": None, "p_since": None, "p_dry_run": False, **params}
    result: dict[str, Any] = db.execute(
        "select public.requeue_failed_usage(p_organisation_id => %(p_organisation_id)s,"
        " p_since => %(p_since)s, p_dry_run => %(p_dry_run)s) as r",
        args,
    ).fetchone()["r"]
    return result


def test_requeue_puts_failed_usage_back_once_its_cause_is_fixed(
    client, meter, db, customer_org, make_plan, subscribe
):
    org, plan = customer_org(), make_plan()
    sub, previous, current = two_periods(org, plan, subscribe, db, ended_ago=timedelta(minutes=20))
    refusal = invalid_field("events[0][payload][stripe_customer_id]", "No such customer: 'cus_x'")
    meter.fail_next(refusal, refusal)
    report(client, org["id"], "now", ended_at=at(NOW))
    assert flush(client)["failed"] == 1
    report(client, org["id"], "before", ended_at=at(previous["period_end"] - timedelta(hours=1)))
    assert flush(client)["failed"] == 1
    db.execute(
        "update billing_cycles set stripe_invoice_id = 'in_2' where id = %s", (previous["id"],)
    )
    assert {usage_row(db, org["id"], c)["meter_status"] for c in ("now", "before")} == {"failed"}

    dry = requeue(db, p_organisation_id=org["id"], p_dry_run=True)
    assert sorted(r["outcome"] for r in dry["rows"]) == ["late", "pending"]
    assert usage_row(db, org["id"], "now")["meter_status"] == "failed"  # nothing changed

    done = requeue(db, p_organisation_id=org["id"])
    assert (done["requeued"], done["late"]) == (1, 1)
    assert requeue(db, p_organisation_id=org["id"])["rows"] == []  # twice changes nothing

    now, before = usage_row(db, org["id"], "now"), usage_row(db, org["id"], "before")
    assert now["meter_status"] == before["meter_status"] == "pending"
    assert now["meter_identifier"] != identifier_for(org["id"], "now")  # a new identifier
    assert before["late"] and before["billing_cycle_id"] == current["id"]
    assert [c["minutes_used"] for c in cycles_of(db, sub["id"])] == [0, 4]
    assert len(audit(db, org["id"], "usage.requeued")) == 2

    flush(client)
    assert usage_row(db, org["id"], "now")["meter_status"] == "sent"
    assert usage_row(db, org["id"], "before")["meter_status"] == "sent"
    assert meter.events[now["meter_identifier"]]["payload[value]"] == "2"


def test_requeue_filters_by_organisation_and_date(
    client, meter, db, customer_org, make_plan, subscribe
):
    orgs = [customer_org(), customer_org()]
    for org in orgs:
        subscribe(org, make_plan())
        meter.fail_next(invalid_field("events[0][payload][value]", "must be an integer."))
        report(client, org["id"], "refused", ended_at=at(NOW - timedelta(days=2)))
        assert flush(client)["failed"] == 1

    later = (NOW - timedelta(days=1)).date().isoformat()
    assert requeue(db, p_organisation_id=orgs[0]["id"], p_since=later, p_dry_run=True)["rows"] == []
    [row] = requeue(db, p_organisation_id=orgs[0]["id"])["rows"]
    assert row["call_id"] == "refused" and row["organisation_id"] == str(orgs[0]["id"])
    assert usage_row(db, orgs[1]["id"], "refused")["meter_status"] == "failed"


def test_a_requeued_call_and_a_call_named_like_its_requeue_are_two_events(
    client, meter, db, subscribed
):
    org = subscribed["org"]
    refusal = invalid_field("events[0][payload][stripe_customer_id]", "No such customer: 'cus_x'")
    meter.fail_next(refusal)
    report(client, org["id"], "X", ended_at=at(NOW))
    assert flush(client)["failed"] == 1
    assert requeue(db, p_organisation_id=org["id"])["requeued"] == 1
    report(client, org["id"], "X:requeue:1", ended_at=at(NOW))

    requeued, lookalike = usage_row(db, org["id"], "X"), usage_row(db, org["id"], "X:requeue:1")
    assert requeued["meter_identifier"] != lookalike["meter_identifier"]
    assert lookalike["meter_identifier"] == identifier_for(org["id"], "X:requeue:1")
    assert requeued["meter_previous_identifier"] == identifier_for(org["id"], "X")
    assert flush(client)["sent"] == 2
    assert {requeued["meter_identifier"], lookalike["meter_identifier"]} <= meter.events.keys()
    assert usage_row(db, org["id"], "X")["meter_status"] == "sent"
