"""ops/errors.py: an operator step that cannot reach the database or Stripe ends in one line that
names the variable and the host; never a traceback, never a password or a key."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest
import stripe

from devtools.stripe_standin import serve_in_thread
from ops.errors import OperatorError, is_unreachable, one_line, reach_database, run, scrub
from ops.migrate import migrate
from shared.errors import ConfigError, Unavailable
from shared.settings import Settings
from shared.stripe_api import call_stripe, make_stripe_client
from tests.conftest import create_database
from tests.test_deploy import deploy, pending_meter_event

PASSWORD = "pw-hunter2-not-for-print"
KEY = "sk_test_ops_errors_0123456789"


def closed_port() -> int:
    """A port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DB_PORT, STRIPE_PORT = closed_port(), closed_port()
DOWN_URL = f"postgresql://billing:{PASSWORD}@127.0.0.1:{DB_PORT}/postgres"
DOWN_BASE = f"http://127.0.0.1:{STRIPE_PORT}"


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of an operator whose database and Stripe are both out of reach."""
    monkeypatch.setenv("DATABASE_URL", DOWN_URL)
    monkeypatch.setenv("STRIPE_SECRET_KEY", KEY)
    monkeypatch.setenv("STRIPE_API_BASE", DOWN_BASE)
    monkeypatch.delenv("SUPABASE_URL", raising=False)


def stripe_client() -> stripe.StripeClient:
    settings = Settings(
        STRIPE_SECRET_KEY=KEY, STRIPE_API_BASE=DOWN_BASE, STRIPE_MAX_NETWORK_RETRIES=0
    )
    return make_stripe_client(settings)


def raised(action: Callable[[], Any]) -> BaseException:
    try:
        action()
    except Exception as error:
        return error
    raise AssertionError("nothing was raised")


def database_down() -> BaseException:
    return raised(lambda: psycopg.connect(DOWN_URL, connect_timeout=5))


def pool_timed_out() -> BaseException:
    """What shared/db.py raises when its pool finds no connection."""

    def call() -> None:
        try:
            raise psycopg_pool.PoolTimeout("couldn't get a connection after 10.00 sec")
        except psycopg_pool.PoolTimeout as exc:
            raise Unavailable("The database is busy; try again shortly.") from exc

    return raised(call)


def key_refused() -> BaseException:
    return stripe.AuthenticationError(
        f"Invalid API Key provided: {KEY[:8]}****6789", http_status=401
    )


UNREACHABLE: dict[str, tuple[Callable[[], BaseException], tuple[str, ...]]] = {
    "psycopg.OperationalError": (database_down, ("DATABASE_URL", f"127.0.0.1:{DB_PORT}")),
    "Unavailable from the pool": (pool_timed_out, ("DATABASE_URL", f"127.0.0.1:{DB_PORT}")),
    "stripe.APIConnectionError": (
        lambda: raised(lambda: stripe_client().v1.products.list()),
        ("STRIPE_API_BASE", DOWN_BASE, "connection refused"),
    ),
    "Unavailable from stripe_errors": (
        lambda: raised(lambda: call_stripe(stripe_client().v1.products.list)),
        ("STRIPE_API_BASE", DOWN_BASE, "connection refused"),
    ),
    "stripe.AuthenticationError": (key_refused, ("STRIPE_SECRET_KEY", "refused the key")),
}


@pytest.mark.parametrize("kind", UNREACHABLE)
def test_nothing_unreachable_escapes_unmapped(down, kind):
    make, expected = UNREACHABLE[kind]
    error = make()
    assert is_unreachable(error)
    line = one_line(error)
    assert line is not None and "\n" not in line
    for part in expected:
        assert part in line
    assert PASSWORD not in line and KEY not in line and "sk_test" not in line


def test_run_prints_one_line_and_exits_non_zero(down, capsys):
    def main() -> None:
        raise database_down()

    with pytest.raises(SystemExit) as exit_info:
        run("flush-usage", main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "deploy.sh flush-usage: cannot reach the database at"
        f" 127.0.0.1:{DB_PORT} (DATABASE_URL): connection refused\n"
    )


def test_a_missing_variable_exits_2_and_a_step_status_is_kept(capsys):
    def missing() -> None:
        raise ConfigError("STRIPE_SECRET_KEY is not set; set it in the environment.")

    with pytest.raises(SystemExit) as exit_info:
        run("webhook", missing)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("deploy.sh webhook: STRIPE_SECRET_KEY is not set")
    with pytest.raises(SystemExit) as exit_info:
        run("resync", lambda: 1)
    assert exit_info.value.code == 1


def test_a_bug_keeps_its_traceback():
    def broken() -> None:
        raise KeyError("plans")

    with pytest.raises(KeyError):
        run("stripe-catalog", broken)


def test_a_statement_error_or_a_503_of_ours_is_no_outage(database_url):
    with psycopg.connect(database_url) as conn:
        conn.execute("set statement_timeout = '10ms'")
        timeout = raised(lambda: conn.execute("select pg_sleep(1)"))
    assert isinstance(timeout, psycopg.OperationalError)  # QueryCanceled
    assert not is_unreachable(timeout) and one_line(timeout) is None
    not_network = stripe.APIConnectionError("Unexpected error communicating with Stripe.")
    assert not is_unreachable(not_network)  # no transport error under it: a bug, not an outage
    busy = Unavailable("The event is being processed; retry.", code="event_in_progress")
    assert not is_unreachable(busy)
    assert one_line(busy) == "The event is being processed; retry."


def test_a_malformed_database_url_is_named_without_its_value():
    with pytest.raises(ConfigError) as info:
        reach_database(f"not a url {PASSWORD}")
    assert "DATABASE_URL is not a Postgres connection string" in str(info.value)
    assert PASSWORD not in str(info.value) and info.value.__suppress_context__


def test_secret_values_are_hidden_from_every_line(down, monkeypatch):
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "sb_secret_xyz123")
    line = one_line(OperatorError(f"{KEY} {PASSWORD} sb_secret_xyz123 {DOWN_URL}"))
    assert line is not None and "[hidden]" in line
    assert KEY not in line and PASSWORD not in line and "sb_secret_xyz123" not in line
    assert scrub("nothing secret") == "nothing secret"


# -- the real commands, as an operator runs them ------------------------------------------------

DATABASE_STEPS = [
    ["migrate"],
    ["stripe-catalog"],
    ["stripe-catalog", "--dry-run"],  # reads which plans would become inactive
    ["flush-usage"],
    ["repair-events"],
    ["resync"],
    ["resync", "sub_123"],
    ["requeue-usage", "--dry-run"],
]


def assert_one_line(run_: Any, *names: str) -> None:
    assert run_.returncode == 1, (run_.stdout, run_.stderr)
    assert "Traceback" not in run_.stderr
    lines = run_.stderr.strip().splitlines()
    assert len(lines) == 1, run_.stderr
    for name in names:
        assert name in lines[0]
    everything = run_.stdout + run_.stderr
    assert PASSWORD not in everything and KEY not in everything


@pytest.mark.parametrize("argv", DATABASE_STEPS, ids=" ".join)
def test_a_step_with_the_database_down_says_so_in_one_line(argv):
    run_ = deploy(*argv, DATABASE_URL=DOWN_URL, STRIPE_SECRET_KEY=KEY, STRIPE_API_BASE=DOWN_BASE)
    assert_one_line(run_, "cannot reach the database", "DATABASE_URL", f"127.0.0.1:{DB_PORT}")


@pytest.fixture(scope="module")
def ops_database(pg_server_url: str) -> str:
    """A migrated database of its own: the flush claims every due event of the database."""
    url = create_database(pg_server_url)
    with contextlib.redirect_stdout(io.StringIO()):
        migrate(url)
    return url


STRIPE_STEPS = [
    ["stripe-catalog"],
    ["webhook"],
    ["resync", "sub_123"],
    ["flush-usage"],  # with an event to deliver: the flush keeps it, then says why
]


@pytest.mark.parametrize("argv", STRIPE_STEPS, ids=" ".join)
def test_a_step_with_stripe_out_of_reach_says_so_in_one_line(argv, ops_database):
    if argv == ["flush-usage"]:
        pending_meter_event(ops_database)
    run_ = deploy(
        *argv,
        DATABASE_URL=ops_database,
        STRIPE_SECRET_KEY=KEY,
        STRIPE_API_BASE=DOWN_BASE,
        WEBHOOK_URL="https://billing.example.com/stripe-webhook-handler",
    )
    assert_one_line(run_, "cannot reach Stripe", "STRIPE_API_BASE", DOWN_BASE)
    if argv == ["flush-usage"]:
        assert "kept pending 1" in run_.stdout


@pytest.fixture
def standin() -> Iterator[str]:
    base, stop = serve_in_thread(None, "whsec_unused")
    yield base
    stop()


def test_a_refused_key_is_named_never_shown(standin):
    live_key = "sk_live_" + "9" * 24  # the stand-in takes sk_test_ keys only
    run_ = deploy(
        "webhook",
        STRIPE_SECRET_KEY=live_key,
        STRIPE_API_BASE=standin,
        WEBHOOK_URL="https://billing.example.com/stripe-webhook-handler",
    )
    assert_one_line(run_, "refused the key (STRIPE_SECRET_KEY)", standin)
    assert live_key[:12] not in run_.stderr
