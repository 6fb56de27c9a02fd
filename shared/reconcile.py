"""Reconciliation: each billing cycle checked against Stripe; with repair, what can be mended is.

The comparison is shared/drift.py, Stripe's reads shared/meter_reads.py; this module runs them
for each cycle and mends what a repair may.

Per cycle (each part of a split period is a cycle of its own, with its own window):

    usage_minutes     our usage rows counted in the cycle (billing_cycle_id), every status
    cycle_minutes     the cycle's minutes_used
    stripe_minutes    Stripe's meter event summary for the cycle's customer over its window
    invoiced_minutes  once invoiced: the quantity of the invoice's lines of the cycle's metered
                      price for its period (None before, or when Stripe no longer has it)

The window is the period widened to whole minutes (summaries take start_time and end_time on
minute boundaries): its start floored, its end ceiled, so that it holds the whole period. Both
sides count that window: Stripe the events whose timestamp falls in it, we the customer's rows
whose metered_at does (the timestamp their event carries; a late row's is the moment it was
counted, in the current cycle), whichever cycle they belong to, so both count the same events.

A row's kind (sql/0061 private.usage_kind): sent; recent (sent less than SETTLE ago: summaries are
eventually consistent); owed (unconfirmed, or failed after an attempt of unknown outcome: at Stripe
or not, owed to it exactly once); refused (failed); in_flight (pending with an attempt under way or
of unknown outcome: the outbox resends the same identifier, which Stripe dedupes); on_the_way
(pending, never sent). Over the window:

    expected = sent + recent + owed + credited   (credited: minutes earlier runs reported for credit)
    Stripe agrees when  expected - recent <= stripe_minutes <= expected + in_flight,
    exactly equal when the window is settled (nothing recent, nothing in flight).

A cycle AGREES when all of these hold, and is in DRIFT otherwise:
    books     usage_minutes == cycle_minutes
    stripe    as above
    refused   no refused row is counted in the cycle (we show minutes Stripe will not bill)
    stranded  no pending row is counted in a cycle Stripe no longer bills (invoiced, grace over)
    placed    every row counted in the cycle is metered within its period (else Stripe bills it
              in another period)
    invoiced  once invoiced: invoiced_minutes == cycle_minutes + credited
Pending rows on their way (the outbox delivers them, Stripe down or not) disagree with nothing.

Repair (only on a settled window for what depends on Stripe's figure; else "settling"):
    missing   Stripe lacks M = expected - stripe_minutes: rows whose minutes sum to exactly M are
              sent again under a new identifier, first rows sent during an error report's
              validation window, then owed rows, then any sent row. Within a window minutes are
              fungible (one customer, one price, one period): which rows go again does not change
              what Stripe bills. A row whose period Stripe no longer bills is counted late
              instead (private.count_late). No set sums to M: reported, never guessed.
    owed      Stripe's figure holds them (the rest, once the missing are chosen): marked sent.
    stray     Stripe holds more than expected + in_flight: our own events that reconciliation
              re-sent and Stripe received less than 24 h ago, when their minutes sum to exactly
              the excess, are canceled (meter event adjustment); otherwise the excess is reported
              with the amount to credit: the overage it adds at the cycle's rate (rate x minutes
              once over the included minutes), for a person to credit. Never negative usage.
    refused   sent again under a new identifier (or counted late); a cause not fixed refuses them
              again and the next run says so.
    stranded  counted late.
    books, placed: reported only.
A cycle is then `repaired` when every drift got its remedy (a credit reported counts, and makes
the run exit 1 once, for the person who issues it), `drift` otherwise.

Two runs at once never both check a cycle: each holds a lease on it from begin_reconciliation to
finish_reconciliation (the other says `busy`), and a row a repair names is changed only if it is
still as compared. An organisation's newest cycle is checked first: repairs of older ones count
usage late into it, and those events would still be settling at Stripe when it is compared.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from shared.db import Database
from shared.drift import (
    SETTLE,
    Check,
    Drift,
    Snapshot,
    StripeSide,
    Usage,
    compare,
    overage_cents,
    total,
)
from shared.meter_events import MeterEvent, deliver
from shared.meter_reads import Sleep, find_meter, invoiced_minutes, summary_minutes
from shared.settings import Settings
from shared.stripe_lib import stripe

LEASE_SECONDS = 600


# ------------------------------------------------------------------ a run


@dataclass
class CycleResult:
    """What a run did with one cycle, for the operator's line."""

    cycle: dict[str, Any]
    status: str  # agree | drift | repaired | busy (another run holds it)
    check: Check | None = None
    repairs: list[dict[str, Any]] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)
    invoice_note: str | None = None


