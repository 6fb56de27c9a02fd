"""stripe-catalog: plans.toml made true in Stripe (the local stand-in) and in billing_plans."""

from __future__ import annotations

import contextlib
import copy
import io
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from devtools.stripe_standin import serve_in_thread
from ops.catalog import ROOT, load_plans, sync_catalog
from ops.migrate import migrate
from shared.settings import Settings
from tests.conftest import acting_as, create_database

CATALOG = load_plans(ROOT / "plans.toml")


@pytest.fixture(scope="module")
def database_url(pg_server_url: str) -> str:
    """A database of this module's own: a catalogue run takes every plan it does not list off
    sale, the other modules' plans included."""
    url = create_database(pg_server_url)
    with contextlib.redirect_stdout(io.StringIO()):
        migrate(url)
    return url


@pytest.fixture
def standin():
    base, stop = serve_in_thread(None, "whsec_unused")
    yield base
    stop()


def run(settings: Settings, catalog=CATALOG) -> tuple[dict[str, str], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ids = sync_catalog(settings, catalog, dry_run=False)
    return ids, out.getvalue()


def stripe_prices(base: str) -> list[dict]:
    state = httpx.get(f"{base}/_standin/state").json()
    return list(state["price"].values()) if "price" in state else state["prices"]


def test_catalog_creates_everything_once_and_writes_plans(standin, database_url, db):
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_catalog", STRIPE_API_BASE=standin, DATABASE_URL=database_url
    )
    ids, first = run(settings)
    assert "meter voice_call_minutes: created" in first
    assert len(ids) == 3 * 3 + 1
    again, second = run(settings)
    assert again == ids
    assert "created" not in second and "replaced" not in second

    plans = {
        row["name"]: row
        for row in db.execute(
            "select * from billing_plans where name in ('Starter', 'Growth', 'Enterprise')"
        )
    }
    starter = plans["Starter"]
    assert (starter["included_minutes"], starter["monthly_price_cents"]) == (500, 20400)
    assert starter["yearly_price_cents"] == 220320 and starter["overage_rate_cents"] == 50
    assert starter["stripe_price_id"] == ids["mb_starter_monthly"]
    assert starter["stripe_yearly_price_id"] == ids["mb_starter_yearly"]
    assert starter["stripe_metered_price_id"] == ids["mb_starter_metered"]
    assert plans["Enterprise"]["included_minutes"] == 2000


def test_metered_price_bills_only_minutes_over_the_included(standin, database_url):
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_catalog", STRIPE_API_BASE=standin, DATABASE_URL=database_url
    )
    ids, _ = run(settings)
    from shared.stripe_api import make_stripe_client

    client = make_stripe_client(settings)
    metered = client.v1.prices.retrieve(ids["mb_growth_metered"], params={"expand": ["tiers"]})
    assert metered.billing_scheme == "tiered" and metered.tiers_mode == "graduated"
    assert [(t.up_to, t.unit_amount) for t in metered.tiers] == [(1000, 0), (None, 50)]


def test_changed_amount_replaces_the_price_and_moves_the_lookup_key(standin, database_url, db):
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_catalog", STRIPE_API_BASE=standin, DATABASE_URL=database_url
    )
    ids, _ = run(settings)
    dearer = copy.deepcopy(CATALOG)
    dearer["plans"][0]["monthly_price_cents"] = 21900
    new_ids, out = run(settings, dearer)
    assert f"price mb_starter_monthly: replaced {ids['mb_starter_monthly']} with" in out
    assert new_ids["mb_starter_monthly"] != ids["mb_starter_monthly"]
    assert {k: v for k, v in new_ids.items() if k != "mb_starter_monthly"} == {
        k: v for k, v in ids.items() if k != "mb_starter_monthly"
    }
    row = db.execute("select * from billing_plans where name = 'Starter'").fetchone()
    assert row["monthly_price_cents"] == 21900
    assert row["stripe_price_id"] == new_ids["mb_starter_monthly"]
    run(settings)  # back to plans.toml for the other tests sharing the database


def test_going_back_to_earlier_terms_moves_the_lookup_key_back(standin, database_url, db):
    """Within Stripe's 24 h key window: reverting a change must not replay the first create
    (which would leave the lookup key on the newer price and report a replacement on every run)."""
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_catalog", STRIPE_API_BASE=standin, DATABASE_URL=database_url
    )
    first, _ = run(settings)
    changed = copy.deepcopy(CATALOG)
    changed["plans"][0].update(included_minutes=800, overage_rate_cents=40)
    run(settings, changed)
    back, _ = run(settings)
    again, out = run(settings)

    assert "replaced" not in out and again == back
    metered = back["mb_starter_metered"]
    holders = [p for p in stripe_prices(standin) if p.get("lookup_key") == "mb_starter_metered"]
    assert [p["id"] for p in holders] == [metered]
    terms = db.execute(
        "select included_minutes, overage_rate_cents from billing_plan_prices"
        " where stripe_price_id = %s",
        (metered,),
    ).fetchone()
    assert (terms["included_minutes"], terms["overage_rate_cents"]) == (500, 50)
    assert first["mb_starter_metered"] != metered or first == back


