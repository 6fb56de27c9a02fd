"""A cycle compared with Stripe: the usage rows and figures a reconciliation reads, what agrees,
each drift found and how it can be mended (shared/reconcile.py says what agree and drift mean,
and runs the comparison for each cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

SETTLE = timedelta(minutes=15)
ERROR_WINDOW_MARGIN = 60  # seconds around an error report's validation window
PICK_BUDGET_BITS = 200_000_000  # the subset-sum table's size limit (25 MB)


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
