"""How an operator step ends when it cannot go on: one line on stderr, never a traceback.

    psycopg.OperationalError (a connection's)  } cannot reach the database at HOST:PORT
    psycopg_pool.PoolTimeout                   }   (DATABASE_URL): why
    shared.errors.Unavailable (a transport's)  }
    stripe.APIConnectionError (a transport's)  cannot reach Stripe at BASE
                                                 (STRIPE_API_BASE / STRIPE_SECRET_KEY): why
    stripe.AuthenticationError                 Stripe at BASE refused the key (STRIPE_SECRET_KEY)
    any other stripe.StripeError               Stripe refused a request: Stripe's account of it
    BillingError, a psycopg MBnnn error        its message (a rule of ours, raised by SQL)
    ConfigError                                its message, exit 2 (a variable missing)
    OperatorError                              its message (the operator can fix it: a plans file)

The rest is a bug and keeps its traceback. A host is shown as host:port, never with its user or
password, and every line passes through `scrub`, which hides the value of each secret variable.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn
from urllib.parse import urlsplit

import httpx
import psycopg
import psycopg_pool
import stripe
from psycopg.conninfo import conninfo_to_dict

from shared.errors import BillingError, ConfigError
from shared.settings import SECRETS
from shared.stripe_api import describe

STRIPE_DEFAULT_BASE = "https://api.stripe.com"
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


class OperatorError(Exception):
    """A step cannot go on for a reason the operator can fix; the message says which and how."""


def run(step: str, main: Callable[[], int | None]) -> NoReturn:
    """Run a step's `main` and exit with its status, or with one line when it cannot go on."""
    # Per-request warnings are for the functions' logs. Here the pool's (each failed connection,
    # in libpq's two lines) and ours (each Stripe failure, in Stripe's four) say again what the
    # step prints: its one line below, repair's line per item, the flush's summary; the reasons
    # also stay on the rows (meter_error, stripe_events.error).
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("metered_billing").setLevel(logging.ERROR)
    try:
        status = main()
    except (OperatorError, ConfigError, BillingError, stripe.StripeError, psycopg.Error) as error:
        line = one_line(error)
        if line is None:
            raise
        print(f"deploy.sh {step}: {line}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    sys.exit(status or 0)


def one_line(error: BaseException) -> str | None:
    """The operator's line for `error`, secrets hidden; None for an error nobody mapped (a bug)."""
    if is_unreachable(error):
        line = unreachable_line(error)
    elif isinstance(error, OperatorError | ConfigError):
        line = str(error)
    elif isinstance(error, BillingError):
        line = error.message
    elif isinstance(error, stripe.StripeError):
        line = f"Stripe refused a request: {describe(error)}"
    elif isinstance(error, psycopg.Error) and (error.sqlstate or "").startswith("MB"):
        line = error.diag.message_primary or str(error)
    else:
        return None
    return scrub(" ".join(line.split()))


def is_unreachable(error: BaseException) -> bool:
    """The database or Stripe could not be reached, or refused our credentials: stop the step.

    Judged by the cause: a connection that failed (not a statement that did), a transport error
    under Stripe's APIConnectionError or the REST transport's Unavailable, a refused key.
    """
    return any(
        _lost_connection(link)
        or isinstance(link, httpx.TransportError | stripe.AuthenticationError)
        for link in _chain(error)
    )


def _lost_connection(error: BaseException) -> bool:
    """No connection (refused, timed out, password refused, server shutting down), as opposed
    to a statement's OperationalError (a timeout, a lock) on a working connection."""
    if isinstance(error, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = error.sqlstate
    return (
        state is None or state[:2] in ("08", "28") or state in ("3D000", "57P01", "57P02", "57P03")
    )


def unreachable_line(error: BaseException) -> str:
    links = list(_chain(error))
    for link in links:
        if isinstance(link, stripe.AuthenticationError):
            return (
                f"Stripe at {stripe_base()} refused the key (STRIPE_SECRET_KEY): {describe(link)}"
            )
        if isinstance(link, stripe.APIConnectionError):
            return (
                f"cannot reach Stripe at {stripe_base()} (STRIPE_API_BASE / STRIPE_SECRET_KEY): "
                f"{_reason(links[-1])}"
            )
    where, variable = database_location()
    postgres = next((link for link in links if _lost_connection(link)), None)
    return f"cannot reach the database at {where} ({variable}): {_reason(postgres or links[-1])}"


def reach_database(url: str | None) -> None:
    """Connect to DATABASE_URL once and hang up: a step stops here, before doing anything, when
    the database is out of reach (the pool would wait 10 s and log each attempt). No URL (the
    REST transport, or a dry run without one): nothing to do."""
    if not url:
        return
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "DATABASE_URL is not a Postgres connection string"
            " (postgresql://USER:PASSWORD@HOST:5432/DBNAME)."
        ) from None
    with psycopg.connect(url, connect_timeout=10):
        pass


def reach_stripe(client: stripe.StripeClient) -> None:
    """One cheap request that raises when Stripe is out of reach or refuses the key. Any other
    refusal (a restricted key without this permission) still proves Stripe answered: it passes."""
    try:
        client.v1.billing.meters.list(params={"limit": 1})
    except stripe.StripeError as error:
        if is_unreachable(error):
            raise


def database_location() -> tuple[str, str]:
    """(host:port, the variable naming it) of the configured database, without credentials."""
    url = os.environ.get("DATABASE_URL")
    if url:
        try:
            parts = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            return "an unreadable address", "DATABASE_URL"
        host = str(parts.get("host") or parts.get("hostaddr") or "the local socket")
        return f"{host}:{parts.get('port') or 5432}", "DATABASE_URL"
    return _origin(os.environ.get("SUPABASE_URL", "")), "SUPABASE_URL / SUPABASE_SERVICE_ROLE_KEY"


def stripe_base() -> str:
    return _origin(os.environ.get("STRIPE_API_BASE") or STRIPE_DEFAULT_BASE)


def scrub(text: str) -> str:
    """`text` with the value of every secret variable (and a URL's password) replaced."""
    for name in SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "[hidden]")
    url = os.environ.get("DATABASE_URL")
    if url:
        try:
            password = conninfo_to_dict(url).get("password")
        except psycopg.ProgrammingError:
            password = None
        if password and len(str(password)) >= 4:
            text = text.replace(str(password), "[hidden]")
    return text


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: no user, password, path or query."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an unreadable address"
    return f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else "an unreadable address"


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what caused it, outermost first (loops cut)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)


def _reason(error: BaseException) -> str:
    """The last line-worth of a low-level error: "connection refused", "timed out", ..."""
    if isinstance(error, psycopg_pool.PoolTimeout):
        text = f"no connection: {error}"
    elif isinstance(error, psycopg.OperationalError):
        # libpq: 'connection failed: connection to server at "h", port p failed: <why>\n\t<hint>'
        text = str(error).split("\n")[0].rsplit(" failed: ", 1)[-1]
        text = text.removeprefix("FATAL:").strip()
    else:
        text = _ERRNO.sub("", str(error).strip()) or type(error).__name__
    return text[:1].lower() + text[1:]
