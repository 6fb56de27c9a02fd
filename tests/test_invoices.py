"""The invoices table (sql/0060, shared/invoices.py): every invoice event stores the invoice as
Stripe has it when the handler runs; any delivery order with any repeats ends in Stripe's final
state; a renewal invoice closes the cycle it bills once finalized; members read their own."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops import repair
from shared.db import get_database
from shared.invoices import FetchedInvoice, apply_invoice
from shared.settings import get_settings
from tests.conftest import acting_as
from tests.test_webhook_support import (
    T0,
    Buyer,
    StripeStandIn,
    cycle_rows,
    deliver,
    event_object,
    event_row,
    invoice_object,
    month,
    new_id,
    subscribed,
    subscription_row,
    ts,
)

# The fixtures `webhook` and `buyer` (`stripe_api` is this module's own, below).
pytest_plugins = ("tests.test_webhook_support",)

INVOICE_EVENTS = {
    "invoice.finalized": "open",
    "invoice.payment_failed": "open",
    "invoice.paid": "paid",
    "invoice.updated": "paid",
    "invoice.voided": "void",
    "invoice.marked_uncollectible": "uncollectible",
}


@pytest.fixture
def stripe_api() -> Any:
    """The webhook tests' Stripe, with its router at hand for extra routes."""
    with respx.mock(base_url="https://api.stripe.com", assert_all_called=False) as router:
        standin = StripeStandIn(router)
        standin.router = router  # type: ignore[attr-defined]
        yield standin


@pytest.fixture
def database(function_env: dict[str, str]) -> Any:
    return get_database(get_settings())


def stripe_invoice(
    buyer: Buyer,
    *,
    status: str = "open",
    billed: tuple[int, int] = month(0),
    created: int | None = None,
    invoice_id: str | None = None,
    of_subscription: bool = True,
    metered: bool = True,
    billing_reason: str = "subscription_cycle",
    total: int = 20_400,
) -> dict[str, Any]:
    """An invoice of the buyer as Stripe has it: the renewal billing `billed`'s metered usage,
    or (`metered=False`) a line of another price. Finalized ones have a number and their links."""
    invoice_id = invoice_id or new_id("in")
    invoice = invoice_object(
        invoice_id,
        buyer.sub_id if of_subscription else None,
        buyer.customer_id,
        billed=billed,
        created=billed[1] if created is None else created,
        metered_price=buyer.plan["stripe_metered_price_id"] if metered else new_id("price"),
        status=status,
        billing_reason=billing_reason,
    )
    paid = total if status == "paid" else 0
    invoice.update(
        currency="eur",
        number=None if status == "draft" else f"MB-{invoice_id[-6:].upper()}",
        amount_due=total,
        amount_paid=paid,
        amount_remaining=0 if status in ("paid", "void") else total - paid,
        total=total,
        hosted_invoice_url=None
        if status == "draft"
        else f"https://invoice.stripe.com/i/acct_test/{invoice_id}",
        invoice_pdf=None
        if status == "draft"
        else f"https://pay.stripe.com/invoice/acct_test/{invoice_id}/pdf",
    )
    return invoice


