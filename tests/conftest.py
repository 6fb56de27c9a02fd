"""Test session: a real Postgres (embedded pgserver, or TEST_DATABASE_URL), migrated with the real
migrations, plus factories for rows and for acting as Supabase's roles."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row, tuple_row

from ops.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = json.loads((ROOT / "devtools" / "stripe_fixtures" / "fixtures3.json").read_text())[
    "resources"
]

STRIPE_KEY = "sk_test_51metered0billing0tests"
WEBHOOK_SECRET = "whsec_test_metered_billing_secret"
JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
SERVICE_KEY = "sb_secret_metered_billing_test_service_key"
WEBSITE_URL = "https://app.example.com"


def stripe_fixture(name: str) -> dict[str, Any]:
    """A deep copy of Stripe's official example object `name` (e.g. "subscription")."""
    return json.loads(json.dumps(FIXTURES[name]))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A Postgres server URL (maintenance database); embedded unless TEST_DATABASE_URL is set."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    import pgserver

    data = Path(tempfile.mkdtemp(prefix="mb-pg-"))
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    name = f"mb_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    params = conninfo_to_dict(server_url)
    params["dbname"] = name
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> str:
    """One migrated database for the whole session; tests make their own rows with fresh ids."""
    url = create_database(pg_server_url)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        migrate(url)
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A superuser connection in autocommit, rows as dicts."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(autouse=True)
def park_pending_meter_events(request: pytest.FixtureRequest) -> Iterator[None]:
    """Meter events a test leaves due are parked when it ends: every report leaves its event
    pending for the flush, the flush is global by design, and the session's database is shared,
    so a later test's flush must not deliver them to its own meter."""
    yield
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "update public.usage_records set meter_next_attempt_at = 'infinity'"
            " where meter_status = 'pending' and meter_next_attempt_at < 'infinity'"
        )


@contextlib.contextmanager
def acting_as(
    conn: psycopg.Connection[Any], role: str, user_id: str | None = None
) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction (rolled back) in which `conn` is `role` with Supabase's request.jwt.claims."""
    claims: dict[str, Any] = {"role": role}
    if user_id:
        claims.update(sub=user_id, aud="authenticated")
    conn.execute("begin")
    try:
        conn.execute(f"set local role {role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn.cursor(row_factory=tuple_row)
    finally:
        conn.execute("rollback")


@pytest.fixture
def make_user(db: psycopg.Connection[dict[str, Any]]) -> Callable[..., str]:
    def make(email: str | None = None) -> str:
        user_id = str(uuid.uuid4())
        db.execute(
            "insert into auth.users (id, email) values (%s, %s)",
            (user_id, email or f"{user_id[:8]}@example.com"),
        )
        return user_id

    return make


@pytest.fixture
def make_org(
    db: psycopg.Connection[dict[str, Any]], make_user: Callable[..., str]
) -> Callable[..., dict[str, Any]]:
    """An organisation with its owner as member (role owner); extra members by role."""

    def make(
        owner_id: str | None = None,
        *,
        name: str = "Acme Voice",
        members: dict[str, str] | None = None,
        stripe_customer_id: str | None = None,
    ) -> dict[str, Any]:
        owner_id = owner_id or make_user()
        org = db.execute(
            "insert into public.organisations (name, owner_id, stripe_customer_id)"
            " values (%s, %s, %s) returning *",
            (name, owner_id, stripe_customer_id),
        ).fetchone()
        assert org is not None
        db.execute(
            "insert into public.organisation_members (organisation_id, user_id, role)"
            " values (%s, %s, 'owner')",
            (org["id"], owner_id),
        )
        for user_id, role in (members or {}).items():
            db.execute(
                "insert into public.organisation_members (organisation_id, user_id, role)"
                " values (%s, %s, %s)",
                (org["id"], user_id, role),
            )
        return dict(org)

    return make


@pytest.fixture
def make_plan(db: psycopg.Connection[dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A plan like the demo Starter plan, with unique Stripe price ids."""

    def make(**overrides: Any) -> dict[str, Any]:
        tag = uuid.uuid4().hex[:10]
        values: dict[str, Any] = {
            "name": f"Starter {tag}",
            "currency": "eur",
            "included_minutes": 500,
            "monthly_price_cents": 20400,
            "yearly_price_cents": 220320,
            "overage_rate_cents": 50,
            "stripe_price_id": f"price_flat_m_{tag}",
            "stripe_yearly_price_id": f"price_flat_y_{tag}",
            "stripe_metered_price_id": f"price_metered_{tag}",
            "sort_order": 1,
            "active": True,
        }
        values.update(overrides)
        columns = ", ".join(values)
        placeholders = ", ".join(f"%({key})s" for key in values)
        plan = db.execute(
            f"insert into public.billing_plans ({columns}) values ({placeholders}) returning *",
            values,
        ).fetchone()
        assert plan is not None
        return dict(plan)

    return make


@pytest.fixture
def function_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The environment the functions read, pointing at the test database; settings reloaded."""
    from shared import db as shared_db
    from shared.settings import get_settings

    env = {
        "DATABASE_URL": database_url,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SUPABASE_URL": "https://project-ref.supabase.co",
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        "WEBSITE_URL": WEBSITE_URL,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        # No background flush behind a test's back: tests flush when they mean to.
        "METER_FLUSH_DELAY_SECONDS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("STRIPE_API_BASE", "SUPABASE_JWKS_URL", "STRIPE_SETUP_FEE_PRICE_ID"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    shared_db.reset_database()
    yield env
    get_settings.cache_clear()
    shared_db.reset_database()


def function_client(name: str, target: str) -> Any:
    """The real function loaded through functions-framework, as a Flask test client."""
    from functions_framework import create_app

    from shared.db import PostgresDatabase, get_database
    from shared.settings import get_settings

    client = create_app(target, str(ROOT / "functions" / name / "main.py")).test_client()
    # The process's pool (all functions share it) opens its connections in background threads,
    # and psycopg_pool draws each one's expiry jitter from the global `random`. Wait until it is
    # full, so no pool thread moves that state while Hypothesis generates a test case: its
    # examples stay reproducible (HypothesisDeprecationWarning: "Do not use the random module
    # inside strategies", seen when a pool filled during a draw).
    settings = get_settings()
    if settings.DATABASE_URL:
        database = get_database(settings)
        if isinstance(database, PostgresDatabase):
            database.pool.wait(timeout=30.0)
    return client


def user_token(user_id: str, *, email: str | None = None, **claims: Any) -> str:
    """A Supabase user access token (HS256, legacy JWT secret) for `user_id`."""
    import time

    from jose import jwt

    payload: dict[str, Any] = {
        "sub": user_id,
        "email": email or f"{user_id[:8]}@example.com",
        "aud": "authenticated",
        "role": "authenticated",
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
    }
    payload.update(claims)
    return str(jwt.encode(payload, JWT_SECRET, algorithm="HS256"))
