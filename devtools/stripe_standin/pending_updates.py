"""Pending updates: a plan change that waits for its invoice to be paid (pending_if_incomplete).

Stripe ("Pending updates", "Pending updates reference"): when the update's invoice cannot be
paid, nothing changes; the subscription shows `pending_update` (expires_at: 23 hours after the
update, or the current period end if sooner; subscription_items: the items as the update sets
them; metadata since 2026-05-27.dahlia; cancel_at_period_end since 2026-09-30.endive) and
keeps cycling as before. Paying the open invoice applies the update (metadata merged); once
expired, the invoice is voided and the update discarded (here: at the next renewal, which is
never before expires_at). A newer update of items or cancel_at_period_end replaces it.
Only these may accompany pending_if_incomplete; anything else is a 400 naming it.
"""

from __future__ import annotations

import copy
from typing import Any

from .invoices import void_invoice
from .params import as_bool, metadata
from .state import Call, Json, State, StripeError, fixture
from .subscriptions import set_cancel_at_period_end

PENDING_PARAMS = {
    "cancel_at_period_end",
    "expand",
    "items",
    "metadata",
    "payment_behavior",
    "proration_behavior",
    "proration_date",
}
PENDING_ITEM_PARAMS = {"id", "price", "quantity"}
PENDING_LIFETIME = 23 * 3600


def check_pending_params(p: Json) -> None:
    """Refuse what a pending update cannot carry, naming the parameter."""
    names = [name for name in p if name not in PENDING_PARAMS]
    edits = p.get("items", [])
    for i, edit in enumerate(edits if isinstance(edits, list) else [edits]):
        keys = edit if isinstance(edit, dict) else {}
        names += [f"items[{i}][{key}]" for key in keys if key not in PENDING_ITEM_PARAMS]
    if names:
        message = (
            f"`{names[0]}` cannot be used with `payment_behavior=pending_if_incomplete`. Pending"
            " updates only support these parameters: add_invoice_items, billing_cycle_anchor,"
            " cancel_at_period_end, expand, items (price, quantity), metadata,"
            " payment_behavior, proration_behavior, proration_date, trial_end, trial_from_plan."
        )
        raise StripeError(400, message, param=names[0])


def hold_pending_update(st: State, stored: Json, p: Json, invoice_id: str, **change: Any) -> None:
    """The update waits for its invoice to be paid: `pending_update`, and what applying does.

    `change`: now, changed (the edited copy), touched and removed (item ids), clocks.
    """
    now, changed = change["now"], change["changed"]
    ends = [item["current_period_end"] for item in stored["items"]["data"]]
    expires_at = min([now + PENDING_LIFETIME, *ends])
    items = [copy.deepcopy(x) for x in changed["items"]["data"] if x["id"] in change["touched"]]
    update = fixture("subscription")["pending_update"]
    update.update(
        billing_cycle_anchor=None,
        cancel_at_period_end=as_bool(p, "cancel_at_period_end"),
        discount=None,
        discounts=None,
        expires_at=expires_at,
        metadata=metadata({}, p["metadata"]) if isinstance(p.get("metadata"), dict) else None,
        subscription_items=items,
        trial_end=None,
        trial_from_plan=None,
    )
    stored["pending_update"] = update
    st.pending_changes[stored["id"]] = {
        "invoice": invoice_id,
        "items": items,
        "removed": change["removed"],
        "metadata": p.get("metadata"),
        "cancel_at_period_end": update["cancel_at_period_end"],
        "clocks": change["clocks"],
    }


def apply_pending_update(st: State, sub: Json, invoice_id: str) -> bool:
    """Paying a pending update's invoice applies it (Stripe merges its metadata)."""
    held = st.pending_changes.get(sub["id"])
    if held is None or held["invoice"] != invoice_id:
        return False
    del st.pending_changes[sub["id"]]
    items = [x for x in sub["items"]["data"] if x["id"] not in held["removed"]]
    for changed in held["items"]:
        at = next((i for i, x in enumerate(items) if x["id"] == changed["id"]), None)
        if at is None:
            items.append(changed)
        else:
            items[at] = changed
    sub["items"]["data"] = items
    if held["metadata"] is not None:
        sub["metadata"] = metadata(sub["metadata"], held["metadata"])
    if held["cancel_at_period_end"] is not None:
        set_cancel_at_period_end(sub, held["cancel_at_period_end"])
    st.item_clocks.update(held["clocks"])
    sub["pending_update"] = None
    return True


def expire_pending_update(call: Call, sub: Json, at: int, *, force: bool = False) -> None:
    """Past its expires_at (or replaced), a pending update goes and its open invoice is voided
    (invoice.voided sent, as Stripe does)."""
    st = call.state
    update = sub["pending_update"]
    if not update or (at < update["expires_at"] and not force):
        return
    held = st.pending_changes.pop(sub["id"], None)
    invoice = st.store["invoice"].get(held["invoice"]) if held else None
    if invoice is not None and invoice["status"] == "open":
        void_invoice(st, invoice, at)
        call.emit("invoice.voided", invoice)
    sub["pending_update"] = None
