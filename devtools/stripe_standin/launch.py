"""Starting the stand-in: `create_app` and `seed_prices` (for tests and local runs),
`serve_in_thread`, and `main` (`python -m devtools.stripe_standin`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server, run_simple

from .app import StripeStandin
from .catalog import create_price, create_product, ensure_meter
from .state import Call, Json, new_id

log = logging.getLogger("stripe_standin")


def create_app(
    webhook_url: str | None,
    webhook_secret: str,
    *,
    meter_event_names: Iterable[str] = (),
    async_meter_validation: bool = True,
) -> StripeStandin:
    """The stand-in WSGI app, with a `sum` meter already registered for each event name.

    `async_meter_validation` (default): a v1 meter event with no meter, an archived one, an
    unknown customer or a bad value is accepted and reported later, as Stripe does
    (meter_events.py); False refuses it with a 400 at once (for tests of the request itself).
    """
    app = StripeStandin(webhook_url, webhook_secret, async_meter_validation=async_meter_validation)
    with app.state.lock:
        for name in meter_event_names:
            ensure_meter(app.state, name)
    return app


def seed_prices(app: StripeStandin, specs: Iterable[Json]) -> list[Json]:
    """Pre-seed prices with chosen ids; a missing product (or meter) is created on the way.

    A spec: `{"id": "price_pro_monthly", "currency": "eur", "unit_amount": 4900,
    "interval": "month" (none: one-time), "usage_type": "licensed" | "metered",
    "meter_event_name": "voice_call_minutes", "product": "prod_pro", "lookup_key", "nickname"}`.
    """
    created = []
    with app.state.lock:
        st = app.state
        for spec in specs:
            product = spec.get("product") or new_id("prod")
            if product not in st.store["product"]:
                create_product(Call(st, {"id": product, "name": spec.get("nickname") or product}))
            params: Json = {"currency": spec["currency"], "product": product}
            params["unit_amount"] = str(spec["unit_amount"])
            params.update({k: spec[k] for k in ("lookup_key", "nickname") if spec.get(k)})
            usage_type = spec.get("usage_type", "licensed")
            if spec.get("interval") or usage_type == "metered":
                interval = spec.get("interval") or "month"
                params["recurring"] = {"interval": interval, "usage_type": usage_type}
            if usage_type == "metered":
                meter = ensure_meter(st, spec.get("meter_event_name") or "voice_call_minutes")
                params["recurring"]["meter"] = meter["id"]
            price = create_price(Call(st, params), price_id=spec.get("id"))
            created.append(copy.deepcopy(price))
    return created


def serve_in_thread(
    webhook_url: str | None, webhook_secret: str, **options: Any
) -> tuple[str, Callable[[], None]]:
    """Serve a fresh stand-in on a free 127.0.0.1 port in a daemon thread: (base_url, stop)."""
    server = make_server(
        "127.0.0.1", 0, create_app(webhook_url, webhook_secret, **options), threaded=True
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="stripe-standin",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"http://127.0.0.1:{server.server_port}", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stripe_standin",
        description="A local stand-in for Stripe's API on 127.0.0.1, for local runs and "
        "end-to-end tests only. NEVER for production: in memory, any sk_test_ key, no money.",
    )
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", help="where signed events are POSTed (none: only logged)")
    parser.add_argument(
        "--webhook-secret", help="whsec_... used to sign events (with --webhook-url)"
    )
    parser.add_argument(
        "--meter-event-name", action="append", default=[], help="pre-register a meter (repeatable)"
    )
    parser.add_argument("--seed-prices", type=Path, help="JSON list of price specs (seed_prices)")
    parser.add_argument(
        "--sync-meter-validation",
        action="store_true",
        help="refuse invalid meter events at once (Stripe accepts them and reports them later)",
    )
    parser.add_argument(
        "--meter-error-report-interval",
        type=float,
        default=0,
        metavar="SECONDS",
        help="deliver pending meter error reports this often (default: only on "
        "POST /_standin/meter_error_reports/deliver)",
    )
    args = parser.parse_args(argv)
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(
        args.webhook_url,
        args.webhook_secret or "",
        meter_event_names=args.meter_event_name,
        async_meter_validation=not args.sync_meter_validation,
    )
    if args.seed_prices:
        for price in seed_prices(app, json.loads(args.seed_prices.read_text())):
            log.info("seeded price %s (%s)", price["id"], price["lookup_key"] or price["nickname"])
    if args.meter_error_report_interval > 0:
        interval = args.meter_error_report_interval
        reporter = threading.Thread(
            target=report_every, args=(app, interval), name="meter-error-reports", daemon=True
        )
        reporter.start()
    log.info("Stripe stand-in (never for production) on http://127.0.0.1:%d", args.port)
    run_simple("127.0.0.1", args.port, app, threaded=True)


def report_every(app: StripeStandin, interval: float) -> None:
    """Deliver pending meter error reports every `interval` seconds, as Stripe would."""
    while True:
        time.sleep(interval)
        try:
            app.report_meter_errors()
        except Exception:  # keep reporting; the next round may succeed
            log.exception("delivering meter error reports failed")