def invoice_row(db: psycopg.Connection[Any], invoice_id: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = db.execute(
        "select * from invoices where id = %s", (invoice_id,)
    ).fetchone()
    return row


# Columns holding the Stripe field of the same name.
SAME_NAME = [
    "number",
    "status",
    "billing_reason",
    "currency",
    "amount_due",
    "amount_paid",
    "amount_remaining",
    "total",
    "hosted_invoice_url",
    "invoice_pdf",
]
TIMES = ("period_start", "period_end", "created")


def as_stored(invoice: dict[str, Any]) -> dict[str, Any]:
    """The Stripe fields of `invoice` the way its row holds them."""
    return {
        **{key: invoice[key] for key in SAME_NAME},
        **{key: ts(invoice[key]) for key in TIMES},
        "stripe_customer_id": invoice["customer"],
    }


def stored_fields(db: psycopg.Connection[Any], invoice_id: str) -> dict[str, Any]:
    row = invoice_row(db, invoice_id)
    assert row is not None, invoice_id
    return {key: row[key] for key in (*SAME_NAME, *TIMES, "stripe_customer_id")}


def renewed(buyer: Buyer, stripe_api: StripeStandIn, webhook: Any) -> None:
    """The buyer subscribed in month 0; Stripe has since renewed it into month 1."""
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(month_index=1)


# --- each event type ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", sorted(INVOICE_EVENTS))
def test_each_invoice_event_stores_the_invoice_as_stripe_has_it(
    db, webhook, stripe_api, buyer, event_type
):
    renewed(buyer, stripe_api, webhook)
    now = stripe_invoice(buyer, status=INVOICE_EVENTS[event_type])
    stripe_api.invoices[now["id"]] = now
    # The event's copy is older (a draft, other amounts): the handler does not trust it.
    stale = stripe_invoice(buyer, status="open", invoice_id=now["id"], total=1)
    stale.update(status="draft", number=None)
    event = event_object(event_type, stale, created=month(1)[0])

    response = deliver(webhook, event)

    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "processed"}
    row = invoice_row(db, now["id"])
    assert stored_fields(db, now["id"]) == as_stored(now)
    assert row["organisation_id"] == buyer.org["id"]
    assert row["subscription_id"] == subscription_row(db, buyer.sub_id)["id"]
    assert row["stripe_state_at"] is not None
    [retrieve] = stripe_api.invoice_retrieves
    assert retrieve.url.path == f"/v1/invoices/{now['id']}"
    stored = event_row(db, event["id"])
    assert stored["status"] == "processed" and stored["error"] is None
    # The ledger keeps no bearer link; the members' table does.
    assert stored["payload"]["data"]["object"]["hosted_invoice_url"] == "[redacted]"
    assert row["hosted_invoice_url"] == now["hosted_invoice_url"]

    assert deliver(webhook, event).get_json()["status"] == "duplicate"
    assert len(stripe_api.invoice_retrieves) == 1


def test_an_invoice_past_two_to_the_31_minor_units_is_stored(db, webhook, stripe_api, buyer):
    """Stripe's amounts are 64-bit; in IDR (hundredths, docs.stripe.com/currencies) 2^31 minor
    units is about USD 1,300, an ordinary invoice for a busy customer."""
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer, status="open", total=3_000_000_000)
    invoice["currency"] = "idr"
    stripe_api.invoices[invoice["id"]] = invoice
    event = event_object("invoice.finalized", invoice)

    response = deliver(webhook, event)

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "processed"
    assert stored_fields(db, invoice["id"]) == as_stored(invoice)
    assert invoice_row(db, invoice["id"])["amount_due"] == 3_000_000_000


def test_a_later_event_updates_the_row(db, webhook, stripe_api, buyer):
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer, status="open")
    stripe_api.invoices[invoice["id"]] = invoice
    assert deliver(webhook, event_object("invoice.finalized", invoice)).status_code == 200
    first = invoice_row(db, invoice["id"])

    paid = stripe_invoice(buyer, status="paid", invoice_id=invoice["id"])
    stripe_api.invoices[invoice["id"]] = paid
    assert deliver(webhook, event_object("invoice.paid", paid)).status_code == 200

    second = invoice_row(db, invoice["id"])
    assert (first["status"], second["status"]) == ("open", "paid")
    assert (second["amount_paid"], second["amount_remaining"]) == (paid["total"], 0)
    assert second["stripe_state_at"] > first["stripe_state_at"]
    assert second["updated_at"] > first["updated_at"]


def test_invoice_paid_also_syncs_the_subscription_and_closes_the_billed_cycle(
    db, webhook, stripe_api, buyer
):
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer, status="paid")
    stripe_api.invoices[invoice["id"]] = invoice
    event = event_object("invoice.paid", invoice, created=month(1)[0])

    assert deliver(webhook, event).get_json()["status"] == "processed"

    first, second = cycle_rows(db, buyer.sub_id)
    assert (first["status"], first["stripe_invoice_id"]) == ("closed", invoice["id"])
    assert (second["period_start"], second["status"]) == (ts(month(1)[0]), "active")
    assert invoice_row(db, invoice["id"])["billing_cycle_id"] == first["id"]
    assert event_row(db, event["id"])["status"] == "processed"


