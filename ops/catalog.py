"""Make Stripe's catalogue match plans.toml and write the price ids into billing_plans.

Usage: python -m ops.catalog [--dry-run] [--plans plans.toml]
Needs STRIPE_SECRET_KEY and DATABASE_URL (STRIPE_API_BASE for the local stand-in). Idempotent:
the meter is found by event name, products by id (`mb_plan_<key>`), prices by lookup key; a price
whose amount or interval changed is replaced by a new one that takes over the lookup key. A plan
no longer in the file becomes inactive (no new checkouts); its row, its prices and its
subscribers stay as they are. billing_plan_prices is written by a trigger on billing_plans.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import stripe

from ops.errors import OperatorError, reach_database, run
from shared.settings import Settings
from shared.stripe_api import make_stripe_client

ROOT = Path(__file__).resolve().parent.parent
SETUP_FEE_KEY = "mb_setup_fee"
AMOUNTS = ("included_minutes", "monthly_price_cents", "overage_rate_cents")
OPTIONAL_AMOUNTS = ("yearly_price_cents", "sort_order")
# Held in int4 columns (prices are 64-bit, as Stripe's amounts are).
INT4_FIELDS = ("included_minutes", "overage_rate_cents", "sort_order")


def load_plans(path: Path) -> dict[str, Any]:
    """The catalogue in `path`, checked; OperatorError naming the file and the first problem."""
    try:
        catalog = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise OperatorError(f"{path}: no such plans file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise OperatorError(f"{path}: cannot read it ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise OperatorError(f"{path}: not valid TOML: {error}") from None
    problem = catalog_problem(catalog)
    if problem:
        raise OperatorError(f"{path}: {problem}")
    return catalog


def catalog_problem(catalog: dict[str, Any]) -> str | None:
    """What is wrong with a parsed plans file, or None."""
    if not re.fullmatch(r"[a-z]{3}", str(catalog.get("currency", ""))):
        return 'currency must be a lowercase ISO code such as "eur"'
    if not isinstance(catalog.get("meter_event_name"), str) or not catalog["meter_event_name"]:
        return "meter_event_name is missing"
    if not _whole(catalog.get("setup_fee_cents", 0)):
        return "setup_fee_cents must be a whole number >= 0"
    plans = catalog.get("plans")
    if not isinstance(plans, list) or not plans or not all(isinstance(p, dict) for p in plans):
        return "no [[plans]] tables"
    for number, plan in enumerate(plans, 1):
        label = f"plan {number} ({plan.get('key', 'no key')})"
        if not re.fullmatch(r"[a-z0-9_]{1,40}", str(plan.get("key", ""))):
            return f"{label}: key must be 1-40 of a-z, 0-9 and _"
        if not isinstance(plan.get("name"), str) or not 1 <= len(plan["name"]) <= 100:
            return f"{label}: name must be text of 1-100 characters"
        for field in AMOUNTS:
            if field not in plan:
                return f"{label}: has no {field}"
        for field in (*AMOUNTS, *OPTIONAL_AMOUNTS):
            if field in plan and not _whole(plan[field]):
                return f"{label}: {field} must be a whole number >= 0, not {plan[field]!r}"
        for field in INT4_FIELDS:
            if plan.get(field, 0) > 2**31 - 1:
                return f"{label}: {field} must be at most 2147483647, not {plan[field]}"
    for field in ("key", "name"):
        values = [plan[field] for plan in plans]
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            return f"two plans have the {field} {repeated[0]!r}"
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def wanted_prices(catalog: dict[str, Any], meter_id: str) -> list[dict[str, Any]]:
    """Every price the catalogue needs, as Stripe create parameters (lookup_key first)."""
    currency = catalog["currency"]
    prices: list[dict[str, Any]] = []
    for plan in catalog["plans"]:
        product = f"mb_plan_{plan['key']}"
        monthly = {"interval": "month", "usage_type": "licensed"}
        prices.append(
            price(
                f"mb_{plan['key']}_monthly", product, currency, plan["monthly_price_cents"], monthly
            )
        )
        if plan.get("yearly_price_cents"):
            yearly = {"interval": "year", "usage_type": "licensed"}
            prices.append(
                price(
                    f"mb_{plan['key']}_yearly",
                    product,
                    currency,
                    plan["yearly_price_cents"],
                    yearly,
                )
            )
        metered = {"interval": "month", "usage_type": "metered", "meter": meter_id}
        usage = price(
            f"mb_{plan['key']}_metered", product, currency, plan["overage_rate_cents"], metered
        )
        if plan["included_minutes"] > 0:
            # Every billed minute goes to the meter and the included ones cost nothing: graduated
            # tiers, so Stripe's invoice and our cycle's overage agree to the cent.
            rate = usage.pop("unit_amount")
            usage.update(
                billing_scheme="tiered",
                tiers_mode="graduated",
                tiers=[
                    {"up_to": plan["included_minutes"], "unit_amount": 0},
                    {"up_to": "inf", "unit_amount": rate},
                ],
            )
        prices.append(usage)
    if catalog.get("setup_fee_cents"):
        prices.append(
            price(SETUP_FEE_KEY, SETUP_FEE_KEY, currency, catalog["setup_fee_cents"], None)
        )
    return prices


def price(
    lookup_key: str, product: str, currency: str, amount: int, recurring: dict[str, str] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "lookup_key": lookup_key,
        "product": product,
        "currency": currency,
        "unit_amount": amount,
        "nickname": lookup_key,
    }
    if recurring:
        params["recurring"] = recurring
    return params


def tiers_of(found: Any) -> list[tuple[int | None, int]]:
    tiers = found.tiers if "tiers" in found else None
    return [(tier.up_to, tier.unit_amount or 0) for tier in (tiers or [])]


def same_price(found: Any, want: dict[str, Any]) -> bool:
    recurring = want.get("recurring")
    have = found.recurring
    if found.currency != want["currency"] or found.unit_amount != want.get("unit_amount"):
        return False
    wanted_tiers = [
        (None if tier["up_to"] == "inf" else tier["up_to"], tier["unit_amount"])
        for tier in want.get("tiers", [])
    ]
    if tiers_of(found) != wanted_tiers:
        return False
    if recurring is None or have is None:
        return recurring is None and have is None
    return bool(
        have.interval == recurring["interval"]
        and have.usage_type == recurring["usage_type"]
        and (recurring.get("meter") is None or have.meter == recurring["meter"])
    )


def ensure_meter(client: stripe.StripeClient, event_name: str) -> str:
    for meter in client.v1.billing.meters.list(params={"status": "active", "limit": 100}).data:
        if meter.event_name == event_name:
            print(f"meter {event_name}: found {meter.id}")
            return meter.id
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "Voice call minutes",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        options={"idempotency_key": f"mb-meter-{event_name}"},
    )
    print(f"meter {event_name}: created {meter.id}")
    return meter.id


def ensure_product(client: stripe.StripeClient, product_id: str, name: str) -> None:
    try:
        product = client.v1.products.retrieve(product_id)
    except stripe.InvalidRequestError as error:
        if error.http_status != 404:
            raise
        client.v1.products.create(params={"id": product_id, "name": name})
        print(f"product {product_id}: created")
        return
    if product.name != name:
        client.v1.products.update(product_id, params={"name": name})
        print(f"product {product_id}: renamed to {name}")
    else:
        print(f"product {product_id}: found")


def ensure_price(client: stripe.StripeClient, want: dict[str, Any]) -> str:
    key = want["lookup_key"]
    found = client.v1.prices.list(
        params={"lookup_keys": [key], "active": True, "limit": 1, "expand": ["data.tiers"]}
    ).data
    if found and same_price(found[0], want):
        print(f"price {key}: found {found[0].id}")
        return str(found[0].id)
    # The price it replaces is part of the key: going back to earlier terms within Stripe's 24 h
    # key window must create a price that takes the lookup key, not replay the first create.
    replaces = found[0].id if found else None
    fingerprint = json.dumps({"price": want, "replaces": replaces}, sort_keys=True).encode()
    created = client.v1.prices.create(
        params={**want, "transfer_lookup_key": True},
        options={"idempotency_key": "mb-price-" + hashlib.sha256(fingerprint).hexdigest()[:32]},
    )
    print(
        f"price {key}: {'replaced ' + found[0].id + ' with' if found else 'created'} {created.id}"
    )
    return str(created.id)


# The customer portal: payment methods, invoices, cancellation at the period end, and NO plan
# switching. Stripe's portal cannot update a subscription with several items or a metered price
# (docs.stripe.com/customer-management, "Limitations": such a subscription can only be canceled
# there), and ours have two (flat + metered): plan changes go through change-plan.
PORTAL_MARK = {"mb_portal": "metered-billing"}
PORTAL_FEATURES: dict[str, Any] = {
    "customer_update": {"enabled": True, "allowed_updates": ["email", "address", "name", "tax_id"]},
    "invoice_history": {"enabled": True},
    "payment_method_update": {"enabled": True},
    "subscription_cancel": {
        "enabled": True,
        "mode": "at_period_end",
        "proration_behavior": "none",
    },
    "subscription_update": {"enabled": False},
}


def ensure_portal_configuration(client: stripe.StripeClient) -> str:
    """Our portal configuration (found by its metadata), created or brought back to our features."""
    configs = client.v1.billing_portal.configurations.list(params={"active": True, "limit": 100})
    ours = next(
        (
            c
            for c in configs.data
            if (c.to_dict().get("metadata") or {}).get("mb_portal") == PORTAL_MARK["mb_portal"]
        ),
        None,
    )
    if ours is None:
        created = client.v1.billing_portal.configurations.create(
            params={"features": PORTAL_FEATURES, "metadata": PORTAL_MARK},  # type: ignore[typeddict-item]
            options={"idempotency_key": "mb-portal-configuration"},
        )
        print(f"portal configuration: created {created.id} (no plan switching)")
        return str(created.id)
    features = ours.features
    if features.subscription_update.enabled or not (
        features.subscription_cancel.enabled
        and features.subscription_cancel.mode == "at_period_end"
        and features.payment_method_update.enabled
        and features.invoice_history.enabled
    ):
        client.v1.billing_portal.configurations.update(
            ours.id,
            params={"features": PORTAL_FEATURES},  # type: ignore[typeddict-item]
        )
        print(f"portal configuration {ours.id}: features restored (no plan switching)")
    else:
        print(f"portal configuration: found {ours.id}")
    return str(ours.id)


def write_plans(database_url: str, catalog: dict[str, Any], ids: dict[str, str]) -> None:
    """Upsert each plan by name with its amounts and Stripe price ids; take every plan the
    catalogue no longer names off sale. One transaction."""
    with psycopg.connect(database_url) as conn:
        for plan in catalog["plans"]:
            key = plan["key"]
            conn.execute(
                """
                insert into public.billing_plans (name, currency, included_minutes,
                  monthly_price_cents, yearly_price_cents, overage_rate_cents, stripe_price_id,
                  stripe_yearly_price_id, stripe_metered_price_id, sort_order, active)
                values (%(name)s, %(currency)s, %(included)s, %(monthly)s, %(yearly)s, %(rate)s,
                  %(price)s, %(yearly_price)s, %(metered)s, %(sort)s, true)
                on conflict (name) do update set currency = excluded.currency,
                  included_minutes = excluded.included_minutes,
                  monthly_price_cents = excluded.monthly_price_cents,
                  yearly_price_cents = excluded.yearly_price_cents,
                  overage_rate_cents = excluded.overage_rate_cents,
                  stripe_price_id = excluded.stripe_price_id,
                  stripe_yearly_price_id = excluded.stripe_yearly_price_id,
                  stripe_metered_price_id = excluded.stripe_metered_price_id,
                  sort_order = excluded.sort_order, active = true, updated_at = now()
                """,
                {
                    "name": plan["name"],
                    "currency": catalog["currency"],
                    "included": plan["included_minutes"],
                    "monthly": plan["monthly_price_cents"],
                    "yearly": plan.get("yearly_price_cents"),
                    "rate": plan["overage_rate_cents"],
                    "price": ids[f"mb_{key}_monthly"],
                    "yearly_price": ids.get(f"mb_{key}_yearly"),
                    "metered": ids[f"mb_{key}_metered"],
                    "sort": plan.get("sort_order", 0),
                },
            )
            print(f"billing_plans {plan['name']}: price ids written")
        # Unlisted plans leave sale only: their rows, price ids and subscribers stay as they are.
        retired = conn.execute(
            "update public.billing_plans set active = false, updated_at = now()"
            " where active and not (name = any(%(names)s)) returning name",
            {"names": [plan["name"] for plan in catalog["plans"]]},
        ).fetchall()
        for (name,) in sorted(retired):
            print(
                f"billing_plans {name}: not in the plans file, now inactive"
                " (no new checkouts; its subscribers keep it)"
            )


def unlisted_plans(database_url: str, catalog: dict[str, Any]) -> list[str]:
    """The active plans of billing_plans that the catalogue no longer names."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select name from public.billing_plans where active and not (name = any(%(names)s))"
            " order by sort_order, name",
            {"names": [plan["name"] for plan in catalog["plans"]]},
        ).fetchall()
    return [name for (name,) in rows]


