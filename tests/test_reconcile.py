"""./deploy.sh reconcile: each cycle's rows, totals, Stripe's meter event summaries and invoice
compared (shared/reconcile.py defines agree and drift), --repair mending what can be mended, on a
real Postgres with Stripe through respx (FakeStripe, Stripe's shapes)."""

# The fixtures come from test_meter_errors and test_report_usage by name.
# ruff: noqa: F811

from __future__ import annotations

import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ops import reconcile as ops_reconcile
from shared.db import get_database
from shared.drift import Usage, pick
from shared.reconcile import reconcile
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from tests.test_deploy import deploy
from tests.test_meter_errors import (  # noqa: F401
    FakeStripe,
    deliver_thin,
    error_report,
    fake_stripe,
    notification,
    webhook,
)
from tests.test_report_usage import (  # noqa: F401
    NOW,
    at,
    client,
    customer_org,
    flush,
    month_after,
    report,
    subscribe,
    usage_row,
)
from tests.test_webhook_support import invoice_object


@pytest.fixture(autouse=True)
def park_leftovers(db: Any) -> Any:
    """Pending rows left by these tests are parked: the session's database is shared, and a later
    test's flush must not deliver them to its own meter."""
    started = db.execute("select clock_timestamp() as t").fetchone()["t"]
    yield
    db.execute(
        "update usage_records set meter_next_attempt_at = 'infinity'"
        " where meter_status = 'pending' and created_at >= %s",
        (started,),
    )


def run(capsys: Any, org: dict[str, Any], *flags: str) -> tuple[int, list[str]]:
    """`reconcile --org ORG [flags]` as deploy.sh runs it: its exit status and its lines."""
    status = ops_reconcile.main(["--org", str(org["id"]), *flags])
    return status, capsys.readouterr().out.splitlines()


def an_hour_passes(db: Any, org: dict[str, Any]) -> None:
    """Stripe's summaries have caught up with everything sent (SETTLE is 15 minutes)."""
    db.execute(
        "update usage_records set meter_sent_at = meter_sent_at - interval '1 hour',"
        " meter_resent_at = meter_resent_at - interval '1 hour' where organisation_id = %s",
        (org["id"],),
    )


def call(client: Any, db: Any, org: dict[str, Any], minutes: int, ended: datetime) -> dict:
    """One call reported and its meter event flushed at once (Stripe's answer decides whether
    it is sent, failed or still pending): its row."""
    call_id = f"call-{minutes}-{uuid.uuid4().hex[:6]}"
    report(client, org["id"], call_id, call_duration_minutes=minutes, ended_at=at(ended))
    assert flush(client)["requests"] == 1
    row: dict[str, Any] = usage_row(db, org["id"], call_id)
    return row


def latest(db: Any, cycle_id: Any) -> dict[str, Any]:
    row: dict[str, Any] = db.execute(
        "select * from reconciliations where billing_cycle_id = %s and source = 'reconcile'"
        " order by id desc limit 1",
        (cycle_id,),
    ).fetchone()
    return row


def line_of(lines: list[str], cycle: dict[str, Any]) -> str:
    start = cycle["period_start"].astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    [found] = [line for line in lines if f" {start}.." in line]
    return found


