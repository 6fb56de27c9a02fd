"""The hot path measured side by side in one run, on this machine only (loopback, about 5 min).

    python bench/hot_path.py [--seconds 8] [--warmup 2] [--connections 16] [--sql-rounds 3]
                             [--cold-runs 5]

Starts an embedded Postgres (pgserver) in a temporary directory, migrates it with the real
migrations, seeds subscribed organisations, and measures with the same client and server settings:

- a bare functions-framework function that parses a JSON body (the ceiling), once before each
  report-usage load below, each ratio taken against the round next to it;
- POST report-usage with a local Stripe stub answering after 1 ms, then after 150 ms;
- GET report-usage;
- on the same database, a minimal SQL floor (idempotent insert + atomic counter increment, in a
  scratch schema) and public.record_usage called directly, by the same method (pgbench, as many
  clients as connections), all on one organisation and then each client on its own, in
  alternating rounds after a vacuum and a checkpoint each (the median of the rounds' ratios);
- the cold start of every function and of the bare one, in a venv of the deployed requirements
  only (.local/bench-venv, installed once from the package registry).

Every server is functions-framework's default gunicorn (no WORKERS/THREADS set); every HTTP load
is wrk (`wrk` from Debian) with the same connections and duration after a warm-up, each POST with
its own call_id. Prints each rate, p50/p99, the ratios issue 12 names, Stripe requests per report
(counted at the stub) and whether each target is met. Timings are never asserted by tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
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
WRK_THREADS = 2

# Targets of issue 12 (items 2, 4 and 5).
POST_RATE_TARGET = 0.6  # report-usage POST (Stripe at 150 ms) / bare function, at least
POST_P50_TARGET = 2.0  # its p50 / the bare function's p50, at most
SQL_TARGET = 0.6  # record_usage / SQL floor, at least
STRIPE_PER_REPORT_TARGET = 1 / 50  # Stripe requests per report at sustained load, at most
COLD_TARGET = 2.0  # a function's cold start / the bare function's, at most

BARE_FUNCTION = '''\
import flask


def bare(request: flask.Request) -> flask.Response:
    """Parse the JSON body and answer with a small JSON object, nothing else."""
    body = request.get_json()
    return flask.jsonify({"received": len(body)}), 201
'''

# One wrk script for every HTTP load: a unique call_id per POST (run tag, wrk thread, counter),
# the same headers, and the statuses counted for the report.
WRK_SCRIPT = r"""
local threads = {}
counter = 0
n200, n201, n202, nother = 0, 0, 0, 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  method, tag, org = args[1], args[2], args[3]
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[4]
end

function request()
  if method == "GET" then
    return wrk.format("GET")
  end
  counter = counter + 1
  local body = string.format(
    '{"org_id":"%s","call_id":"%s-%d-%d","call_duration_seconds":61}', org, tag, id, counter)
  return wrk.format("POST", nil, nil, body)
end

function response(status, headers, body)
  if status == 200 then n200 = n200 + 1
  elseif status == 201 then n201 = n201 + 1
  elseif status == 202 then n202 = n202 + 1
  else nother = nother + 1 end
end

function done(summary, latency, requests)
  local s = {0, 0, 0, 0}
  for _, t in ipairs(threads) do
    s[1] = s[1] + t:get("n200")
    s[2] = s[2] + t:get("n201")
    s[3] = s[3] + t:get("n202")
    s[4] = s[4] + t:get("nother")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,' ..
    '"s200":%d,"s201":%d,"s202":%d,"other":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, s[1], s[2], s[3], s[4]))
