"""Stripe's asynchronous verdicts: thin error-report events at stripe-webhook-handler, signed with
Stripe's real scheme, recorded once, and the rows they sample marked failed with their cycles due
for reconciliation. `FakeStripe` (respx, Stripe's shapes) is also the Stripe of test_reconcile."""

# The fixtures (client, customer_org, subscribe) come from test_report_usage by name.
# ruff: noqa: F811

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx
from stripe.events import V1BillingMeterErrorReportTriggeredEvent

from shared.db import PostgresDatabase, get_database
from shared.meter_errors import process_thin_notification
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from tests.conftest import WEBHOOK_SECRET, function_client, stripe_fixture
from tests.test_report_usage import (  # noqa: F401
    FakeMeter,
    at,
    client,
    customer_org,
    flush,
    report,
    subscribe,
    usage_row,
)
from tests.test_webhook_support import signature_header

METER_ID = "mtr_test_voice_minutes"
THIN_SECRET = "whsec_test_thin_destination"
REJECTED = "meter_event_customer_not_found"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def not_found(message: str) -> httpx.Response:
    error = {"type": "invalid_request_error", "code": "resource_missing", "message": message}
    return httpx.Response(404, json={"error": error})


class FakeStripe:
    """The Stripe of these tests, through respx: meter events (FakeMeter), the meter list, meter
    event summaries (over the accepted events, less those Stripe `dropped` (lost, or rejected
    after acceptance), less canceled ones, plus `strays` that are not ours), adjustments,
    invoices and v2 events. `throttle` answers that many summary requests with 429."""

    def __init__(self, router: respx.Router) -> None:
        self.meter = FakeMeter()
        self.dropped: set[str] = set()
        self.strays: list[dict[str, Any]] = []
        self.canceled: list[str] = []
        self.invoices: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.fail_events = 0
        self.throttle = 0
        self.summary_requests: list[dict[str, str]] = []
        self.meter.mount(router)  # v1 meter events, the v2 session and stream
        router.get("/v1/billing/meters").mock(side_effect=self._meters)
        router.get(path__regex=r"^/v1/billing/meters/(?P<meter_id>[^/]+)/event_summaries$").mock(
            side_effect=self._summaries
        )
        router.post("/v1/billing/meter_event_adjustments").mock(side_effect=self._adjust)
        router.get(path__regex=r"^/v1/invoices/(?P<invoice_id>in_[^/]+)$").mock(
            side_effect=self._invoice
        )
        router.get(path__regex=r"^/v2/core/events/(?P<event_id>[^/]+)$").mock(
            side_effect=self._event
        )

    def _meters(self, request: httpx.Request) -> httpx.Response:
        meter = stripe_fixture("billing.meter")
        meter.update(id=METER_ID, event_name="voice_call_minutes", status="active")
        meter["customer_mapping"]["event_payload_key"] = "stripe_customer_id"
        page = {"object": "list", "data": [meter], "has_more": False, "url": "/v1/billing/meters"}
        return httpx.Response(200, json=page)

    def held(self, customer: str, start: int, end: int) -> Decimal:
        """What Stripe's summary counts for `customer` in [start, end)."""
        values = [
            Decimal(form["payload[value]"])
            for identifier, form in self.meter.events.items()
            if form["payload[stripe_customer_id]"] == customer
            and start <= int(form["timestamp"]) < end
            and identifier not in self.dropped
            and identifier not in self.canceled
        ]
        values += [
            Decimal(str(s["value"]))
            for s in self.strays
            if s["customer"] == customer and start <= s["timestamp"] < end
        ]
        return sum(values, Decimal(0))

    def _summaries(self, request: httpx.Request, meter_id: str) -> httpx.Response:
        params = dict(urllib.parse.parse_qsl(request.url.query.decode()))
        self.summary_requests.append(params)
        if self.throttle:
            self.throttle -= 1
            error = {"type": "invalid_request_error", "message": "Too many requests."}
            return httpx.Response(429, json={"error": error})
        start, end = int(params["start_time"]), int(params["end_time"])
        if start % 60 or end % 60:
            message = "start_time and end_time must be aligned with minute boundaries."
            error = {"type": "invalid_request_error", "message": message}
            return httpx.Response(400, json={"error": error})
        summary = stripe_fixture("billing.meter_event_summary")
        value = self.held(params["customer"], start, end)
        summary.update(
            id=f"mtrusg_{uuid.uuid4().hex}",
            meter=meter_id,
            start_time=start,
            end_time=end,
            aggregated_value=float(value),
        )
        url = f"/v1/billing/meters/{meter_id}/event_summaries"
        return httpx.Response(
            200, json={"object": "list", "data": [summary], "has_more": False, "url": url}
        )

    def _adjust(self, request: httpx.Request) -> httpx.Response:
        form = dict(urllib.parse.parse_qsl(request.content.decode()))
        identifier = form["cancel[identifier]"]
        if form.get("type") != "cancel" or identifier not in self.meter.events:
            error = {"type": "invalid_request_error", "message": "No such meter event."}
            return httpx.Response(400, json={"error": error})
        self.canceled.append(identifier)
        adjustment = stripe_fixture("billing.meter_event_adjustment")
        adjustment.update(event_name=form["event_name"], cancel={"identifier": identifier})
        return httpx.Response(200, json=adjustment)

    def _invoice(self, request: httpx.Request, invoice_id: str) -> httpx.Response:
        invoice = self.invoices.get(invoice_id)
        return httpx.Response(200, json=invoice) if invoice else not_found("No such invoice")

    def _event(self, request: httpx.Request, event_id: str) -> httpx.Response:
        if self.fail_events:
            self.fail_events -= 1
            return httpx.Response(500, json={"error": {"type": "api_error", "message": "Oops."}})
        event = self.events.get(event_id)
        return httpx.Response(200, json=event) if event else not_found("No such event")


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with respx.mock(base_url="https://api.stripe.com", assert_all_called=False) as router:
        yield FakeStripe(router)


