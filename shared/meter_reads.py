"""Stripe's side of a reconciliation: the meter, its event summaries over a window, the quantity
an invoice billed for a cycle's metered price; reads retried while Stripe rate-limits them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from shared.db import Database
from shared.errors import BillingError, NotFound
from shared.invoices import fetch_invoice, invoice_missing
from shared.stripe_lib import stripe

if TYPE_CHECKING:
    from stripe.params.billing import MeterEventSummaryListParams, MeterListParams

PAGE = 100
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each retry of a read Stripe rate-limited

T = TypeVar("T")
Sleep = Callable[[float], None]


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
