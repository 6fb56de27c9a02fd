"""What a plan change bills for the items it touches: prorations and metered usage so far.

A `Change` collects, on a copy of the subscription, the invoice items a change makes; nothing
is stored until `record`. Amounts (Stripe, flexible billing mode):
- credit for unused time: what was last debited for the item's current period (its own line
  on an invoice, or a pending proration) times seconds left / seconds in that period, rounded
  toward -inf: "Unused time on {q} × {price} after {day}", period [at, period end];
- debit for the remaining time: the new price and quantity for the whole period times seconds
  left / seconds in the period, rounded down: "Remaining time on ...", period [at, period end];
  Stripe's recorded answers round this way (10.00 -> 20.00 with a third left: -334 and +666);
- a metered item's usage reported since its period or last change began (unbilled meter
  events), at its old price with tiers from zero: "{usage} × {price}", period [start, now],
  not a proration; with proration_behavior none those events are billed nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from .catalog import price_amount
from .invoices import new_invoiceitem
from .meter_events import mark_billed, unbilled_usage
from .state import Json, State
from .subscriptions import usage_start


@dataclass
class Change:
    """One update in the making: the edited copy and what it bills, stored only at the end."""

    st: State
    sub: Json
    now: int  # when the change happens (simulated time)
    at: int  # where prorations count the time left from (proration_date, or now)
    proration: str
    charges: list[Json] = field(default_factory=list)  # new invoice items
    fees: list[Json] = field(default_factory=list)  # items billed in full for a new period
    usage: list[tuple[list[str], str]] = field(default_factory=list)  # events -> where billed
    clocks: dict[str, Json] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)  # items the update sets
    removed: list[str] = field(default_factory=list)

    def clock(self, item: Json) -> Json:
        return self.clocks.setdefault(item["id"], dict(self.st.item_clocks.get(item["id"], {})))


def close_item(change: Change, item: Json) -> None:
    """What the item's old price still bills: its usage so far, or a credit for unused time."""
    st, sub, price = change.st, change.sub, item["price"]
    if price["recurring"]["usage_type"] == "metered":
        events, usage = unbilled_usage(st, sub["customer"], price["recurring"]["meter"])
        if change.proration == "none":
            change.usage.append((events, f"not billed: {item['id']} price change"))
        elif events:
            charge = new_invoiceitem(
                sub,
                price,
                change.now,
                amount=price_amount(price, usage),
                quantity=usage,
                period=(usage_start(st, item), change.now),
                item=item["id"],
                proration=False,
                description=f"{usage} × {price_name(price)}",
            )
            change.charges.append(charge)
            change.usage.append((events, charge["id"]))
    elif change.proration != "none" and (credit := unused_time_credit(change, item)):
        change.charges.append(credit)


def open_item(change: Change, item: Json, restart: bool) -> None:
    """What the item's new price bills now: a new period in full, or the remaining time."""
    price, quantity = item["price"], item["quantity"]
    if price["recurring"]["usage_type"] == "metered":
        return  # billed in arrears, at the renewal
    if restart:
        change.fees.append(item)
        return
    start, end = item["current_period_start"], item["current_period_end"]
    at = max(change.at, start)
    if change.proration == "none" or end <= at:
        return
    debit = price_amount(price, quantity) * (end - at) // (end - start)
    change.charges.append(
        new_invoiceitem(
            change.sub,
            price,
            change.now,
            amount=debit,
            quantity=quantity,
            period=(at, end),
            item=item["id"],
            proration=True,
            description=f"Remaining time on {quantity} × {price_name(price)} after {day(at)}",
        )
    )


class Debit(NamedTuple):
    """A charge for an item's time: what a later credit for unused time is based on."""

    amount: int
    start: int
    end: int
    price: str
    quantity: int
    credited: Json  # proration_details.credited_items of a credit for it


def unused_time_credit(change: Change, item: Json) -> Json | None:
    """A credit for the time left of what was last debited for this item's period."""
    st, at = change.st, max(change.at, item["current_period_start"])
    covering = [d for d in debits(st, change.sub, item) if d.amount > 0 and d.start <= at < d.end]
    if not covering:  # nothing was charged for this time (e.g. a change with proration none)
        return None
    debit = max(covering, key=lambda d: d.start)  # the newest
    length = debit.end - debit.start
    credit = -((debit.amount * (debit.end - at) + length - 1) // length)
    price = st.store["price"][debit.price]
    return new_invoiceitem(
        change.sub,
        price,
        change.now,
        amount=credit,
        quantity=debit.quantity,
        period=(at, debit.end),
        item=item["id"],
        proration=True,
        description=f"Unused time on {debit.quantity} × {price_name(price)} after {day(at)}",
        credited=debit.credited,
    )


def debits(st: State, sub: Json, item: Json) -> Iterator[Debit]:
    """The item's charges: pending invoice items, and its lines on invoices not voided."""
    for ii in st.store["invoiceitem"].values():
        if (
            ii["invoice"] is None
            and ii["parent"]["subscription_details"]["subscription_item"] == item["id"]
        ):
            credited = {
                "type": "invoice_item",
                "invoice_item": ii["id"],
                "invoice_line_item_details": None,
            }
            yield Debit(
                ii["amount"],
                ii["period"]["start"],
                ii["period"]["end"],
                ii["pricing"]["price_details"]["price"],
                ii["quantity"],
                credited,
            )
    for invoice in st.store["invoice"].values():
        mine = invoice["parent"]["subscription_details"]["subscription"] == sub["id"]
        for line in invoice["lines"]["data"] if mine and invoice["status"] != "void" else []:
            details = line["parent"]["subscription_item_details"] or {}
            if details.get("subscription_item") == item["id"]:
                ref = {"invoice": invoice["id"], "invoice_line_items": [line["id"]]}
                credited = {
                    "type": "invoice_line_items",
                    "invoice_item": None,
                    "invoice_line_item_details": ref,
                }
                yield Debit(
                    line["amount"],
                    line["period"]["start"],
                    line["period"]["end"],
                    line["pricing"]["price_details"]["price"],
                    line["quantity"],
                    credited,
                )


def record(change: Change) -> None:
    """Store the change's invoice items (pending) and where its metered usage went."""
    for charge in change.charges:
        change.st.put(charge)
    for events, billed_on in change.usage:
        mark_billed(change.st, events, billed_on)


def price_name(price: Json) -> str:
    return str(price["nickname"] or price["product"])


def day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %Y")
