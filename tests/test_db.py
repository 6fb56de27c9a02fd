"""The two database transports: one behaviour, errors mapped the same way."""

from __future__ import annotations

import json

import httpx
import psycopg
import pytest
import respx

from shared.db import PostgresDatabase, SupabaseDatabase, get_database, reset_database
from shared.errors import Conflict, NotFound, Unavailable, Unprocessable
from shared.settings import Settings

SUPABASE_URL = "https://project-ref.supabase.co"
SERVICE_KEY = "sb_secret_transport_test_key"


@pytest.fixture(scope="module")
def probe_functions(database_url):
    """Two throwaway SQL functions shaped like ours (named params, jsonb, MBnnn errors)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            """
            create or replace function public.test_probe(p_name text, p_count integer,
              p_payload jsonb default null) returns jsonb language sql as $$
              select jsonb_build_object('name', p_name, 'double', p_count * 2, 'payload', p_payload)
            $$;
            create or replace function public.test_refuse(p_status text) returns jsonb
            language plpgsql as $$
            begin
              raise exception 'organisation % not found', p_status
                using errcode = 'MB' || p_status, hint = 'organisation_not_found';
            end $$;
            revoke all on function public.test_probe(text, integer, jsonb),
              public.test_refuse(text) from public, anon, authenticated;
            grant execute on function public.test_probe(text, integer, jsonb),
              public.test_refuse(text) to service_role;
            """
        )
    yield
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("drop function public.test_probe(text, integer, jsonb)")
        conn.execute("drop function public.test_refuse(text)")


@pytest.fixture
def postgres(database_url, probe_functions):
    database = PostgresDatabase(database_url, max_size=2)
    yield database
    database.close()


def test_postgres_calls_with_named_params_and_returns_jsonb(postgres):
    result = postgres.call("test_probe", p_name="o'hara", p_count=21, p_payload={"a": [1, 2]})
    assert result == {"name": "o'hara", "double": 42, "payload": {"a": [1, 2]}}


@pytest.mark.parametrize(
    ("status", "error"), [("404", NotFound), ("409", Conflict), ("422", Unprocessable)]
)
def test_postgres_maps_our_sqlstates(postgres, status, error):
    with pytest.raises(error) as raised:
        postgres.call("test_refuse", p_status=status)
    assert raised.value.code == "organisation_not_found"
    assert raised.value.message == f"organisation {status} not found"


def test_postgres_refuses_names_that_are_not_identifiers(postgres):
    with pytest.raises(ValueError):
        postgres.call("test_probe(); drop table x; --")


def test_postgres_uses_no_server_side_prepared_statements(postgres):
    for _ in range(10):  # psycopg prepares after 5 runs unless told not to
        postgres.call("test_probe", p_name="x", p_count=1)
    with postgres.pool.connection() as conn:
        prepared = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    assert prepared == (0,)


def test_postgres_down_is_unavailable():
    database = PostgresDatabase(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", max_size=1
    )
    database.pool.timeout = 2
    try:
        with pytest.raises(Unavailable):
            database.call("test_probe", p_name="x", p_count=1)
    finally:
        database.close()


@pytest.fixture
def supabase():
    return SupabaseDatabase(SUPABASE_URL, SERVICE_KEY)


def test_supabase_sends_the_rpc_postgrest_expects(supabase):
    with respx.mock(base_url=SUPABASE_URL) as mock:
        route = mock.post("/rest/v1/rpc/test_probe").respond(200, json={"double": 42})
        result = supabase.call("test_probe", p_name="x", p_count=21, p_payload={"a": 1})
    assert result == {"double": 42}
    request = route.calls.last.request
    assert json.loads(request.content) == {"p_name": "x", "p_count": 21, "p_payload": {"a": 1}}
    assert request.headers["apikey"] == SERVICE_KEY
    assert request.headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert request.headers["content-profile"] == "public"


@pytest.mark.parametrize(("status", "error"), [("404", NotFound), ("409", Conflict)])
def test_supabase_maps_our_sqlstates(supabase, status, error):
    body = {
        "code": f"MB{status}",
        "message": "organisation not found",
        "hint": "organisation_not_found",
        "details": None,
    }
    with respx.mock(base_url=SUPABASE_URL) as mock:
        mock.post("/rest/v1/rpc/test_refuse").respond(400, json=body)
        with pytest.raises(error) as raised:
            supabase.call("test_refuse", p_status=status)
    assert raised.value.code == "organisation_not_found"


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(503, json={"code": "PGRST000", "message": "no connection", "hint": None}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
)
def test_supabase_down_is_unavailable(supabase, reply):
    with respx.mock(base_url=SUPABASE_URL) as mock:
        route = mock.post("/rest/v1/rpc/test_probe")
        route.mock(side_effect=reply) if isinstance(reply, Exception) else route.mock(reply)
        with pytest.raises(Unavailable):
            supabase.call("test_probe", p_name="x", p_count=1)


def test_supabase_and_postgres_give_the_same_result(postgres, supabase):
    """Same call, same answer: PostgREST relays the function's jsonb as the body."""
    direct = postgres.call("test_probe", p_name="same", p_count=5)
    with respx.mock(base_url=SUPABASE_URL) as mock:
        mock.post("/rest/v1/rpc/test_probe").respond(200, json=direct)
        assert supabase.call("test_probe", p_name="same", p_count=5) == direct


def test_transport_chosen_by_configuration(database_url):
    reset_database()
    try:
        assert isinstance(get_database(Settings(DATABASE_URL=database_url)), PostgresDatabase)
        reset_database()
        rest = Settings(SUPABASE_URL=SUPABASE_URL, SUPABASE_SERVICE_ROLE_KEY=SERVICE_KEY)
        assert isinstance(get_database(rest), SupabaseDatabase)
    finally:
        reset_database()