def test_payment_failed_records_the_open_invoice_and_the_past_due_subscription(
    db, webhook, stripe_api, buyer
):
    renewed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(status="past_due", month_index=1)
    invoice = stripe_invoice(buyer, status="open")
    stripe_api.invoices[invoice["id"]] = invoice

    event = event_object("invoice.payment_failed", invoice)
    assert deliver(webhook, event).get_json()["status"] == "processed"

    assert subscription_row(db, buyer.sub_id)["status"] == "past_due"
    row = invoice_row(db, invoice["id"])
    assert (row["status"], row["amount_remaining"]) == ("open", invoice["total"])


# --- the cycle an invoice bills ----------------------------------------------------------------


def test_a_finalized_renewal_invoice_links_and_closes_the_cycle_it_bills(
    db, webhook, stripe_api, buyer
):
    """DESIGN, late usage: nothing is counted in a cycle whose invoice is made. The invoice is
    made when it is finalized, long before it is paid (or if it never is)."""
    renewed(buyer, stripe_api, webhook)
    deliver(webhook, buyer.subscription_event("customer.subscription.updated", month_index=1))
    invoice = stripe_invoice(buyer, status="open")
    stripe_api.invoices[invoice["id"]] = invoice

    assert deliver(webhook, event_object("invoice.finalized", invoice)).status_code == 200

    first, second = cycle_rows(db, buyer.sub_id)
    assert (first["stripe_invoice_id"], first["status"]) == (invoice["id"], "closed")
    assert second["stripe_invoice_id"] is None and second["status"] == "active"
    assert invoice_row(db, invoice["id"])["billing_cycle_id"] == first["id"]
    reason = db.execute(
        "select private.unbillable_reason(c, c.period_start) as r from billing_cycles c"
        " where c.id = %s",
        (first["id"],),
    ).fetchone()["r"]
    assert reason == "invoiced"

    # Paid later: still that cycle, and nothing else moves.
    stripe_api.invoices[invoice["id"]] = stripe_invoice(
        buyer, status="paid", invoice_id=invoice["id"]
    )
    assert deliver(webhook, event_object("invoice.paid", invoice)).status_code == 200
    assert [c["stripe_invoice_id"] for c in cycle_rows(db, buyer.sub_id)] == [invoice["id"], None]
    assert invoice_row(db, invoice["id"])["billing_cycle_id"] == first["id"]


def test_any_other_invoice_bills_its_cycle_only_once_paid(db, webhook, stripe_api, buyer):
    """A plan change's invoice (pending_if_incomplete) whose payment fails is voided later, and
    the usage on it is billed again at the renewal: until paid it closes nothing."""
    renewed(buyer, stripe_api, webhook)
    change = stripe_invoice(buyer, billing_reason="subscription_update")
    stripe_api.invoices[change["id"]] = change

    assert deliver(webhook, event_object("invoice.payment_failed", change)).status_code == 200
    assert invoice_row(db, change["id"])["billing_cycle_id"] is None
    assert all(c["stripe_invoice_id"] is None for c in cycle_rows(db, buyer.sub_id))
    void = stripe_invoice(
        buyer, status="void", invoice_id=change["id"], billing_reason="subscription_update"
    )
    stripe_api.invoices[change["id"]] = void
    assert deliver(webhook, event_object("invoice.voided", void)).status_code == 200
    assert invoice_row(db, change["id"])["status"] == "void"
    assert all(c["stripe_invoice_id"] is None for c in cycle_rows(db, buyer.sub_id))

    paid = stripe_invoice(buyer, status="paid", billing_reason="subscription_update")
    stripe_api.invoices[paid["id"]] = paid
    assert deliver(webhook, event_object("invoice.paid", paid)).status_code == 200
    first = cycle_rows(db, buyer.sub_id)[0]
    assert first["stripe_invoice_id"] == paid["id"]
    assert invoice_row(db, paid["id"])["billing_cycle_id"] == first["id"]


