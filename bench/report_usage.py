"""Benchmark POST report-usage end to end, on this machine only (loopback, about 20 s).

    python bench/report_usage.py [--seconds 6] [--clients 8]

Starts an embedded Postgres (pgserver) in a temporary directory and migrates it, seeds one
subscribed organisation, serves Stripe's POST /v1/billing/meter_events from a local stub that
answers in about 1 ms, runs the real function under functions-framework (gunicorn), and drives it
with concurrent clients for a fixed time. Prints requests/s, p50 and p99 latency, database round
trips per report (pg_stat_database.xact_commit: every call is one autocommit statement), and the
rate of calling public.record_usage directly in a loop, with the ratio of the two.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pgserver
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ops.migrate import migrate  # noqa: E402

FIXTURE = json.loads((ROOT / "devtools" / "stripe_fixtures" / "fixtures3.json").read_text())[
    "resources"
]["billing.meter_event"]
SERVICE_KEY = "bench_service_role_key_0123456789abcdef"


class StripeStub(BaseHTTPRequestHandler):
    """POST /v1/billing/meter_events: a fixture-shaped billing.meter_event after about 1 ms."""

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"] or 0)).decode())
        time.sleep(0.001)
        if self.path != "/v1/billing/meter_events":
            self.send_error(404)
            return
        event = {
            **FIXTURE,
            "identifier": form["identifier"][0],
            "event_name": form["event_name"][0],
            "timestamp": int(form["timestamp"][0]),
            "payload": {
                "stripe_customer_id": form["payload[stripe_customer_id]"][0],
                "value": form["payload[value]"][0],
            },
        }
        body = json.dumps(event).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stripe_stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StripeStub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def function_server(database_url: str, stripe_url: str, org_id: str) -> Iterator[tuple[str, int]]:
    """functions-framework (gunicorn: 1 worker, 8 threads) serving report-usage on loopback;
    its URL and how many GET requests it took to see it ready."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "DATABASE_POOL_SIZE": "8",
        "STRIPE_SECRET_KEY": "sk_test_bench0metered0billing",
        "STRIPE_API_BASE": stripe_url,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        "THREADS": "8",
    }
    command = [
        str(Path(sys.executable).parent / "functions-framework"),
        "--source",
        str(ROOT / "functions" / "report-usage" / "main.py"),
        "--target",
        "report_usage",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline, checks = time.monotonic() + 20, 0
        while True:
            with contextlib.suppress(httpx.HTTPError):
                checks += 1
                ready = httpx.get(url, params={"org_id": org_id}, headers=auth(), timeout=2)
                if ready.status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("report-usage did not start under functions-framework")
            time.sleep(0.2)
        yield url, checks
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_KEY}"}


def seed(conn: psycopg.Connection[Any]) -> str:
    """An organisation with an active monthly subscription and its current cycle; its id."""
    tag = uuid.uuid4().hex[:10]
    user = conn.execute(
        "insert into auth.users (id, email) values (gen_random_uuid(), %s) returning id",
        (f"bench-{tag}@example.com",),
    ).fetchone()
    assert user is not None
    row = conn.execute(
        """
        with org as (
          insert into public.organisations (name, owner_id, stripe_customer_id)
          values ('Bench Voice', %(user)s, %(customer)s) returning id
        ), plan as (
          insert into public.billing_plans (name, included_minutes, monthly_price_cents,
            overage_rate_cents, stripe_price_id, stripe_metered_price_id)
          values (%(plan)s, 500, 20400, 50, %(price)s, %(metered)s) returning id
        ), sub as (
          insert into public.subscriptions (organisation_id, plan_id, stripe_subscription_id,
            stripe_customer_id, status, billing_period, current_period_start, current_period_end)
          select org.id, plan.id, %(sub)s, %(customer)s, 'active', 'monthly',
            now() - interval '3 days', now() - interval '3 days' + interval '1 month'
            from org, plan returning id, organisation_id, current_period_start, current_period_end
        )
        insert into public.billing_cycles (organisation_id, subscription_id, period_start,
          period_end, included_minutes)
        select organisation_id, id, current_period_start, current_period_end, 500 from sub
        returning organisation_id
        """,
        {
            "user": user[0],
            "customer": f"cus_bench{tag}",
            "plan": f"Bench {tag}",
            "price": f"price_bench_{tag}",
            "metered": f"price_bench_metered_{tag}",
            "sub": f"sub_bench{tag}",
        },
    ).fetchone()
    assert row is not None
    return str(row[0])


