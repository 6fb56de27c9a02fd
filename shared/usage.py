"""Usage: record each call's minutes once, and read the current cycle.

A report is one SQL call (`record_usage`, one transaction): the usage row, the cycle totals, the
alerts and the meter event, `pending` and due, for the batched flush (shared/meter_flush.py). The
request never waits for Stripe. Every meter event carries an identifier derived from
(organisation, call): Stripe ignores a second event with that identifier, so any number of
attempts bills the call once.

Delivery is shared/meter_flush.py's (batches, through shared/outbox.py in report-usage) and
shared/meter_events.py's (one event); this module imports neither, so recording a call never
loads Stripe's client.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.db import Database
from shared.errors import Unprocessable

MAX_CALL_SECONDS = 24 * 60 * 60
FUTURE_TOLERANCE = timedelta(minutes=5)  # what Stripe accepts for a meter event's timestamp
BATCH = 100  # meter events per stream request (Stripe's most); a full batch flushes at once
DEFAULT_FLUSH_LIMIT = 1000
MAX_FLUSH_LIMIT = 10_000

Seconds = Annotated[float, Field(strict=True, ge=0, le=MAX_CALL_SECONDS, allow_inf_nan=False)]

Minutes = Annotated[float, Field(strict=True, ge=0, le=MAX_CALL_SECONDS // 60, allow_inf_nan=False)]


class UsageReport(BaseModel):
    """POST report-usage: one finished call, its duration in seconds or in minutes."""

    org_id: uuid.UUID
    call_id: str = Field(min_length=1, max_length=200)
    call_duration_seconds: Seconds | None = None
    call_duration_minutes: Minutes | None = None
    ended_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_misspelt_fields(cls, body: Any) -> Any:
        """Other properties are ignored (an agent may send its own), but not one of ours spelt
        another way: a dropped `endedAt` would bill the call as ended now, maybe in another
        period, with a 202."""
        for key in body if isinstance(body, dict) else ():
            field = _OUR_FIELDS.get(_spelling(key))
            if field and key != field:
                raise Unprocessable(
                    f"{key}: not a field of a report; did you mean {field}?", field=key
                )
        return body

    @field_validator("call_id")
    @classmethod
    def _storable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text") from None
        return value

    @field_validator("ended_at", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> datetime | None:
        if value is None:
            return None
        expected = "must be an ISO-8601 date-time, e.g. 2026-11-22T05:00:00Z"
        if not isinstance(value, str):
            raise ValueError(expected)
        try:
            parsed = datetime.fromisoformat(value)
            # Without an offset the time is taken as UTC, the agent's clock everywhere else.
            parsed = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):
            raise ValueError(expected) from None
        if parsed > datetime.now(UTC) + FUTURE_TOLERANCE:
            raise ValueError("must not be more than 5 minutes in the future")
        return parsed

    @model_validator(mode="after")
    def _one_duration(self) -> UsageReport:
        if (self.call_duration_seconds is None) == (self.call_duration_minutes is None):
            raise Unprocessable(
                "call_duration_seconds: give exactly one of call_duration_seconds and"
                " call_duration_minutes.",
                field="call_duration_seconds",
            )
        return self

    @property
    def duration_seconds(self) -> Decimal:
        """Exact seconds (minutes x 60 in decimal), so rounding up is exact too."""
        if self.call_duration_seconds is not None:
            return Decimal(repr(self.call_duration_seconds))
        assert self.call_duration_minutes is not None
        return Decimal(repr(self.call_duration_minutes)) * 60


def _spelling(key: Any) -> str:
    """A field name without its case and separators: endedAt, Ended-At and ended_at alike."""
    return "".join(c for c in str(key).lower() if c.isalnum())


_OUR_FIELDS = {_spelling(name): name for name in UsageReport.model_fields}


class CycleQuery(BaseModel):
    """GET report-usage?org_id=..."""

    org_id: uuid.UUID


class FlushCommand(BaseModel):
    """POST report-usage {"action": "flush"}: deliver due pending meter events. Nothing else: a
    call's fields beside `action` would be a report taken for a flush and never recorded."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["flush"]
    limit: Annotated[int, Field(ge=1, le=MAX_FLUSH_LIMIT)] = DEFAULT_FLUSH_LIMIT

    @field_validator("limit", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """JSON's integers, 5.0 included (JSON Schema counts it as one); not true nor "5"."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a whole number")
        return value


def record_usage(database: Database, report: UsageReport) -> dict[str, Any]:
    """Record the call once (one database round trip); the response body."""
    result: dict[str, Any] = database.call(
        "record_usage",
        p_org_id=str(report.org_id),
        p_call_id=report.call_id,
        p_duration_seconds=str(report.duration_seconds),
        p_ended_at=report.ended_at.isoformat() if report.ended_at else None,
    )
    return result


def response_status(result: dict[str, Any]) -> int:
    """200 for a repeat, 202 while its meter event is queued, 201 when it is on Stripe's meter
    or has none to send."""
    if result["duplicate"]:
        return 200
    return 202 if result["meter_status"] == "pending" else 201


def current_cycle(database: Database, org_id: uuid.UUID) -> dict[str, Any]:
    """The organisation's plan, current cycle and whether it may place calls."""
    summary: dict[str, Any] = database.call("usage_summary", p_org_id=str(org_id))
    return summary