class Storm:
    """One organisation through a storm. Its previous cycle P (invoiced): two calls Stripe took
    (4 and 5 min), one it never got (6 min, Stripe down at the period's end), and a stray event
    of 3 min that is not ours. Its current cycle C: two calls Stripe took (1, 2), five it took and
    then rejected asynchronously (3..7, an error report sampling the 3 and the 4), one it lost
    outright (20), two still pending (10, 11: Stripe down for a stretch). The plan includes 5
    minutes, then 50 cents a minute."""

    def __init__(self, client, webhook, fake, db, customer_org, make_plan, subscribe) -> None:
        self.db, self.fake = db, fake
        self.org = org = customer_org()
        self.plan = plan = make_plan(included_minutes=5, overage_rate_cents=50)
        boundary = NOW - timedelta(days=10)
        self.sub = sub = subscribe(
            org, plan, start=NOW - timedelta(days=40), end=NOW + timedelta(days=1)
        )
        p_day = boundary - timedelta(days=2)
        self.p_ok = [call(client, db, org, n, p_day) for n in (4, 5)]
        fake.meter.fail_next(429)
        self.p_down = call(client, db, org, 6, p_day)
        # The period ended 10 days ago and was invoiced with what Stripe held then.
        db.execute(
            "update subscriptions set current_period_start = %s, current_period_end = %s"
            " where id = %s",
            (boundary, month_after(boundary), sub["id"]),
        )
        invoice_id = f"in_{uuid.uuid4().hex[:14]}"
        self.P = db.execute(
            "update billing_cycles set period_end = %s, status = 'closed', stripe_invoice_id = %s,"
            " stripe_metered_price_id = %s where subscription_id = %s returning *",
            (boundary, invoice_id, plan["stripe_metered_price_id"], sub["id"]),
        ).fetchone()
        self.C = db.execute(
            "insert into billing_cycles (organisation_id, subscription_id, period_start,"
            " period_end, included_minutes, overage_rate_cents, stripe_metered_price_id)"
            " values (%s, %s, %s, %s, 5, 50, %s) returning *",
            (
                org["id"],
                sub["id"],
                boundary,
                month_after(boundary),
                plan["stripe_metered_price_id"],
            ),
        ).fetchone()
        customer = org["stripe_customer_id"]
        fake.strays.append(
            {"customer": customer, "timestamp": int(p_day.timestamp()) + 60, "value": 3}
        )
        start, end = int(self.P["period_start"].timestamp()), int(boundary.timestamp())
        invoice = invoice_object(
            invoice_id,
            sub["stripe_subscription_id"],
            customer,
            billed=(start, end),
            created=end + 3600,
            metered_price=plan["stripe_metered_price_id"],
        )
        invoice["lines"]["data"][0]["quantity"] = 12  # 4 + 5 + the stray 3
        fake.invoices[invoice_id] = invoice

        c_day = NOW - timedelta(days=1)
        self.c_ok = [call(client, db, org, n, c_day) for n in (1, 2)]
        self.rejected = [call(client, db, org, n, c_day) for n in (3, 4, 5, 6, 7)]
        self.lost = call(client, db, org, 20, c_day)
        fake.meter.fail_next(429, 429)
        self.down = [call(client, db, org, n, c_day) for n in (10, 11)]
        fake.dropped |= {r["meter_identifier"] for r in [*self.rejected, self.lost]}
        event = error_report(
            fake, [(r["meter_identifier"], customer) for r in self.rejected[:2]], errors=5
        )
        assert deliver_thin(webhook, notification(event)).status_code == 200
        an_hour_passes(db, org)

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        return usage_row(self.db, self.org["id"], row["call_id"])


@pytest.fixture
def storm(client, webhook, fake_stripe, db, customer_org, make_plan, subscribe) -> Storm:
    return Storm(client, webhook, fake_stripe, db, customer_org, make_plan, subscribe)


def test_reconcile_reports_exactly_the_storms_drift(storm, db, capsys):
    status, lines = run(capsys, storm.org)

    assert status == 1
    assert lines[-1] == "2 cycles: 2 drift"
    p_line, c_line = line_of(lines, storm.P), line_of(lines, storm.C)
    assert c_line.startswith(f"drift    organisation {storm.org['id']} (Acme Voice) ")
    assert (
        "ours 69 min (sent 41, pending 21, unconfirmed 0, failed 7), cycle 69,"
        " Stripe 3 (expected 41), invoiced -" in c_line
    )
    assert "Stripe lacks 38 min of ours (mend: send 4 rows again under new identifiers)" in c_line
    assert "Stripe refused 7 min (2 rows) (mend: send them again under new identifiers)" in c_line
    assert "ours 15 min (sent 9, pending 6, unconfirmed 0, failed 0), cycle 15," in p_line
    assert "Stripe 12 (expected 9), invoiced 12" in p_line
    assert (
        "Stripe holds 3 min more than our rows (mend: report 150 cents to credit, not ours)"
        in p_line
    )
    assert "6 min (1 row) still pending in a period Stripe no longer bills" in p_line
    assert (
        "the invoice bills 12 min, the cycle counts 15 (mend: follows from the repairs above)"
        in p_line
    )
    c, p = latest(db, storm.C["id"]), latest(db, storm.P["id"])
    assert (c["status"], c["usage_minutes"], c["cycle_minutes"], c["stripe_minutes"]) == (
        "drift",
        69,
        69,
        3,
    )
    assert c["invoiced_minutes"] is None and c["details"]["expected"] == "41"
    assert {d["kind"] for d in c["details"]["drifts"]} == {"missing", "refused"}
    assert (p["status"], p["stripe_minutes"], p["invoiced_minutes"]) == ("drift", 12, 12)
    assert {d["kind"] for d in p["details"]["drifts"]} == {"stray", "stranded", "invoiced"}
    # Nothing was changed: no repair without --repair.
    assert storm.row(storm.lost)["meter_identifier"] == storm.lost["meter_identifier"]
    assert storm.row(storm.p_down)["meter_status"] == "pending"
    assert not db.execute(
        "select 1 from audit_log where organisation_id = %s and action = 'reconciliation.repair'",
        (storm.org["id"],),
    ).fetchall()
    # The windows asked about: each period widened to whole minutes.
    for request, cycle in zip(storm.fake.summary_requests, (storm.C, storm.P), strict=True):
        start, end = cycle["period_start"].timestamp(), cycle["period_end"].timestamp()
        assert int(request["start_time"]) == math.floor(start / 60) * 60
        assert int(request["end_time"]) == math.ceil(end / 60) * 60
        assert request["customer"] == storm.org["stripe_customer_id"]