end
"""


@dataclass
class Measured:
    """One load: rate, latencies and what came back."""

    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    requests: int
    statuses: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- Stripe stub -------------------------------------------------------------------------------


class StripeStub(BaseHTTPRequestHandler):
    """Stripe's meter event endpoints after `delay` seconds, every request counted by path.

    POST /v1/billing/meter_events answers a fixture-shaped billing.meter_event; the v2 session and
    stream endpoints answer minimally, so a batched delivery is counted the same way.
    """

    delay = 0.001
    lock = threading.Lock()
    counts: ClassVar[Counter[str]] = Counter()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"] or 0))
        time.sleep(self.delay)
        with self.lock:
            self.counts[self.path] += 1
        if self.path == "/v1/billing/meter_events":
            form = parse_qs(raw.decode())
            answer: dict[str, Any] = {
                **FIXTURE,
                "identifier": form["identifier"][0],
                "event_name": form["event_name"][0],
                "timestamp": int(form["timestamp"][0]),
                "payload": {
                    "stripe_customer_id": form["payload[stripe_customer_id]"][0],
                    "value": form["payload[value]"][0],
                },
            }
        elif self.path == "/v2/billing/meter_event_session":
            answer = {
                "object": "v2.billing.meter_event_session",
                "id": f"mes_bench{uuid.uuid4().hex[:12]}",
                "authentication_token": f"mes_token_{uuid.uuid4().hex}",
                "created": "2026-01-01T00:00:00.000Z",
                "expires_at": time.strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 900)
                ),
                "livemode": False,
            }
        elif self.path == "/v2/billing/meter_event_stream":
            answer = {}
        else:
            self.send_error(404)
            return
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stripe_stub(delay: float) -> Iterator[tuple[str, type[StripeStub]]]:
    handler = type("StripeStubDelayed", (StripeStub,), {"delay": delay, "counts": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.request_queue_size = 128
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()


# --- servers and load --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_KEY}"}


@contextlib.contextmanager
def function_server(
    source: Path, target: str, env: dict[str, str], ready: Callable[[str], bool]
) -> Iterator[tuple[str, int]]:
    """functions-framework with its default gunicorn (1 worker, 4 threads per core) on loopback;
    its URL and how many requests it took to see it ready."""
    port = free_port()
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    command = [
        str(Path(sys.executable).parent / "functions-framework"),
        "--source",
        str(source),
        "--target",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, env={**base_env, **env}, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline, checks = time.monotonic() + 30, 0
        while True:
            with contextlib.suppress(httpx.HTTPError):
                checks += 1
                if ready(url):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{target} did not start under functions-framework")
            time.sleep(0.2)
        yield url, checks
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def wrk(
    script: Path, url: str, method: str, org: str, tag: str, seconds: float, connections: int
) -> dict[str, int]:
    """One wrk load; the figures its Lua done() printed."""
    command = [
        "wrk",
        f"-t{min(WRK_THREADS, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
        "--",
        method,
        tag,
        org,
        SERVICE_KEY,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no figures:\n{out}")
    figures: dict[str, int] = json.loads(line[4:])
    return figures


def http_load(
    name: str, script: Path, url: str, method: str, org: str, args: argparse.Namespace
) -> tuple[Measured, int]:
    """Warm-up, then the measured load; the figures and the 2xx answers of both together."""
    tag = uuid.uuid4().hex[:8]
    warm = wrk(script, url, method, org, f"w{tag}", args.warmup, args.connections)
    run = wrk(script, url, method, org, f"m{tag}", args.seconds, args.connections)
    statuses = {k: run[k] for k in ("s200", "s201", "s202", "other") if run[k]}
    if run["errors"]:
        statuses["socket errors"] = run["errors"]
    measured = Measured(
        name=name,
        rate=run["requests"] / (run["duration_us"] / 1e6),
        p50_ms=run["p50_us"] / 1000,
        p99_ms=run["p99_us"] / 1000,
        requests=run["requests"],
        statuses=statuses,
    )
    ok = sum(x[k] for x in (warm, run) for k in ("s200", "s201", "s202"))
    return measured, ok


# --- cold start --------------------------------------------------------------------------------

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"  # noqa: S105 (a local run's)
WEBHOOK_SECRET = "whsec_bench0metered0billing"  # noqa: S105 (a local run's)

# function directory -> (entry point, expected status of its first request). Each first request
# is a real one, authenticated as its callers do: a report with the service key (202), a signed
# Stripe event of a type nobody handles (200), a user's token on a body it refuses (422), and a
# user of no organisation asking for its billing page (404).
COLD_FUNCTIONS = {
    "report-usage": ("report_usage", 202),
    "stripe-webhook-handler": ("stripe_webhook_handler", 200),
    "create-checkout-session": ("create_checkout_session", 422),
    "create-portal-session": ("create_portal_session", 422),
    "change-plan": ("change_plan", 422),
    "billing-overview": ("billing_overview", 404),
}


def first_request(name: str, org: str) -> Callable[[str], int]:
    """The first request `name` answers in a cold-start measurement."""

    def send(url: str) -> int:
        if name == "report-usage":
            body = {"org_id": org, "call_id": uuid.uuid4().hex, "call_duration_seconds": 61}
            return httpx.post(url, json=body, headers=auth(), timeout=10).status_code
        if name == "stripe-webhook-handler":
            event = json.dumps(
                {
                    "id": f"evt_cold{uuid.uuid4().hex[:16]}",
                    "object": "event",
                    "type": "ping",
                    "api_version": "2026-10-28.endive",
                    "created": int(time.time()),
                    "data": {"object": {}},
                    "livemode": False,
                }
            )
            stamp = str(int(time.time()))
            mac = hmac.new(WEBHOOK_SECRET.encode(), f"{stamp}.{event}".encode(), hashlib.sha256)
            signed = {
                "Stripe-Signature": f"t={stamp},v1={mac.hexdigest()}",
                "Content-Type": "application/json",
            }
            return httpx.post(url, content=event, headers=signed, timeout=10).status_code
        token = {"Authorization": f"Bearer {user_token()}"}
        if name == "billing-overview":
            return httpx.get(url, headers=token, timeout=10).status_code
        return httpx.post(
            url, json={"plan_id": "not-a-plan"}, headers=token, timeout=10
        ).status_code

    return send


def user_token() -> str:
    """A signed-in user of no organisation (HS256, as Supabase's legacy tokens)."""
    from jose import jwt

    now = int(time.time())
    claims = {
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 600,
    }
    return str(jwt.encode(claims, JWT_SECRET, algorithm="HS256"))


def deployed_python() -> tuple[Path, str]:
    """An interpreter with only what a function is deployed with (pyproject's dependencies, the
    requirements.txt ops/cloud_functions.py writes), for the cold starts: the dev tools in this
    one's venv load more (httpx loads its command line, rich and pygments, when they are there).
    Made once in .local/bench-venv, and again when the dependencies change; without a package
    registry, this interpreter."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    stamp = hashlib.sha256("\n".join(deps).encode()).hexdigest()
    venv = ROOT / ".local" / "bench-venv"
    python, marker = venv / "bin" / "python", venv / "dependencies.sha256"
    if not (marker.exists() and marker.read_text() == stamp):
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
        if made.returncode == 0:
            install = [str(python), "-m", "pip", "install", "--quiet", *deps]
            made = subprocess.run(install, capture_output=True)
        if made.returncode != 0:
            return Path(
                sys.executable
            ), "this interpreter (the deployed set could not be installed)"
        marker.write_text(stamp)
    return python, "a venv of the deployed requirements only (.local/bench-venv)"


def cold_start(
    python: Path,
    source: Path,
    target: str,
    env: dict[str, str],
    first: Callable[[str], int],
    expected: int,
) -> float:
    """Seconds from starting functions-framework to the answer of its first request: the
    import of the function (and everything it loads at start) plus that request."""
    port = free_port()
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    command = [
        str(python.parent / "functions-framework"),
        *("--source", str(source), "--target", target, "--host", "127.0.0.1"),
        *("--port", str(port)),
    ]
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**base_env, **env}, cwd=ROOT)
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                status = first(url)
                if status != expected:
                    raise SystemExit(f"{target}: first request answered {status}, not {expected}")
                return time.perf_counter() - started
            if process.poll() is not None or time.perf_counter() - started > 60:
                raise SystemExit(f"{target} did not start under functions-framework")
            time.sleep(0.005)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def cold_starts(
    python: Path, bare_source: Path, env: dict[str, str], org: str, runs: int
) -> dict[str, tuple[float, float]]:
    """Each function's median cold start and the median of its ratios to the bare function's,
    the bare one started just before each (the machine's pace drifts between runs)."""

    def bare(u: str) -> int:
        return httpx.post(u, json={"ping": 1}, timeout=5).status_code

    times: dict[str, list[float]] = {"bare": []}
    ratios: dict[str, list[float]] = {"bare": []}
    for _ in range(runs):
        for name, (target, expected) in COLD_FUNCTIONS.items():
            base = cold_start(python, bare_source, "bare", {}, bare, 201)
            source = ROOT / "functions" / name / "main.py"
            took = cold_start(python, source, target, env, first_request(name, org), expected)
            times["bare"].append(base)
            times.setdefault(name, []).append(took)
            ratios.setdefault(name, []).append(took / base)
    return {
        name: (statistics.median(values), statistics.median(ratios[name] or [1.0]))
        for name, values in times.items()
    }


# --- database ----------------------------------------------------------------------------------


def migrated_database(server: Any) -> str:
    """The URL of a new database `bench` on the embedded Postgres `server`, migrated by the
    project's own migrations (their output kept quiet)."""
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute("create database bench")
    url: str = server.get_uri().replace("/postgres?", "/bench?")
    with contextlib.redirect_stdout(io.StringIO()):
        migrate(url)
    return url


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
            stripe_customer_id, status, billing_period, current_period_start, current_period_end,
            stripe_metered_price_id)
          select org.id, plan.id, %(sub)s, %(customer)s, 'active', 'monthly',
            now() - interval '3 days', now() - interval '3 days' + interval '1 month',
            %(metered)s
            from org, plan returning id, organisation_id, current_period_start, current_period_end
        )
        insert into public.billing_cycles (organisation_id, subscription_id, period_start,
          period_end, included_minutes, overage_rate_cents, stripe_metered_price_id)
        select organisation_id, id, current_period_start, current_period_end, 500, 50, %(metered)s
          from sub
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