def commits(url: str) -> int:
    """Transactions committed in the database so far, once no other client is connected.

    A backend publishes its statistics when it exits (while it idles, only every 10 s), so this
    reads after the function's connections are gone. The read itself adds one commit.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        others = (
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and backend_type = 'client backend' and pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + 10
        while conn.execute(others).fetchone() != (0,) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        conn.execute("select pg_stat_clear_snapshot()")
        row = conn.execute(
            "select xact_commit from pg_stat_database where datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def drive(url: str, org_id: str, clients: int, seconds: float) -> tuple[list[float], Counter[int]]:
    """`clients` threads posting distinct calls until the time is up; latencies (s), statuses."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        mine: list[float] = []
        seen: Counter[int] = Counter()
        with httpx.Client(headers=auth(), timeout=30) as http:
            i = 0
            while time.monotonic() < deadline:
                body = {"org_id": org_id, "call_id": f"bench-{n}-{i}", "call_duration_seconds": 61}
                started = time.perf_counter()
                status = http.post(url, json=body).status_code
                mine.append(time.perf_counter() - started)
                seen[status] += 1
                i += 1
        with lock:
            latencies.extend(mine)
            statuses.update(seen)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


def direct_rate(conn: psycopg.Connection[Any], org_id: str, seconds: float) -> float:
    """public.record_usage called in a loop on one connection: calls per second."""
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        conn.execute(
            "select public.record_usage(p_org_id => %s, p_call_id => %s,"
            " p_duration_seconds => 61, p_ended_at => null, p_lease_seconds => 3600)",
            (org_id, f"direct-{calls}"),
        )
        calls += 1
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="HTTP load duration")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mb-bench-") as data:
        server = pgserver.get_server(data, cleanup_mode="stop")
        try:
            with psycopg.connect(server.get_uri(), autocommit=True) as admin:
                admin.execute("create database bench")
            url = server.get_uri().replace("/postgres?", "/bench?")
            with contextlib.redirect_stdout(io.StringIO()):
                migrate(url)
            with psycopg.connect(url, autocommit=True) as conn:
                http_org, direct_org = seed(conn), seed(conn)
            base = commits(url)
            with stripe_stub() as stripe_url, function_server(url, stripe_url, http_org) as served:
                latencies, statuses = drive(served[0], http_org, args.clients, args.seconds)
            # Each readiness GET is one commit (usage_summary) and the base read another.
            trips = commits(url) - base - 1 - served[1]
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                direct = direct_rate(conn, direct_org, 3.0)
                cycle = conn.execute(
                    "select c.minutes_used, (select count(*) from public.usage_records u"
                    " where u.organisation_id = c.organisation_id and u.meter_status = 'sent')"
                    " from public.billing_cycles c where c.organisation_id = %s",
                    (http_org,),
                ).fetchone()
        finally:
            server.cleanup()

    reports = len(latencies)
    rate = reports / args.seconds
    cuts = statistics.quantiles(latencies, n=100) if reports > 1 else [0.0] * 99
    assert cycle is not None
    print(
        "report-usage under functions-framework (gunicorn 1 worker x 8 threads), Stripe stub ~1 ms"
    )
    print(f"  clients             {args.clients} for {args.seconds:.0f} s")
    print(f"  requests            {reports} ({dict(statuses)})")
    print(f"  requests/s          {rate:.0f}")
    print(f"  latency p50 / p99   {cuts[49] * 1000:.1f} ms / {cuts[98] * 1000:.1f} ms")
    print(f"  DB round trips      {trips / max(reports, 1):.2f} per report")
    print(f"  record_usage direct {direct:.0f} calls/s (one connection, loop)")
    print(f"  ratio HTTP/direct   {rate / direct:.2f}")
    ok = cycle[0] == 2 * reports and cycle[1] == reports
    print(
        f"  totals check        minutes {cycle[0]} = 2 x {reports}, sent {cycle[1]}: "
        f"{'ok' if ok else 'MISMATCH'}"
    )


if __name__ == "__main__":
    main()