def reconcile(
    database: Database,
    client: stripe.StripeClient,
    settings: Settings,
    *,
    organisation_id: str | None = None,
    since: str | None = None,
    repair: bool = False,
    dry_run: bool = False,
    settle: timedelta = SETTLE,
    sleep: Sleep = time.sleep,
) -> Iterator[CycleResult]:
    """Check every cycle `reconciliation_cycles` names, one after the other (see the docstring)."""
    cycles: list[dict[str, Any]] = database.call(
        "reconciliation_cycles", p_organisation_id=organisation_id, p_since=since
    )
    if not cycles:
        return
    meter = find_meter(client, settings.STRIPE_METER_EVENT_NAME, sleep)
    for cycle in cycles:
        begun = database.call(
            "begin_reconciliation",
            p_cycle_id=cycle["id"],
            p_settle_seconds=int(settle.total_seconds()),
            p_lease_seconds=LEASE_SECONDS,
            p_claim=not dry_run,
        )
        if not begun["claimed"] and not dry_run:
            yield CycleResult(cycle, "busy")
            continue
        snapshot = Snapshot.of(begun)
        try:
            side = StripeSide(summary_minutes(client, meter, snapshot.cycle, sleep))
            invoiced, note = invoiced_minutes(client, database, snapshot.cycle, sleep)
            side = StripeSide(side.minutes, invoiced, note)
            check = compare(snapshot, side)
            if repair and not dry_run:
                cancel_events(client, settings, snapshot, check)
        except BaseException:
            if snapshot.token:
                database.call(
                    "release_reconciliation", p_cycle_id=cycle["id"], p_token=snapshot.token
                )
            raise
        yield finish(database, client, settings, snapshot, check, side, repair, dry_run)


def cancel_events(
    client: stripe.StripeClient, settings: Settings, snapshot: Snapshot, check: Check
) -> None:
    """Cancel at Stripe the re-sent events a stray drift names; one Stripe refuses (its 24 h are
    over) is reported for credit instead."""
    by_id = {row.id: row for row in snapshot.rows}
    for index, drift in enumerate(check.drifts):
        if drift.kind != "stray" or not drift.mend or drift.mend[0]["action"] != "cancel":
            continue
        refused: list[Usage] = []
        for repair in drift.mend:
            row = by_id[repair["usage_record_id"]]
            try:
                client.v1.billing.meter_event_adjustments.create(
                    params={
                        "event_name": settings.STRIPE_METER_EVENT_NAME,
                        "type": "cancel",
                        "cancel": {"identifier": str(row.identifier)},
                    },
                    options={"idempotency_key": f"cancel-{row.identifier}"},
                )
            except stripe.InvalidRequestError:
                refused.append(row)
        if refused:
            minutes = Decimal(total(refused))
            cents = overage_cents(snapshot.cycle, check.figures["expected"], minutes)
            kept = [r for r in drift.mend if by_id[r["usage_record_id"]] not in refused]
            credit = {"action": "credit", "minutes": int(minutes), "cents": cents, "why": "stray"}
            check.drifts[index] = Drift(
                drift.kind,
                drift.text,
                [*kept, credit],
                f"{drift.remedy}; report {cents} cents to credit (Stripe refused the cancel)",
            )


def finish(
    database: Database,
    client: stripe.StripeClient,
    settings: Settings,
    snapshot: Snapshot,
    check: Check,
    side: StripeSide,
    repair: bool,
    dry_run: bool,
) -> CycleResult:
    """Record the check (and apply its repairs, delivering the events they requeued)."""
    status = check.status(repair=repair)
    planned = check.repairs if repair else []
    result = CycleResult(snapshot.cycle, status, check, planned, invoice_note=side.invoice_note)
    if dry_run:
        return result
    figures = check.figures
    report = {
        "status": status,
        "usage_minutes": figures["usage_minutes"],
        "cycle_minutes": figures["cycle_minutes"],
        "stripe_minutes": int(figures["stripe_minutes"].to_integral_value(ROUND_HALF_UP)),
        "invoiced_minutes": figures["invoiced_minutes"],
        "details": {
            "window": [snapshot.cycle["window_start"], snapshot.cycle["window_end"]],
            "stripe_minutes_exact": str(figures["stripe_minutes"]),
            "expected": str(figures["expected"]),
            "settling": figures["settling"],
            "credited_before": str(figures["credited"]),
            "by_status": figures["by_status"],
            "drifts": [
                {"kind": d.kind, "text": d.text, "remedy": d.remedy, "mendable": d.mend is not None}
                for d in check.drifts
            ],
            "invoice_id": snapshot.cycle["stripe_invoice_id"],
            "invoice_note": side.invoice_note,
        },
    }
    done = database.call(
        "finish_reconciliation",
        p_cycle_id=snapshot.cycle["id"],
        p_token=snapshot.token,
        p_report=report,
        p_repairs=planned,
        p_lease_seconds=LEASE_SECONDS,
    )
    result.status, result.repairs = str(done["status"]), list(done["repairs"])
    for event in done["events"]:
        outcome = deliver(database, client, settings, MeterEvent(**event))
        result.delivered[outcome] = result.delivered.get(outcome, 0) + 1
    return result