def test_an_invoice_of_another_price_links_no_cycle(db, webhook, stripe_api, buyer):
    renewed(buyer, stripe_api, webhook)
    other = stripe_invoice(buyer, metered=False, billing_reason="manual")
    stripe_api.invoices[other["id"]] = other

    assert deliver(webhook, event_object("invoice.finalized", other)).status_code == 200

    assert invoice_row(db, other["id"])["billing_cycle_id"] is None
    assert all(c["stripe_invoice_id"] is None for c in cycle_rows(db, buyer.sub_id))


def test_the_usage_line_on_a_later_page_of_lines_still_links_the_cycle(
    db, webhook, stripe_api, buyer
):
    """An invoice object embeds the first lines only; the rest are fetched."""
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer)
    usage = invoice["lines"]["data"][0]
    flat = copy.deepcopy(usage)
    flat.update(id=new_id("il"), period={"start": month(1)[0], "end": month(1)[1]})
    flat["pricing"]["price_details"]["price"] = buyer.plan["stripe_price_id"]
    invoice["lines"].update(data=[flat], has_more=True)
    stripe_api.invoices[invoice["id"]] = invoice
    pages = stripe_api.router.get(path=f"/v1/invoices/{invoice['id']}/lines").mock(
        return_value=httpx.Response(
            200, json={"object": "list", "data": [usage], "has_more": False, "url": "/v1/x"}
        )
    )

    assert deliver(webhook, event_object("invoice.finalized", invoice)).status_code == 200

    [page] = pages.calls
    assert page.request.url.params["starting_after"] == flat["id"]
    [first] = cycle_rows(db, buyer.sub_id)  # finalized alone does not renew the subscription
    assert (first["period_start"], first["stripe_invoice_id"]) == (ts(T0), invoice["id"])


# --- drafts, strangers, deleted drafts ---------------------------------------------------------


def test_a_draft_is_not_recorded_until_finalized(db, webhook, stripe_api, buyer):
    renewed(buyer, stripe_api, webhook)
    draft = stripe_invoice(buyer, status="draft")
    stripe_api.invoices[draft["id"]] = draft
    updated = event_object("invoice.updated", draft)

    assert deliver(webhook, updated).get_json()["status"] == "ignored"

    assert invoice_row(db, draft["id"]) is None
    stored = event_row(db, updated["id"])
    assert stored["status"] == "ignored" and "draft" in stored["error"]
    # The grace hour is not over: the cycle still takes usage.
    assert all(c["stripe_invoice_id"] is None for c in cycle_rows(db, buyer.sub_id))

    final = stripe_invoice(buyer, status="open", invoice_id=draft["id"])
    stripe_api.invoices[draft["id"]] = final
    assert deliver(webhook, event_object("invoice.finalized", final)).status_code == 200
    assert stored_fields(db, draft["id"]) == as_stored(final)


@pytest.mark.parametrize("subscription", ["none", "not ours"])
def test_an_invoice_of_no_organisation_is_ignored_with_the_reason(
    db, webhook, stripe_api, subscription
):
    customer = new_id("cus")
    stranger = Buyer({"id": None}, {"stripe_metered_price_id": "price_x"}, new_id("sub"), customer)
    invoice = stripe_invoice(stranger, of_subscription=subscription == "not ours")
    stripe_api.invoices[invoice["id"]] = invoice
    event = event_object("invoice.finalized", invoice)

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    assert invoice_row(db, invoice["id"]) is None
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored"
    assert customer in stored["error"] and "belongs to no organisation" in stored["error"]
    if subscription == "not ours":
        assert f"subscription {stranger.sub_id} is not ours" in stored["error"]


def test_an_invoice_of_our_customer_without_a_subscription_is_recorded(
    db, webhook, stripe_api, buyer
):
    renewed(buyer, stripe_api, webhook)
    one_off = stripe_invoice(buyer, of_subscription=False, metered=False, billing_reason="manual")
    stripe_api.invoices[one_off["id"]] = one_off

    assert deliver(webhook, event_object("invoice.finalized", one_off)).status_code == 200

    row = invoice_row(db, one_off["id"])
    assert row["organisation_id"] == buyer.org["id"]
    assert row["subscription_id"] is None and row["billing_cycle_id"] is None


