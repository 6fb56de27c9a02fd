"""The API v2 meter event stream: sessions, and meter events sent a hundred at a time.

`POST /v2/billing/meter_event_session` (secret key) answers a session whose
`authentication_token` is valid 15 minutes (on the stand-in's clock, state.State.now).
`POST /v2/billing/meter_event_stream` (`Authorization: Bearer <token>`, served on the same base
URL: configure the client's `meter_events` base address to the stand-in) takes `{"events": [...]}`,
1 to 100 events of `event_name`, `payload` (strings), `identifier` and `timestamp` (RFC 3339,
`2026-11-20T10:00:00Z`; default now) and answers `{}`. A request that breaks that shape is
refused whole (400, `invalid_fields`); an expired token is a 401 `temporary_session_expired`
(stripe-python raises TemporarySessionExpiredError), an unknown one a 401. Everything else is
validated asynchronously, as Stripe does: an invalid event is reported by the next error report
(meter_errors.py), an identifier already recorded (by v1 or the stream) is ignored.
"""

from __future__ import annotations

import secrets
from typing import Any

from .meter_events import ingest
from .state import Call, Json, State, StripeError, fixture, iso, new_id, parse_iso, v2

SESSION_SECONDS = 15 * 60
MAX_EVENTS = 100
FIELDS = ("event_name", "identifier", "payload", "timestamp")


def create_session(call: Call) -> Json:
    st = call.state
    now = st.now()
    token = "mets_test_" + secrets.token_urlsafe(32)
    session = {
        "id": new_id("mes"),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": iso(now),
        "expires_at": iso(now + SESSION_SECONDS),
        "livemode": False,
    }
    st.meter_sessions[token] = session | {"expires": now + SESSION_SECONDS}
    return session


def check_session(st: State, token: str | None) -> None:
    """The stream's authentication: a token of a session that has not expired (401 otherwise)."""
    session = st.meter_sessions.get(token or "")
    if session is None:
        shown = (token or "")[:14] + "*" * 8
        message = f"Invalid meter event session token provided: {shown}"
        raise StripeError(401, message)
    if st.now() >= int(session["expires"]):
        message = (
            "The meter event session has expired. Create a new one with"
            " POST /v2/billing/meter_event_session."
        )
        raise StripeError(
            401,
            message,
            code="billing_meter_event_session_expired",
            type="temporary_session_expired",
        )


def stream_events(call: Call) -> Json:
    st = call.state
    events = call.params.get("events")
    if not isinstance(events, list) or not events:
        raise invalid("events", "a list of 1 to 100 meter events is required.")
    if len(events) > MAX_EVENTS:
        message = f"at most {MAX_EVENTS} events per request ({len(events)} given)."
        raise invalid("events", message)
    now = st.now()
    parsed = [parse_event(i, given, now) for i, given in enumerate(events)]
    for event in parsed:
        ingest(st, event, check_timestamp=True)
    return {}


def parse_event(index: int, given: Any, now: int) -> Json:
    """One event of the request, its shape checked (what is wrong in it is found later)."""
    at = f"events[{index}]"
    if not isinstance(given, dict):
        raise invalid(at, "must be an object.")
    name = given.get("event_name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{at}[event_name]", "is required.")
    payload = given.get("payload")
    if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
        raise invalid(f"{at}[payload]", "must be an object of strings.")
    identifier = given.get("identifier") or new_id("mev")
    if not isinstance(identifier, str) or len(identifier) > 100:
        raise invalid(f"{at}[identifier]", "must be a string of at most 100 characters.")
    timestamp = given.get("timestamp")
    return fixture(
        "billing.meter_event",
        created=now,
        event_name=name,
        identifier=identifier,
        livemode=False,
        payload=dict(payload),
        timestamp=now if timestamp is None else parse_iso(timestamp, f"{at}[timestamp]"),
    )


def invalid(param: str, problem: str) -> StripeError:
    return StripeError(400, f"Invalid {param}: {problem}", code="invalid_fields", param=param)


ROUTES = [
    v2("POST", "/v2/billing/meter_event_session", create_session),
    v2(
        "POST",
        "/v2/billing/meter_event_stream",
        stream_events,
        "events "
        + " ".join(f"events[][{name}]" for name in FIELDS if name != "payload")
        + " events[][payload][*]",
        session=True,
    ),
]
