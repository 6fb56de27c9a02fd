"""Meter events on the Stripe stand-in, through stripe-python: event summaries, adjustments,
asynchronous validation reported by thin events to event destinations, lost and stray events,
and the v2 meter event stream (devtools/stripe_standin/meter_*.py and event_destinations.py say
the rules).

Windows: meter events carry real timestamps while renewals move periods ahead of the wall
clock, so summaries are queried over the events' own minutes (or, before any renewal, over the
subscription's current period, floored and rounded up to minutes): see meter_summaries.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe
from stripe.events import (
    V1BillingMeterErrorReportTriggeredEvent,
    V1BillingMeterErrorReportTriggeredEventNotification,
    V1BillingMeterNoMeterFoundEvent,
)
from stripe.params.v2.billing import MeterEventStreamCreateParamsEvent as StreamEvent

from devtools.stripe_standin import serve_in_thread
from tests.test_stripe_standin import SECRET, Receiver, checkout, control, new_customer

EVENT_NAME = "voice_call_minutes"
REPORTS = ["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"]


@pytest.fixture
def thin() -> Iterator[Receiver]:
    """The project's thin event destination: keeps each delivery's raw body and signature."""
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def base_url() -> Iterator[str]:
    url, stop = serve_in_thread(
        None, SECRET, meter_event_names=[EVENT_NAME], async_meter_validation=True
    )
    yield url
    stop()


def stripe_client(api_key: str, base_url: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base_url, "meter_events": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )


@pytest.fixture
def client(base_url: str) -> stripe.StripeClient:
    return stripe_client("sk_test_x", base_url)


@pytest.fixture
def meter(client: stripe.StripeClient) -> stripe.billing.Meter:
    return client.v1.billing.meters.list().data[0]


@pytest.fixture
def customer(client: stripe.StripeClient) -> str:
    return new_customer(client)


def send(
    client: stripe.StripeClient,
    customer: str,
    identifier: str,
    value: str | int,
    timestamp: int | None = None,
    event_name: str = EVENT_NAME,
) -> stripe.billing.MeterEvent:
    return client.v1.billing.meter_events.create(
        params={
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "identifier": identifier,
            "timestamp": timestamp or int(time.time()),
        }
    )


def summaries(
    client: stripe.StripeClient, meter: str, customer: str, start: int, end: int, **more: Any
) -> stripe.ListObject[stripe.billing.MeterEventSummary]:
    params = {"customer": customer, "start_time": start, "end_time": end, **more}
    return client.v1.billing.meters.event_summaries.list(meter, params=params)  # type: ignore[arg-type]


def usage(client: stripe.StripeClient, meter: str, customer: str) -> float:
    """The customer's usage over the last hour and the next two minutes (timestamps are now)."""
    minute = int(time.time()) // 60 * 60
    found = summaries(client, meter, customer, minute - 3600, minute + 120)
    return found.data[0].aggregated_value


def thin_destination(client: stripe.StripeClient, url: str) -> stripe.v2.core.EventDestination:
    return client.v2.core.event_destinations.create(
        params={
            "name": "meter errors",
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": REPORTS,
            "webhook_endpoint": {"url": url},
            "include": ["webhook_endpoint.signing_secret"],
        }
    )


# ---------------------------------------------------------------- summaries