def test_an_update_of_a_draft_deleted_since_is_ignored(db, webhook, stripe_api, buyer):
    renewed(buyer, stripe_api, webhook)
    draft = stripe_invoice(buyer, status="draft")
    event = event_object("invoice.updated", draft)
    stripe_api.invoices[draft["id"]] = None  # deleted at Stripe before the handler ran

    assert deliver(webhook, event).get_json()["status"] == "ignored"
    stored = event_row(db, event["id"])
    assert "no longer exists" in stored["error"]


def test_stripe_down_fails_the_event_for_a_retry(db, webhook, stripe_api, buyer):
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer)
    stripe_api.invoices[invoice["id"]] = invoice
    stripe_api.fail_invoice_retrieves = 1
    event = event_object("invoice.finalized", invoice)

    response = deliver(webhook, event)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "stripe_unavailable"
    assert event_row(db, event["id"])["status"] == "failed"
    assert invoice_row(db, invoice["id"]) is None

    assert deliver(webhook, event).get_json()["status"] == "processed"
    assert invoice_row(db, invoice["id"])["status"] == "open"


# --- an older fetch never wins -----------------------------------------------------------------


def test_a_state_fetched_earlier_never_overwrites_one_fetched_later(
    db, database, webhook, stripe_api, buyer
):
    """Two handlers race: the one that fetched first commits last."""
    renewed(buyer, stripe_api, webhook)
    open_ = stripe_invoice(buyer, status="open")
    paid = stripe_invoice(buyer, status="paid", invoice_id=open_["id"])
    earlier = db.execute("select clock_timestamp() as t").fetchone()["t"]
    later = earlier + timedelta(seconds=1)

    apply_invoice(FetchedInvoice(paid, later), database=database)
    result = apply_invoice(FetchedInvoice(open_, earlier), database=database)

    assert result["applied"] is False and result["invoice_status"] == "paid"
    row = invoice_row(db, open_["id"])
    assert (row["status"], row["stripe_state_at"]) == ("paid", later)


@pytest.mark.parametrize("terminal", ["paid", "void", "uncollectible"])
def test_a_terminal_status_is_never_reopened(db, database, webhook, stripe_api, buyer, terminal):
    renewed(buyer, stripe_api, webhook)
    done = stripe_invoice(buyer, status=terminal)
    reopened = stripe_invoice(buyer, status="open", invoice_id=done["id"])
    earlier = db.execute("select clock_timestamp() as t").fetchone()["t"]

    apply_invoice(FetchedInvoice(done, earlier), database=database)
    apply_invoice(FetchedInvoice(reopened, earlier + timedelta(seconds=1)), database=database)

    assert invoice_row(db, done["id"])["status"] == terminal


def test_uncollectible_then_voided_is_applied(db, database, webhook, stripe_api, buyer):
    """Stripe lets an uncollectible invoice be voided (or paid) later."""
    renewed(buyer, stripe_api, webhook)
    lost = stripe_invoice(buyer, status="uncollectible")
    void = stripe_invoice(buyer, status="void", invoice_id=lost["id"])
    earlier = db.execute("select clock_timestamp() as t").fetchone()["t"]

    apply_invoice(FetchedInvoice(lost, earlier), database=database)
    apply_invoice(FetchedInvoice(void, earlier + timedelta(seconds=1)), database=database)

    assert invoice_row(db, lost["id"])["status"] == "void"


# --- a whole lifecycle, any order, any repeats -------------------------------------------------


