"""Reconciliation: each billing cycle checked against Stripe; with repair, what can be mended is.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from typing import Any, TypeVar

import stripe
from stripe.params.billing import MeterEventSummaryListParams, MeterListParams

from shared.db import Database
from shared.errors import BillingError, NotFound
from shared.invoices import fetch_invoice, invoice_missing
from shared.settings import Settings
from shared.usage import MeterEvent, deliver

SETTLE = timedelta(minutes=15)
LEASE_SECONDS = 600
PAGE = 100
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each retry of a read Stripe rate-limited
ERROR_WINDOW_MARGIN = 60  # seconds around an error report's validation window
PICK_BUDGET_BITS = 200_000_000  # the subset-sum table's size limit (25 MB)

T = TypeVar("T")
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Usage:
    """A usage row as begin_reconciliation describes it."""

    id: str
    call_id: str
    minutes: int
    status: str
    kind: str
    identifier: str | None
    in_window: bool
    in_cycle: bool
    in_period: bool
    billable: bool
    sent_at: float | None
    cancellable: bool

    def repair(self, action: str, why: str) -> dict[str, Any]:
        """The repair of this row for finish_reconciliation (it checks the row is unchanged)."""
        return {
            "action": action,
            "usage_record_id": self.id,
            "status": self.status,
            "identifier": self.identifier,
            "minutes": self.minutes,
            "why": why,
        }


@dataclass(frozen=True)
class Snapshot:
    """Our side of one cycle's comparison, and the run's lease on it."""

    cycle: dict[str, Any]
    rows: list[Usage]
    credited: Decimal
    error_windows: list[tuple[float, float]]
    token: str | None

    @classmethod
    def of(cls, begun: dict[str, Any]) -> Snapshot:
        fields = Usage.__dataclass_fields__
        windows = [
            (datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp())
            for start, end in begun["error_windows"]
            if start and end
        ]
        return cls(
            cycle=begun["cycle"],
            rows=[Usage(**{key: row[key] for key in fields}) for row in begun["rows"]],
            credited=Decimal(str(begun["credited_minutes"])),
            error_windows=windows,
            token=begun.get("token"),
        )


@dataclass(frozen=True)
class StripeSide:
    minutes: Decimal
    invoiced: int | None = None
    invoice_note: str | None = None


@dataclass(frozen=True)
class Drift:
    """One disagreement: what it is, and the repairs that mend it (None: none can)."""

    kind: str
    text: str
    mend: list[dict[str, Any]] | None
    remedy: str


@dataclass
class Check:
    """One cycle compared: its figures, its drifts, and what --repair does."""

    figures: dict[str, Any]
    drifts: list[Drift] = field(default_factory=list)
    housekeeping: list[dict[str, Any]] = field(default_factory=list)  # owed rows to mark sent

    @property
    def repairs(self) -> list[dict[str, Any]]:
        mends = [repair for drift in self.drifts for repair in drift.mend or []]
        return self.housekeeping + mends

    def status(self, *, repair: bool) -> str:
        if not self.drifts:
            return "repaired" if repair and self.housekeeping else "agree"
        mendable = all(drift.mend is not None for drift in self.drifts)
        return "repaired" if repair and mendable else "drift"


def total(rows: list[Usage]) -> int:
    return sum(row.minutes for row in rows)


def count(rows: list[Usage]) -> str:
    return f"{len(rows)} row" if len(rows) == 1 else f"{len(rows)} rows"


def pick(candidates: list[Usage], amount: int) -> list[Usage] | None:
    """Rows whose minutes sum to exactly `amount`, from as short a front of `candidates` as will
    do (a subset-sum table over bit sets); None when no set does."""
    if amount <= 0:
        return [] if amount == 0 else None
    running = 0
    for index, row in enumerate(candidates):  # the common case: a whole front is missing
        running += row.minutes
        if running == amount:
            return candidates[: index + 1]
    if (amount + 1) * len(candidates) > PICK_BUDGET_BITS:
        return None
    mask = (1 << (amount + 1)) - 1
    reach = [1]
    for row in candidates:
        reach.append((reach[-1] | (reach[-1] << max(row.minutes, 0))) & mask)
        if reach[-1] >> amount & 1:
            break
    if not reach[-1] >> amount & 1:
        return None
    chosen, need = [], amount
    for index in range(len(reach) - 1, 0, -1):
        if need and not reach[index - 1] >> need & 1:  # not reachable without this row
            chosen.append(candidates[index - 1])
            need -= candidates[index - 1].minutes
    return chosen


def overage_cents(cycle: dict[str, Any], minutes: Decimal, extra: Decimal) -> int:
    """What `extra` minutes on top of `minutes` add at the cycle's terms (included minutes free)."""
    included, rate = Decimal(cycle["included_minutes"]), Decimal(cycle["overage_rate_cents"])
    over = max(minutes + extra - included, Decimal(0)) - max(minutes - included, Decimal(0))
    return int((over * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def compare(snapshot: Snapshot, stripe_side: StripeSide) -> Check:
    """The figures, drifts and repairs of one cycle (see the module's docstring)."""
    cycle, rows = snapshot.cycle, snapshot.rows
    window = [row for row in rows if row.in_window]
    counted = [row for row in rows if row.in_cycle]

    def kind(source: list[Usage], *kinds: str) -> list[Usage]:
        return [row for row in source if row.kind in kinds]

    sent, recent, owed = kind(window, "sent"), kind(window, "recent"), kind(window, "owed")
    in_flight = kind(window, "in_flight")
    expected = total(sent) + total(recent) + total(owed) + snapshot.credited
    low, high = expected - total(recent), expected + total(in_flight)
    settled = not recent and not in_flight
    stripe_minutes = stripe_side.minutes
    check = Check(
        figures={
            "usage_minutes": total(counted),
            "cycle_minutes": int(cycle["minutes_used"]),
            "stripe_minutes": stripe_minutes,
            "invoiced_minutes": stripe_side.invoiced,
            "expected": expected,
            "settling": total(recent) + total(in_flight),
            "credited": snapshot.credited,
            "by_status": {
                status: total([row for row in counted if row.status == status])
                for status in ("sent", "pending", "unconfirmed", "failed")
            },
        }
    )
    drifts = check.drifts
    if check.figures["usage_minutes"] != check.figures["cycle_minutes"]:
        drifts.append(
            Drift(
                "books",
                f"its rows count {total(counted)} min, its total {cycle['minutes_used']}",
                None,
                "cannot mend: a person must look",
            )
        )
    misplaced = [row for row in counted if not row.in_period]
    if misplaced:
        drifts.append(
            Drift(
                "placed",
                f"{count(misplaced)} ({total(misplaced)} min) metered outside its period",
                None,
                "cannot mend: a person must look",
            )
        )
    refused = kind(counted, "refused")
    if refused:
        drifts.append(
            Drift(
                "refused",
                f"Stripe refused {total(refused)} min ({count(refused)})",
                [row.repair("resend", "refused") for row in refused],
                "mend: send them again under new identifiers",
            )
        )
    stranded = [row for row in kind(counted, "on_the_way") if not row.billable]
    if stranded:
        drifts.append(
            Drift(
                "stranded",
                f"{total(stranded)} min ({count(stranded)}) still pending in a period"
                " Stripe no longer bills",
                [row.repair("late", "stranded") for row in stranded],
                "mend: count them late in the current cycle",
            )
        )
    if stripe_minutes < low:
        drifts.append(missing_drift(snapshot, check, window, expected - stripe_minutes, settled))
    elif stripe_minutes > high:
        drifts.append(stray_drift(snapshot, check, window, stripe_minutes - high, settled))
    elif settled and owed:
        check.housekeeping = [row.repair("settle", "held by Stripe") for row in owed]
    if stripe_side.invoiced is not None:
        invoiced_drift(check, counted)
    return check


def missing_drift(
    snapshot: Snapshot, check: Check, window: list[Usage], lacking: Decimal, settled: bool
) -> Drift:
    text = f"Stripe lacks {lacking} min of ours"
    if not settled:
        return Drift(
            "missing",
            text,
            None,
            f"cannot mend yet: {check.figures['settling']} min still settling at Stripe",
        )
    owed = [row for row in window if row.kind == "owed"]
    sent = sorted(
        (row for row in window if row.kind == "sent"), key=lambda row: -(row.sent_at or 0)
    )
    suspect = [row for row in sent if during_error_report(snapshot, row)]
    others = [row for row in sent if row not in suspect]
    chosen = pick(suspect + owed + others, int(lacking)) if lacking == int(lacking) else None
    if chosen is None:
        return Drift("missing", text, None, "cannot mend: no set of our rows sums to it")
    check.housekeeping = [
        row.repair("settle", "held by Stripe") for row in owed if row not in chosen
    ]
    return Drift(
        "missing",
        text,
        [row.repair("resend", "missing") for row in chosen],
        f"mend: send {count(chosen)} again under new identifiers",
    )


def stray_drift(
    snapshot: Snapshot, check: Check, window: list[Usage], excess: Decimal, settled: bool
) -> Drift:
    text = f"Stripe holds {excess} min more than our rows"
    if not settled:
        return Drift(
            "stray",
            text,
            None,
            f"cannot mend yet: {check.figures['settling']} min still settling at Stripe",
        )
    check.housekeeping = [
        row.repair("settle", "held by Stripe") for row in window if row.kind == "owed"
    ]
    ours = [row for row in window if row.cancellable]
    chosen = pick(ours, int(excess)) if excess == int(excess) else None
    if chosen:
        return Drift(
            "stray",
            text,
            [row.repair("cancel", "stray") for row in chosen],
            f"mend: cancel our re-sent events of {count(chosen)} (meter event adjustments)",
        )
    cents = overage_cents(snapshot.cycle, check.figures["stripe_minutes"] - excess, excess)
    minutes: int | float = int(excess) if excess == int(excess) else float(excess)
    credit = {"action": "credit", "minutes": minutes, "cents": cents, "why": "stray"}
    return Drift("stray", text, [credit], f"mend: report {cents} cents to credit, not ours")


def invoiced_drift(check: Check, counted: list[Usage]) -> None:
    """The invoice against the cycle, and whether the repairs planned already make them agree."""
    figures = check.figures
    invoiced = figures["invoiced_minutes"]
    if invoiced == figures["cycle_minutes"] + figures["credited"]:
        return
    by_id = {row.id: row for row in counted}
    moved = sum(
        by_id[repair["usage_record_id"]].minutes
        for repair in check.repairs
        if repair["action"] in ("resend", "late")
        and repair["usage_record_id"] in by_id
        and not by_id[repair["usage_record_id"]].billable
    )
    credit = sum(Decimal(str(r["minutes"])) for r in check.repairs if r["action"] == "credit")
    mended = invoiced == figures["cycle_minutes"] - moved + figures["credited"] + credit
    check.drifts.append(
        Drift(
            "invoiced",
            f"the invoice bills {invoiced} min, the cycle counts {figures['cycle_minutes']}",
            [] if mended else None,
            "mend: follows from the repairs above" if mended else "cannot mend: a person must look",
        )
    )


def during_error_report(snapshot: Snapshot, row: Usage) -> bool:
    """Whether Stripe received the row's event in a validation window an error report named."""
    return row.sent_at is not None and any(
        start - ERROR_WINDOW_MARGIN <= row.sent_at <= end + ERROR_WINDOW_MARGIN
        for start, end in snapshot.error_windows
    )


# ------------------------------------------------------------------ Stripe's side


def with_backoff(call: Callable[[], T], sleep: Sleep) -> T:
    """`call()`, retried after BACKOFF's pauses while Stripe answers 429 (its read rate limit)."""
    for delay in (*BACKOFF, None):
        try:
            return call()
        except (stripe.RateLimitError, BillingError) as error:
            limited = isinstance(error, stripe.RateLimitError) or isinstance(
                error.__cause__, stripe.RateLimitError
            )
            if not limited or delay is None:
                raise
            sleep(delay)
    raise AssertionError("unreachable")


def find_meter(client: stripe.StripeClient, event_name: str, sleep: Sleep) -> str:
    """The id of the meter of `event_name` (STRIPE_METER_EVENT_NAME), an active one first."""
    params: MeterListParams = {"limit": PAGE}
    meters: list[Any] = []
    while True:
        page = with_backoff(partial(client.v1.billing.meters.list, params=params), sleep)
        meters.extend(page.data)
        if not page.has_more or not page.data:
            break
        params["starting_after"] = page.data[-1].id
    found = sorted(
        (meter for meter in meters if meter.event_name == event_name),
        key=lambda meter: meter.status != "active",
    )
    if not found:
        raise NotFound(
            f"No meter at Stripe has event_name {event_name!r} (STRIPE_METER_EVENT_NAME):"
            " ./deploy.sh stripe-catalog creates it.",
            code="meter_not_found",
        )
    return str(found[0].id)


def summary_minutes(
    client: stripe.StripeClient, meter: str, cycle: dict[str, Any], sleep: Sleep
) -> Decimal:
    """Stripe's total for the cycle's customer over its window (every page of summaries)."""
    params: MeterEventSummaryListParams = {
        "customer": cycle["customer"],
        "start_time": int(cycle["window_start"]),
        "end_time": int(cycle["window_end"]),
        "limit": PAGE,
    }
    minutes = Decimal(0)
    while True:
        summaries = client.v1.billing.meters.event_summaries
        page = with_backoff(partial(summaries.list, meter, params=params), sleep)
        minutes += sum(
            (Decimal(str(summary.aggregated_value)) for summary in page.data), Decimal(0)
        )
        if not page.has_more or not page.data:
            return minutes.to_integral_value() if minutes == int(minutes) else minutes.normalize()
        params["starting_after"] = page.data[-1].id


def invoiced_minutes(
    client: stripe.StripeClient, database: Database, cycle: dict[str, Any], sleep: Sleep
) -> tuple[int | None, str | None]:
    """(quantity of the cycle's invoice lines of its metered price for its period, a note)."""
    invoice_id, price = cycle["stripe_invoice_id"], cycle["stripe_metered_price_id"]
    if not invoice_id:
        return None, None
    try:
        fetched = with_backoff(lambda: fetch_invoice(client, invoice_id, database=database), sleep)
    except BillingError as error:
        if invoice_missing(error):
            return None, f"invoice {invoice_id} is not at Stripe"
        raise
    if not price:
        return None, "the cycle names no metered price"
    start = datetime.fromisoformat(cycle["period_start"]).timestamp()
    end = datetime.fromisoformat(cycle["period_end"]).timestamp()
    quantity = Decimal(0)
    for line in (fetched.invoice.get("lines") or {}).get("data") or []:
        details = (line.get("pricing") or {}).get("price_details") or {}
        line_price = details.get("price")
        line_price = line_price.get("id") if isinstance(line_price, dict) else line_price
        period = line.get("period") or {}
        if line_price == price and period.get("start", end) < end and period.get("end", 0) > start:
            quantity += Decimal(str(line.get("quantity_decimal") or line.get("quantity") or 0))
    return int(quantity), None


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
