"""Meter event errors found after the event was accepted, and the error reports that tell them.

Stripe accepts a meter event, validates it asynchronously and reports the invalid ones in an
error report: a thin event per meter and validation window, `v1.billing.meter.error_report_
triggered` (related object: the meter), or `v1.billing.meter.no_meter_found` for events whose
`event_name` has no meter (no related object: `{}`, as in Stripe's example). The full event
(`GET /v2/core/events/{id}`) carries in `data` the error count, the errors by code, a few
samples of each (the event's identifier and a message) and the validation window:

    {"developer_message_summary": "There are 2 invalid events",
     "reason": {"error_count": 2, "error_types": [{"code": "meter_event_customer_not_found",
                "error_count": 2, "sample_errors": [{"error_message": "...",
                "request": {"identifier": "call-1"}}, ...]}]},
     "validation_start": "2026-11-20T10:00:00.000Z", "validation_end": "...10.000Z"}

Stripe sends a report some seconds after the window; the stand-in keeps the errors pending
until `POST /_standin/meter_error_reports/deliver`, which reports everything pending at once:
one event per meter (and one for the events without a meter), its window from the first error's
10-second window to the end of the last one's. Codes: `no_meter`, `archived_meter`,
`meter_event_no_customer_defined`, `meter_event_customer_not_found`,
`meter_event_value_not_found`, `meter_event_invalid_value`, `timestamp_too_far_in_past`,
`timestamp_in_future` (the last two from the v2 stream only: v1 refuses them with a 400).
"""

from __future__ import annotations

from .event_destinations import emit_thin
from .state import Call, Json, State, control, iso

SAMPLES_PER_TYPE = 5  # Stripe sends "sample errors", not every one; how many is not documented
WINDOW = 10  # seconds; Stripe's examples show 10-second validation windows


def record_error(
    st: State, meter_id: str | None, code: str, message: str, identifier: str, received: int
) -> None:
    """An accepted event found invalid: reported by the next error report."""
    error = {"meter": meter_id, "code": code, "message": message}
    st.meter_errors["pending"].append(error | {"identifier": identifier, "received": received})


def deliver_error_reports(call: Call) -> Json:
    """`POST /_standin/meter_error_reports/deliver`: report every pending error now.

    Answers `{"events": [{"id", "type", "meter", "error_count"}]}` and the deliveries to the
    thin event destinations (an empty list of events when nothing was pending).
    """
    st = call.state
    pending: list[Json] = st.meter_errors["pending"]
    st.meter_errors["pending"] = []
    by_meter: dict[str | None, list[Json]] = {}
    for error in pending:
        by_meter.setdefault(error["meter"], []).append(error)
    reported = []
    for meter_id, errors in by_meter.items():
        if meter_id is None:
            event_type, related = "v1.billing.meter.no_meter_found", {}
        else:
            event_type = "v1.billing.meter.error_report_triggered"
            related = {
                "id": meter_id,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{meter_id}",
            }
        event = emit_thin(call, event_type, report_data(errors), related)
        for error in errors:
            st.meter_errors["reported"].append(error | {"event": event["id"]})
        summary = {"id": event["id"], "type": event_type, "meter": meter_id}
        reported.append(summary | {"error_count": len(errors)})
    return {"events": reported, "deliveries": []}  # the app sets the deliveries it made


def report_data(errors: list[Json]) -> Json:
    by_code: dict[str, list[Json]] = {}
    for error in errors:
        by_code.setdefault(error["code"], []).append(error)
    error_types = [
        {
            "code": code,
            "error_count": len(same),
            "sample_errors": [
                {"error_message": e["message"], "request": {"identifier": e["identifier"]}}
                for e in same[:SAMPLES_PER_TYPE]
            ],
        }
        for code, same in by_code.items()
    ]
    received = [int(e["received"]) for e in errors]
    count = len(errors)
    summary = "There is 1 invalid event" if count == 1 else f"There are {count} invalid events"
    return {
        "developer_message_summary": summary,
        "reason": {"error_count": count, "error_types": error_types},
        "validation_end": iso((max(received) // WINDOW + 1) * WINDOW),
        "validation_start": iso(min(received) // WINDOW * WINDOW),
    }


ROUTES = [control("POST", "/_standin/meter_error_reports/deliver", deliver_error_reports)]