def lifecycle(buyer: Buyer) -> list[tuple[str, dict[str, Any]]]:
    """Stripe's changes in the order it makes them: (event type, the invoice after the change).

    The renewal is finalized, its payment fails, then succeeds, then it is updated; another
    invoice of the subscription is finalized, marked uncollectible, then voided; a one-off
    invoice of the customer is finalized and marked uncollectible."""
    renewal, other, one_off = new_id("in"), new_id("in"), new_id("in")
    failed = stripe_invoice(buyer, status="open", invoice_id=renewal)
    failed.update(attempted=True, attempt_count=1)
    updated = stripe_invoice(buyer, status="paid", invoice_id=renewal)
    updated["metadata"] = {"note": "thanks"}

    def extra(status: str, invoice_id: str, **how: Any) -> dict[str, Any]:
        return stripe_invoice(
            buyer, status=status, invoice_id=invoice_id, metered=False, total=5_000, **how
        )

    return [
        ("invoice.finalized", stripe_invoice(buyer, status="open", invoice_id=renewal)),
        ("invoice.finalized", extra("open", other, billing_reason="subscription_update")),
        ("invoice.payment_failed", failed),
        ("invoice.finalized", extra("open", one_off, of_subscription=False)),
        ("invoice.paid", stripe_invoice(buyer, status="paid", invoice_id=renewal)),
        (
            "invoice.marked_uncollectible",
            extra("uncollectible", other, billing_reason="subscription_update"),
        ),
        ("invoice.updated", updated),
        ("invoice.voided", extra("void", other, billing_reason="subscription_update")),
        ("invoice.marked_uncollectible", extra("uncollectible", one_off, of_subscription=False)),
    ]


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_lifecycle_in_any_order_with_repeats_ends_in_stripes_final_state(
    db, webhook, stripe_api, make_org, make_plan, data
):
    """Stripe moves on while events are on their way: a delivery happens any time after its
    event was sent, any number of times, and its handler sees Stripe as it is at that moment."""
    buyer = Buyer(make_org(), make_plan(), new_id("sub"), new_id("cus"))
    renewed(buyer, stripe_api, webhook)
    changes = lifecycle(buyer)
    sent: list[dict[str, Any]] = []
    delivered: set[int] = set()

    def advance() -> None:
        event_type, invoice = changes[len(sent)]
        stripe_api.invoices[invoice["id"]] = invoice
        sent.append(event_object(event_type, copy.deepcopy(invoice), created=month(1)[0]))

    def send(index: int) -> None:
        response = deliver(webhook, sent[index])
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["status"] in {"processed", "duplicate"}
        delivered.add(index)

    steps = data.draw(
        st.lists(st.tuples(st.booleans(), st.integers(0, 99)), max_size=24), label="steps"
    )
    for stripe_moves, pick in steps:
        if (stripe_moves or not sent) and len(sent) < len(changes):
            advance()
        elif sent:
            send(pick % len(sent))
    while len(sent) < len(changes):
        advance()
    rest = [index for index in range(len(sent)) if index not in delivered]
    for index in data.draw(st.permutations(rest), label="rest"):
        send(index)

    finals = {invoice["id"]: invoice for _, invoice in changes}
    for invoice_id, final in finals.items():
        assert stored_fields(db, invoice_id) == as_stored(final), invoice_id
    renewal_id, other_id, one_off_id = (
        changes[0][1]["id"],
        changes[1][1]["id"],
        changes[3][1]["id"],
    )
    first, _ = cycle_rows(db, buyer.sub_id)
    assert first["stripe_invoice_id"] == renewal_id
    assert invoice_row(db, renewal_id)["billing_cycle_id"] == first["id"]
    assert invoice_row(db, other_id)["billing_cycle_id"] is None
    assert invoice_row(db, one_off_id)["subscription_id"] is None
    statuses = {event_row(db, event["id"])["status"] for event in sent}
    assert statuses == {"processed"}


# --- resync ------------------------------------------------------------------------------------