def test_repair_mends_the_storm_and_the_next_run_agrees(storm, db, capsys):
    status, lines = run(capsys, storm.org, "--repair")

    assert status == 1, lines  # a credit was reported: a person must issue it
    assert lines[-1] == "2 cycles: 2 repaired; credits to issue (see above)"
    c_line, p_line = line_of(lines, storm.C), line_of(lines, storm.P)
    assert c_line.startswith("repaired ")
    assert "=> re-sent 6 rows (45 min); delivered: 6 sent" in c_line
    assert "=> counted late 1 row (6 min); to credit 150 cents (3 min not ours);" in p_line
    assert "delivered: 1 sent" in p_line
    # Each missing or refused row went again under a new identifier, in its own cycle.
    for before in [*storm.rejected, storm.lost]:
        after = storm.row(before)
        assert after["meter_status"] == "sent" and after["billing_cycle_id"] == storm.C["id"]
        assert after["meter_identifier"] != before["meter_identifier"]
        assert storm.fake.meter.events[after["meter_identifier"]]["payload[value]"] == str(
            before["billed_minutes"]
        )
    late = storm.row(storm.p_down)
    assert late["late"] and late["billing_cycle_id"] == storm.C["id"]
    assert late["meter_status"] == "sent" and late["metered_at"] > NOW
    for untouched in [*storm.c_ok, *storm.p_ok]:
        assert storm.row(untouched)["meter_identifier"] == untouched["meter_identifier"]
    assert [storm.row(r)["meter_status"] for r in storm.down] == ["pending", "pending"]
    cycles = {
        c["id"]: c["minutes_used"]
        for c in db.execute(
            "select id, minutes_used from billing_cycles where subscription_id = %s",
            (storm.sub["id"],),
        )
    }
    assert cycles == {storm.P["id"]: 9, storm.C["id"]: 75}
    repairs = db.execute(
        "select details from audit_log where organisation_id = %s"
        " and action = 'reconciliation.repair' order by id",
        (storm.org["id"],),
    ).fetchall()
    assert sorted(r["details"]["outcome"] for r in repairs) == [
        "credited",
        "late",
        *["pending"] * 6,
    ]
    credit = next(r["details"] for r in repairs if r["details"]["action"] == "credit")
    assert (credit["minutes"], credit["cents"]) == (3, 150)
    assert latest(db, storm.P["id"])["details"]["credited_minutes"] == 3

    status, lines = run(capsys, storm.org)

    assert status == 0, lines
    assert lines[-1] == "2 cycles: 2 agree"
    assert "Stripe 54 (expected 54)" in line_of(lines, storm.C)
    assert "Stripe 12 (expected 12, 3 of them reported for credit), invoiced 12" in line_of(
        lines, storm.P
    )
    assert latest(db, storm.C["id"])["status"] == "agree"


