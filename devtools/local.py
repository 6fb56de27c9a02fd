"""`./deploy.sh local`: the whole billing system on this machine, no cloud account needed.

Starts an embedded Postgres (data kept in .local/pgdata between runs), migrates it, starts the
Stripe stand-in (or uses real Stripe test mode when STRIPE_SECRET_KEY is set), syncs the demo
catalogue from plans.toml into it and into billing_plans, creates a demo organisation and its
owner, serves the functions on 127.0.0.1 and prints copy-paste curl lines for the whole flow.
Ctrl-C stops everything it started. Local development only: secrets here are generated per
machine in .local/secrets.json and are not for production.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from jose import jwt

from ops.catalog import ROOT, ensure_portal_configuration, load_plans, sync_catalog
from ops.migrate import migrate
from ops.webhook import create_thin_destination, find_thin_destination
from shared.settings import Settings
from shared.stripe_api import make_stripe_client

DEMO_OWNER_ID = "00000000-0000-4000-8000-00000000d3e0"
DEMO_OWNER_EMAIL = "owner@demo.example"
DEMO_ORG_ID = "00000000-0000-4000-8000-0000000000d0"

# function directory -> (entry point, port offset)
FUNCTIONS = {
    "create-checkout-session": ("create_checkout_session", 1),
    "stripe-webhook-handler": ("stripe_webhook_handler", 2),
    "report-usage": ("report_usage", 3),
    "create-portal-session": ("create_portal_session", 4),
    "change-plan": ("change_plan", 5),
    "billing-overview": ("billing_overview", 6),
}


def local_secrets(data: Path) -> dict[str, str]:
    """Per-machine local secrets, generated once and kept in .local/secrets.json (mode 600)."""
    path = data / "secrets.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        return stored
    values = {
        "jwt_secret": secrets.token_urlsafe(48),
        "service_key": "sb_secret_local_" + secrets.token_urlsafe(24),
        "webhook_secret": "whsec_local" + secrets.token_hex(16),
    }
    path.write_text(json.dumps(values, indent=2))
    path.chmod(0o600)
    return values


def thin_destination_secret(settings: Settings, url: str, data: Path) -> str:
    """The signing secret of the stand-in's thin-event destination for `url` (ops.webhook's),
    created once. Stripe shows a destination's secret only when creating it, so it is kept in
    data/thin-destination.json beside the stand-in's state; a destination whose secret was lost
    (a run killed before the stand-in saved its state, say) is disabled and made again."""
    path = data / "thin-destination.json"
    known: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
    client = make_stripe_client(settings)
    found = find_thin_destination(client, url)
    if found is not None and known.get(url, {}).get("destination") == found.id:
        if found.status != "enabled":
            client.v2.core.event_destinations.enable(found.id)
        return known[url]["secret"]
    if found is not None:
        client.v2.core.event_destinations.disable(found.id)
    created, secret = create_thin_destination(client, url)
    known[url] = {"destination": created, "secret": secret}
    path.write_text(json.dumps(known, indent=2))
    path.chmod(0o600)
    return secret


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until `process` answers on `port`; RuntimeError when it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_free(port):
            return
        if process.poll() is not None:
            raise RuntimeError(f"the function for port {port} exited; see its output above")
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout:.0f} s")


def seed_demo_organisation(database_url: str) -> None:
    """The demo owner (auth.users) and organisation, created once."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "insert into auth.users (id, email) values (%s, %s) on conflict (id) do nothing",
            (DEMO_OWNER_ID, DEMO_OWNER_EMAIL),
        )
        conn.execute(
            "insert into public.organisations (id, name, owner_id) values (%s, %s, %s)"
            " on conflict (id) do nothing",
            (DEMO_ORG_ID, "Demo Voice Co", DEMO_OWNER_ID),
        )
        conn.execute(
            "insert into public.organisation_members (organisation_id, user_id, role)"
            " values (%s, %s, 'owner') on conflict do nothing",
            (DEMO_ORG_ID, DEMO_OWNER_ID),
        )


