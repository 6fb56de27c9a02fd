"""Customers: create and retrieve; make their next payment fail (`/_standin/`)."""

from __future__ import annotations

import secrets
import time

from .params import as_int, metadata
from .state import ID, Call, Json, api, control, fixture, new_id


def create_customer(call: Call) -> Json:
    p = call.params
    customer = fixture(
        "customer",
        id=new_id("cus"),
        created=int(time.time()),
        email=p.get("email"),
        name=p.get("name"),
        metadata=metadata({}, p.get("metadata", {})),
        invoice_prefix=secrets.token_hex(4).upper(),
        unset="address currency discount shipping",
    )
    return call.state.put(customer)


def get_customer(call: Call, object_id: str) -> Json:
    return call.state.get("customer", object_id, status=404)


def decline_next_payment(call: Call, object_id: str) -> Json:
    """The customer's next payment attempt(s) fail, like a declined card.

    Body `{"count": n}` (default 1) adds n declines; each payment attempt uses one: a plan
    change's invoice, a renewal, a retry (`/_standin/invoices/{id}/pay`). Checkout is unaffected.
    """
    st = call.state
    customer = st.get("customer", object_id, status=404)
    count = as_int(call.params, "count") or 1
    st.declines[customer["id"]] = st.declines.get(customer["id"], 0) + count
    return {"customer": customer["id"], "declines_waiting": st.declines[customer["id"]]}


ROUTES = [
    api("POST", "/v1/customers", create_customer, "email name metadata[*]"),
    api("GET", "/v1/customers" + ID, get_customer),
    control("POST", "/_standin/customers" + ID + "/decline_next_payment", decline_next_payment),
]