def test_the_error_report_fails_its_samples_and_reconcile_finds_the_rest(
    client, webhook, fake_stripe, db, customer_org, make_plan, subscribe, capsys
):
    org = customer_org()
    subscribe(org, make_plan())
    ended = NOW - timedelta(hours=3)
    rows = [call(client, db, org, n, ended) for n in (2, 3, 5, 8)]
    fake_stripe.dropped |= {row["meter_identifier"] for row in rows}
    event = error_report(
        fake_stripe,
        [(row["meter_identifier"], org["stripe_customer_id"]) for row in rows[:2]],
        errors=4,
    )
    assert deliver_thin(webhook, notification(event)).status_code == 200
    an_hour_passes(db, org)

    status, lines = run(capsys, org)

    assert status == 1
    [line] = lines[:-1]
    assert "Stripe 0 (expected 13)" in line  # the unsampled 5 and 8
    assert "Stripe lacks 13 min of ours" in line and "Stripe refused 5 min (2 rows)" in line
    assert [usage_row(db, org["id"], r["call_id"])["meter_status"] for r in rows] == [
        "failed",
        "failed",
        "sent",
        "sent",
    ]

    status, lines = run(capsys, org, "--repair")
    assert status == 0 and "re-sent 4 rows (18 min)" in lines[0]
    assert run(capsys, org)[0] == 0


def test_unconfirmed_rows_are_settled_from_the_summary(
    client, fake_stripe, db, customer_org, make_plan, subscribe, capsys
):
    org = customer_org()
    subscribe(org, make_plan())
    ended = NOW - timedelta(hours=30)
    held, lacking, _ = (call(client, db, org, n, ended) for n in (4, 7, 1))
    fake_stripe.dropped.add(lacking["meter_identifier"])  # its attempt never reached Stripe
    db.execute(
        "update usage_records set meter_status = 'unconfirmed', meter_sent_at = null,"
        " meter_outcome_unknown_at = now() - interval '25 hours' where id in (%s, %s)",
        (held["id"], lacking["id"]),
    )
    an_hour_passes(db, org)

    status, lines = run(capsys, org, "--dry-run", "--repair")
    assert status == 1
    assert "Stripe 5 (expected 12)" in lines[0] and "would re-send 1 row (7 min)" in lines[0]
    assert "would settle as sent 1 row (4 min)" in lines[0]
    assert usage_row(db, org["id"], lacking["call_id"])["meter_status"] == "unconfirmed"
    assert not db.execute(
        "select 1 from reconciliations where organisation_id = %s", (org["id"],)
    ).fetchall()

    status, lines = run(capsys, org, "--repair")

    assert status == 0, lines
    after_held = usage_row(db, org["id"], held["call_id"])
    assert after_held["meter_status"] == "sent"
    assert after_held["meter_identifier"] == held["meter_identifier"]  # never sent twice
    after_lacking = usage_row(db, org["id"], lacking["call_id"])
    assert after_lacking["meter_status"] == "sent"
    assert after_lacking["meter_identifier"] != lacking["meter_identifier"]
    assert fake_stripe.meter.sent(held["meter_identifier"]) == 1
    assert run(capsys, org)[0] == 0


def test_our_own_resent_event_counted_twice_is_canceled_within_24_hours(
    client, fake_stripe, db, customer_org, make_plan, subscribe, capsys
):
    org = customer_org()
    subscribe(org, make_plan())
    row = call(client, db, org, 9, NOW - timedelta(hours=5))
    fake_stripe.dropped.add(row["meter_identifier"])
    an_hour_passes(db, org)
    assert run(capsys, org, "--repair")[0] == 0
    resent = usage_row(db, org["id"], row["call_id"])
    # Stripe's summary was only late: the first event shows up after all, counted twice.
    fake_stripe.dropped.discard(row["meter_identifier"])
    an_hour_passes(db, org)

    status, lines = run(capsys, org, "--repair")

    assert status == 0, lines
    assert "Stripe holds 9 min more than our rows" in lines[0]
    assert "canceled at Stripe 1 row (9 min)" in lines[0]
    assert fake_stripe.canceled == [resent["meter_identifier"]]
    assert usage_row(db, org["id"], row["call_id"])["meter_identifier"] == row["meter_identifier"]
    assert run(capsys, org)[0] == 0