def without(catalog, key: str):
    smaller = copy.deepcopy(catalog)
    smaller["plans"] = [plan for plan in smaller["plans"] if plan["key"] != key]
    return smaller


def subscribe(db, plan_id) -> dict:
    """An organisation with a live subscription and its current cycle on the plan."""
    tag = uuid.uuid4().hex[:10]
    owner = db.execute(
        "insert into auth.users (id, email) values (gen_random_uuid(), %s) returning id",
        (f"{tag}@example.com",),
    ).fetchone()["id"]
    org = db.execute(
        "insert into organisations (name, owner_id, stripe_customer_id)"
        " values ('Kept', %s, %s) returning id",
        (owner, f"cus_{tag}"),
    ).fetchone()["id"]
    plan = db.execute("select * from billing_plans where id = %s", (plan_id,)).fetchone()
    start = datetime.now(UTC) - timedelta(days=5)
    sub = db.execute(
        "insert into subscriptions (organisation_id, plan_id, stripe_subscription_id,"
        " stripe_customer_id, status, billing_period, current_period_start, current_period_end,"
        " stripe_metered_price_id) values (%s, %s, %s, %s, 'active', 'monthly', %s, %s, %s)"
        " returning *",
        (
            org,
            plan_id,
            f"sub_{tag}",
            f"cus_{tag}",
            start,
            start + timedelta(days=30),
            plan["stripe_metered_price_id"],
        ),
    ).fetchone()
    db.execute(
        "insert into billing_cycles (organisation_id, subscription_id, period_start, period_end,"
        " included_minutes, overage_rate_cents) values (%s, %s, %s, %s, %s, %s)",
        (
            org,
            sub["id"],
            start,
            start + timedelta(days=30),
            plan["included_minutes"],
            plan["overage_rate_cents"],
        ),
    )
    return dict(sub)


def test_a_plan_no_longer_listed_leaves_sale_and_its_subscribers_keep_it(standin, database_url, db):
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_catalog", STRIPE_API_BASE=standin, DATABASE_URL=database_url
    )
    ids, _ = run(settings)
    enterprise = db.execute("select * from billing_plans where name = 'Enterprise'").fetchone()
    sub = subscribe(db, enterprise["id"])
    summary = db.execute("select public.usage_summary(%s)", (sub["organisation_id"],)).fetchone()
    prices = db.execute(
        "select * from billing_plan_prices where plan_id = %s order by stripe_price_id",
        (enterprise["id"],),
    ).fetchall()

    dry = io.StringIO()
    with contextlib.redirect_stdout(dry):
        sync_catalog(settings, without(CATALOG, "enterprise"), dry_run=True)
    assert "would make plan Enterprise inactive: not in the plans file" in dry.getvalue()
    assert db.execute("select active from billing_plans where name = 'Enterprise'").fetchone()[
        "active"
    ]

    new_ids, out = run(settings, without(CATALOG, "enterprise"))
    assert (
        "billing_plans Enterprise: not in the plans file, now inactive"
        " (no new checkouts; its subscribers keep it)"
    ) in out
    assert "Starter: not in the plans file" not in out
    assert {k: v for k, v in ids.items() if "enterprise" not in k} == new_ids

    after = db.execute("select * from billing_plans where id = %s", (enterprise["id"],)).fetchone()
    assert after["active"] is False
    assert {k: v for k, v in after.items() if k not in ("active", "updated_at")} == {
        k: v for k, v in enterprise.items() if k not in ("active", "updated_at")
    }
    assert db.execute("select * from subscriptions where id = %s", (sub["id"],)).fetchone() == sub
    assert (
        db.execute("select public.usage_summary(%s)", (sub["organisation_id"],)).fetchone()
        == summary
    )
    assert (
        db.execute(
            "select * from billing_plan_prices where plan_id = %s order by stripe_price_id",
            (enterprise["id"],),
        ).fetchall()
        == prices
    )
    with acting_as(db, "anon") as anon:  # what a pricing page (and a new checkout) can see
        on_sale = anon.execute("select name from billing_plans order by sort_order").fetchall()
    assert on_sale == [("Starter",), ("Growth",)]
    # Stripe keeps billing the subscriber: the plan's prices stay active there.
    live = {price["id"] for price in stripe_prices(standin) if price.get("active", True)}
    assert {ids["mb_enterprise_monthly"], ids["mb_enterprise_metered"]} <= live

    _, back = run(settings)  # listed again: on sale again, same prices
    assert "not in the plans file" not in back
    again = db.execute("select * from billing_plans where id = %s", (enterprise["id"],)).fetchone()
    assert again["active"] is True and again["stripe_price_id"] == enterprise["stripe_price_id"]
