"""A customer's whole life over HTTP: the real functions as servers (functions-framework), the
Stripe stand-in sending signed webhooks, Postgres; rows and the stand-in's invoices at each step.

This is `./deploy.sh local`'s own stack (devtools.local), so the newcomer's path is what is tested.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from devtools.local import DEMO_ORG_ID, Stack, local_secrets, owner_token, running
from ops.catalog import ROOT, load_plans
from shared.settings import Settings
from shared.stripe_api import make_stripe_client
from tests.conftest import create_database
from tests.openapi_check import assert_documented


def free_port_block(size: int) -> int:
    """A base port with `size` free ports after it, below the ephemeral range (32768 up), where
    the tests' own outgoing connections could hold a port the functions then fail to bind."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 32000 - size)
        if all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free block of ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def stack(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = free_port_block(8)  # web/ at base, the functions at base + 1 .. 6, the stand-in at + 7
    with running(
        tmp_path_factory.mktemp("local"),
        port_base=base,
        stripe_port=base + 7,
        database_url=create_database(pg_server_url),
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def db(stack: Stack) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True, row_factory=dict_row) as conn:
        yield conn


class Client:
    """Talks to the running functions the way the frontend, the agent and Stripe do."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.Client(timeout=30)
        keys = local_secrets(stack.data)
        self.service = {"Authorization": f"Bearer {keys['service_key']}"}
        self.owner = {"Authorization": f"Bearer {owner_token(keys['jwt_secret'])}"}

    def call(self, name: str, method: str, *, expect: int, **kwargs: Any) -> Any:
        response = self.http.request(method, self.stack.urls[name], **kwargs)
        body = response.json()
        assert response.status_code == expect, body
        assert_documented(f"/{name}", method, response.status_code, body)
        return body

    def standin(self, path: str, **body: Any) -> Any:
        if path.endswith(("/advance", "/cancel")):
            self.settle()
        response = self.http.post(f"{self.stack.stripe_base}/_standin/{path}", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        for delivery in result.get("deliveries", []):
            assert delivery["status_code"] == 200, delivery
        return result

    def stripe_state(self) -> dict[str, Any]:
        """The stand-in's objects by kind and id (meter events by identifier)."""
        state = self.http.get(f"{self.stack.stripe_base}/_standin/state").json()
        by_id = {
            kind: {obj["id"]: obj for obj in objects}
            for kind, objects in state.items()
            if isinstance(objects, list) and kind != "meter_events" and kind != "events"
        }
        by_id["meter_events"] = {e["identifier"]: e for e in state["meter_events"]}
        by_id["checkout_orders"] = state["checkout_orders"]
        return by_id

    def report(self, org: str, call_id: str, seconds: float, expect: int = 202) -> Any:
        """A report; a first one answers 202 (recorded, its meter event queued)."""
        return self.call(
            "report-usage",
            "POST",
            expect=expect,
            headers=self.service,
            json={"org_id": org, "call_id": call_id, "call_duration_seconds": seconds},
        )

    def settle(self) -> None:
        """What the hour before a period's invoice does in production: the scheduled flush (or
        report-usage's own) delivers every queued meter event. The stand-in ends a period at
        once, so the test lets the flush run first."""

        def nothing_queued() -> None:
            self.flush()
            with psycopg.connect(self.stack.env["DATABASE_URL"], autocommit=True) as conn:
                row = conn.execute(
                    "select count(*) from usage_records where meter_status = 'pending'"
                    " and (meter_next_attempt_at <= now() or meter_claimed_at is not null)"
                ).fetchone()
            assert row == (0,), f"{row} meter events still queued"

        eventually(nothing_queued)

    def flush(self) -> Any:
        """The scheduled flush's request: deliver every due meter event now."""
        return self.call(
            "report-usage", "POST", expect=200, headers=self.service, json={"action": "flush"}
        )

    def delivered(self, db: psycopg.Connection[dict[str, Any]], org: str, call_id: str) -> None:
        """Flush, then the call's meter event is on Stripe's meter (the function's own flusher
        may hold it for a moment: a claimed event is skipped by this flush)."""
        self.flush()

        def sent() -> None:
            row = db.execute(
                "select meter_status, meter_identifier from usage_records"
                " where organisation_id = %s and call_id = %s",
                (org, call_id),
            ).fetchone()
            assert row is not None and row["meter_status"] == "sent", row
            assert row["meter_identifier"] in self.stripe_state()["meter_events"]

        eventually(sent)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack)


def plan(db: psycopg.Connection[dict[str, Any]], name: str) -> dict[str, Any]:
    row = db.execute("select * from billing_plans where name = %s", (name,)).fetchone()
    assert row is not None
    return row


def subscription(db: psycopg.Connection[dict[str, Any]], org: str) -> dict[str, Any]:
    row = db.execute(
        "select * from subscriptions where organisation_id = %s order by created_at desc limit 1",
        (org,),
    ).fetchone()
    assert row is not None
    return row


