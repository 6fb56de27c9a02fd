"""stripe-catalog: plans.toml made true in Stripe (the local stand-in) and in billing_plans."""

from __future__ import annotations

import contextlib
import copy
import io

import httpx
import pytest

from devtools.stripe_standin import serve_in_thread
from ops.catalog import ROOT, load_plans, sync_catalog
from shared.settings import Settings

CATALOG = load_plans(ROOT / "plans.toml")


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
