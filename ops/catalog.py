"""Make Stripe's catalogue match plans.toml and write the price ids into billing_plans.

Usage: python -m ops.catalog [--dry-run] [--plans plans.toml]
Needs STRIPE_SECRET_KEY and DATABASE_URL (STRIPE_API_BASE for the local stand-in). Idempotent:
the meter is found by event name, products by id (`mb_plan_<key>`), prices by lookup key; a price
whose amount or interval changed is replaced by a new one that takes over the lookup key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import stripe

from shared.settings import Settings
from shared.stripe_api import make_stripe_client

ROOT = Path(__file__).resolve().parent.parent
SETUP_FEE_KEY = "mb_setup_fee"


def load_plans(path: Path) -> dict[str, Any]:
    catalog = tomllib.loads(path.read_text())
    for plan in catalog["plans"]:
        for field in (
            "key",
            "name",
            "included_minutes",
            "monthly_price_cents",
            "overage_rate_cents",
        ):
            if field not in plan:
                sys.exit(f"{path}: plan {plan.get('key', '?')} has no {field}")
    return catalog


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
    fingerprint = json.dumps(want, sort_keys=True).encode()
    created = client.v1.prices.create(
        params={**want, "transfer_lookup_key": True},
        options={"idempotency_key": "mb-price-" + hashlib.sha256(fingerprint).hexdigest()[:32]},
    )
    print(
        f"price {key}: {'replaced ' + found[0].id + ' with' if found else 'created'} {created.id}"
    )
    return str(created.id)


def write_plans(database_url: str, catalog: dict[str, Any], ids: dict[str, str]) -> None:
    """Upsert each plan by name with its amounts and Stripe price ids."""
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


def sync_catalog(settings: Settings, catalog: dict[str, Any], *, dry_run: bool) -> dict[str, str]:
    """Ensure meter, products and prices; write billing_plans. Returns lookup key -> price id."""
    if dry_run:
        print(f"would ensure meter {catalog['meter_event_name']}")
        for want in wanted_prices(catalog, meter_id="<meter>"):
            print(
                f"would ensure product {want['product']} and price {want['lookup_key']}"
                f" ({want.get('unit_amount', want.get('tiers'))} {want['currency']})"
            )
        print(f"would write {len(catalog['plans'])} plans into billing_plans")
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
    if SETUP_FEE_KEY in ids:
        print(
            f"setup fee: set STRIPE_SETUP_FEE_PRICE_ID={ids[SETUP_FEE_KEY]} for create-checkout-session"
        )
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be ensured")
    parser.add_argument("--plans", type=Path, default=ROOT / "plans.toml")
    args = parser.parse_args()
    catalog = load_plans(args.plans)
    settings = Settings()
    if not args.dry_run:
        settings.require("STRIPE_SECRET_KEY", "DATABASE_URL")
    sync_catalog(settings, catalog, dry_run=args.dry_run)


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # an operator command: say what failed, exit non-zero
        sys.exit(f"stripe-catalog failed: {type(error).__name__}: {error}")