def cycles(db: psycopg.Connection[dict[str, Any]], org: str) -> list[dict[str, Any]]:
    return db.execute(
        "select * from billing_cycles where organisation_id = %s order by period_start", (org,)
    ).fetchall()


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Webhooks that Stripe sends after answering a call arrive a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_monthly_customer_life(client: Client, db: psycopg.Connection[dict[str, Any]]) -> None:
    starter = plan(db, "Starter")

    # Before buying: the agent may not place calls.
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": DEMO_ORG_ID}
    )
    assert cycle["allowed"] is False and cycle["plan"] is None

    # The owner buys Starter monthly; a double click gets the same session.
    order = {"plan_id": str(starter["id"]), "billing_period": "monthly"}
    first = client.call(
        "create-checkout-session", "POST", expect=200, headers=client.owner, json=order
    )
    again = client.call(
        "create-checkout-session", "POST", expect=200, headers=client.owner, json=order
    )
    assert again == first
    lines = client.stripe_state()["checkout_orders"][first["session_id"]]["lines"]
    assert [line["price"] for line in lines][:2] == [
        starter["stripe_price_id"],
        starter["stripe_metered_price_id"],
    ]

    # The customer pays: Stripe sends checkout.session.completed, subscription.created, invoice.paid.
    paid = client.standin(f"checkout_sessions/{first['session_id']}/complete")
    sub = subscription(db, DEMO_ORG_ID)
    assert (sub["status"], sub["billing_period"], sub["plan_id"]) == (
        "active",
        "monthly",
        starter["id"],
    )
    assert sub["stripe_subscription_id"] == paid["subscription"]
    [opened] = cycles(db, DEMO_ORG_ID)
    assert (opened["status"], opened["included_minutes"], opened["minutes_used"]) == (
        "active",
        500,
        0,
    )
    first_invoice = client.stripe_state()["invoices"][paid["invoice"]]
    assert first_invoice["amount_paid"] == 20400 + 24900  # flat fee + setup fee, no usage yet

    # Buying again is refused while subscribed.
    client.call("create-checkout-session", "POST", expect=409, headers=client.owner, json=order)

    # Usage under the included minutes, then over; a retry counts nothing twice.
    call = uuid.uuid4().hex[:8]
    small = client.report(DEMO_ORG_ID, f"{call}-1", 700)
    assert (small["billed_minutes"], small["minutes_used"], small["alerts"]) == (12, 12, [])
    assert small["meter_status"] == "pending"
    client.delivered(db, DEMO_ORG_ID, f"{call}-1")
    big = client.report(DEMO_ORG_ID, f"{call}-2", 36000)
    assert (big["minutes_used"], big["overage_minutes"], big["overage_cost_cents"]) == (
        612,
        112,
        5600,
    )
    assert big["alerts"] == [80, 100, 120]
    repeat = client.report(DEMO_ORG_ID, f"{call}-2", 36000, expect=200)
    assert repeat["duplicate"] is True and repeat["minutes_used"] == 612
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": DEMO_ORG_ID}
    )
    assert (cycle["allowed"], cycle["minutes_used"], cycle["plan"]["name"]) == (
        True,
        612,
        "Starter",
    )
    alerts = db.execute(
        "select threshold_percent from usage_alerts where billing_cycle_id = %s order by 1",
        (opened["id"],),
    ).fetchall()
    assert [a["threshold_percent"] for a in alerts] == [80, 100, 120]
    client.settle()
    values = sorted(
        int(event["payload"]["value"])
        for event in client.stripe_state()["meter_events"].values()
        if event["payload"]["stripe_customer_id"] == sub["stripe_customer_id"]
    )
    assert values == [12, 600]

    # Renewal: the overage is invoiced (graduated price: 112 minutes x 0.50), a new cycle opens.
    renewal = client.standin(f"subscriptions/{sub['stripe_subscription_id']}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    usage_lines = [line for line in invoice["lines"]["data"] if line["quantity"] == 612]
    assert [line["amount"] for line in usage_lines] == [5600]
    assert invoice["amount_paid"] == 20400 + 5600
    closed, current = cycles(db, DEMO_ORG_ID)
    assert (closed["status"], closed["minutes_used"], closed["stripe_invoice_id"]) == (
        "closed",
        612,
        renewal["invoice"],
    )
    assert (current["status"], current["minutes_used"]) == ("active", 0)
    assert current["period_start"] == closed["period_end"]

    # A failed payment, then recovery.
    failed = client.standin(f"subscriptions/{sub['stripe_subscription_id']}/advance", fail=True)
    assert subscription(db, DEMO_ORG_ID)["status"] == "past_due"
    client.standin(f"invoices/{failed['invoice']}/pay")
    assert subscription(db, DEMO_ORG_ID)["status"] == "active"
    changes = db.execute(
        "select details from audit_log where organisation_id = %s and action like 'subscription.%%'",
        (DEMO_ORG_ID,),
    ).fetchall()
    assert any(
        c["details"]["before"].get("status") == "active"
        and c["details"]["after"].get("status") == "past_due"
        for c in changes
        if c["details"].get("before")
    )

    # The owner opens the portal; then the subscription is canceled.
    portal = client.call("create-portal-session", "POST", expect=200, headers=client.owner, json={})
    assert portal["portal_url"].startswith(client.stack.stripe_base or "")
    client.standin(f"subscriptions/{sub['stripe_subscription_id']}/cancel")
    ended = subscription(db, DEMO_ORG_ID)
    assert ended["status"] == "canceled" and ended["canceled_at"] is not None
    assert all(c["status"] == "closed" for c in cycles(db, DEMO_ORG_ID))
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": DEMO_ORG_ID}
    )
    assert cycle["allowed"] is False


