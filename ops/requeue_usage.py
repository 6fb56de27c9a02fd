"""Put failed usage back on the way to Stripe once its cause is fixed; prints one line per row.

Usage: python -m ops.requeue_usage [--org ID] [--since YYYY-MM-DD] [--dry-run]
Reads DATABASE_URL (or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY). `requeue_failed_usage` decides
for each `failed` row, in one transaction: pending again in its own cycle while Stripe can still
bill it, else counted late in the current cycle (or skipped without a live subscription); the
flush then delivers it under a new identifier. --dry-run shows the same and changes nothing.
"""

from __future__ import annotations

import argparse
import re
import uuid
from collections.abc import Sequence
from datetime import date
from typing import Any

from ops.errors import reach_database, run
from shared.db import get_database
from shared.settings import get_settings

# outcome -> (what was done, what it means), and the dry run's wording of what would be done
OUTCOMES: dict[str, tuple[str, str, str]] = {
    "pending": ("requeued", "would requeue", "pending again in its own cycle"),
    "late": ("requeued late", "would requeue late", "counted in the current cycle"),
    "skipped": ("skipped", "would skip", "no live subscription to bill it in"),
    "unconfirmed": (
        "unconfirmed",
        "would mark unconfirmed",
        "an earlier attempt may have reached Stripe; reconcile it, a resend could bill twice",
    ),
}


def organisation_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an organisation id (a uuid): {value!r}") from None


def since_date(value: str) -> str:
    try:
        parsed = date.fromisoformat(value) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) else None
    except ValueError:  # 2026-02-30
        parsed = None
    if parsed is None:
        raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {value!r}")
    return parsed.isoformat()


def report_lines(result: dict[str, Any], *, dry_run: bool) -> list[str]:
    """One line per row `requeue_failed_usage` returned, then the summary."""
    rows: list[dict[str, Any]] = result["rows"]
    lines = []
    for row in rows:
        done, would, meaning = OUTCOMES.get(row["outcome"], (row["outcome"], row["outcome"], ""))
        lines.append(
            f"{would if dry_run else done} usage {row['usage_record_id']} (organisation"
            f" {row['organisation_id']}, call {row['call_id']}, {row['billed_minutes']} min):"
            f" {meaning or row['outcome']}; it had failed with:"
            f" {' '.join(str(row['meter_error'] or '-').split())}"
        )
    if not rows:
        lines.append("no failed usage to requeue")
    else:
        verb = "would requeue" if dry_run else "requeued"
        lines.append(
            f"{verb} {result['requeued']} in their own cycle and {result['late']} late,"
            f" of {len(rows)} failed usage records"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ops.requeue_usage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--org", type=organisation_id, metavar="ID", help="one organisation")
    parser.add_argument(
        "--since", type=since_date, metavar="YYYY-MM-DD", help="calls that ended on or after"
    )
    parser.add_argument("--dry-run", action="store_true", help="show, change nothing")
    args = parser.parse_args(argv)
    settings = get_settings().require_database()
    reach_database(settings.DATABASE_URL)
    result = get_database(settings).call(
        "requeue_failed_usage",
        p_organisation_id=args.org,
        p_since=args.since,
        p_dry_run=args.dry_run,
    )
    for line in report_lines(result, dry_run=args.dry_run):
        print(line)


if __name__ == "__main__":
    run("requeue-usage", main)
