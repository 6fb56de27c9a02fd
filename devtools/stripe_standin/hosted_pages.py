"""The pages where Stripe's hosted Checkout, customer portal and invoice pages would be: plain
HTML forms a person (or a browser test) can click through, never for production.

    GET  /checkout/{id}                  the session's lines and total; Pay, Fail payment, Cancel
    POST /checkout/{id}/pay              completes it as /_standin/.../complete does (webhooks
                                         delivered first), then 303 to its success_url
    POST /checkout/{id}/decline          a declined card: Checkout says so and lets the customer
                                         try again; the session stays open and nothing is made
    GET  /portal/{id}                    the customer's subscriptions and invoices, cancel at the
                                         period end (or now) as the session's configuration allows
    POST /portal/{id}/subscriptions/{sub}/cancel | /renew
    GET  /invoice/{id}                   an invoice's lines, total and status

Cancel on the Checkout page is a link to the session's cancel_url: like Stripe's back link, it
leaves the session open until it expires.
"""

from __future__ import annotations

import html
import time
from typing import Any

from werkzeug.utils import redirect
from werkzeug.wrappers import Response

from .checkout import complete_checkout
from .plan_changes import update_subscription
from .state import ID, Call, Json, StripeError, control
from .subscriptions import cancel_subscription

STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem;
       color: #1a1f36; }