def sync_catalog(settings: Settings, catalog: dict[str, Any], *, dry_run: bool) -> dict[str, str]:
    """Ensure meter, products and prices; write billing_plans. Returns lookup key -> price id."""
    if dry_run:
        print(f"would ensure meter {catalog['meter_event_name']}")
        for want in wanted_prices(catalog, meter_id="<meter>"):
            print(
                f"would ensure product {want['product']} and price {want['lookup_key']}"
                f" ({want.get('unit_amount', want.get('tiers'))} {want['currency']})"
            )
        for plan in catalog["plans"]:
            print(f"would write plan {plan['name']} ({plan['key']}) into billing_plans")
        if settings.DATABASE_URL:
            for name in unlisted_plans(settings.DATABASE_URL, catalog):
                print(f"would make plan {name} inactive: not in the plans file")
        else:
            print("would make inactive every active plan not in the plans file (no DATABASE_URL)")
        return {}
    client = make_stripe_client(settings)
    meter_id = ensure_meter(client, catalog["meter_event_name"])
    names = {f"mb_plan_{plan['key']}": plan["name"] for plan in catalog["plans"]}
    names[SETUP_FEE_KEY] = "Setup fee"
    ids: dict[str, str] = {}
    for want in wanted_prices(catalog, meter_id):
        if want["product"] in names:
            ensure_product(client, want["product"], names.pop(want["product"]))
        ids[want["lookup_key"]] = ensure_price(client, want)
    assert settings.DATABASE_URL is not None
    write_plans(settings.DATABASE_URL, catalog, ids)
    portal = ensure_portal_configuration(client)
    print(f"portal: set STRIPE_PORTAL_CONFIGURATION_ID={portal} for create-portal-session")
    if SETUP_FEE_KEY in ids:
        print(
            f"setup fee: set STRIPE_SETUP_FEE_PRICE_ID={ids[SETUP_FEE_KEY]} for create-checkout-session"
        )
    return ids


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be ensured")
    parser.add_argument("--plans", type=Path, default=ROOT / "plans.toml", metavar="FILE")
    args = parser.parse_args(argv)
    catalog = load_plans(args.plans)
    settings = Settings()
    if not args.dry_run:
        settings.require("STRIPE_SECRET_KEY", "DATABASE_URL")
    reach_database(settings.DATABASE_URL)  # before Stripe is touched
    sync_catalog(settings, catalog, dry_run=args.dry_run)


if __name__ == "__main__":
    run("stripe-catalog", main)
