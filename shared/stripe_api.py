"""The Stripe client (pinned API version, explicit retries and timeout) and the one Stripe error map."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from shared.errors import Unavailable, UpstreamError
from shared.settings import Settings
from shared.stripe_lib import stripe

log = logging.getLogger("metered_billing")

# The API version stripe-python 16 pins ("2026-10-28.endive"); webhook endpoints use the same.
API_VERSION: str = stripe.api_version

T = TypeVar("T")


def make_stripe_client(
    settings: Settings, http_client: stripe.HTTPClient | None = None
) -> stripe.StripeClient:
    """A StripeClient over httpx (visible to respx), honouring STRIPE_API_BASE and the timeout."""
    settings.require("STRIPE_SECRET_KEY")
    assert settings.STRIPE_SECRET_KEY is not None
    # A stand-in serves the meter event stream too (Stripe serves it from its own host).
    local = settings.STRIPE_API_BASE.rstrip("/") if settings.STRIPE_API_BASE else None
    base = {"api": local, "meter_events": local} if local else None
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        stripe_version=API_VERSION,
        max_network_retries=settings.STRIPE_MAX_NETWORK_RETRIES,
        http_client=http_client
        or stripe.HTTPXClient(timeout=settings.STRIPE_TIMEOUT_SECONDS, allow_sync_methods=True),
        base_addresses=base,  # type: ignore[arg-type]
    )


def is_retriable(error: stripe.StripeError) -> bool:
    """Network failures, rate limits, conflicts and Stripe's 5xx: the same request may succeed later."""
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    # 409: another request with the same idempotency key is still in flight (a double click).
    status = error.http_status or 0
    return status >= 500 or status in (409, 429) or error.code == "lock_timeout"


# Stripe quotes (masked) keys back in some messages ("Invalid API Key provided: sk_test_****1234").
_KEYS = re.compile(r"\b(?:sk|rk|pk|whsec)_[A-Za-z0-9_*]+")


def describe(error: stripe.StripeError) -> str:
    """A short account of a Stripe error for logs and rows, without any key (never for browsers).

    It ends up in `usage_records.meter_error` and `stripe_events.error`, which members may read.
    """
    message = _KEYS.sub("[key]", str(error.user_message or error))
    return f"{kind_of(error)}: {message}"[:500]


def kind_of(error: stripe.StripeError) -> str:
    """`describe` without Stripe's message: for a row of one organisation when the error was
    about a request that carried other organisations' events too (its message may name them)."""
    status = error.http_status or "no response"
    return f"{type(error).__name__} ({status}, {error.code or '-'})"


@contextmanager
def stripe_errors() -> Iterator[None]:
    """Turn Stripe errors into ours: retriable -> 503, refused -> 502; details only in the log."""
    try:
        yield
    except stripe.StripeError as error:
        log.warning("stripe request failed: %s", describe(error))
        if is_retriable(error):
            raise Unavailable(
                "The payment provider is unavailable; try again in a moment.",
                code="stripe_unavailable",
            ) from error
        raise UpstreamError(
            "The payment provider refused the request; nothing was charged.",
            code="stripe_error",
        ) from error


def call_stripe(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call one Stripe method with `stripe_errors` mapping."""
    with stripe_errors():
        return fn(*args, **kwargs)