def test_summaries_per_window_with_pagination(
    client: stripe.StripeClient, meter: stripe.billing.Meter, customer: str
) -> None:
    hour = int(time.time()) // 3600 * 3600 - 3 * 3600  # three whole hours ago
    for identifier, value, at in [("a", 5, 60), ("b", 7, 3600 + 10), ("c", 11, 7200 + 5)]:
        send(client, customer, identifier, value, hour + at)
    send(client, customer, "d", 13, hour + 3 * 3600)  # the current hour's first second
    other = new_customer(client)
    send(client, other, "e", 100, hour + 60)

    whole = summaries(client, meter.id, customer, hour, hour + 3 * 3600)
    assert [(s.aggregated_value, s.start_time, s.end_time) for s in whole.data] == [
        (23, hour, hour + 3 * 3600)  # [start, end): "d" is out
    ]
    assert (whole.data[0].object, whole.data[0].meter, whole.has_more) == (
        "billing.meter_event_summary",
        meter.id,
        False,
    )
    assert whole.url == f"/v1/billing/meters/{meter.id}/event_summaries"

    hourly = summaries(
        client, meter.id, customer, hour, hour + 4 * 3600, value_grouping_window="hour"
    )
    assert [(s.start_time - hour, s.aggregated_value) for s in hourly.data] == [
        (3 * 3600, 13),  # newest first
        (2 * 3600, 11),
        (3600, 7),
        (0, 5),
    ]
    first = summaries(
        client, meter.id, customer, hour, hour + 4 * 3600, value_grouping_window="hour", limit=3
    )
    assert ([s.id for s in first.data], first.has_more) == ([s.id for s in hourly.data[:3]], True)
    rest = summaries(
        client,
        meter.id,
        customer,
        hour,
        hour + 4 * 3600,
        value_grouping_window="hour",
        limit=3,
        starting_after=first.data[-1].id,
    )
    assert ([s.id for s in rest.data], rest.has_more) == ([hourly.data[3].id], False)
    back = summaries(
        client,
        meter.id,
        customer,
        hour,
        hour + 4 * 3600,
        value_grouping_window="hour",
        limit=2,
        ending_before=hourly.data[3].id,
    )
    assert ([s.id for s in back.data], back.has_more) == ([s.id for s in hourly.data[1:3]], True)
    every = first.auto_paging_iter()
    assert [s.aggregated_value for s in every] == [13, 11, 7, 5]

    day = int(time.time()) // 86400 * 86400 - 86400  # yesterday and today (UTC)
    daily = summaries(client, meter.id, customer, day, day + 2 * 86400, value_grouping_window="day")
    assert [s.end_time - s.start_time for s in daily.data] == [86400, 86400]
    assert sum(s.aggregated_value for s in daily.data) == 36


def test_summary_times_must_lie_on_boundaries(
    client: stripe.StripeClient, meter: stripe.billing.Meter, customer: str
) -> None:
    minute = int(time.time()) // 60 * 60

    def refused(start: int, end: int, **more: Any) -> stripe.InvalidRequestError:
        with pytest.raises(stripe.InvalidRequestError) as error:
            summaries(client, meter.id, customer, start, end, **more)
        assert error.value.http_status == 400
        return error.value

    assert refused(minute + 30, minute + 120).param == "start_time"
    assert refused(minute - 60, minute + 1).param == "end_time"
    hour = minute // 3600 * 3600
    assert refused(hour - 60, hour + 3600, value_grouping_window="hour").param == "start_time"
    assert refused(hour, hour + 3600, value_grouping_window="week").param == (
        "value_grouping_window"
    )
    assert refused(minute, minute).param == "start_time"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.billing.meters.event_summaries.list(
            meter.id,
            params={"start_time": minute, "end_time": minute + 60},  # type: ignore[typeddict-item]
        )
    assert (missing.value.code, missing.value.param) == ("parameter_missing", "customer")


# ---------------------------------------------------------------- adjustments


def test_adjustment_cancels_within_24_hours_and_refuses_later(
    client: stripe.StripeClient, base_url: str, meter: stripe.billing.Meter, customer: str
) -> None:
    send(client, customer, "call-a", 5)
    send(client, customer, "call-b", 7)
    assert usage(client, meter.id, customer) == 12

    def cancel(identifier: str) -> stripe.billing.MeterEventAdjustment:
        return client.v1.billing.meter_event_adjustments.create(
            params={
                "event_name": EVENT_NAME,
                "type": "cancel",
                "cancel": {"identifier": identifier},
            }
        )

    adjustment = cancel("call-a")
    assert (adjustment.object, adjustment.type, adjustment.status) == (
        "billing.meter_event_adjustment",
        "cancel",
        "pending",
    )
    assert adjustment.cancel is not None and adjustment.cancel.identifier == "call-a"
    assert usage(client, meter.id, customer) == 7
    with pytest.raises(stripe.InvalidRequestError) as again:
        cancel("call-a")
    assert (again.value.http_status, again.value.code) == (400, "resource_already_exists")
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        cancel("call-nope")
    assert (unknown.value.code, unknown.value.param) == ("resource_missing", "cancel[identifier]")

    clock = control(base_url, "clock/advance", {"seconds": 86400})
    assert clock["offset"] == 86400
    with pytest.raises(stripe.InvalidRequestError) as late:
        cancel("call-b")
    assert late.value.http_status == 400
    assert "within 24 hours" in str(late.value.user_message)
    events = httpx.get(f"{base_url}/_standin/state").json()["meter_events"]
    assert {e["identifier"]: e["canceled_at"] is not None for e in events} == {
        "call-a": True,
        "call-b": False,
    }


