"""The database behind one face: every operation is one call of one SQL function returning jsonb.

Two transports with the same behaviour (DESIGN.md, "Talking to the database"):
- `PostgresDatabase`: psycopg 3 pool, autocommit (each call is its own transaction), no server-side
  prepared statements, so it works through Supabase's transaction pooler;
- `SupabaseDatabase`: supabase-py calling the same functions as RPC through PostgREST.

SQL functions signal expected failures with `raise exception ... using errcode = 'MBnnn',
hint = '<code>'`: nnn is the HTTP status and the hint the stable error code.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Protocol

import psycopg
import psycopg_pool
from psycopg.types.json import Jsonb

from shared.errors import BillingError, Unavailable, error_for_status
from shared.settings import Settings

_FUNCTION_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_OUR_SQLSTATE = re.compile(r"^MB(\d{3})$")


class Database(Protocol):
    def call(self, function: str, **params: Any) -> Any:
        """Run `public.<function>(name => value, ...)` in its own transaction; its jsonb result."""
        ...


def _mapped(sqlstate: str | None, message: str, hint: str | None) -> BillingError | None:
    match = _OUR_SQLSTATE.match(sqlstate or "")
    if match is None:
        return None
    status = int(match.group(1))
    return error_for_status(status, hint or "error", message)


def _check_name(function: str) -> str:
    if not _FUNCTION_NAME.match(function):
        raise ValueError(f"not a SQL function name: {function!r}")
    return function


class PostgresDatabase:
    """psycopg 3 pool over DATABASE_URL."""

    def __init__(self, url: str, *, max_size: int = 10) -> None:
        # A fixed size, opened in the background at start: a pool left to grow on demand fell
        # behind under load (report-usage waited on the pool for half of each request; measured
        # 340 -> 740 reports/s with the same 10 connections; README, "The hot path").
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=max_size,
            max_size=max_size,
            # prepare_threshold=None: no server-side prepared statements (transaction pooler).
            kwargs={"autocommit": True, "prepare_threshold": None},
            open=False,
            timeout=10,
            name="metered-billing",
        )
        self.pool.open(wait=False)

    def call(self, function: str, **params: Any) -> Any:
        query = _call_query(function, tuple(params))
        values = {name: _adapt(value) for name, value in params.items()}
        try:
            with self.pool.connection() as conn:
                row = conn.execute(query, values).fetchone()
        except psycopg.Error as exc:
            diag = exc.diag
            mapped = _mapped(exc.sqlstate, diag.message_primary or str(exc), diag.message_hint)
            if mapped is not None:
                raise mapped from exc
            if isinstance(exc, psycopg.OperationalError):
                raise Unavailable("The database is unavailable; try again shortly.") from exc
            raise
        except psycopg_pool.PoolTimeout as exc:
            raise Unavailable("The database is busy; try again shortly.") from exc
        return row[0] if row else None

    def close(self) -> None:
        self.pool.close()


class SupabaseDatabase:
    """supabase-py RPC over SUPABASE_URL with the service-role key."""

    def __init__(self, url: str, service_role_key: str, *, timeout: float = 10.0) -> None:
        from supabase import ClientOptions, create_client

        self.client = create_client(
            url,
            service_role_key,
            options=ClientOptions(
                schema="public",
                postgrest_client_timeout=timeout,
                auto_refresh_token=False,
                persist_session=False,
            ),
        )

    def call(self, function: str, **params: Any) -> Any:
        import httpx
        from postgrest.exceptions import APIError

        try:
            response = self.client.rpc(_check_name(function), params).execute()
        except APIError as exc:
            mapped = _mapped(exc.code, exc.message or str(exc), exc.hint)
            if mapped is not None:
                raise mapped from exc
            if exc.code is None or str(exc.code).startswith(("5", "PGRST0", "08", "53", "57")):
                raise Unavailable("The database is unavailable; try again shortly.") from exc
            raise
        except httpx.HTTPError as exc:
            raise Unavailable("The database is unavailable; try again shortly.") from exc
        return response.data


@functools.lru_cache(maxsize=256)
def _call_query(function: str, names: tuple[str, ...]) -> str:
    """`select public.f(a => %(a)s, ...)`, built once per function and argument names (every
    name matches [a-z_][a-z0-9_]*, so none needs quoting)."""
    arguments = ", ".join(f"{_check_name(name)} => %({name})s" for name in names)
    return f"select public.{_check_name(function)}({arguments})"


def _adapt(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, dict | list) else value


_database: Database | None = None
_database_lock = threading.Lock()


def get_database(settings: Settings) -> Database:
    """The process's database, made once on first use (threads share it) from the settings."""
    global _database
    if _database is not None:
        return _database
    with _database_lock:
        if _database is not None:
            return _database
        settings.require_database()
        if settings.DATABASE_URL:
            _database = PostgresDatabase(
                settings.DATABASE_URL, max_size=settings.DATABASE_POOL_SIZE
            )
        else:
            assert settings.SUPABASE_URL and settings.SUPABASE_SERVICE_ROLE_KEY
            _database = SupabaseDatabase(settings.SUPABASE_URL, settings.SUPABASE_SERVICE_ROLE_KEY)
    return _database


def reset_database() -> None:
    """Forget the process's database (tests switch settings between cases)."""
    global _database
    if isinstance(_database, PostgresDatabase):
        _database.close()
    _database = None