def test_resync_fills_the_invoices_of_a_subscription_page_by_page(
    db, webhook, stripe_api, buyer, capsys, monkeypatch
):
    renewed(buyer, stripe_api, webhook)
    monkeypatch.setattr("shared.invoices.PAGE", 2)  # five invoices: three pages
    first = stripe_invoice(
        buyer,
        status="paid",
        billed=(month(0)[0], month(0)[0]),
        billing_reason="subscription_create",
    )
    renewal = stripe_invoice(buyer, status="open")
    void = stripe_invoice(buyer, status="void", metered=False, created=month(0)[0] + 10)
    lost = stripe_invoice(buyer, status="uncollectible", metered=False, created=month(0)[0] + 20)
    draft = stripe_invoice(buyer, status="draft", billed=month(1), created=month(2)[0])
    for invoice in (first, renewal, void, lost, draft):
        stripe_api.invoices[invoice["id"]] = invoice

    assert repair.main(["resync", "--subscription", buyer.sub_id, "--dry-run"]) == 0
    assert f"would apply invoice {renewal['id']}: open" in capsys.readouterr().out
    assert invoice_row(db, renewal["id"]) is None

    assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0

    out = capsys.readouterr().out
    for invoice in (first, renewal, void, lost):
        assert stored_fields(db, invoice["id"]) == as_stored(invoice)
        assert f"recorded invoice {invoice['id']}: {invoice['status']}" in out
    assert invoice_row(db, draft["id"]) is None
    assert f"ignored invoice {draft['id']}: invoice {draft['id']} is a draft" in out
    assert f"invoices of {buyer.sub_id}: 5 at Stripe (4 recorded" in out
    pages = [r for r in stripe_api.router.calls if r.request.url.path == "/v1/invoices"]
    assert len(pages) == 3 + 3  # the dry run's, then this run's
    assert pages[0].request.url.params["subscription"] == buyer.sub_id
    assert cycle_rows(db, buyer.sub_id)[0]["stripe_invoice_id"] == renewal["id"]

    # Again: nothing changes.
    assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0
    assert "(0 recorded, 0 synced, 4 unchanged, 1 ignored)" in capsys.readouterr().out
    # Paid since: that one changes.
    stripe_api.invoices[renewal["id"]] = stripe_invoice(
        buyer, status="paid", invoice_id=renewal["id"]
    )
    assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0
    out = capsys.readouterr().out
    assert f"synced invoice {renewal['id']}: paid (amount_paid, amount_remaining, status)" in out
    assert "(0 recorded, 1 synced, 3 unchanged, 1 ignored)" in out


# --- row-level security ------------------------------------------------------------------------


def test_members_read_their_organisations_invoices_and_nobody_else_does(
    db, webhook, stripe_api, make_user, make_org, make_plan
):
    member, outsider = make_user(), make_user()
    org = make_org(members={member: "member"})
    buyer = Buyer(org, make_plan(), new_id("sub"), new_id("cus"))
    renewed(buyer, stripe_api, webhook)
    invoice = stripe_invoice(buyer)
    stripe_api.invoices[invoice["id"]] = invoice
    deliver(webhook, event_object("invoice.finalized", invoice))
    other = Buyer(make_org(), buyer.plan, new_id("sub"), new_id("cus"))
    renewed(other, stripe_api, webhook)
    theirs = stripe_invoice(other)
    stripe_api.invoices[theirs["id"]] = theirs
    deliver(webhook, event_object("invoice.finalized", theirs))

    query = "select id, hosted_invoice_url from public.invoices where id = any(%s)"
    both = [invoice["id"], theirs["id"]]
    for user in (member, org["owner_id"]):
        with acting_as(db, "authenticated", str(user)) as cur:
            assert cur.execute(query, (both,)).fetchall() == [
                (invoice["id"], invoice["hosted_invoice_url"])
            ]
    with acting_as(db, "authenticated", outsider) as cur:
        assert cur.execute(query, (both,)).fetchall() == []
    with acting_as(db, "anon") as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute(query, (both,))
    for statement in (
        "update public.invoices set status = 'paid'",
        "delete from public.invoices",
        "insert into public.invoices (id) values ('in_forged')",
    ):
        with (
            acting_as(db, "authenticated", member) as cur,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            cur.execute(statement)
    with acting_as(db, "authenticated", member) as cur, pytest.raises(psycopg.Error):
        cur.execute("select public.apply_invoice_state('{}', now(), null)")
