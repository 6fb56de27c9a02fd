"""Compare each billing cycle with Stripe and say so in one line; --repair mends what it can.

Usage: python -m ops.reconcile [--org ID] [--since YYYY-MM-DD] [--repair] [--dry-run]
Reads DATABASE_URL (or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY), STRIPE_SECRET_KEY and
STRIPE_METER_EVENT_NAME. The cycles of organisations with a Stripe customer ending on or after
--since (default: the last 35 days, and the current ones), and every cycle a Stripe error report
named since its last check. Per cycle: our usage rows, the cycle's total, Stripe's meter event
summary over the period and the invoiced quantity (shared/reconcile.py defines when they agree),
a `reconciliations` row, and with --repair the repairs (audited as reconciliation.repair), the
re-sent events delivered at once. Exit 1 when any cycle is in drift, or a credit was reported;
0 when all agree or were mended. --dry-run reads and says, and writes nothing anywhere.
Runs at once never both check a cycle (a lease per cycle: the second says `busy`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from ops.errors import reach_database, reach_stripe, run
from ops.requeue_usage import organisation_id, since_date
from shared.db import get_database
from shared.reconcile import CycleResult, reconcile
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client

OUTCOMES = {  # a repair's outcome -> how the line says it
    "pending": "re-sent",
    "late": "counted late",
    "nowhere": "counted nowhere (no live subscription)",
    "sent": "settled as sent",
    "canceled": "canceled at Stripe",
    "credited": "to credit",
    "stale": "left (changed meanwhile)",
}
PLANNED = {  # a planned repair's action -> how a dry run says it
    "resend": "would re-send",
    "late": "would count late",
    "settle": "would settle as sent",
    "cancel": "would cancel at Stripe",
    "credit": "would report to credit",
}


def when(value: str) -> str:
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M")


def amount(value: Any) -> str:
    number = Decimal(str(value))
    return str(int(number)) if number == int(number) else str(number)


def figures_text(result: CycleResult) -> str:
    assert result.check is not None
    f = result.check.figures
    by = f["by_status"]
    invoiced = "-" if f["invoiced_minutes"] is None else f["invoiced_minutes"]
    credited = f", {amount(f['credited'])} of them reported for credit" if f["credited"] else ""
    return (
        f"ours {f['usage_minutes']} min (sent {by['sent']}, pending {by['pending']},"
        f" unconfirmed {by['unconfirmed']}, failed {by['failed']}), cycle {f['cycle_minutes']},"
        f" Stripe {amount(f['stripe_minutes'])} (expected {amount(f['expected'])}{credited}),"
        f" invoiced {invoiced}"
    )


def repairs_text(result: CycleResult, *, dry_run: bool) -> str:
    """What was done (or would be), grouped: "re-sent 4 rows (38 min); to credit 150 cents"."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for repair in result.repairs:
        key = PLANNED[repair["action"]] if dry_run else OUTCOMES[repair["outcome"]]
        groups.setdefault(key, []).append(repair)
    parts = []
    for label, repairs in groups.items():
        if repairs[0]["action"] == "credit":
            cents = sum(int(r["cents"]) for r in repairs)
            minutes = sum(Decimal(str(r["minutes"])) for r in repairs)
            parts.append(f"{label} {cents} cents ({amount(minutes)} min not ours)")
        else:
            minutes = sum(Decimal(str(r.get("minutes") or 0)) for r in repairs)
            rows = "row" if len(repairs) == 1 else "rows"
            parts.append(
                f"{label} {len(repairs)} {rows}" + (f" ({amount(minutes)} min)" if minutes else "")
            )
    if result.delivered:
        parts.append(
            "delivered: "
            + ", ".join(f"{n} {status}" for status, n in sorted(result.delivered.items()))
        )
    return "; ".join(parts)


def line(result: CycleResult, *, dry_run: bool) -> str:
    """One line for one cycle: verdict, organisation, period, each figure, what differs, done."""
    cycle = result.cycle
    who = f"organisation {cycle['organisation_id']}"
    if result.status == "busy":
        period = f"{when(cycle['period_start'])}..{when(cycle['period_end'])} UTC"
        return f"busy     {who} {period}: another reconcile run is checking this cycle"
    assert result.check is not None
    verdict = {"repaired": "would repair" if dry_run else "repaired"}.get(
        result.status, result.status
    )
    period = f"{when(cycle['period_start'])}..{when(cycle['period_end'])} UTC"
    text = f"{verdict:<8} {who} ({cycle['organisation_name']}) {period}: {figures_text(result)}"
    drifts = [f"{d.text} ({d.remedy})" for d in result.check.drifts]
    if result.invoice_note:
        drifts.append(result.invoice_note)
    if drifts:
        text += ": " + "; ".join(drifts)
    done = repairs_text(result, dry_run=dry_run)
    return text + (f" => {done}" if done else "")


def drift_count(result: CycleResult) -> int:
    return len(result.check.drifts) if result.check else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.reconcile", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--org", type=organisation_id, metavar="ID", help="one organisation")
    parser.add_argument(
        "--since", type=since_date, metavar="YYYY-MM-DD", help="cycles ending on or after"
    )
    parser.add_argument("--repair", action="store_true", help="mend what can be mended")
    parser.add_argument("--dry-run", action="store_true", help="read and say, write nothing")
    args = parser.parse_args(argv)
    settings = get_settings().require("STRIPE_SECRET_KEY").require_database()
    reach_database(settings.DATABASE_URL)
    client = make_stripe_client(settings)
    reach_stripe(client)
    counts: dict[str, int] = {}
    credited = disagree = False
    for result in reconcile(
        get_database(settings),
        client,
        settings,
        organisation_id=args.org,
        since=args.since,
        repair=args.repair,
        dry_run=args.dry_run,
    ):
        print(line(result, dry_run=args.dry_run), flush=True)
        status = "would repair" if args.dry_run and result.status == "repaired" else result.status
        counts[status] = counts.get(status, 0) + 1
        credited = credited or any(r["action"] == "credit" for r in result.repairs)
        disagree = (
            disagree or result.status == "drift" or bool(args.dry_run and drift_count(result))
        )
    if not counts:
        print("no billing cycles to reconcile")
        return 0
    print(
        f"{sum(counts.values())} cycles: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + ("; credits to issue (see above)" if credited else "")
    )
    return 1 if disagree or credited else 0


if __name__ == "__main__":
    run("reconcile", main)
