"""Meter events to Stripe in batches, over the v2 meter event stream.

A report leaves its meter event `pending` and due (sql/0070). `flush` claims due events a hundred
at a time (`claim_meter_events`: skip locked, so any number of flushers may run at once, each
claim leased), sends each batch in one request to `POST /v2/billing/meter_event_stream` and keeps
the outcomes in one call (`record_meter_results`). Identifiers are the rows' own, derived from
(organisation, call): Stripe ignores an identifier it already has, so a batch sent twice (a
flusher killed after sending, before recording) bills each call once.

The stream authenticates with a meter event session token (15 minutes); a `MeterStream` keeps
one per process and makes a new one shortly before it expires or when Stripe says it has. Stripe
validates streamed events asynchronously: a bad one is accepted here and reported later through
a meter error report (shared/meter_errors.py), which marks its row failed.

report-usage flushes through shared/outbox.py, which loads this module (and Stripe's client)
with its first flush.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.db import Database
from shared.meter_events import Outcome, failure_outcome
from shared.settings import Settings
from shared.stripe_api import describe, kind_of
from shared.stripe_lib import stripe
from shared.usage import BATCH

log = logging.getLogger("metered_billing")

SESSION_MARGIN = timedelta(minutes=1)  # a token this close to expiry is replaced first
_EVENT_PARAM = re.compile(r"^events\[(\d+)\]")


@dataclass
class FlushReport:
    sent: int = 0
    pending: int = 0
    failed: int = 0
    requests: int = 0  # requests made to the stream (sessions not counted)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Sent:
    """A batch's outcome per event (in the batch's order) and the stream requests it took."""

    outcomes: list[tuple[Outcome, str | None]]
    requests: int = 0

    def set(self, indexes: list[int], outcome: Outcome, reason: str | None) -> None:
        for index in indexes:
            self.outcomes[index] = (outcome, reason)


def batch_lease_seconds(settings: Settings) -> int:
    """How long a batch's claim lasts: three Stripe requests at their worst (a session, the
    batch, the batch again under a fresh session) and a margin. httpx applies the timeout to
    connecting, writing and reading separately."""
    return 3 * math.ceil(3 * settings.STRIPE_TIMEOUT_SECONDS) + 30


class MeterStream:
    """The process's meter event session and the batches sent with it (thread-safe)."""

    def __init__(self, client: stripe.StripeClient, settings: Settings) -> None:
        self._client = client
        self._event_name = settings.STRIPE_METER_EVENT_NAME
        self.lease_seconds = batch_lease_seconds(settings)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = datetime.min.replace(tzinfo=UTC)

    def send(self, events: list[dict[str, Any]]) -> Sent:
        """Send one batch (1-100 claimed events): each event's outcome and Stripe's reason.

        A refused request takes none of its events. When Stripe names one event (`param`
        events[i][...]), that one failed for good and the rest go again at once; a session
        Stripe no longer takes (expired, or unknown to it) is replaced once.
        """
        assert 0 < len(events) <= BATCH
        outcomes: list[tuple[Outcome, str | None]] = [("retry", None)] * len(events)
        left = list(range(len(events)))
        sent = Sent(outcomes)
        renew = False
        while left:
            try:
                token = self._session_token(renew=renew)
            except stripe.StripeError as error:  # nothing of these was sent
                log.warning("no meter event session: %s", describe(error))
                sent.set(left, "retry", f"no meter event session: {kind_of(error)}")
                break
            body = {"events": [self._stream_event(events[i]) for i in left]}
            sent.requests += 1
            try:
                self._post(body, token)
            except (stripe.TemporarySessionExpiredError, stripe.AuthenticationError) as error:
                if renew:
                    log.warning("meter event session refused twice: %s", describe(error))
                    sent.set(left, "retry", kind_of(error))
                    break
                renew = True  # once more under a new session
                continue
            except stripe.StripeError as error:
                reason = describe(error)
                log.warning("meter event batch of %d not delivered: %s", len(left), reason)
                named = _named_event(error, len(left))
                if named is None:
                    outcome = failure_outcome(error)
                    # Refused whole without naming an event: kept for a retry, never dropped.
                    # The rows (members read them) get the kind of error, not Stripe's message,
                    # which may name another organisation's customer or event of the batch.
                    sent.set(
                        left,
                        "retry" if outcome == "failed" else outcome,
                        f"{kind_of(error)}: the whole batch was refused (message in the log)",
                    )
                    break
                sent.set([left.pop(named)], "failed", reason)
                continue
            sent.set(left, "sent", None)
            break
        return sent

    def _post(self, body: dict[str, Any], token: str) -> None:
        # One try: retrying is the outbox's job (a retried batch keeps its identifiers).
        self._client.v2.billing.meter_event_stream.create(
            params=body,  # type: ignore[arg-type]
            options={"api_key": token, "max_network_retries": 0},
        )

    def _session_token(self, *, renew: bool = False) -> str:
        with self._lock:
            if (
                renew
                or self._token is None
                or datetime.now(UTC) + SESSION_MARGIN >= self._expires_at
            ):
                session = self._client.v2.billing.meter_event_session.create(
                    options={"max_network_retries": 0}
                )
                self._token = session.authentication_token
                self._expires_at = _utc(session.expires_at)
            return self._token

    def _stream_event(self, event: dict[str, Any]) -> dict[str, Any]:
        at = datetime.fromtimestamp(int(event["timestamp"]), UTC)
        return {
            "event_name": self._event_name,
            "identifier": event["identifier"],
            "payload": {"stripe_customer_id": event["customer"], "value": str(event["value"])},
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        }


def flush(
    database: Database, stream: MeterStream, *, limit: int, organisation_id: str | None = None
) -> FlushReport:
    """Deliver up to `limit` due meter events (of one organisation when given), a batch at a
    time, until none is due."""
    report = FlushReport()
    taken = 0
    while taken < limit:
        claimed: list[dict[str, Any]] = database.call(
            "claim_meter_events",
            p_limit=min(BATCH, limit - taken),
            p_lease_seconds=stream.lease_seconds,
            p_organisation_id=organisation_id,
        )
        if not claimed:
            break
        taken += len(claimed)
        sent = stream.send(claimed)
        report.requests += sent.requests
        counts: dict[str, int] = database.call(
            "record_meter_results",
            p_results=[
                {
                    "usage_record_id": event["usage_record_id"],
                    "attempt": event["attempt"],
                    "identifier": event["identifier"],  # a `sent` is for this identifier only
                    "outcome": outcome,
                    "error": error,
                }
                for event, (outcome, error) in zip(claimed, sent.outcomes, strict=True)
            ],
        )
        report.sent += counts.get("sent", 0)
        report.pending += counts.get("pending", 0)
        report.failed += counts.get("failed", 0)
        if len(claimed) < BATCH or report.sent == 0:
            break  # drained, or Stripe is taking nothing: the events wait for their retry time
    return report


def _utc(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _named_event(error: stripe.StripeError, count: int) -> int | None:
    """The index of the one event a 400 names (`param` events[i][...]), if it names one."""
    named = _EVENT_PARAM.match(str(getattr(error, "param", None) or _param(error)))
    if error.http_status == 400 and named and int(named.group(1)) < count:
        return int(named.group(1))
    return None


def _param(error: stripe.StripeError) -> str:
    body = error.json_body if isinstance(error.json_body, dict) else {}
    detail = body.get("error")
    return str(detail.get("param") or "") if isinstance(detail, dict) else ""
