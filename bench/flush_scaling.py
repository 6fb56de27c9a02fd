"""How many flushers one Postgres feeds: 1, 2, 4 and 8 draining 100,000 queued meter events.

    python bench/flush_scaling.py [--events 100000] [--flushers 1 2 4 8] [--stripe-ms 0 50]

Starts an embedded Postgres (pgserver) with the real migrations, queues `--events` meter events
over 100 subscribed organisations (record_usage, the function report-usage calls), and for each
Stripe latency and flusher count: puts every event back in the queue, starts that many flusher
processes (each shared.meter_flush.flush with its own session and connection, as report-usage
instances and the scheduled flush run them) against a local stand-in of the v2 meter event
stream, and times the drain. Prints events/s, Stripe requests, and the share of each flusher's
time spent in the database (claim + outcomes) against the share waiting for Stripe: when adding
flushers stops adding events/s while the database share grows, the outbox claim is the
bottleneck. Checks every event reached the stub exactly once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pgserver
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hot_path import migrated_database  # noqa: E402

ORGS = 100


class Stream(BaseHTTPRequestHandler):
    """The v2 session and stream endpoints after `delay` seconds; identifiers counted."""

    delay = 0.0
    lock = threading.Lock()
    seen: ClassVar[Counter[str]] = Counter()
    requests: ClassVar[int] = 0

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"] or 0))
        time.sleep(self.delay)
        if self.path == "/v2/billing/meter_event_session":
            expires = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 900))
            answer: dict[str, Any] = {
                "object": "v2.billing.meter_event_session",
                "id": f"mes_{uuid.uuid4().hex[:12]}",
                "authentication_token": f"mets_bench_{uuid.uuid4().hex}",
                "created": "2026-01-01T00:00:00.000Z",
                "expires_at": expires,
                "livemode": False,
            }
        else:
            events = json.loads(raw)["events"]
            with self.lock:
                type(self).requests += 1
                self.seen.update(event["identifier"] for event in events)
            answer = {}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def seed(url: str, events: int) -> None:
    """100 subscribed organisations and `events` reports spread over them (1 minute each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            with owner as (
              insert into auth.users (id, email) values (gen_random_uuid(), 'bench@example.com')
              returning id
            ), plan as (
              insert into public.billing_plans (name, included_minutes, monthly_price_cents,
                overage_rate_cents, stripe_price_id, stripe_metered_price_id)
              values ('Bench', 500, 20400, 50, 'price_bench', 'price_bench_metered') returning id
            ), orgs as (
              insert into public.organisations (name, owner_id, stripe_customer_id)
              select 'Org ' || n, owner.id, 'cus_bench' || n
                from generate_series(1, %(orgs)s) n, owner
              returning id, stripe_customer_id
            ), subs as (
              insert into public.subscriptions (organisation_id, plan_id, stripe_subscription_id,
                stripe_customer_id, status, billing_period, current_period_start,
                current_period_end, stripe_metered_price_id)
              select orgs.id, plan.id, 'sub_' || orgs.stripe_customer_id, orgs.stripe_customer_id,
                     'active', 'monthly', now() - interval '3 days',
                     now() - interval '3 days' + interval '1 month', 'price_bench_metered'
                from orgs, plan
              returning id, organisation_id, current_period_start, current_period_end
            )
            insert into public.billing_cycles (organisation_id, subscription_id, period_start,
              period_end, included_minutes, overage_rate_cents, stripe_metered_price_id)
            select organisation_id, id, current_period_start, current_period_end, 500, 50,
                   'price_bench_metered'
              from subs
            """,
            {"orgs": ORGS},
        )
        conn.execute(
            """
            select public.record_usage(o.id, 'call-' || n, 60, null)
              from generate_series(1, %(events)s) n
              join (select id, row_number() over () - 1 as k from public.organisations) o
                on o.k = n %% %(orgs)s
            """,
            {"events": events, "orgs": ORGS},
        )


def requeue(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        done = conn.execute(
            "update public.usage_records set meter_status = 'pending', meter_attempts = 0,"
            " meter_claimed_at = null, meter_outcome_unknown_at = null, meter_sent_at = null,"
            " meter_next_attempt_at = now() where meter_identifier is not null"
        )
        conn.execute("vacuum analyze public.usage_records")
        return done.rowcount


def flusher(url: str, stripe_url: str, start: Any, out: Any) -> None:
    """One flusher process: flush until nothing is due; its time in the database and at Stripe."""
    os.environ.update(
        DATABASE_URL=url,
        STRIPE_SECRET_KEY="sk_test_bench0flush0scaling",  # noqa: S106 (a stub's key)
        STRIPE_API_BASE=stripe_url,
    )
    from shared import meter_flush
    from shared.db import PostgresDatabase
    from shared.settings import Settings
    from shared.stripe_api import make_stripe_client

    settings = Settings()
    database = PostgresDatabase(url, max_size=1)
    stream = meter_flush.MeterStream(make_stripe_client(settings), settings)
    timed = {"database": 0.0, "stripe": 0.0}

    class Timed:
        def call(self, function: str, **params: Any) -> Any:
            began = time.perf_counter()
            try:
                return database.call(function, **params)
            finally:
                timed["database"] += time.perf_counter() - began

    send = stream.send

    def timed_send(events: list[dict[str, Any]]) -> Any:
        began = time.perf_counter()
        try:
            return send(events)
        finally:
            timed["stripe"] += time.perf_counter() - began

    stream.send = timed_send  # type: ignore[method-assign]
    start.wait()
    sent = 0
    while True:
        report = meter_flush.flush(Timed(), stream, limit=10_000)  # type: ignore[arg-type]
        sent += report.sent
        if report.sent == 0:
            break
    out.put({"sent": sent, **timed})


def drain(url: str, stripe_url: str, count: int) -> tuple[float, list[dict[str, Any]]]:
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=flusher, args=(url, stripe_url, start, out)) for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    time.sleep(3)  # imports and connections, outside the timing
    began = time.perf_counter()
    start.set()
    results = [out.get() for _ in workers]
    elapsed = time.perf_counter() - began
    for worker in workers:
        worker.join()
    return elapsed, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--flushers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--stripe-ms", type=float, nargs="+", default=[0.0, 50.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mb-flush-") as tmp:
        server = pgserver.get_server(str(Path(tmp) / "pg"), cleanup_mode="stop")
        try:
            url = migrated_database(server)
            began = time.perf_counter()
            seed(url, args.events)
            print(
                f"Flush scaling ({os.cpu_count()} cores, embedded Postgres): {args.events} events"
                f" over {ORGS} organisations queued by record_usage in"
                f" {time.perf_counter() - began:.0f} s"
            )
            print(
                f"  {'Stripe':>7} {'flushers':>8} {'drain s':>8} {'events/s':>9} {'requests':>9}"
                f" {'in DB':>6} {'at Stripe':>9}  exactly once"
            )
            for delay in args.stripe_ms:
                for count in args.flushers:
                    queued = requeue(url)
                    handler = type("Stub", (Stream,), {"delay": delay / 1000, "seen": Counter()})
                    handler.requests = 0
                    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
                    stub.daemon_threads = True
                    threading.Thread(target=stub.serve_forever, daemon=True).start()
                    stripe_url = f"http://127.0.0.1:{stub.server_address[1]}"
                    elapsed, results = drain(url, stripe_url, count)
                    stub.shutdown()
                    in_db = sum(r["database"] for r in results)
                    at_stripe = sum(r["stripe"] for r in results)
                    busy = in_db + at_stripe or 1
                    once = len(handler.seen) == queued and max(handler.seen.values()) == 1
                    print(
                        f"  {delay:5.0f}ms {count:8d} {elapsed:8.1f} {queued / elapsed:9.0f}"
                        f" {handler.requests:9d} {in_db / busy:6.0%} {at_stripe / busy:9.0%}"
                        f"  {'yes' if once else 'NO: ' + str(len(handler.seen)) + ' distinct'}"
                    )
        finally:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