FLOOR_SQL = """
create schema bench_floor;
create table bench_floor.usage (
  organisation_id uuid not null,
  call_id text not null,
  duration_seconds numeric not null,
  primary key (organisation_id, call_id)
);
create table bench_floor.totals (
  organisation_id uuid primary key,
  minutes_used bigint not null default 0
);
-- pgbench client n's own organisation: floor_org for the floor, org for record_usage.
create table bench_floor.clients (n integer primary key, floor_org uuid, org uuid);
-- The floor: record a call once (idempotent insert) and add its minutes (atomic increment).
create function bench_floor.record(p_org_id uuid, p_call_id text, p_duration_seconds numeric)
returns jsonb language plpgsql set search_path = '' as $$
declare
  v_minutes bigint;
begin
  insert into bench_floor.usage (organisation_id, call_id, duration_seconds)
  values (p_org_id, p_call_id, p_duration_seconds)
  on conflict do nothing;
  if not found then
    return jsonb_build_object('duplicate', true);
  end if;
  update bench_floor.totals t
     set minutes_used = t.minutes_used + (ceil(p_duration_seconds)::integer + 59) / 60
   where t.organisation_id = p_org_id
  returning t.minutes_used into v_minutes;
  return jsonb_build_object('duplicate', false, 'minutes_used', v_minutes);
end
$$;
"""