def test_a_split_cycle_is_checked_part_by_part(
    client, fake_stripe, db, customer_org, make_plan, subscribe, capsys
):
    org = customer_org()
    sub = subscribe(org, make_plan())
    change = NOW - timedelta(days=3, seconds=17)
    first = call(client, db, org, 4, change - timedelta(hours=1))
    second = call(client, db, org, 6, change + timedelta(hours=1))
    [part] = db.execute(
        "select * from billing_cycles where subscription_id = %s", (sub["id"],)
    ).fetchall()
    db.execute(
        "update billing_cycles set period_end = %s, status = 'closed', closed_by_change = true,"
        " minutes_used = 4 where id = %s",
        (change, part["id"]),
    )
    later = db.execute(
        "insert into billing_cycles (organisation_id, subscription_id, period_start, period_end,"
        " included_minutes, overage_rate_cents, minutes_used) values (%s, %s, %s, %s, 100, 40, 6)"
        " returning *",
        (org["id"], sub["id"], change, part["period_end"]),
    ).fetchone()
    db.execute(
        "update usage_records set billing_cycle_id = %s where id = %s", (later["id"], second["id"])
    )
    an_hour_passes(db, org)

    status, lines = run(capsys, org)

    assert status == 0, lines
    assert "Stripe 4 (expected 4)" in line_of(lines, part)
    assert "Stripe 6 (expected 6)" in line_of(lines, later)
    windows = [(int(r["start_time"]), int(r["end_time"])) for r in fake_stripe.summary_requests]
    cut = change.timestamp()
    assert windows == [
        (math.floor(cut / 60) * 60, math.ceil(later["period_end"].timestamp() / 60) * 60),
        (math.floor(part["period_start"].timestamp() / 60) * 60, math.ceil(cut / 60) * 60),
    ]
    assert first["meter_status"] == "sent"


def test_stripes_read_rate_limit_is_waited_out(
    client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    call(client, db, org, 2, NOW - timedelta(hours=2))
    an_hour_passes(db, org)
    fake_stripe.throttle = 2
    slept: list[float] = []
    settings = get_settings()

    [result] = reconcile(
        get_database(settings),
        make_stripe_client(settings),
        settings,
        organisation_id=str(org["id"]),
        sleep=slept.append,
    )

    assert result.status == "agree" and slept == [1.0, 2.0]
    assert len(fake_stripe.summary_requests) == 3


def test_two_runs_at_once_repair_once(client, fake_stripe, db, customer_org, make_plan, subscribe):
    org = customer_org()
    subscribe(org, make_plan())
    rows = [call(client, db, org, n, NOW - timedelta(hours=2)) for n in (2, 3)]
    fake_stripe.dropped |= {row["meter_identifier"] for row in rows}
    an_hour_passes(db, org)
    settings = get_settings()

    def one(_: int) -> list[str]:
        results = reconcile(
            get_database(settings),
            make_stripe_client(settings),
            settings,
            organisation_id=str(org["id"]),
            repair=True,
        )
        return [result.status for result in results]

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(s for run_ in pool.map(one, range(2)) for s in run_)

    assert statuses in (["busy", "repaired"], ["agree", "repaired"])
    for row in rows:
        after = usage_row(db, org["id"], row["call_id"])
        assert (
            after["meter_requeues"] == 1 and fake_stripe.meter.sent(after["meter_identifier"]) == 1
        )


def test_pick_takes_rows_summing_exactly_from_the_front():
    def rows(*minutes: int) -> list[Usage]:
        return [
            Usage(str(i), str(i), m, "sent", "sent", f"mb_{i}", True, True, True, True, None, False)
            for i, m in enumerate(minutes)
        ]

    candidates = rows(5, 6, 7, 20, 1, 2)
    assert [r.minutes for r in pick(candidates, 38) or []] == [5, 6, 7, 20]  # a whole front
    assert sorted(r.minutes for r in pick(candidates, 28) or []) == [1, 7, 20]
    assert sorted(r.minutes for r in pick(candidates, 22) or []) == [2, 20]
    assert pick(candidates, 0) == [] and pick(rows(4, 4), 3) is None
    assert [r.minutes for r in pick(rows(3, 1, 2), 3) or []] == [3]


def test_deploy_sh_takes_reconciles_own_options_and_refuses_others():
    assert "--repair takes no value" in deploy("reconcile", "--repair=yes").stderr
    refused = deploy("reconcile", "--fix")
    assert refused.returncode == 2
    assert "reconcile does not take the option --fix (it takes: --org ID, --since" in refused.stderr
    missing = deploy("reconcile", "--repair")
    assert missing.returncode == 2 and "DATABASE_URL is not set" in missing.stderr
    assert "reconcile [--org ID]" in deploy("help").stdout