def owner_token(jwt_secret: str, hours: int = 24) -> str:
    now = int(time.time())
    claims = {
        "sub": DEMO_OWNER_ID,
        "email": DEMO_OWNER_EMAIL,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + hours * 3600,
    }
    return str(jwt.encode(claims, jwt_secret, algorithm="HS256"))


@dataclass
class Stack:
    """Everything `local` runs; also what the end-to-end test drives."""

    data: Path
    port_base: int = 8080
    stripe_port: int = 12111
    database_url: str | None = None  # a server of your own; default: embedded in data/pgdata
    env: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    stripe_base: str | None = None
    web_url: str | None = None  # the billing pages (web/), at port_base
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stops: list[Any] = field(default_factory=list)
    _had_database: bool = False

    def start(self, *, real_stripe_key: str | None = None) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        keys = local_secrets(self.data)
        ports = [self.port_base, *(self.port_base + offset for _, offset in FUNCTIONS.values())]
        if not real_stripe_key:
            ports.append(self.stripe_port)
        busy = [port for port in ports if not port_free(port)]
        if busy:
            raise SystemExit(
                f"ports {busy} on 127.0.0.1 are in use: stop what runs there or pick"
                " --port-base / --stripe-port"
            )
        self._had_database = (self.data / "pgdata").exists()
        database_url = self._start_postgres()
        webhook_url = f"http://127.0.0.1:{self.port_base + 2}/"
        self.env = {
            "DATABASE_URL": database_url,
            "SUPABASE_URL": "http://127.0.0.1:54321",  # not contacted: HS256 tokens locally
            "SUPABASE_JWT_SECRET": keys["jwt_secret"],
            "SUPABASE_SERVICE_ROLE_KEY": keys["service_key"],
            "WEBSITE_URL": f"http://127.0.0.1:{self.port_base}",  # where web/ is served
            "STRIPE_TIMEOUT_SECONDS": "10",
        }
        if real_stripe_key:
            webhook_secret = os.environ.get("STRIPE_WEBHOOK_SECRET")
            if not webhook_secret:
                raise SystemExit(
                    "STRIPE_WEBHOOK_SECRET is not set: run `stripe listen --print-secret` and"
                    f" export it, then keep `stripe listen --forward-to {webhook_url}` running."
                )
            self.env.update(STRIPE_SECRET_KEY=real_stripe_key, STRIPE_WEBHOOK_SECRET=webhook_secret)
        else:
            self.stripe_base = self._start_standin(webhook_url, keys["webhook_secret"])
            self.env.update(
                STRIPE_SECRET_KEY="sk_test_local_standin",  # noqa: S106 (stand-in takes any sk_test_)
                STRIPE_WEBHOOK_SECRET=keys["webhook_secret"],
                STRIPE_API_BASE=self.stripe_base,
            )
            # Stripe's meter error reports come as thin events, signed with their destination's
            # own secret: the handler takes both secrets.
            thin_secret = thin_destination_secret(Settings(**self.env), webhook_url, self.data)
            self.env["STRIPE_WEBHOOK_SECRET"] += "," + thin_secret
        ids = sync_catalog(Settings(**self.env), load_plans(ROOT / "plans.toml"), dry_run=False)
        if "mb_setup_fee" in ids:
            self.env["STRIPE_SETUP_FEE_PRICE_ID"] = ids["mb_setup_fee"]
        # The portal as deployed: no plan switching (sync_catalog made it; found again here).
        portal = ensure_portal_configuration(make_stripe_client(Settings(**self.env)))
        self.env["STRIPE_PORTAL_CONFIGURATION_ID"] = portal
        seed_demo_organisation(database_url)
        self._start_functions()
        self._start_flush_schedule()
        self._start_web(keys["jwt_secret"])

    def _start_postgres(self) -> str:
        url = self.database_url
        if url is None:
            import pgserver

            server = pgserver.get_server(self.data / "pgdata", cleanup_mode="stop")
            self._stops.append(server.cleanup)
            url = server.get_uri()
        migrate(url)
        return url

    def _start_standin(self, webhook_url: str, webhook_secret: str) -> str:
        from werkzeug.serving import make_server

        from devtools.stripe_standin import create_app

        app = create_app(webhook_url, webhook_secret)
        # Stripe's side is kept beside the database, so a second run finds its customers again.
        saved = self.data / "stripe-standin.json"
        if not saved.exists() and self._had_database:
            print(
                "warning: the Stripe stand-in's state of the previous run is missing, so the"
                " customers in the database are unknown to it; `./deploy.sh local --reset`"
                " starts over"
            )
        app.state.load(saved)
        server = make_server("127.0.0.1", self.stripe_port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="stripe-standin", daemon=True)
        thread.start()
        self._stops.append(lambda: app.state.save(saved))
        self._stops.append(server.shutdown)
        return f"http://127.0.0.1:{self.stripe_port}"

    def _start_functions(self) -> None:
        binary = Path(sys.executable).with_name("functions-framework")
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        for name, (target, offset) in FUNCTIONS.items():
            port = self.port_base + offset
            self.processes.append(
                subprocess.Popen(
                    [
                        str(binary),
                        "--source",
                        str(ROOT / "functions" / name / "main.py"),
                        "--target",
                        target,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    env=env,
                    cwd=ROOT,
                )
            )
            self.urls[name] = f"http://127.0.0.1:{port}/"
        for url, process in zip(self.urls.values(), self.processes, strict=True):
            wait_for_port(int(url.rsplit(":", 1)[1].strip("/")), process)

    def _start_flush_schedule(self, every: float = 60.0) -> None:
        """What Cloud Scheduler does in production (`deploy.sh functions`): POST report-usage's
        flush action every minute, so queued meter events reach Stripe without traffic too."""
        url, key = self.urls["report-usage"], self.env["SUPABASE_SERVICE_ROLE_KEY"]
        stop = threading.Event()

        def schedule() -> None:
            while not stop.wait(every):
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(
                        url,
                        json={"action": "flush"},
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=120,
                    )

        threading.Thread(target=schedule, name="flush-schedule", daemon=True).start()
        self._stops.append(stop.set)

    def _start_web(self, jwt_secret: str) -> None:
        """web/ at port_base, its config.js pointing at these functions, the demo owner signed in."""
        from devtools.web_server import local_config, serve_web

        user = {"id": DEMO_OWNER_ID, "email": DEMO_OWNER_EMAIL}
        functions = {name: url for name, url in self.urls.items() if "webhook" not in name}
        self.web_url, stop = serve_web(
            self.port_base, lambda: local_config(functions, owner_token(jwt_secret), user)
        )
        self._stops.append(stop)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()


@contextlib.contextmanager
def running(data: Path, **options: Any) -> Iterator[Stack]:
    stack = Stack(data=data, **options)
    try:
        stack.start(real_stripe_key=None)
        yield stack
    finally:
        stack.stop()


def main() -> None:
    from devtools.guide import print_guide

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per stand-in request
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / ".local")
    parser.add_argument("--port-base", type=int, default=8080)
    parser.add_argument("--stripe-port", type=int, default=12111)
    parser.add_argument(
        "--reset", action="store_true", help="forget the previous runs' data (.local) first"
    )
    args = parser.parse_args()
    if args.reset and args.data.exists():
        shutil.rmtree(args.data)
        print(f"removed {args.data}: starting from scratch")
    real_key = os.environ.get("STRIPE_SECRET_KEY")
    if real_key and not real_key.startswith("sk_test_"):
        raise SystemExit("STRIPE_SECRET_KEY must be a test-mode key (sk_test_...) for local runs.")
    stack = Stack(data=args.data, port_base=args.port_base, stripe_port=args.stripe_port)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        stack.start(real_stripe_key=real_key)
        print_guide(stack)  # devtools/guide.py
        while not stopping.is_set() and all(p.poll() is None for p in stack.processes):
            stopping.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
        print(f"stopped: functions, Stripe stand-in and Postgres (data kept in {args.data}/)")


if __name__ == "__main__":
    main()