.banner { background: #fff4d6; border: 1px solid #e5b800; padding: .5rem .75rem; border-radius: 6px; }
.error { background: #fde8e8; border: 1px solid #d33; padding: .5rem .75rem; border-radius: 6px; }
table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
td, th { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid #e3e8ee; }
td.amount, th.amount { text-align: right; }
form { display: inline; }
button, a.button { font: inherit; padding: .5rem 1rem; margin: .25rem .5rem .25rem 0;
       border-radius: 6px; border: 1px solid #635bff; background: #635bff; color: #fff;
       cursor: pointer; text-decoration: none; display: inline-block; }
button.secondary, a.button.secondary { background: #fff; color: #635bff; }
button:focus-visible, a:focus-visible { outline: 3px solid #1a1f36; outline-offset: 2px; }
.subscription { border: 1px solid #e3e8ee; border-radius: 8px; padding: .75rem 1rem; margin: 1rem 0; }
"""


def page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        '<p class="banner">Local Stripe stand-in: not Stripe, nothing is charged, never for'
        " production.</p>"
        f"{body}</body></html>"
    )


def money(cents: int, currency: str) -> str:
    return f"{cents / 100:,.2f} {currency.upper()}"


def day(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp)) if timestamp else "-"


def product_name(st: Any, price: Json) -> str:
    product = st.store["product"].get(price.get("product"), {})
    label = product.get("name") or price.get("nickname") or price["id"]
    recurring = price.get("recurring")
    if not recurring:
        return f"{label} (one-time)"
    if recurring["usage_type"] == "metered":
        return f"{label}, usage (billed monthly in arrears)"
    return f"{label}, per {recurring['interval']}"


def error_box(message: str | None) -> str:
    return f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""


# ---------------------------------------------------------------- Checkout


def checkout_page(call: Call, object_id: str, *, message: str | None = None) -> str:
    st = call.state
    session = st.get("checkout.session", object_id, status=404)
    oid, currency = html.escape(object_id), session["currency"]
    if call.params.get("declined"):
        message = "Your card was declined. Try again, or use another card."
    rows = []
    for line in st.session_orders.get(object_id, {}).get("lines", []):
        price = st.store["price"][line["price"]]
        amount = "usage" if price["unit_amount"] is None else money(price["unit_amount"], currency)
        rows.append(
            f"<tr><td>{html.escape(product_name(st, price))}</td>"
            f'<td class="amount">{html.escape(amount)}</td></tr>'
        )
    total = money(session["amount_total"], currency)
    head = (
        f"<h1>Checkout</h1><p>Session <code>{oid}</code></p>"
        f"<table><tr><th>Item</th><th class='amount'>Price</th></tr>{''.join(rows)}"
        f"<tr><th>Due today</th><th class='amount'>{html.escape(total)}</th></tr></table>"
    )
    if session["status"] != "open":
        return page("Checkout", head + error_box(f"This Checkout Session is {session['status']}."))
    cancel = session["cancel_url"]
    back = f'<a class="button secondary" href="{html.escape(cancel)}">Cancel</a>' if cancel else ""
    return page(
        "Checkout",
        head
        + error_box(message)
        + f'<form method="post" action="/checkout/{oid}/pay"><button type="submit">Pay</button></form>'
        f'<form method="post" action="/checkout/{oid}/decline">'
        '<button type="submit" class="secondary">Fail payment</button></form>' + back,
    )


def pay(call: Call, object_id: str) -> Any:
    """Complete the session (as the control route does) and go to its success_url."""
    session = call.state.get("checkout.session", object_id, status=404)
    if session["status"] == "open":
        complete_checkout(call, object_id)
    elif session["status"] != "complete":
        return checkout_page(call, object_id)
    target = (session["success_url"] or f"/checkout/{object_id}").replace(
        "{CHECKOUT_SESSION_ID}", object_id
    )
    return redirect(target, 303)


def decline(call: Call, object_id: str) -> Response:
    """A declined card: Checkout shows the decline and lets the customer retry; nothing made."""
    call.state.get("checkout.session", object_id, status=404)
    return redirect(f"/checkout/{object_id}?declined=1", 303)


# ---------------------------------------------------------------- the customer portal


def portal_page(call: Call, object_id: str, *, message: str | None = None) -> str:
    st = call.state
    session = st.get("billing_portal.session", object_id, status=404)
    config = st.store["billing_portal.configuration"].get(session["configuration"], {})
    features = config.get("features", {})
    cancel = features.get("subscription_cancel", {})
    customer, oid = session["customer"], html.escape(object_id)
    subs = [
        s
        for s in st.store["subscription"].values()
        if s["customer"] == customer and s["status"] != "canceled"
    ]
    blocks = []
    for sub in subs:
        names = ", ".join(product_name(st, item["price"]) for item in sub["items"]["data"])
        ends = max((item["current_period_end"] for item in sub["items"]["data"]), default=None)
        when = (
            f"Cancels on {day(sub['cancel_at'])}"
            if sub["cancel_at_period_end"]
            else f"Renews on {day(ends)}"
        )
        action = f"/portal/{oid}/subscriptions/{html.escape(sub['id'])}"
        button = ""
        if cancel.get("enabled") and sub["cancel_at_period_end"]:
            button = (
                f'<form method="post" action="{action}/renew">'
                '<button type="submit">Renew subscription</button></form>'
            )
        elif cancel.get("enabled"):
            label = (
                "Cancel subscription at period end"
                if cancel.get("mode") == "at_period_end"
                else "Cancel subscription now"
            )
            button = (
                f'<form method="post" action="{action}/cancel">'
                f'<button type="submit" class="secondary">{label}</button></form>'
            )
        blocks.append(
            f'<div class="subscription"><h2>{html.escape(names)}</h2>'
            f"<p>Status: <strong>{html.escape(sub['status'])}</strong>. {when}.</p>{button}</div>"
        )
    if not subs:
        blocks.append("<p>No current subscription.</p>")
    if features.get("invoice_history", {}).get("enabled"):
        invoices = [i for i in st.store["invoice"].values() if i["customer"] == customer]
        rows = "".join(
            f"<tr><td><a href='/invoice/{html.escape(i['id'])}'>{html.escape(i['number'])}</a></td>"
            f"<td>{day(i['created'])}</td><td>{html.escape(i['status'])}</td>"
            f"<td class='amount'>{money(i['total'], i['currency'])}</td></tr>"
            for i in reversed(invoices)
        )
        blocks.append(f"<h2>Invoices</h2><table>{rows}</table>" if rows else "")
    back = session["return_url"] or config.get("default_return_url")
    ret = f'<a class="button secondary" href="{html.escape(back)}">Return</a>' if back else ""
    return page("Billing portal", "<h1>Billing</h1>" + error_box(message) + "".join(blocks) + ret)


def change_cancellation(call: Call, object_id: str, sub_id: str, *, cancel: bool) -> Any:
    """What the portal's cancel (or renew) button does, through the API's own update."""
    st = call.state
    session = st.get("billing_portal.session", object_id, status=404)
    sub = st.get("subscription", sub_id, status=404)
    config = st.store["billing_portal.configuration"].get(session["configuration"], {})
    allowed = config.get("features", {}).get("subscription_cancel", {})
    if sub["customer"] != session["customer"] or not allowed.get("enabled"):
        return portal_page(call, object_id, message="This portal cannot change that subscription.")
    try:
        if cancel and allowed.get("mode") != "at_period_end":
            call.params = {}
            cancel_subscription(call, sub_id)
        else:
            call.params = {"cancel_at_period_end": "true" if cancel else "false"}
            update_subscription(call, sub_id)
    except StripeError as error:
        return portal_page(call, object_id, message=error.message)
    return redirect(f"/portal/{object_id}", 303)


def cancel_at_period_end(call: Call, object_id: str, sub_id: str) -> Any:
    return change_cancellation(call, object_id, sub_id, cancel=True)


def renew(call: Call, object_id: str, sub_id: str) -> Any:
    return change_cancellation(call, object_id, sub_id, cancel=False)


# ---------------------------------------------------------------- invoices


def invoice_page(call: Call, object_id: str) -> str:
    invoice = call.state.get("invoice", object_id, status=404)
    currency = invoice["currency"]
    rows = "".join(
        f"<tr><td>{html.escape(line.get('description') or '')}</td>"
        f"<td class='amount'>{money(line['amount'], currency)}</td></tr>"
        for line in invoice["lines"]["data"]
    )
    return page(
        f"Invoice {invoice['number']}",
        f"<h1>Invoice {html.escape(invoice['number'])}</h1>"
        f"<p>{day(invoice['created'])}, status <strong>{html.escape(invoice['status'])}</strong></p>"
        f"<table>{rows}<tr><th>Total</th><th class='amount'>"
        f"{money(invoice['total'], currency)}</th></tr>"
        f"<tr><td>Amount due</td><td class='amount'>{money(invoice['amount_remaining'], currency)}"
        "</td></tr></table>",
    )


SUB = "/subscriptions/<sub_id>"

ROUTES = [
    control("GET", "/checkout" + ID, checkout_page, kind="page"),
    control("POST", "/checkout" + ID + "/pay", pay, kind="page"),
    control("POST", "/checkout" + ID + "/decline", decline, kind="page"),
    control("GET", "/portal" + ID, portal_page, kind="page"),
    control("POST", "/portal" + ID + SUB + "/cancel", cancel_at_period_end, kind="page"),
    control("POST", "/portal" + ID + SUB + "/renew", renew, kind="page"),
    control("GET", "/invoice" + ID, invoice_page, kind="page"),
]