@pytest.fixture
def webhook(function_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """stripe-webhook-handler with two secrets: the snapshot endpoint's and the thin destination's."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", f"{WEBHOOK_SECRET},{THIN_SECRET}")
    get_settings.cache_clear()
    return function_client("stripe-webhook-handler", "stripe_webhook_handler")


def error_report(
    fake: FakeStripe,
    samples: list[tuple[str, int]],
    *,
    errors: int | None = None,
    window: tuple[datetime, datetime] | None = None,
    event_type: str = "v1.billing.meter.error_report_triggered",
    code: str = REJECTED,
) -> dict[str, Any]:
    """A full error-report event (V1BillingMeterErrorReportTriggeredEvent's shape, as
    GET /v2/core/events/{id} returns it) sampling `samples` (identifier, customer), stored at the
    fake Stripe; `errors` rejected events in all."""
    now = datetime.now(UTC)
    start, end = window or (now - timedelta(seconds=20), now)
    count = errors or len(samples)
    event = {
        "id": f"evt_test_{uuid.uuid4().hex}",
        "object": "v2.core.event",
        "type": event_type,
        "created": iso(now),
        "livemode": False,
        "context": None,
        "reason": None,
        "changes": None,
        "snapshot_event": None,
        "data": {
            "developer_message_summary": f"There are {count} invalid events",
            "reason": {
                "error_count": count,
                "error_types": [
                    {
                        "code": code,
                        "error_count": count,
                        "sample_errors": [
                            {
                                "error_message": f"No customer with id '{customer}' exists.",
                                "request": {"identifier": identifier},
                            }
                            for identifier, customer in samples
                        ],
                    }
                ],
            },
            "validation_start": iso(start),
            "validation_end": iso(end),
        },
    }
    if event_type == "v1.billing.meter.error_report_triggered":
        url = f"/v1/billing/meters/{METER_ID}"
        event["related_object"] = {"id": METER_ID, "type": "billing.meter", "url": url}
    fake.events[event["id"]] = event
    return event


def notification(event: dict[str, Any]) -> dict[str, Any]:
    """The thin payload an event destination delivers for `event`."""
    thin = {key: event[key] for key in ("id", "object", "type", "livemode", "created", "context")}
    if "related_object" in event:
        thin["related_object"] = event["related_object"]
    return thin


def deliver_thin(
    webhook: Any, payload: dict[str, Any] | str, *, secret: str = THIN_SECRET, **headers: str
) -> Any:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    signed = {"Stripe-Signature": signature_header(body, secret=secret)}
    return webhook.post(
        "/", data=body, headers={**signed, **headers, "Content-Type": "application/json"}
    )


def sent_rows(client: Any, db: Any, org: dict[str, Any], minutes: list[int]) -> list[dict]:
    """One call per entry, each accepted by Stripe at the next flush: their rows."""
    call_ids = []
    for n in minutes:
        call_id = f"call-{uuid.uuid4().hex[:8]}"
        ended = datetime.now(UTC) - timedelta(hours=2)
        assert report(client, org["id"], call_id, call_duration_minutes=n, ended_at=at(ended))
        call_ids.append(call_id)
    assert flush(client)["sent"] == len(minutes)
    rows = [usage_row(db, org["id"], call_id) for call_id in call_ids]
    assert all(row["meter_status"] == "sent" for row in rows)
    return rows


def stored_event(db: Any, event_id: str) -> dict[str, Any] | None:
    return db.execute("select * from stripe_events where id = %s", (event_id,)).fetchone()


# ------------------------------------------------------------------ tests


def test_the_fake_error_report_has_stripes_own_shape(function_env, fake_stripe):
    event = error_report(fake_stripe, [("mb_x", "cus_x")])
    stripe_client = make_stripe_client(get_settings())
    fetched = stripe_client.v2.core.events.retrieve(event["id"])
    assert isinstance(fetched, V1BillingMeterErrorReportTriggeredEvent)
    [error_type] = fetched.data.reason.error_types
    assert error_type.code == REJECTED and error_type.sample_errors[0].request.identifier == "mb_x"
    parsed = stripe_client.parse_event_notification(
        json.dumps(notification(event)),
        signature_header(json.dumps(notification(event)), secret=THIN_SECRET),
        THIN_SECRET,
    )
    assert parsed.id == event["id"] and parsed.type == event["type"]


def test_an_error_report_fails_the_sampled_rows_and_marks_their_cycle(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    rows = sent_rows(client, db, org, [3, 4, 5, 6])
    event = error_report(
        fake_stripe,
        [(row["meter_identifier"], org["stripe_customer_id"]) for row in rows[:2]],
        errors=4,
    )

    response = deliver_thin(webhook, notification(event))

    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "processed"}
    failed = [usage_row(db, org["id"], row["call_id"]) for row in rows]
    assert [row["meter_status"] for row in failed] == ["failed", "failed", "sent", "sent"]
    assert failed[0]["meter_error"] == (
        f"{REJECTED}: No customer with id '{org['stripe_customer_id']}' exists."
    )
    cycle = db.execute(
        "select * from billing_cycles where organisation_id = %s", (org["id"],)
    ).fetchone()
    assert cycle["minutes_used"] == 18  # the rejected minutes stay counted until sent again
    [todo] = db.execute(
        "select * from reconciliations where organisation_id = %s", (org["id"],)
    ).fetchall()
    assert todo["status"] == "drift" and todo["source"] == "error_report"
    assert todo["billing_cycle_id"] == cycle["id"] and todo["cycle_minutes"] == 18
    assert sorted(todo["details"]["failed"]) == sorted(str(row["id"]) for row in rows[:2])
    assert todo["details"]["error_count"] == 4
    audits = db.execute(
        "select details from audit_log where organisation_id = %s and action = 'usage.meter_rejected'",
        (org["id"],),
    ).fetchall()
    assert {a["details"]["previous_status"] for a in audits} == {"sent"} and len(audits) == 2
    stored = stored_event(db, event["id"])
    assert stored["status"] == "processed" and stored["type"] == event["type"]
    assert stored["payload"]["event"]["data"]["reason"]["error_count"] == 4


@pytest.fixture
def stalled_flush(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Runs each callable appended to it just before the flusher saves a batch's outcomes,
    once: the flusher's thread stalled after Stripe took the batch (Cloud Run throttles a
    background thread between requests) while the world went on."""
    meanwhile: list[Any] = []
    real_call = PostgresDatabase.call

    def call(self: PostgresDatabase, function: str, **params: Any) -> Any:
        while function == "record_meter_results" and meanwhile:
            meanwhile.pop(0)()
        return real_call(self, function, **params)

    monkeypatch.setattr(PostgresDatabase, "call", call)
    return meanwhile


def test_an_error_report_overtaking_the_flushers_outcome_keeps_the_row_failed(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe, stalled_flush
):
    org = customer_org()
    subscribe(org, make_plan())
    ended = datetime.now(UTC) - timedelta(hours=2)
    for call_id in ("refused", "taken"):
        assert report(client, org["id"], call_id, call_duration_minutes=3, ended_at=at(ended))
    refused = usage_row(db, org["id"], "refused")
    event = error_report(fake_stripe, [(refused["meter_identifier"], org["stripe_customer_id"])])
    answers: list[Any] = []
    stalled_flush.append(lambda: answers.append(deliver_thin(webhook, notification(event))))

    flushed = flush(client)

    assert answers[0].status_code == 200
    after = usage_row(db, org["id"], "refused")
    assert after["meter_status"] == "failed" and after["meter_error"].startswith(REJECTED)
    assert after["meter_rejected_identifier"] == refused["meter_identifier"]
    assert usage_row(db, org["id"], "taken")["meter_status"] == "sent"
    assert (flushed["sent"], flushed["failed"]) == (1, 1)
    # requeue-usage can send it again, under a new identifier, which the next flush delivers.
    db.execute("select public.requeue_failed_usage(p_organisation_id => %s)", (org["id"],))
    assert flush(client)["sent"] == 1
    resent = usage_row(db, org["id"], "refused")
    assert resent["meter_status"] == "sent"
    assert resent["meter_identifier"] not in (None, refused["meter_identifier"])


def test_a_stale_sent_does_not_mark_a_requeued_rows_new_identifier_sent(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe, stalled_flush
):
    org = customer_org()
    subscribe(org, make_plan())
    ended = datetime.now(UTC) - timedelta(hours=2)
    assert report(client, org["id"], "requeued", call_duration_minutes=3, ended_at=at(ended))
    before = usage_row(db, org["id"], "requeued")
    event = error_report(fake_stripe, [(before["meter_identifier"], org["stripe_customer_id"])])
    stalled_flush.append(lambda: deliver_thin(webhook, notification(event)))
    stalled_flush.append(
        lambda: db.execute(
            "select public.requeue_failed_usage(p_organisation_id => %s)", (org["id"],)
        )
    )

    flush(client)

    after = usage_row(db, org["id"], "requeued")
    assert after["meter_status"] == "pending"  # its new identifier was never sent
    assert after["meter_identifier"] != before["meter_identifier"]
    assert flush(client)["sent"] == 1
    assert usage_row(db, org["id"], "requeued")["meter_status"] == "sent"


def test_a_duplicate_error_report_changes_nothing(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    [row] = sent_rows(client, db, org, [2])
    event = error_report(fake_stripe, [(row["meter_identifier"], org["stripe_customer_id"])])
    assert deliver_thin(webhook, notification(event)).status_code == 200
    db.execute(  # requeued meanwhile: a repeat of the report must not fail it again
        "update usage_records set meter_status = 'sent' where id = %s", (row["id"],)
    )

    again = deliver_thin(webhook, notification(event))

    assert again.status_code == 200
    assert again.get_json() == {"received": True, "event_id": event["id"], "status": "duplicate"}
    assert usage_row(db, org["id"], row["call_id"])["meter_status"] == "sent"
    assert (
        db.execute(
            "select count(*) as n from reconciliations where organisation_id = %s", (org["id"],)
        ).fetchone()["n"]
        == 1
    )


def test_a_report_naming_a_failed_row_or_an_unknown_identifier_keeps_them(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    [row] = sent_rows(client, db, org, [2])
    db.execute(
        "update usage_records set meter_status = 'failed', meter_error = 'earlier' where id = %s",
        (row["id"],),
    )
    # Our idempotency key (identifier-attempt) names the row as well as its identifier.
    event = error_report(
        fake_stripe,
        [(f"{row['meter_identifier']}-1", org["stripe_customer_id"]), ("mb_unknown", "cus_x")],
    )
    assert deliver_thin(webhook, notification(event)).status_code == 200
    assert usage_row(db, org["id"], row["call_id"])["meter_error"] == "earlier"
    assert not db.execute(
        "select 1 from audit_log where organisation_id = %s and action = 'usage.meter_rejected'",
        (org["id"],),
    ).fetchall()


def test_no_meter_found_fails_the_rows_it_samples(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    [row] = sent_rows(client, db, org, [2])
    event = error_report(
        fake_stripe,
        [(row["meter_identifier"], org["stripe_customer_id"])],
        event_type="v1.billing.meter.no_meter_found",
        code="no_meter",
    )
    response = deliver_thin(webhook, notification(event))
    assert response.status_code == 200 and response.get_json()["status"] == "processed"
    assert usage_row(db, org["id"], row["call_id"])["meter_error"].startswith("no_meter: ")


@pytest.mark.parametrize(
    "how", ["other secret", "no header", "tampered body", "stale", "the snapshot secret only"]
)
def test_a_bad_signature_is_400_and_stores_nothing(webhook, fake_stripe, db, how):
    event = error_report(fake_stripe, [("mb_x", "cus_x")])
    body = json.dumps(notification(event))
    headers = {"Stripe-Signature": signature_header(body, secret=THIN_SECRET)}
    if how == "other secret":
        headers["Stripe-Signature"] = signature_header(body, secret="whsec_someone_else")
    elif how == "no header":
        headers = {}
    elif how == "tampered body":
        body = body.replace('"livemode": false', '"livemode": true')
    elif how == "stale":
        old = int(time.time()) - 600
        headers["Stripe-Signature"] = signature_header(body, secret=THIN_SECRET, timestamp=old)
    response = webhook.post("/", data=body, headers={**headers, "Content-Type": "application/json"})
    if how == "the snapshot secret only":  # any listed secret signs: rolling, or one per endpoint
        response = deliver_thin(webhook, notification(event), secret=WEBHOOK_SECRET)
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_signature"
    assert stored_event(db, event["id"]) is None


def test_an_unknown_thin_event_is_ignored(webhook, fake_stripe, db):
    event = error_report(fake_stripe, [], event_type="v1.billing.meter.created")
    event["related_object"] = {"id": METER_ID, "type": "billing.meter", "url": "/v1/x"}
    response = deliver_thin(webhook, notification(event))
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "ignored"}
    assert stored_event(db, event["id"])["status"] == "ignored"


def test_a_thin_event_that_is_not_one_is_400(webhook, fake_stripe, db):
    response = deliver_thin(webhook, {"object": "v2.core.event", "id": "evt_1"})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_event"


def test_stripe_down_while_fetching_the_event_is_5xx_kept_and_retried(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    org = customer_org()
    subscribe(org, make_plan())
    [row] = sent_rows(client, db, org, [2])
    event = error_report(fake_stripe, [(row["meter_identifier"], org["stripe_customer_id"])])
    fake_stripe.fail_events = 1

    first = deliver_thin(webhook, notification(event))

    assert first.status_code >= 500
    stored = stored_event(db, event["id"])
    assert stored["status"] == "failed" and "APIError" in stored["error"]
    assert usage_row(db, org["id"], row["call_id"])["meter_status"] == "sent"
    retry = deliver_thin(webhook, notification(event))
    assert retry.status_code == 200 and retry.get_json()["status"] == "processed"
    assert usage_row(db, org["id"], row["call_id"])["meter_status"] == "failed"
    assert stored_event(db, event["id"])["attempts"] == 2


def test_a_failed_error_report_is_retried_from_the_ledger(
    webhook, client, fake_stripe, db, customer_org, make_plan, subscribe
):
    """What `./deploy.sh repair-events` has: the stored notification, no signature."""
    org = customer_org()
    subscribe(org, make_plan())
    [row] = sent_rows(client, db, org, [2])
    event = error_report(fake_stripe, [(row["meter_identifier"], org["stripe_customer_id"])])
    fake_stripe.fail_events = 1
    assert deliver_thin(webhook, notification(event)).status_code >= 500
    stored = stored_event(db, event["id"])

    settings = get_settings()
    status = process_thin_notification(
        stored["payload"],
        database=get_database(settings),
        stripe_client=make_stripe_client(settings),
    )

    assert status == "processed"
    assert usage_row(db, org["id"], row["call_id"])["meter_status"] == "failed"
    assert stored_event(db, event["id"])["status"] == "processed"