FLOOR_CALL = (
    "select bench_floor.record(p_org_id => '{org}'::uuid,"
    " p_call_id => gen_random_uuid()::text, p_duration_seconds => 61)"
)
RECORD_USAGE_CALL = (
    "select public.record_usage(p_org_id => '{org}'::uuid,"
    " p_call_id => gen_random_uuid()::text, p_duration_seconds => 61, p_ended_at => null)"
)


def wait_delivered(url: str, org: str, timeout: float = 90.0) -> float:
    """Seconds until none of `org`'s meter events is pending (SystemExit after `timeout`)."""
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "select count(*) from public.usage_records"
                " where organisation_id = %s and meter_status = 'pending'",
                (org,),
            ).fetchone()
            if row == (0,):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise SystemExit(f"{row[0] if row else '?'} meter events still pending")
            time.sleep(0.1)


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


def pgbench() -> str:
    """pgbench: the system's, else the one pgserver ships beside its postgres."""
    return shutil.which("pgbench") or str(Path(pgserver.__file__).parent / "pginstall/bin/pgbench")


def sql_load(name: str, url: str, statement: str, args: argparse.Namespace, work: Path) -> Measured:
    """`statement` (one autocommit call) from `connections` pgbench clients (`:client_id` is each
    client's number), after a vacuum and a checkpoint (earlier loads leave dead rows and WAL)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum (analyze)")
        conn.execute("checkpoint")
    script = work / f"{uuid.uuid4().hex[:8]}.sql"
    script.write_text(statement + ";\n")
    common = [pgbench(), "-n", "-M", "prepared", "-f", str(script)]
    common += ["-c", str(args.connections), "-j", str(WRK_THREADS)]
    subprocess.run([*common, "-T", f"{max(1, round(args.warmup))}", url], capture_output=True)
    logs = work / f"log-{uuid.uuid4().hex[:6]}"
    logs.mkdir()
    out = subprocess.run(
        [
            *common,
            "-T",
            f"{max(1, round(args.seconds))}",
            "-l",
            "--log-prefix",
            str(logs / "tx"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    latencies = [
        int(line.split()[2]) / 1e6
        for log in logs.iterdir()
        for line in log.read_text().splitlines()
        if line.strip()
    ]
    measured = summarise(name, latencies, float(tps.group(1)) if tps else 0.0)
    measured.notes.append(f"pgbench, {args.connections} clients, prepared")
    return measured


def summarise(name: str, latencies: list[float], rate: float) -> Measured:
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Measured(name, rate, cuts[49] * 1000, cuts[98] * 1000, len(latencies))


# --- the run -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="each measured load")
    parser.add_argument("--warmup", type=float, default=2.0, help="each warm-up before it")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections / SQL clients")
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts of each function")
    parser.add_argument("--sql-rounds", type=int, default=3, help="rounds of each SQL load")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk (Debian's package), then run this again")
        return 2

    started = time.monotonic()
    results: dict[str, Measured] = {}
    with tempfile.TemporaryDirectory(prefix="mb-bench-") as tmp:
        work = Path(tmp)
        script = work / "load.lua"
        script.write_text(WRK_SCRIPT)
        bare_source = work / "bare" / "main.py"
        bare_source.parent.mkdir()
        bare_source.write_text(BARE_FUNCTION)

        server = pgserver.get_server(str(work / "pg"), cleanup_mode="stop")
        stack = contextlib.ExitStack()
        try:
            url = migrated_database(server)
            with psycopg.connect(url, autocommit=True) as conn:
                orgs = {k: seed(conn) for k in ("post1", "post150", "get", "direct")}
                conn.execute(FLOOR_SQL)
                floor_org = str(uuid.uuid4())
                conn.execute("insert into bench_floor.totals values (%s, 0)", (floor_org,))
                # One organisation per SQL client, for the loads that do not share one row.
                for n in range(args.connections):
                    mine = str(uuid.uuid4())
                    conn.execute("insert into bench_floor.totals values (%s, 0)", (mine,))
                    conn.execute(
                        "insert into bench_floor.clients values (%s, %s, %s)", (n, mine, seed(conn))
                    )

            # 1. The bare function: the ceiling of functions-framework on this machine. It keeps
            # running, and a round of it comes just before each report-usage load: each ratio
            # is taken against the bare round next to it (the machine's pace drifts).
            def bare_ready(u: str) -> bool:
                return httpx.post(u, json={"ping": 1}, timeout=2).status_code == 201

            bare_server = stack.enter_context(function_server(bare_source, "bare", {}, bare_ready))
            bare_url = bare_server[0]

            # 2, 3. report-usage POST with Stripe at 1 ms and at 150 ms; 4. GET.
            source = ROOT / "functions" / "report-usage" / "main.py"
            stripe_per_report: dict[str, float] = {}
            sql_ratios: dict[str, float] = {}
            for key, delay, method in (
                ("post1", 0.001, "POST"),
                ("post150", 0.150, "POST"),
                ("get", 0.001, "GET"),
            ):
                results[f"bare {key}"], _ = http_load(
                    f"bare JSON function (before {key})",
                    script,
                    bare_url,
                    "POST",
                    orgs["post1"],
                    args,
                )
                org = orgs[key]

                def ready(u: str, org: str = org) -> bool:
                    answer = httpx.get(u, params={"org_id": org}, headers=auth(), timeout=2)
                    return answer.status_code == 200

                base = commits(url)
                with stripe_stub(delay) as (stripe_url, stub):
                    env = {
                        "DATABASE_URL": url,
                        "STRIPE_SECRET_KEY": "sk_test_bench0metered0billing",
                        "STRIPE_API_BASE": stripe_url,
                        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                    }
                    with function_server(source, "report_usage", env, ready) as (fn_url, checks):
                        target = fn_url if method == "POST" else f"{fn_url}?org_id={org}"
                        label = (
                            f"report-usage POST, Stripe {delay * 1000:g} ms"
                            if method == "POST"
                            else "report-usage GET"
                        )
                        measured, answered = http_load(label, script, target, method, org, args)
                        if method == "POST":
                            # Queued events reach the stub through the function's own flusher.
                            drained = wait_delivered(url, org)
                            measured.notes.append(
                                f"every queued meter event on the stub {drained:.1f} s after"
                                " the load ended"
                            )
                    stripe_requests = sum(stub.counts.values())
                    paths = dict(stub.counts)
                # Each readiness GET is one commit (usage_summary) and the base read another.
                trips = commits(url) - base - 1 - checks
                if method == "GET":
                    measured.notes.append(f"DB commits {trips / max(answered, 1):.2f} per request")
                else:
                    # Counted in the database: wrk stops with up to `connections` requests in
                    # flight, which the function still records (and sends to Stripe).
                    with psycopg.connect(url, autocommit=True) as conn:
                        row = conn.execute(
                            "select c.minutes_used, (select count(*) from public.usage_records u"
                            " where u.organisation_id = c.organisation_id)"
                            " from public.billing_cycles c where c.organisation_id = %s",
                            (org,),
                        ).fetchone()
                    assert row is not None
                    minutes, recorded = row
                    per = stripe_requests / max(recorded, 1)
                    stripe_per_report[key] = per
                    batches = paths.get("/v2/billing/meter_event_stream", 0)
                    measured.notes += [
                        f"DB commits {trips / max(recorded, 1):.2f} per report: 1 recording it,"
                        f" {2 * batches / max(recorded, 1):.2f} its share of the flush's"
                        f" {batches} claims and {batches} outcomes",
                        f"Stripe requests {per:.3f} per report ({stripe_requests} for {recorded}"
                        f" recorded: {paths})",
                        f"totals check: minutes {minutes} = 2 x {recorded} recorded >= {answered}"
                        f" answered: {'ok' if minutes == 2 * recorded >= 2 * answered else 'MISMATCH'}",
                    ]
                results[key] = measured

            # 5, 6. The SQL floor and record_usage, called directly by the same method: first
            # all clients on one organisation (every call updates the same row, as the HTTP loads
            # above), then each client on its own. Floor and record_usage alternate round by
            # round (the machine's pace drifts); each ratio is the median of the rounds' ratios.
            own = "(select {column} from bench_floor.clients where n = :client_id)"
            shapes = {
                "one": (
                    "",
                    FLOOR_CALL.format(org=floor_org),
                    RECORD_USAGE_CALL.format(org=orgs["direct"]),
                ),
                "own": (
                    f" ({args.connections} orgs)",
                    FLOOR_CALL.replace("'{org}'::uuid", own.format(column="floor_org")),
                    RECORD_USAGE_CALL.replace("'{org}'::uuid", own.format(column="org")),
                ),
            }
            for shape, (whose, floor_call, direct_call) in shapes.items():
                pairs = [
                    (
                        sql_load(f"SQL floor{whose}", url, floor_call, args, work),
                        sql_load(f"record_usage direct{whose}", url, direct_call, args, work),
                    )
                    for _ in range(args.sql_rounds)
                ]
                for key, taken in (
                    ("floor", [a for a, _ in pairs]),
                    ("record_usage", [b for _, b in pairs]),
                ):
                    middle = sorted(taken, key=lambda m: m.rate)[len(taken) // 2]
                    middle.notes.append(
                        f"rounds: {' '.join(f'{m.rate:.0f}' for m in taken)} /s (the median shown)"
                    )
                    results[f"{key} {shape}"] = middle
                sql_ratios[shape] = statistics.median(b.rate / a.rate for a, b in pairs)
            # 7. Cold starts, the bare function's and each function's.
            with stripe_stub(0.001) as (stripe_url, _):
                env = {
                    "DATABASE_URL": url,
                    "STRIPE_SECRET_KEY": "sk_test_bench0metered0billing",
                    "STRIPE_API_BASE": stripe_url,
                    "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                    "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                    "SUPABASE_JWT_SECRET": JWT_SECRET,
                    "WEBSITE_URL": "http://127.0.0.1:5173",
                }
                python, interpreter = deployed_python()
                cold = cold_starts(python, bare_source, env, orgs["get"], args.cold_runs)
        finally:
            stack.close()
            server.cleanup()

    report(
        results, stripe_per_report, sql_ratios, cold, interpreter, args, time.monotonic() - started
    )
    return 0


def report(
    results: dict[str, Measured],
    stripe_per_report: dict[str, float],
    sql_ratios: dict[str, float],
    cold: dict[str, tuple[float, float]],
    interpreter: str,
    args: argparse.Namespace,
    elapsed: float,
) -> None:
    cores = os.cpu_count()
    print(
        f"Hot path, one run on this machine ({cores} cores): functions-framework default gunicorn,"
        f" wrk {args.connections} connections x {args.seconds:g} s after {args.warmup:g} s warm-up"
    )
    print(f"  {'':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9}")
    for measured in results.values():
        print(
            f"  {measured.name:34} {measured.rate:8.0f} {measured.p50_ms:8.1f}"
            f" {measured.p99_ms:8.1f} {measured.requests:9d}  {measured.statuses or ''}"
        )
        for note in measured.notes:
            print(f"  {'':36}{note}")

    bare, slow = results["bare post150"], results["post150"]
    rate_ratio = slow.rate / bare.rate
    p50_ratio = slow.p50_ms / bare.p50_ms
    sql_ratio, sql_own = sql_ratios["one"], sql_ratios["own"]
    per_report = stripe_per_report["post150"]

    def verdict(ok: bool) -> str:
        return "target met" if ok else "not met"

    print("Ratios and targets (issue 12)")
    print(
        f"  report-usage POST (Stripe 150 ms) / bare   {rate_ratio:5.2f}"
        f"  (>= {POST_RATE_TARGET})  {verdict(rate_ratio >= POST_RATE_TARGET)}"
    )
    print(
        f"  its p50 / bare p50                         {p50_ratio:5.2f}"
        f"  (<= {POST_P50_TARGET:g})    {verdict(p50_ratio <= POST_P50_TARGET)}"
    )
    print(
        f"  record_usage / SQL floor, one organisation {sql_ratio:5.2f}"
        f"  (>= {SQL_TARGET})  {verdict(sql_ratio >= SQL_TARGET)}"
    )
    print(
        f"  the same, each client its own organisation {sql_own:5.2f}"
        f"  (>= {SQL_TARGET})  {verdict(sql_own >= SQL_TARGET)}"
    )
    print(
        f"  Stripe requests per report (150 ms)        {per_report:5.3f}"
        f" (<= 1/50) {verdict(per_report <= STRIPE_PER_REPORT_TARGET)}"
    )
    post1 = results["post1"].rate / results["bare post1"].rate
    get = results["get"].rate / results["bare get"].rate
    print(f"  report-usage POST (Stripe 1 ms) / bare     {post1:5.2f}")
    print(f"  report-usage GET / bare                    {get:5.2f}")
    print("  (each against the bare round just before it)")
    print(
        f"Cold start: start of functions-framework to the first answer, median of"
        f" {args.cold_runs} (target: at most {COLD_TARGET:g}x the bare function's),"
        f" in {interpreter}"
    )
    for name, (took, ratio) in cold.items():
        mark = "" if name == "bare" else f"  {ratio:4.2f}x  {verdict(ratio <= COLD_TARGET)}"
        print(f"  {name:34} {took * 1000:6.0f} ms{mark}")
    print("  (each ratio: the median of its ratios to a bare start just before it)")
    print(f"Whole run {elapsed:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
