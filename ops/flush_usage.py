"""Deliver due meter events to Stripe in batches; safe to schedule and to overlap.

Usage: python -m ops.flush_usage [--limit N]   (reads DATABASE_URL or SUPABASE_URL +
SUPABASE_SERVICE_ROLE_KEY, STRIPE_SECRET_KEY)
Exit status 1, with one line naming the variable, when the database or Stripe is out of reach.
"""

from __future__ import annotations

import argparse

from ops.errors import reach_database, reach_stripe, run
from shared.db import get_database
from shared.meter_flush import MeterStream, flush
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from shared.usage import DEFAULT_FLUSH_LIMIT, MAX_FLUSH_LIMIT


def limit(value: str) -> int:
    """--limit's value: a whole number from 1 to MAX_FLUSH_LIMIT."""
    if not value.isdigit() or not 1 <= int(value) <= MAX_FLUSH_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_FLUSH_LIMIT}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit",
        type=limit,
        default=DEFAULT_FLUSH_LIMIT,
        metavar="N",
        help=f"most events to deliver in this run, 1-{MAX_FLUSH_LIMIT} (default {DEFAULT_FLUSH_LIMIT})",
    )
    args = parser.parse_args(argv)
    settings = get_settings().require("STRIPE_SECRET_KEY").require_database()
    reach_database(settings.DATABASE_URL)
    client = make_stripe_client(settings)
    stream = MeterStream(client, settings)
    report = flush(get_database(settings), stream, limit=args.limit)
    print(
        f"meter events: sent {report.sent}, kept pending {report.pending}, failed {report.failed}"
    )
    if report.pending and not report.sent:
        # The outbox keeps what Stripe did not take; when Stripe took nothing, say whether it is
        # out of reach or refuses the key (one request, only then).
        reach_stripe(client)


if __name__ == "__main__":
    run("flush-usage", main)