def test_yearly_customer_gets_the_monthly_metered_item(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    growth = plan(db, "Growth")
    org, headers = new_organisation(client, db, "Yearly Ltd")
    order = {"plan_id": str(growth["id"]), "billing_period": "yearly"}
    session = client.call(
        "create-checkout-session", "POST", expect=200, headers=headers, json=order
    )
    lines = client.stripe_state()["checkout_orders"][session["session_id"]]["lines"]
    assert [line["price"] for line in lines] == [
        growth["stripe_yearly_price_id"],
        client.stack.env["STRIPE_SETUP_FEE_PRICE_ID"],
    ]
    paid = client.standin(f"checkout_sessions/{session['session_id']}/complete")

    def metered_item_added() -> None:
        items = client.stripe_state()["subscriptions"][paid["subscription"]]["items"]["data"]
        prices = sorted(item["price"]["id"] for item in items)
        assert prices == sorted(
            [growth["stripe_yearly_price_id"], growth["stripe_metered_price_id"]]
        )

    eventually(metered_item_added)
    sub = subscription(db, org)
    assert (sub["billing_period"], sub["plan_id"], sub["status"]) == (
        "yearly",
        growth["id"],
        "active",
    )
    [cycle] = eventually(lambda: _one_cycle(db, org))
    assert cycle["included_minutes"] == 1000
    assert (cycle["period_end"] - cycle["period_start"]).days in range(28, 32)  # monthly usage
    result = client.report(org, "yearly-call-1", 90)
    assert (result["billed_minutes"], result["minutes_used"], result["meter_status"]) == (
        2,
        2,
        "pending",
    )
    client.delivered(db, org, "yearly-call-1")


def new_organisation(
    client: Client, db: psycopg.Connection[dict[str, Any]], name: str
) -> tuple[str, dict[str, str]]:
    """A fresh organisation and its owner: (organisation id, the owner's Authorization header)."""
    owner, org = str(uuid.uuid4()), str(uuid.uuid4())
    db.execute(
        "insert into auth.users (id, email) values (%s, %s)", (owner, f"{owner}@example.com")
    )
    db.execute(
        "insert into organisations (id, name, owner_id) values (%s, %s, %s)", (org, name, owner)
    )
    db.execute("insert into organisation_members values (%s, %s, 'owner')", (org, owner))
    return org, {"Authorization": f"Bearer {_token_for(client, owner)}"}


def _one_cycle(db: psycopg.Connection[dict[str, Any]], org: str) -> list[dict[str, Any]]:
    found = cycles(db, org)
    assert len(found) == 1
    return found


def _token_for(client: Client, user_id: str) -> str:
    from jose import jwt

    now = int(time.time())
    claims = {
        "sub": user_id,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 600,
    }
    return str(
        jwt.encode(claims, local_secrets(client.stack.data)["jwt_secret"], algorithm="HS256")
    )


# ---------------------------------------------------------------- plan changes (POST change-plan)


def test_upgrade_mid_period_bills_each_part_of_the_cycle_at_its_own_price(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Starter monthly, 550 minutes, upgrade to Growth now: the change's invoice bills the 550
    at Starter's tiers, the renewal bills the minutes after the change at Growth's; our cycle is
    split at the change and each part says what its line says."""
    starter, growth = plan(db, "Starter"), plan(db, "Growth")
    org, owner = new_organisation(client, db, "Upgrade Ltd")
    sub = _subscribe(client, db, org, owner, starter)
    stripe_sub = sub["stripe_subscription_id"]
    assert client.report(org, "up-1", 450 * 60)["minutes_used"] == 450
    before = client.report(org, "up-2", 100 * 60)
    assert (before["minutes_used"], before["overage_cost_cents"]) == (550, 50 * 50)

    _next_second()
    changed = _change_plan(client, owner, plan_id=str(growth["id"]), billing_period="monthly")
    assert (changed["plan_id"], changed["billing_period"], changed["effective"]) == (
        str(growth["id"]),
        "monthly",
        "now",
    )
    assert changed["subscription_id"] == stripe_sub
    _settled(client)
    row = subscription(db, org)
    assert (row["plan_id"], row["billing_period"], row["status"]) == (
        growth["id"],
        "monthly",
        "active",
    )
    assert row["stripe_metered_price_id"] == growth["stripe_metered_price_id"]
    assert _plan_change_statuses(db, org) == ["applied"]
    items = _stripe_items(client, stripe_sub)
    assert sorted(items.values()) == sorted(
        [growth["stripe_price_id"], growth["stripe_metered_price_id"]]
    )

    # The change's invoice: Starter's metered usage so far, and the flat fee prorated.
    change_invoice = _latest_invoice(client, stripe_sub)
    assert change_invoice["billing_reason"] == "subscription_update"
    old, new = cycles(db, org)
    assert (old["status"], old["closed_by_change"], old["stripe_invoice_id"]) == (
        "closed",
        True,
        change_invoice["id"],
    )
    assert (new["status"], new["minutes_used"], new["stripe_invoice_id"]) == ("active", 0, None)
    assert old["period_end"] == new["period_start"]
    _assert_terms(client, old, starter)
    _assert_terms(client, new, growth)
    [usage] = _usage_lines(client, change_invoice)
    assert usage["pricing"]["price_details"]["price"] == starter["stripe_metered_price_id"]
    assert (usage["quantity"], usage["amount"]) == (old["minutes_used"], old["overage_cost_cents"])
    assert (old["minutes_used"], old["overage_minutes"], old["overage_cost_cents"]) == (
        550,
        50,
        2500,
    )
    credit, debit = _proration_lines(client, change_invoice)
    assert credit["pricing"]["price_details"]["price"] == starter["stripe_price_id"]
    assert debit["pricing"]["price_details"]["price"] == growth["stripe_price_id"]
    at, end = debit["period"]["start"], debit["period"]["end"]
    length = end - int(sub["current_period_start"].timestamp())
    assert credit["amount"] == -(starter["monthly_price_cents"] * (end - at)) // length
    assert debit["amount"] == growth["monthly_price_cents"] * (end - at) // length
    assert change_invoice["status"] == "paid"
    assert change_invoice["amount_paid"] == usage["amount"] + credit["amount"] + debit["amount"]

    # The agent sees Growth's terms at once; more calls count in the new part.
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": org}
    )
    assert (cycle["plan"]["name"], cycle["included_minutes"], cycle["minutes_used"]) == (
        "Growth",
        1000,
        0,
    )
    after = client.report(org, "up-3", 1100 * 60)
    assert (after["minutes_used"], after["included_minutes"], after["overage_cost_cents"]) == (
        1100,
        1000,
        100 * 50,
    )

    # Renewal: Growth's metered line is the new part, exactly; Starter's is not billed again.
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [usage] = _usage_lines(client, invoice)
    assert usage["pricing"]["price_details"]["price"] == growth["stripe_metered_price_id"]
    old, new, current = cycles(db, org)
    assert (new["status"], new["stripe_invoice_id"]) == ("closed", invoice["id"])
    assert (usage["quantity"], usage["amount"]) == (new["minutes_used"], new["overage_cost_cents"])
    assert (new["minutes_used"], new["overage_minutes"], new["overage_cost_cents"]) == (
        1100,
        100,
        5000,
    )
    assert old["stripe_invoice_id"] == change_invoice["id"]  # unchanged
    assert invoice["amount_paid"] == growth["monthly_price_cents"] + usage["amount"]
    assert (current["status"], current["minutes_used"], current["period_start"]) == (
        "active",
        0,
        new["period_end"],
    )
    _assert_terms(client, current, growth)
    _webhooks_all_answered(client, db)


def test_downgrade_waits_for_the_period_end_and_the_renewal_applies_it(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Growth monthly, downgrade to Starter: pending until the period ends (Growth's terms meanwhile);
    the renewal bills the period at Growth's price and the next one is Starter's."""
    starter, growth = plan(db, "Starter"), plan(db, "Growth")
    org, owner = new_organisation(client, db, "Downgrade Ltd")
    sub = _subscribe(client, db, org, owner, growth)
    stripe_sub = sub["stripe_subscription_id"]
    assert client.report(org, "down-1", 300 * 60)["minutes_used"] == 300

    changed = _change_plan(client, owner, plan_id=str(starter["id"]), billing_period="monthly")
    assert (changed["plan_id"], changed["billing_period"], changed["effective"]) == (
        str(starter["id"]),
        "monthly",
        "period_end",
    )
    assert _when(changed["effective_at"]) == sub["current_period_end"]
    _settled(client)
    row = subscription(db, org)
    assert (row["plan_id"], row["pending_plan_id"], row["pending_billing_period"]) == (
        growth["id"],
        starter["id"],
        "monthly",
    )
    assert row["pending_effective_at"] == sub["current_period_end"]
    assert row["stripe_schedule_id"] is not None
    assert _plan_change_statuses(db, org) == ["scheduled"]
    state = client.stripe_state()
    assert state["subscriptions"][stripe_sub]["schedule"] == row["stripe_schedule_id"]
    assert sorted(_stripe_items(client, stripe_sub).values()) == sorted(
        [growth["stripe_price_id"], growth["stripe_metered_price_id"]]
    )
    # Until the period ends: Growth's terms, one cycle.
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": org}
    )
    assert (cycle["plan"]["name"], cycle["included_minutes"]) == ("Growth", 1000)
    more = client.report(org, "down-2", 800 * 60)
    assert (more["minutes_used"], more["included_minutes"], more["overage_cost_cents"]) == (
        1100,
        1000,
        100 * 50,
    )
    [only] = cycles(db, org)
    _assert_terms(client, only, growth)

    # The renewal: the ended period at Growth's metered price, Starter's flat fee for the next.
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [usage] = _usage_lines(client, invoice)
    assert usage["pricing"]["price_details"]["price"] == growth["stripe_metered_price_id"]
    [fee] = _fee_lines(client, invoice)
    assert (fee["pricing"]["price_details"]["price"], fee["amount"]) == (
        starter["stripe_price_id"],
        starter["monthly_price_cents"],
    )
    closed, current = cycles(db, org)
    assert (closed["status"], closed["stripe_invoice_id"]) == ("closed", invoice["id"])
    assert (usage["quantity"], usage["amount"]) == (
        closed["minutes_used"],
        closed["overage_cost_cents"],
    )
    row = subscription(db, org)
    assert (row["plan_id"], row["billing_period"], row["status"]) == (
        starter["id"],
        "monthly",
        "active",
    )
    assert (row["pending_plan_id"], row["pending_billing_period"], row["pending_effective_at"]) == (
        None,
        None,
        None,
    )
    assert row["stripe_metered_price_id"] == starter["stripe_metered_price_id"]
    assert (current["status"], current["minutes_used"], current["period_start"]) == (
        "active",
        0,
        closed["period_end"],
    )
    _assert_terms(client, current, starter)

    # Usage after the boundary counts in Starter's cycle (the stand-in's clock is a period ahead
    # of the wall clock, so it is counted late, in the current cycle), and the next renewal's
    # metered line is that cycle's figures.
    late = client.report(org, "down-3", 600 * 60)
    assert (late["minutes_used"], late["included_minutes"], late["overage_cost_cents"]) == (
        600,
        500,
        100 * 50,
    )
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [usage] = _usage_lines(client, invoice)
    assert usage["pricing"]["price_details"]["price"] == starter["stripe_metered_price_id"]
    _, closed, _ = cycles(db, org)
    assert (closed["status"], closed["stripe_invoice_id"]) == ("closed", invoice["id"])
    assert (usage["quantity"], usage["amount"]) == (
        closed["minutes_used"],
        closed["overage_cost_cents"],
    )
    assert (closed["minutes_used"], closed["overage_cost_cents"]) == (600, 5000)
    assert subscription(db, org)["stripe_schedule_id"] is None  # its last phase began: released
    _webhooks_all_answered(client, db)


def test_monthly_to_yearly_charges_the_year_and_keeps_the_monthly_metered_item(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Starter monthly to Growth yearly: the year's flat fee charged now less the unused month,
    the metered item stays monthly on Growth's metered price; the cycle is split at the change."""
    starter, growth = plan(db, "Starter"), plan(db, "Growth")
    org, owner = new_organisation(client, db, "Yearly Upgrade Ltd")
    sub = _subscribe(client, db, org, owner, starter)
    stripe_sub = sub["stripe_subscription_id"]
    metered_end = _stripe_item_periods(client, stripe_sub)[starter["stripe_metered_price_id"]][1]
    assert client.report(org, "year-1", 520 * 60)["overage_cost_cents"] == 20 * 50

    _next_second()
    changed = _change_plan(client, owner, plan_id=str(growth["id"]), billing_period="yearly")
    assert (changed["plan_id"], changed["billing_period"], changed["effective"]) == (
        str(growth["id"]),
        "yearly",
        "now",
    )
    _settled(client)
    periods = _stripe_item_periods(client, stripe_sub)
    assert sorted(periods) == sorted(
        [growth["stripe_yearly_price_id"], growth["stripe_metered_price_id"]]
    )
    year_start, year_end = periods[growth["stripe_yearly_price_id"]]
    assert (year_end - year_start) // 86400 in (365, 366)
    assert periods[growth["stripe_metered_price_id"]][1] == metered_end  # still monthly
    row = subscription(db, org)
    assert (row["plan_id"], row["billing_period"], row["status"]) == (
        growth["id"],
        "yearly",
        "active",
    )
    assert int(row["current_period_end"].timestamp()) == year_end

    change_invoice = _latest_invoice(client, stripe_sub)
    [fee] = _fee_lines(client, change_invoice)
    assert (fee["pricing"]["price_details"]["price"], fee["amount"]) == (
        growth["stripe_yearly_price_id"],
        growth["yearly_price_cents"],
    )
    assert (fee["period"]["start"], fee["period"]["end"]) == (year_start, year_end)
    [credit] = _proration_lines(client, change_invoice)
    assert credit["pricing"]["price_details"]["price"] == starter["stripe_price_id"]
    at, end = credit["period"]["start"], credit["period"]["end"]
    length = end - int(sub["current_period_start"].timestamp())
    assert credit["amount"] == -(starter["monthly_price_cents"] * (end - at)) // length < 0
    old, new = cycles(db, org)
    [usage] = _usage_lines(client, change_invoice)
    assert usage["pricing"]["price_details"]["price"] == starter["stripe_metered_price_id"]
    assert (usage["quantity"], usage["amount"]) == (old["minutes_used"], old["overage_cost_cents"])
    assert (old["minutes_used"], old["overage_cost_cents"]) == (520, 1000)
    assert (old["status"], old["closed_by_change"], old["stripe_invoice_id"]) == (
        "closed",
        True,
        change_invoice["id"],
    )
    assert change_invoice["status"] == "paid"
    assert change_invoice["amount_paid"] == fee["amount"] + credit["amount"] + usage["amount"]
    _assert_terms(client, old, starter)
    _assert_terms(client, new, growth)
    assert int(new["period_end"].timestamp()) == metered_end  # the cycle stays monthly

    after = client.report(org, "year-2", 1050 * 60)
    assert (after["minutes_used"], after["included_minutes"], after["overage_cost_cents"]) == (
        1050,
        1000,
        50 * 50,
    )
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [usage] = _usage_lines(client, invoice)
    assert usage["pricing"]["price_details"]["price"] == growth["stripe_metered_price_id"]
    assert _fee_lines(client, invoice) == []  # the year is paid
    old, new, current = cycles(db, org)
    assert (new["status"], new["stripe_invoice_id"]) == ("closed", invoice["id"])
    assert (usage["quantity"], usage["amount"]) == (new["minutes_used"], new["overage_cost_cents"])
    assert invoice["amount_paid"] == usage["amount"] == 2500
    assert (current["status"], current["period_start"]) == ("active", new["period_end"])
    _assert_terms(client, current, growth)
    row = subscription(db, org)
    assert (row["billing_period"], int(row["current_period_end"].timestamp())) == (
        "yearly",
        year_end,
    )
    _webhooks_all_answered(client, db)


def test_declined_upgrade_changes_nothing_and_a_retry_succeeds(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """The card is declined on the upgrade's invoice: 402, the subscription stays on Starter at
    Stripe and here; once the card is fine, the same request upgrades."""
    starter, growth = plan(db, "Starter"), plan(db, "Growth")
    org, owner = new_organisation(client, db, "Declined Ltd")
    sub = _subscribe(client, db, org, owner, starter)
    stripe_sub = sub["stripe_subscription_id"]
    assert client.report(org, "dec-1", 100 * 60)["minutes_used"] == 100
    _settled(client)
    items_before = _stripe_items(client, stripe_sub)
    rows_before = (_subscription_facts(db, org), cycles(db, org))

    client.standin(f"customers/{sub['stripe_customer_id']}/decline_next_payment")
    _next_second()
    order = {"plan_id": str(growth["id"]), "billing_period": "monthly"}
    declined = _change_plan(client, owner, expect=402, **order)
    assert declined["error"]["code"] == "payment_failed"
    _settled(client)
    assert _stripe_items(client, stripe_sub) == items_before
    assert (_subscription_facts(db, org), cycles(db, org)) == rows_before
    assert _plan_change_statuses(db, org) == ["payment_failed"]
    cycle = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": org}
    )
    assert (cycle["plan"]["name"], cycle["included_minutes"], cycle["minutes_used"]) == (
        "Starter",
        500,
        100,
    )

    # The card is fine now: the retry upgrades, and the 100 minutes are billed once, at Starter's.
    retried = _change_plan(client, owner, **order)
    assert (retried["plan_id"], retried["effective"]) == (str(growth["id"]), "now")
    _settled(client)
    assert sorted(_stripe_items(client, stripe_sub).values()) == sorted(
        [growth["stripe_price_id"], growth["stripe_metered_price_id"]]
    )
    assert subscription(db, org)["plan_id"] == growth["id"]
    assert _plan_change_statuses(db, org) == ["payment_failed", "applied"]
    change_invoice = _latest_invoice(client, stripe_sub)
    assert change_invoice["status"] == "paid"
    credit, debit = _proration_lines(client, change_invoice)
    assert [line["pricing"]["price_details"]["price"] for line in (credit, debit)] == [
        starter["stripe_price_id"],  # what was paid (the declined invoice was never paid)
        growth["stripe_price_id"],
    ]
    assert change_invoice["amount_paid"] > 0
    old, new = cycles(db, org)
    assert (old["stripe_invoice_id"], old["closed_by_change"]) == (change_invoice["id"], True)
    [usage] = _usage_lines(client, change_invoice)
    assert usage["pricing"]["price_details"]["price"] == starter["stripe_metered_price_id"]
    assert (usage["quantity"], usage["amount"]) == (old["minutes_used"], old["overage_cost_cents"])
    assert old["minutes_used"] == 100
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [usage] = _usage_lines(client, invoice)
    assert usage["pricing"]["price_details"]["price"] == growth["stripe_metered_price_id"]
    old, new, _ = cycles(db, org)
    assert (new["stripe_invoice_id"], usage["quantity"]) == (invoice["id"], new["minutes_used"])
    assert new["minutes_used"] == 0
    _webhooks_all_answered(client, db)


def test_cancel_pending_releases_the_downgrade_and_the_renewal_keeps_the_plan(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    starter, growth = plan(db, "Starter"), plan(db, "Growth")
    org, owner = new_organisation(client, db, "Changed Mind Ltd")
    sub = _subscribe(client, db, org, owner, growth)
    stripe_sub = sub["stripe_subscription_id"]
    scheduled = _change_plan(client, owner, plan_id=str(starter["id"]), billing_period="monthly")
    assert scheduled["effective"] == "period_end"
    _settled(client)
    schedule = subscription(db, org)["stripe_schedule_id"]
    assert schedule is not None

    kept = _change_plan(client, owner, cancel_pending=True)
    assert (kept["plan_id"], kept["billing_period"], kept["effective"]) == (
        str(growth["id"]),
        "monthly",
        "now",
    )
    _settled(client)
    row = subscription(db, org)
    assert (row["plan_id"], row["pending_plan_id"], row["pending_effective_at"]) == (
        growth["id"],
        None,
        None,
    )
    assert row["stripe_schedule_id"] is None
    assert _plan_change_statuses(db, org) == ["scheduled", "released"]
    state = client.stripe_state()
    assert state["subscription_schedules"][schedule]["status"] == "released"
    assert state["subscriptions"][stripe_sub]["schedule"] is None
    nothing = _change_plan(client, owner, expect=409, cancel_pending=True)
    assert nothing["error"]["code"] == "nothing_pending"

    assert client.report(org, "kept-1", 40 * 60)["included_minutes"] == 1000
    renewal = client.standin(f"subscriptions/{stripe_sub}/advance")
    invoice = client.stripe_state()["invoices"][renewal["invoice"]]
    [fee] = _fee_lines(client, invoice)
    assert (fee["pricing"]["price_details"]["price"], fee["amount"]) == (
        growth["stripe_price_id"],
        growth["monthly_price_cents"],
    )
    [usage] = _usage_lines(client, invoice)
    closed, current = cycles(db, org)
    assert usage["pricing"]["price_details"]["price"] == growth["stripe_metered_price_id"]
    assert (closed["stripe_invoice_id"], closed["minutes_used"]) == (invoice["id"], 40)
    assert (usage["quantity"], usage["amount"]) == (40, closed["overage_cost_cents"])
    row = subscription(db, org)
    assert (row["plan_id"], row["stripe_metered_price_id"]) == (
        growth["id"],
        growth["stripe_metered_price_id"],
    )
    _assert_terms(client, current, growth)
    _webhooks_all_answered(client, db)


def _change_plan(client: Client, owner: dict[str, str], expect: int = 200, **body: Any) -> Any:
    return client.call("change-plan", "POST", expect=expect, headers=owner, json=body)


def _next_second() -> None:
    """Sleep into the next whole second. Stripe (and our cycle split) counts a change in whole
    seconds while the stand-in bills every unbilled meter event whatever its timestamp: calls
    reported in the same second as a change would be billed before it but counted after it."""
    time.sleep(1 - time.time() % 1 + 0.01)


def _settled(client: Client) -> None:
    """Every event the stand-in sent so far was answered (those after a /v1/ call come later)."""
    eventually(lambda: _all_events_delivered(client))


def _webhooks_all_answered(client: Client, db: psycopg.Connection[dict[str, Any]]) -> None:
    _settled(client)
    failed = db.execute(
        "select id, type, error from stripe_events where status = 'failed'"
    ).fetchall()
    assert failed == []


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _plan_change_statuses(db: psycopg.Connection[dict[str, Any]], org: str) -> list[str]:
    rows = db.execute(
        "select status from plan_changes where organisation_id = %s order by created_at", (org,)
    ).fetchall()
    return [row["status"] for row in rows]


def _subscription_facts(db: psycopg.Connection[dict[str, Any]], org: str) -> dict[str, Any]:
    row = subscription(db, org)
    return {
        k: row[k]
        for k in (
            "plan_id",
            "billing_period",
            "status",
            "current_period_start",
            "current_period_end",
            "stripe_metered_price_id",
            "pending_plan_id",
            "stripe_schedule_id",
        )
    }


def _stripe_items(client: Client, stripe_sub: str) -> dict[str, str]:
    """The subscription's items at the stand-in: item id -> price id."""
    sub = client.stripe_state()["subscriptions"][stripe_sub]
    return {item["id"]: item["price"]["id"] for item in sub["items"]["data"]}


def _stripe_item_periods(client: Client, stripe_sub: str) -> dict[str, tuple[int, int]]:
    """price id -> (current_period_start, current_period_end) of its item at the stand-in."""
    sub = client.stripe_state()["subscriptions"][stripe_sub]
    return {
        item["price"]["id"]: (item["current_period_start"], item["current_period_end"])
        for item in sub["items"]["data"]
    }


def _latest_invoice(client: Client, stripe_sub: str) -> dict[str, Any]:
    state = client.stripe_state()
    invoice: dict[str, Any] = state["invoices"][
        state["subscriptions"][stripe_sub]["latest_invoice"]
    ]
    return invoice


def _usage_lines(client: Client, invoice: dict[str, Any]) -> list[dict[str, Any]]:
    """Lines billing a metered price's usage (an invoice item at a change, or the item's line)."""
    return _lines(client, invoice, proration=False, usage_type="metered")


def _fee_lines(client: Client, invoice: dict[str, Any]) -> list[dict[str, Any]]:
    """A flat price's own lines (not prorations)."""
    return _lines(client, invoice, proration=False, usage_type="licensed")


def _proration_lines(client: Client, invoice: dict[str, Any]) -> list[dict[str, Any]]:
    """The prorations, credits (negative) first."""
    lines = _lines(client, invoice, proration=True, usage_type="licensed")
    return sorted(lines, key=lambda line: line["amount"])


def _lines(
    client: Client, invoice: dict[str, Any], *, proration: bool, usage_type: str
) -> list[dict[str, Any]]:
    prices = client.stripe_state()["prices"]
    found = []
    for line in invoice["lines"]["data"]:
        details = line["parent"][line["parent"]["type"]]
        recurring = prices[line["pricing"]["price_details"]["price"]]["recurring"] or {}
        if details["proration"] is proration and recurring.get("usage_type") == usage_type:
            found.append(line)
    return found


def _assert_terms(client: Client, cycle: dict[str, Any], terms: dict[str, Any]) -> None:
    """The cycle carries `terms`' metered price, and its figures are that price's tiers."""
    price = client.stripe_state()["prices"][cycle["stripe_metered_price_id"]]
    assert cycle["stripe_metered_price_id"] == terms["stripe_metered_price_id"]
    assert _tiers(price) == [(cycle["included_minutes"], 0), (None, cycle["overage_rate_cents"])]
    assert (cycle["included_minutes"], cycle["overage_rate_cents"]) == (
        terms["included_minutes"],
        terms["overage_rate_cents"],
    )
    over = max(cycle["minutes_used"] - cycle["included_minutes"], 0)
    assert (cycle["overage_minutes"], cycle["overage_cost_cents"]) == (
        over,
        over * cycle["overage_rate_cents"],
    )


def test_reconcile_finds_a_lost_meter_event_and_repair_sends_it_again(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """Stripe loses one of a new customer's meter events: `ops.reconcile` says the cycle drifts
    (exit 1), `--repair` sends the row again, the next run agrees (exit 0). Meanwhile an error
    report about an event for a customer Stripe does not know reaches the handler through the
    thin-event destination `local` registered, and verifies."""
    org, owner = new_organisation(client, db, "Lost Event Ltd")
    _subscribe(client, db, org, owner, plan(db, "Starter"))
    assert client.report(org, "lost-1", 30 * 60)["meter_status"] == "pending"
    client.delivered(db, org, "lost-1")
    client.standin("meter_events/drop_next")
    lost = client.report(org, "lost-2", 20 * 60)
    assert (lost["meter_status"], lost["minutes_used"]) == ("pending", 50)
    client.flush()  # Stripe answers 200, then loses it

    def lost_sent() -> None:
        row = db.execute(
            "select meter_status from usage_records where organisation_id = %s"
            " and call_id = 'lost-2'",
            (org,),
        ).fetchone()
        assert row is not None and row["meter_status"] == "sent"

    eventually(lost_sent)

    env: dict[str, Any] = client.stack.env
    settings = Settings(**env)
    make_stripe_client(settings).v1.billing.meter_events.create(
        params={
            "event_name": settings.STRIPE_METER_EVENT_NAME,
            "payload": {"stripe_customer_id": "cus_nobody", "value": "5"},
            "identifier": f"nobody-{uuid.uuid4().hex[:8]}",
        }
    )
    reported = client.standin("meter_error_reports/deliver")  # asserts every delivery got 200
    [event] = reported["events"]
    assert len(reported["deliveries"]) == 1
    row = db.execute("select status from stripe_events where id = %s", (event["id"],)).fetchone()
    assert row is not None and row["status"] == "processed"

    # Fifteen minutes later (reconcile waits that long for Stripe's summaries to settle).
    _age_sent_usage(db, org)
    found = _reconcile(client, "--org", org)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "Stripe lacks 20 min of ours" in found.stdout
    repaired = _reconcile(client, "--org", org, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "re-sent 1 row (20 min)" in repaired.stdout
    again = _reconcile(client, "--org", org)
    print(found.stdout, repaired.stdout, again.stdout, sep="")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("agree "), again.stdout
    values = sorted(
        int(e["payload"]["value"])
        for e in client.stripe_state()["meter_events"].values()
        if e["payload"]["stripe_customer_id"] == subscription(db, org)["stripe_customer_id"]
    )
    assert values == [20, 30]


def test_reconcile_agrees_for_every_organisation(
    client: Client, db: psycopg.Connection[dict[str, Any]]
) -> None:
    """After every flow above, a run over all organisations finds nothing to mend.

    Only cycles that have started are checked: the stand-in's renewals move periods ahead of the
    wall clock (the cycles they open start in the future), while meter events keep real
    timestamps, so those cycles cannot be compared with Stripe's summaries until then."""
    _age_sent_usage(db, None)
    result = _reconcile(client)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    started = db.execute("select count(*) as n from billing_cycles where period_start <= now()")
    checked = started.fetchone()["n"]  # type: ignore[index]
    assert result.stdout.splitlines()[-1] == f"{checked} cycles: {checked} agree"
    future = db.execute("select count(*) as n from billing_cycles where period_start > now()")
    print(f"{future.fetchone()['n']} cycles start later (renewals ahead of the wall clock)")  # type: ignore[index]


def _age_sent_usage(db: psycopg.Connection[dict[str, Any]], org: str | None) -> None:
    """As if the sent rows were acknowledged 20 minutes earlier: past reconcile's SETTLE, so the
    comparison with Stripe's summaries is exact (the stand-in's summaries are immediate)."""
    db.execute(
        "update usage_records set meter_sent_at = meter_sent_at - interval '20 minutes'"
        " where meter_status = 'sent' and (%s::uuid is null or organisation_id = %s::uuid)",
        (org, org),
    )


def _reconcile(client: Client, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.reconcile", *args],
        env={**os.environ, **client.stack.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_catalogue_change_mid_run_keeps_subscribers_on_their_prices(
    client: Client, db: psycopg.Connection[dict[str, Any]], tmp_path: Path
) -> None:
    """The operator changes Starter's terms while A is subscribed: B checks out on the new prices,
    A keeps the old ones (Stripe bills A's usage at A's tiers) until A cancels.

    Kept last in the module: it changes the stack's Starter plan, which the tests above buy."""
    before = plan(db, "Starter")
    assert (before["included_minutes"], before["overage_rate_cents"]) == (500, 50)
    org_a, owner_a = new_organisation(client, db, "Old Terms Ltd")
    org_b, owner_b = new_organisation(client, db, "New Terms Ltd")

    # A subscribes on today's catalogue and talks 300 minutes.
    sub_a = _subscribe(client, db, org_a, owner_a, before)
    assert sub_a["stripe_metered_price_id"] == before["stripe_metered_price_id"]
    assert client.report(org_a, "a-1", 300 * 60)["minutes_used"] == 300

    # The operator changes Starter: 800 included minutes, 40 cents a minute above them.
    plans_file = tmp_path / "plans.toml"
    plans_file.write_text(_catalogue_with("starter", included_minutes=800, overage_rate_cents=40))
    starter_terms = next(p for p in load_plans(plans_file)["plans"] if p["key"] == "starter")
    assert (starter_terms["included_minutes"], starter_terms["overage_rate_cents"]) == (800, 40)
    synced = subprocess.run(
        [sys.executable, "-m", "ops.catalog", "--plans", str(plans_file)],
        env={**os.environ, **client.stack.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert synced.returncode == 0, synced.stdout + synced.stderr
    after = plan(db, "Starter")
    old_metered, new_metered = before["stripe_metered_price_id"], after["stripe_metered_price_id"]
    assert f"price mb_starter_metered: replaced {old_metered} with {new_metered}" in synced.stdout
    assert (after["included_minutes"], after["overage_rate_cents"], after["active"]) == (
        800,
        40,
        True,
    )
    # The flat prices did not change, so they are the same Stripe prices.
    assert after["stripe_price_id"] == before["stripe_price_id"]
    assert "not in the plans file" not in synced.stdout  # no plan taken off sale
    versions = {
        row["stripe_price_id"]: row
        for row in db.execute(
            "select * from billing_plan_prices where plan_id = %s and kind = 'metered'",
            (after["id"],),
        ).fetchall()
    }
    assert {
        k: (v["included_minutes"], v["overage_rate_cents"], v["active"])
        for k, v in versions.items()
    } == {
        old_metered: (500, 50, False),
        new_metered: (800, 40, True),
    }
    prices = client.stripe_state()["prices"]
    assert prices[new_metered]["lookup_key"] == "mb_starter_metered"
    assert prices[old_metered]["active"] and prices[old_metered]["lookup_key"] is None
    assert _tiers(prices[old_metered]) == [(500, 0), (None, 50)]
    assert _tiers(prices[new_metered]) == [(800, 0), (None, 40)]

    # B subscribes to the same plan and gets the new prices.
    sub_b = _subscribe(client, db, org_b, owner_b, after)
    assert sub_b["stripe_metered_price_id"] == new_metered
    # A is still on the old ones: 200 minutes over the old 500 (none over the new 800).
    a_now = client.call(
        "report-usage", "GET", expect=200, headers=client.service, params={"org_id": org_a}
    )
    assert (a_now["allowed"], a_now["plan"]["name"], a_now["included_minutes"]) == (
        True,
        "Starter",
        500,
    )
    over = client.report(org_a, "a-2", 400 * 60)
    assert (over["minutes_used"], over["included_minutes"], over["overage_minutes"]) == (
        700,
        500,
        200,
    )
    assert (over["overage_cost_cents"], over["meter_status"]) == (200 * 50, "pending")
    client.delivered(db, org_a, "a-2")
    b_used = client.report(org_b, "b-1", 850 * 60)
    assert (b_used["included_minutes"], b_used["overage_minutes"]) == (800, 50)
    assert (b_used["overage_cost_cents"], b_used["meter_status"]) == (50 * 40, "pending")
    client.delivered(db, org_b, "b-1")

    # Renewals: Stripe invoices each customer's usage at the tiers of the price they are on, and
    # each closed cycle says what that invoice line says.
    for org, sub, metered, included, rate in (
        (org_a, sub_a, old_metered, 500, 50),
        (org_b, sub_b, new_metered, 800, 40),
    ):
        renewal = client.standin(f"subscriptions/{sub['stripe_subscription_id']}/advance")
        invoice = client.stripe_state()["invoices"][renewal["invoice"]]
        [usage_line] = [
            line
            for line in invoice["lines"]["data"]
            if line["pricing"]["price_details"]["price"] == metered
        ]
        closed, current = cycles(db, org)
        assert closed["status"] == "closed" and closed["stripe_invoice_id"] == invoice["id"]
        assert closed["minutes_used"] == usage_line["quantity"]  # every minute goes to the meter
        assert closed["overage_minutes"] == usage_line["quantity"] - included  # the free tier
        assert closed["overage_cost_cents"] == usage_line["amount"]
        assert (closed["included_minutes"], closed["overage_rate_cents"]) == (included, rate)
        assert invoice["amount_paid"] == after["monthly_price_cents"] + usage_line["amount"]
        # The next cycle keeps the terms of the price the subscription is on.
        assert (current["status"], current["minutes_used"]) == ("active", 0)
        assert (current["included_minutes"], current["overage_rate_cents"]) == (included, rate)
        assert current["period_start"] == closed["period_end"]
        assert subscription(db, org)["stripe_metered_price_id"] == metered
    assert cycles(db, org_a)[0]["overage_cost_cents"] == 200 * 50
    assert cycles(db, org_b)[0]["overage_cost_cents"] == 50 * 40

    # A cancels; B stays.
    client.standin(f"subscriptions/{sub_a['stripe_subscription_id']}/cancel")
    ended = subscription(db, org_a)
    assert ended["status"] == "canceled" and ended["canceled_at"] is not None
    for org, allowed in ((org_a, False), (org_b, True)):
        cycle = client.call(
            "report-usage", "GET", expect=200, headers=client.service, params={"org_id": org}
        )
        assert cycle["allowed"] is allowed

    # Every webhook the stand-in sent was answered 2xx and is stored, none failed.
    eventually(lambda: _all_events_delivered(client))
    events = client.http.get(f"{client.stack.stripe_base}/_standin/state").json()["events"]
    stored = {
        row["id"]: row["status"]
        for row in db.execute("select id, status from stripe_events").fetchall()
    }
    assert [(e["type"], e["id"]) for e in events if e["id"] not in stored] == []
    assert {event: status for event, status in stored.items() if status == "failed"} == {}


def _subscribe(
    client: Client,
    db: psycopg.Connection[dict[str, Any]],
    org: str,
    owner: dict[str, str],
    starter: dict[str, Any],
) -> dict[str, Any]:
    """The owner buys `starter` monthly at its current prices and pays; the subscription row."""
    order = {"plan_id": str(starter["id"]), "billing_period": "monthly"}
    session = client.call("create-checkout-session", "POST", expect=200, headers=owner, json=order)
    lines = client.stripe_state()["checkout_orders"][session["session_id"]]["lines"]
    assert [line["price"] for line in lines][:2] == [
        starter["stripe_price_id"],
        starter["stripe_metered_price_id"],
    ]
    paid = client.standin(f"checkout_sessions/{session['session_id']}/complete")
    sub = subscription(db, org)
    assert (sub["status"], sub["plan_id"], sub["stripe_subscription_id"]) == (
        "active",
        starter["id"],
        paid["subscription"],
    )
    [cycle] = cycles(db, org)
    assert (cycle["included_minutes"], cycle["overage_rate_cents"]) == (
        starter["included_minutes"],
        starter["overage_rate_cents"],
    )
    return sub


def _catalogue_with(key: str, **terms: int) -> str:
    """plans.toml with `terms` changed in the plan `key` (every other plan as it is)."""
    head, *plans = (ROOT / "plans.toml").read_text().split("[[plans]]")
    for i, block in enumerate(plans):
        if re.search(rf'^key = "{key}"$', block, flags=re.M):
            for name, value in terms.items():
                block, found = re.subn(rf"^{name} = \d+", f"{name} = {value}", block, flags=re.M)
                assert found == 1, f"plans.toml: no {name} in plan {key}"
            plans[i] = block
    return "[[plans]]".join([head, *plans])


def _tiers(price: dict[str, Any]) -> list[tuple[int | None, int]]:
    return [(tier["up_to"], tier["unit_amount"]) for tier in price["tiers"]]


def _all_events_delivered(client: Client) -> None:
    events = client.http.get(f"{client.stack.stripe_base}/_standin/state").json()["events"]
    for event in events:
        assert event["deliveries"], f"{event['type']} {event['id']} not delivered yet"
        for delivery in event["deliveries"]:
            assert 200 <= (delivery["status_code"] or 0) < 300, (event["type"], delivery)
