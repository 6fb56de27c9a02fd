"""The billing pages in headless Chromium, on `./deploy.sh local`'s own stack (devtools.local):
a customer's life clicked through as a person would, every figure checked against the database
and the stand-in's invoices, no console error on any page, screenshots kept as artefacts.

The tests run in file order and share the demo organisation, like the lifecycle they follow:
pricing, checkout (cancel, a declined card, pay), usage and its banner, plan changes (by
keyboard), a renewal's invoice, the billing portal, then failures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from devtools.local import DEMO_ORG_ID, Stack, local_secrets, running
from tests.browser_support import Watched, chromium_or_skip
from tests.conftest import create_database
from tests.test_e2e import free_port_block

CHROMIUM = chromium_or_skip()

from playwright.sync_api import Browser, Playwright, expect, sync_playwright  # noqa: E402

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def stack(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = free_port_block(8)  # web/ at base, the functions at base + 1 .. 6, Stripe at base + 7
    with running(
        tmp_path_factory.mktemp("browser"),
        port_base=base,
        stripe_port=base + 7,
        database_url=create_database(pg_server_url),
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def db(stack: Stack) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    driver: Playwright = sync_playwright().start()
    try:
        chromium = driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()
    finally:
        driver.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    """A fresh desktop-sized tab; the test fails on any console error it did not provoke."""
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    context.set_default_timeout(15_000)
    watched = Watched(context.new_page())
    yield watched
    context.close()
    assert watched.unexpected() == []


# ---------------------------------------------------------------- helpers


def open_page(page: Watched, url: str) -> None:
    """Go to one of the billing pages and wait until it has drawn what billing-overview said."""
    page.page.goto(url)
    page.page.wait_for_selector("body[data-ready='true']")


def report(stack: Stack, call_id: str, minutes: int) -> dict[str, Any]:
    """The voice agent reports a call (the service key), as the printed curl line does."""
    service_key = local_secrets(stack.data)["service_key"]
    answer = httpx.post(
        stack.urls["report-usage"],
        headers={"Authorization": f"Bearer {service_key}"},
        json={"org_id": DEMO_ORG_ID, "call_id": call_id, "call_duration_seconds": minutes * 60},
        timeout=30,
    )
    assert answer.status_code in (201, 202), answer.text  # on Stripe's meter, or queued for it
    body: dict[str, Any] = answer.json()
    return body


def standin(stack: Stack, path: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{stack.stripe_base}/_standin/{path}", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def subscription(db: psycopg.Connection[dict[str, Any]]) -> dict[str, Any]:
    row = db.execute(
        "select s.*, p.name as plan_name from subscriptions s join billing_plans p"
        " on p.id = s.plan_id where s.organisation_id = %s order by s.created_at desc limit 1",
        (DEMO_ORG_ID,),
    ).fetchone()
    assert row is not None
    return row


def current_cycle(db: psycopg.Connection[dict[str, Any]]) -> dict[str, Any]:
    row = db.execute(
        "select * from billing_cycles where organisation_id = %s and status = 'active'"
        " order by period_start desc limit 1",
        (DEMO_ORG_ID,),
    ).fetchone()
    assert row is not None
    return row


def wait_until_delivered(db: psycopg.Connection[dict[str, Any]], timeout: float = 75.0) -> None:
    """Until no usage of the organisation waits for delivery to Stripe's meter (report-usage
    queues meter events and sends them in batches), so a plan change finds it billed."""
    deadline = time.monotonic() + timeout
    while db.execute(
        "select 1 from usage_records where organisation_id = %s and meter_status = 'pending'",
        (DEMO_ORG_ID,),
    ).fetchone():
        assert time.monotonic() < deadline, "usage still pending delivery to Stripe"
        time.sleep(0.25)


def minutes_shown(page: Watched, figure: str) -> int:
    return int(page.page.locator(f"#{figure}").get_attribute("data-minutes") or -1)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


# ---------------------------------------------------------------- the lifecycle


def test_pricing_shows_the_plans_on_sale_monthly_and_yearly(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    plans = db.execute("select * from billing_plans where active order by sort_order").fetchall()
    assert stack.web_url is not None
    open_page(page, stack.web_url)
    cards = page.page.locator("li.plan")
    expect(cards).to_have_count(len(plans))
    for card, plan in zip(cards.all(), plans, strict=True):
        expect(card.locator("h2")).to_have_text(plan["name"])
        expect(card.locator(".amount")).to_have_attribute(
            "data-cents", str(plan["monthly_price_cents"])
        )
        expect(card.get_by_role("button", name=f"Buy {plan['name']}")).to_be_enabled()
    page.shot("01-pricing-monthly")

    page.page.get_by_text("Yearly").click()
    starter = plans[0]
    saving = starter["monthly_price_cents"] * 12 - starter["yearly_price_cents"]
    first = cards.first
    expect(first.locator(".amount")).to_have_attribute(
        "data-cents", str(starter["yearly_price_cents"])
    )
    percent = round(saving / (starter["monthly_price_cents"] * 12) * 100)
    expect(first.locator(".saving")).to_contain_text(f"{saving / 100:,.2f}")
    expect(first.locator(".saving")).to_contain_text(f"({percent}%)")
    expect(page.page.locator("#yearly-saving")).to_have_text(f"save up to {percent}%")
    page.shot("02-pricing-yearly")


def test_cancel_on_the_checkout_page_comes_back_to_pricing(page: Watched, stack: Stack) -> None:
    assert stack.web_url is not None
    open_page(page, stack.web_url)
    page.page.get_by_role("button", name="Buy Starter").click()
    page.page.wait_for_url(f"{stack.stripe_base}/checkout/*")
    page.shot("03-checkout")
    page.page.get_by_role("link", name="Cancel").click()
    page.page.wait_for_url(re.compile(r"/index\.html\?checkout=canceled$"))
    expect(page.page.locator("#status")).to_have_text("Checkout canceled: nothing was charged.")


def test_buy_a_declined_card_then_pay_and_the_dashboard_shows_the_plan(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    open_page(page, stack.web_url)
    page.page.get_by_role("button", name="Buy Starter").click()
    page.page.wait_for_url(f"{stack.stripe_base}/checkout/*")
    page.page.get_by_role("button", name="Fail payment").click()
    expect(page.page.get_by_role("alert")).to_contain_text("Your card was declined")
    page.shot("04-checkout-declined")
    assert db.execute(
        "select count(*) as n from subscriptions where organisation_id = %s", (DEMO_ORG_ID,)
    ).fetchone() == {"n": 0}

    page.page.get_by_role("button", name="Pay", exact=True).click()
    page.page.wait_for_url(re.compile(r"/dashboard\.html\?checkout=success&session_id=cs_"))
    page.page.wait_for_selector("body[data-ready='true']")
    sub = subscription(db)
    assert (sub["status"], sub["plan_name"], sub["billing_period"]) == (
        "active",
        "Starter",
        "monthly",
    )
    expect(page.page.locator("#plan-name")).to_have_text("Starter")
    expect(page.page.locator("#plan-status")).to_have_attribute("data-status", "active")
    expect(page.page.locator("#status")).to_have_text("Welcome to Starter.")
    first_invoice = page.page.locator("#invoices tbody tr")
    expect(first_invoice).to_have_count(1)  # the first payment: flat fee and setup fee
    page.shot("05-dashboard-subscribed")


def test_reported_calls_show_in_the_figures_and_the_chart(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    open_page(page, stack.web_url + "dashboard.html")
    assert minutes_shown(page, "used-minutes") == 0
    for number, minutes in enumerate((12, 25, 1)):
        report(stack, f"browser-call-{number}", minutes)
    page.page.reload()
    page.page.wait_for_selector("body[data-ready='true']")
    cycle = current_cycle(db)
    assert cycle["minutes_used"] == 38
    assert minutes_shown(page, "used-minutes") == 38
    assert minutes_shown(page, "included-minutes") == cycle["included_minutes"] == 500
    assert minutes_shown(page, "overage-minutes") == 0
    bar = page.page.locator(f"#chart rect.bar[data-date='{today()}']")
    expect(bar).to_have_attribute("data-minutes", "38")
    expect(bar).to_have_class(re.compile(r"\btoday\b"))
    assert page.page.locator("#usage-banner").is_hidden()


def test_usage_banner_at_80_then_100_percent(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    report(stack, "browser-call-80", 400 - 38)
    open_page(page, stack.web_url + "dashboard.html")
    banner = page.page.locator("#usage-banner")
    expect(banner).to_have_attribute("data-threshold", "80")
    expect(banner).to_contain_text("80% of your included minutes used (400 of 500")

    report(stack, "browser-call-100", 100)
    page.page.reload()
    page.page.wait_for_selector("body[data-ready='true']")
    expect(banner).to_have_attribute("data-threshold", "100")
    expect(banner).to_contain_text("100% of your included minutes used (500 of 500")
    cycle = current_cycle(db)
    assert (cycle["minutes_used"], cycle["overage_minutes"], cycle["overage_cost_cents"]) == (
        500,
        0,
        0,
    )
    expect(page.page.locator("#overage-cost")).to_have_attribute("data-cents", "0")
    thresholds = {
        row["threshold_percent"]
        for row in db.execute(
            "select threshold_percent from usage_alerts where billing_cycle_id = %s", (cycle["id"],)
        ).fetchall()
    }
    assert thresholds == {80, 100}
    page.shot("06-dashboard-100-percent")

    page.page.set_viewport_size(PHONE)  # type: ignore[arg-type]
    page.page.reload()
    page.page.wait_for_selector("body[data-ready='true']")
    expect(banner).to_be_visible()
    page.shot("07-dashboard-phone")
    overflow = page.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    too_wide = page.page.evaluate(  # what sticks out, but for what scrolls in its own box
        """() => [...document.querySelectorAll("body *")]
            .filter((node) => !node.closest(".table-scroll"))
            .filter((node) => node.getBoundingClientRect().right > window.innerWidth + 1)
            .map((node) => node.tagName + (node.id ? "#" + node.id : ""))"""
    )
    assert overflow <= 0 and too_wide == [], f"{overflow}px wider than a phone: {too_wide}"


def test_upgrade_with_the_keyboard_on_the_pricing_page(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    wait_until_delivered(db)
    open_page(page, stack.web_url)
    expect(page.page.locator("li.plan.is-current h2")).to_have_text("Starter")
    switch = page.page.get_by_role("button", name="Switch to Growth")
    for _ in range(40):  # Tab through the page until the button has the focus
        page.page.keyboard.press("Tab")
        if switch.evaluate("button => button === document.activeElement"):
            break
    else:
        pytest.fail("Tab never reached the Switch to Growth button")
    outline = switch.evaluate("button => getComputedStyle(button).outlineStyle")
    assert outline != "none", "the focused button shows no focus ring"
    page.shot("08-pricing-keyboard-focus", full_page=False)
    page.page.keyboard.press("Enter")
    expect(page.page.locator("#status")).to_have_text(
        "You are on Growth (monthly) now. The difference for the rest of this period was charged."
    )
    assert subscription(db)["plan_name"] == "Growth"
    expect(page.page.locator("li.plan.is-current h2")).to_have_text("Growth")

    open_page(page, stack.web_url + "dashboard.html")
    expect(page.page.locator("#plan-name")).to_have_text("Growth")
    cycle = current_cycle(db)
    assert minutes_shown(page, "used-minutes") == cycle["minutes_used"]
    assert minutes_shown(page, "included-minutes") == cycle["included_minutes"] == 1000
    before_change = 500 - cycle["minutes_used"]  # Starter's part, billed with the upgrade
    expect(page.page.locator("#chart-note")).to_contain_text(f"{before_change} of its minutes")
    page.shot("09-dashboard-upgraded")


def test_downgrade_waits_for_the_period_end_and_can_be_canceled(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    open_page(page, stack.web_url)
    page.page.get_by_role("button", name="Switch to Starter").click()
    expect(page.page.locator("#status")).to_contain_text(
        "Your plan changes to Starter (monthly) on"
    )
    sub = subscription(db)
    assert sub["plan_name"] == "Growth" and sub["pending_plan_id"] is not None
    expect(page.page.locator("li.plan", has_text="Starter").locator(".tag.pending")).to_be_visible()

    open_page(page, stack.web_url + "dashboard.html")
    pending = page.page.locator("#pending-change")
    expect(pending).to_contain_text("Scheduled change: Starter (monthly) from")
    page.shot("10-dashboard-pending-change")
    pending.get_by_role("button", name="Cancel scheduled change").click()
    expect(page.page.locator("#status")).to_contain_text("Scheduled change canceled")
    expect(pending).to_have_count(0)
    assert subscription(db)["pending_plan_id"] is None


def test_a_declined_upgrade_shows_the_functions_message(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    customer = subscription(db)["stripe_customer_id"]
    standin(stack, f"customers/{customer}/decline_next_payment")
    open_page(page, stack.web_url)
    with page.allow(r"status of 402"):  # Chromium logs every non-2xx answer
        page.page.get_by_role("button", name="Switch to Enterprise").click()
        error = page.page.locator("#error")
        expect(error).to_be_visible()
    message = error.inner_text()
    assert message and "without saying why" not in message
    assert re.search(r"payment|card|declin", message, re.IGNORECASE), message
    page.shot("11-pricing-declined-upgrade")
    assert subscription(db)["plan_name"] == "Growth"


def test_the_renewal_invoice_is_listed_with_its_link(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    sub = subscription(db)
    renewal = standin(stack, f"subscriptions/{sub['stripe_subscription_id']}/advance")
    stripe_invoices = {
        invoice["id"]: invoice
        for invoice in httpx.get(f"{stack.stripe_base}/_standin/state").json()["invoices"]
    }
    deadline = time.monotonic() + 15
    while True:  # the renewal's invoice events are delivered before advance answers
        rows = db.execute(
            "select * from invoices where organisation_id = %s order by created desc, id desc",
            (DEMO_ORG_ID,),
        ).fetchall()
        if any(row["id"] == renewal["invoice"] for row in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    open_page(page, stack.web_url + "dashboard.html")
    shown = page.page.locator("#invoices tbody tr")
    expect(shown).to_have_count(len(rows))
    for row_shown, row in zip(shown.all(), rows, strict=True):
        assert row_shown.get_attribute("data-invoice-id") == row["id"]
        at_stripe = stripe_invoices[row["id"]]
        assert (row["total"], row["status"]) == (at_stripe["total"], at_stripe["status"])
        expect(row_shown.locator("td.amount")).to_have_attribute("data-cents", str(row["total"]))
    latest = page.page.locator(f"#invoices tr[data-invoice-id='{renewal['invoice']}']")
    expect(latest.locator("th")).to_have_text(stripe_invoices[renewal["invoice"]]["number"])
    link = latest.get_by_role("link", name=re.compile("^View"))
    expect(link).to_have_attribute("href", f"{stack.stripe_base}/invoice/{renewal['invoice']}")
    assert minutes_shown(page, "used-minutes") == current_cycle(db)["minutes_used"] == 0
    page.shot("12-dashboard-after-renewal")

    page.page.goto(link.get_attribute("href") or "")
    total = stripe_invoices[renewal["invoice"]]["total"]
    expect(page.page.locator("body")).to_contain_text(f"{total / 100:,.2f} EUR")


def test_cancel_at_period_end_in_the_billing_portal(
    page: Watched, stack: Stack, db: psycopg.Connection[dict[str, Any]]
) -> None:
    assert stack.web_url is not None
    open_page(page, stack.web_url + "dashboard.html")
    page.page.get_by_role("button", name="Manage billing").click()
    page.page.wait_for_url(f"{stack.stripe_base}/portal/*")
    page.page.get_by_role("button", name="Cancel subscription at period end").click()
    expect(page.page.locator("body")).to_contain_text("Cancels on")
    page.shot("13-portal-canceled")
    page.page.get_by_role("link", name="Return").click()
    page.page.wait_for_url(f"{stack.web_url}dashboard.html")
    page.page.wait_for_selector("body[data-ready='true']")
    sub = subscription(db)
    assert sub["cancel_at_period_end"] is True and sub["status"] == "active"
    expect(page.page.locator("#renewal")).to_contain_text("(canceled at period end)")
    page.shot("14-dashboard-canceling")


def test_no_network_says_so(page: Watched, stack: Stack) -> None:
    assert stack.web_url is not None
    page.page.route(f"{stack.urls['billing-overview']}**", lambda route: route.abort())
    with page.allow(r"net::ERR_FAILED"):
        page.page.goto(stack.web_url + "dashboard.html")
        expect(page.page.locator("#error")).to_have_text(
            "Could not reach the billing service. Check your connection and try again."
        )
    page.shot("15-dashboard-offline")