def test_canceled_lost_and_stray_events_on_the_invoice(
    client: stripe.StripeClient, base_url: str, meter: stripe.billing.Meter
) -> None:
    """What Stripe bills equals its summaries, not what the project sent: a canceled event is
    not billed, a lost one neither, a stray one is."""
    client.v1.products.create(params={"id": "prod_pro", "name": "Pro"})
    monthly = client.v1.prices.create(
        params={
            "currency": "eur",
            "unit_amount": 4900,
            "product": "prod_pro",
            "recurring": {"interval": "month"},
        }
    )
    metered = client.v1.prices.create(
        params={
            "currency": "eur",
            "unit_amount": 50,
            "product": "prod_pro",
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    customer = new_customer(client)
    session = checkout(
        client, customer, [{"price": monthly.id, "quantity": 1}, {"price": metered.id}]
    )
    sub_id = control(base_url, f"checkout_sessions/{session.id}/complete")["subscription"]
    item = client.v1.subscriptions.retrieve(sub_id)["items"].data[0]

    send(client, customer, "sent-1", 10)
    assert control(base_url, "meter_events/drop_next") == {"waiting": 1}
    lost = send(client, customer, "sent-2", 20)  # answered 200 as usual, then lost
    assert lost.identifier == "sent-2"
    send(client, customer, "sent-3", 30)
    client.v1.billing.meter_event_adjustments.create(
        params={"event_name": EVENT_NAME, "type": "cancel", "cancel": {"identifier": "sent-3"}}
    )
    stray = control(base_url, "meter_events/stray", {"customer": customer, "value": 4})
    assert (stray["object"], stray["payload"]["value"]) == ("billing.meter_event", "4")

    # Before any renewal the current period holds the wall clock: the reconciliation's window.
    start = item.current_period_start // 60 * 60
    end = -(-item.current_period_end // 60) * 60
    found = summaries(client, meter.id, customer, start, end)
    assert found.data[0].aggregated_value == 14  # 10 + 4: the lost and the canceled are not

    renewal = control(base_url, f"subscriptions/{sub_id}/advance")
    invoice = client.v1.invoices.retrieve(renewal["invoice"])
    amounts = {line.pricing.price_details.price: line.amount for line in invoice.lines.data}  # type: ignore[union-attr]
    assert amounts[metered.id] == 14 * 50

    send(client, customer, "sent-2", 20)  # the project's resend: the lost identifier is free
    assert summaries(client, meter.id, customer, start, end).data[0].aggregated_value == 34


# ---------------------------------------------------------------- asynchronous validation


def test_invalid_events_are_accepted_then_reported_by_thin_events(
    client: stripe.StripeClient,
    base_url: str,
    meter: stripe.billing.Meter,
    customer: str,
    thin: Receiver,
) -> None:
    destination = thin_destination(client, thin.url)
    secret = destination.webhook_endpoint.signing_secret  # type: ignore[union-attr]
    assert secret is not None and secret.startswith("whsec_")
    assert (destination.object, destination.status, destination.event_payload) == (
        "v2.core.event_destination",
        "enabled",
        "thin",
    )
    listed = client.v2.core.event_destinations.list(params={"include": ["webhook_endpoint.url"]})
    assert [(d.id, d.webhook_endpoint.url) for d in listed.data] == [(destination.id, thin.url)]  # type: ignore[union-attr]
    assert listed.data[0].webhook_endpoint.signing_secret is None  # type: ignore[union-attr]

    accepted = send(client, "cus_nope", "bad-customer", 3)  # 200: validated later
    assert accepted.identifier == "bad-customer"
    send(client, customer, "bad-value", "three")
    send(client, customer, "ghost-1", 1, event_name="no_such_meter")
    send(client, customer, "good-1", 2)
    assert thin.deliveries == []
    assert usage(client, meter.id, customer) == 2

    answer = control(base_url, "meter_error_reports/deliver")
    assert [(e["type"], e["error_count"]) for e in answer["events"]] == [
        ("v1.billing.meter.error_report_triggered", 2),
        ("v1.billing.meter.no_meter_found", 1),
    ]
    assert [d["status_code"] for d in answer["deliveries"]] == [200, 200]
    notifications = [
        client.parse_event_notification(body, sig, secret) for body, sig in thin.deliveries
    ]
    report, no_meter = notifications
    assert isinstance(report, V1BillingMeterErrorReportTriggeredEventNotification)
    assert (report.type, report.object, report.livemode) == (
        "v1.billing.meter.error_report_triggered",
        "v2.core.event",
        False,
    )
    assert (report.related_object.id, report.related_object.type, report.related_object.url) == (
        meter.id,
        "billing.meter",
        f"/v1/billing/meters/{meter.id}",
    )
    assert report.fetch_related_object().id == meter.id
    raw = json.loads(thin.deliveries[0][0])
    assert "data" not in raw and raw["id"].startswith("evt_")
    assert datetime.fromisoformat(raw["created"]).tzinfo is not None

    full = client.v2.core.events.retrieve(report.id)
    assert isinstance(full, V1BillingMeterErrorReportTriggeredEvent)
    assert full.data.reason.error_count == 2
    assert full.data.developer_message_summary == "There are 2 invalid events"
    samples = {
        t.code: [s.request.identifier for s in t.sample_errors]
        for t in full.data.reason.error_types
    }
    assert samples == {
        "meter_event_customer_not_found": ["bad-customer"],
        "meter_event_invalid_value": ["bad-value"],
    }
    assert full.data.validation_start < full.data.validation_end
    assert report.fetch_event().id == report.id

    missing = client.v2.core.events.retrieve(no_meter.id)
    assert isinstance(missing, V1BillingMeterNoMeterFoundEvent)
    only = missing.data.reason.error_types[0]
    assert (only.code, only.sample_errors[0].request.identifier) == ("no_meter", "ghost-1")

    assert control(base_url, "meter_error_reports/deliver")["events"] == []  # nothing pending
    with pytest.raises(stripe.SignatureVerificationError):
        client.parse_event_notification(thin.deliveries[0][0], thin.deliveries[0][1], "whsec_other")

    send(client, customer, "bad-customer", 3)  # corrected and resent under its identifier
    assert usage(client, meter.id, customer) == 5


def test_an_archived_meter_reports_its_events(
    client: stripe.StripeClient,
    base_url: str,
    meter: stripe.billing.Meter,
    customer: str,
    thin: Receiver,
) -> None:
    secret = thin_destination(client, thin.url).webhook_endpoint.signing_secret  # type: ignore[union-attr]
    archived = client.v1.billing.meters.deactivate(meter.id)
    assert archived.status == "inactive"
    send(client, customer, "late-1", 4)
    control(base_url, "meter_error_reports/deliver")
    ((body, sig),) = thin.deliveries
    notification = client.parse_event_notification(body, sig, secret)
    event = client.v2.core.events.retrieve(notification.id)
    assert isinstance(event, V1BillingMeterErrorReportTriggeredEvent)
    assert [t.code for t in event.data.reason.error_types] == ["archived_meter"]
    assert event.related_object.id == meter.id
    listed = client.v2.core.events.list(params={"object_id": meter.id})
    assert [e.id for e in listed.data] == [notification.id]


def test_a_destination_gets_only_what_it_enabled(
    client: stripe.StripeClient, base_url: str, customer: str, thin: Receiver
) -> None:
    plain = client.v2.core.event_destinations.create(
        params={
            "name": "no meters",
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": ["v1.billing.meter.no_meter_found"],
            "webhook_endpoint": {"url": thin.url},
        }
    )
    assert plain.webhook_endpoint is not None and plain.webhook_endpoint.signing_secret is None
    send(client, "cus_nope", "bad-1", 1)
    assert control(base_url, "meter_error_reports/deliver")["deliveries"] == []
    client.v2.core.event_destinations.disable(plain.id)
    send(client, customer, "ghost-1", 1, event_name="nothing")
    assert control(base_url, "meter_error_reports/deliver")["deliveries"] == []
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v2.core.event_destinations.create(
            params={  # type: ignore[typeddict-unknown-key]
                "name": "x",
                "type": "webhook_endpoint",
                "event_payload": "thin",
                "enabled_events": REPORTS,
                "webhook_endpoint": {"url": thin.url},
                "colour": "blue",
            }
        )
    assert unknown.value.http_status == 400 and "colour" in str(unknown.value.user_message)


# ---------------------------------------------------------------- the v2 meter event stream


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stream_event(customer: str, identifier: str, value: int, at: int | None = None) -> StreamEvent:
    return {
        "event_name": EVENT_NAME,
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": str(value)},
        "timestamp": iso(at or int(time.time())),
    }


def test_stream_takes_up_to_100_events_with_a_session_token(
    client: stripe.StripeClient,
    base_url: str,
    meter: stripe.billing.Meter,
    customer: str,
    thin: Receiver,
) -> None:
    secret = thin_destination(client, thin.url).webhook_endpoint.signing_secret  # type: ignore[union-attr]
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    created = datetime.fromisoformat(session.created)
    assert (datetime.fromisoformat(session.expires_at) - created).total_seconds() == 15 * 60
    stream = stripe_client(session.authentication_token, base_url)
    auth = {"Authorization": f"Bearer {session.authentication_token}"}
    raw = httpx.post(
        f"{base_url}/v2/billing/meter_event_stream",
        headers=auth,
        json={"events": [stream_event(customer, "raw-0", 0)]},
    )
    assert (raw.status_code, raw.json()) == (200, {})

    send(client, customer, "v1-1", 1)
    stream.v2.billing.meter_event_stream.create(
        params={
            "events": [stream_event(customer, f"s-{n}", 2) for n in range(99)]
            + [stream_event(customer, "v1-1", 500)]  # v1's identifier: ignored
        }
    )
    assert usage(client, meter.id, customer) == 1 + 99 * 2

    with pytest.raises(stripe.InvalidRequestError) as too_many:
        stream.v2.billing.meter_event_stream.create(
            params={"events": [stream_event(customer, f"t-{n}", 1) for n in range(101)]}
        )
    assert (too_many.value.http_status, too_many.value.code) == (400, "invalid_fields")
    with pytest.raises(stripe.InvalidRequestError) as bad_time:
        stream.v2.billing.meter_event_stream.create(
            params={"events": [{**stream_event(customer, "t-x", 1), "timestamp": "yesterday"}]}
        )
    assert bad_time.value.http_status == 400
    assert usage(client, meter.id, customer) == 199  # a refused request takes none of its events

    old = int(time.time()) - 36 * 86400
    stream.v2.billing.meter_event_stream.create(
        params={
            "events": [
                stream_event("cus_nope", "u-1", 1),
                stream_event(customer, "u-2", 1, at=old),
                stream_event(customer, "u-3", 3),
            ]
        }
    )
    assert usage(client, meter.id, customer) == 202
    control(base_url, "meter_error_reports/deliver")
    ((body, sig),) = thin.deliveries
    report = client.v2.core.events.retrieve(client.parse_event_notification(body, sig, secret).id)
    assert isinstance(report, V1BillingMeterErrorReportTriggeredEvent)
    assert {
        t.code: t.sample_errors[0].request.identifier for t in report.data.reason.error_types
    } == {
        "meter_event_customer_not_found": "u-1",
        "timestamp_too_far_in_past": "u-2",
    }

    control(base_url, "clock/advance", {"seconds": 15 * 60})
    with pytest.raises(stripe.TemporarySessionExpiredError) as expired:
        stream.v2.billing.meter_event_stream.create(
            params={"events": [stream_event(customer, "v-1", 1)]}
        )
    assert expired.value.http_status == 401
    body = httpx.post(f"{base_url}/v2/billing/meter_event_stream", headers=auth, json={}).json()
    assert (body["error"]["type"], body["error"]["code"]) == (
        "temporary_session_expired",
        "billing_meter_event_session_expired",
    )
    fresh = stripe_client(
        client.v2.billing.meter_event_session.create().authentication_token, base_url
    )
    fresh.v2.billing.meter_event_stream.create(
        params={"events": [stream_event(customer, "v-1", 1)]}
    )

    for token in ("mets_test_unknown", "sk_test_x"):
        with pytest.raises(stripe.AuthenticationError) as refused:
            stripe_client(token, base_url).v2.billing.meter_event_stream.create(
                params={"events": [stream_event(customer, "w-1", 1)]}
            )
        assert refused.value.http_status == 401
