"""report-usage (service role only): POST records one finished call's minutes, or with
{"action": "flush"} delivers due meter events; GET ?org_id= reads the current cycle."""

from __future__ import annotations

import flask

from shared import meter_flush, usage
from shared.auth import require_service
from shared.db import get_database
from shared.errors import Unprocessable
from shared.http import endpoint, json_response, read_json, validate
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client

settings = get_settings().require("STRIPE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY")
settings.require_database()
# Made once at start, before any request thread exists: one pool, one Stripe client, one meter
# event session and one flushing thread per process.
database = get_database(settings)
stream = meter_flush.MeterStream(make_stripe_client(settings), settings)
flusher = meter_flush.BackgroundFlusher(
    lambda: meter_flush.flush(database, stream, limit=usage.MAX_FLUSH_LIMIT),
    settings.METER_FLUSH_DELAY_SECONDS,
)


@endpoint(methods=("GET", "POST"))
def report_usage(request: flask.Request) -> flask.Response:
    require_service(request, settings)
    if request.method == "GET":
        query = validate(usage.CycleQuery, request.args.to_dict())
        return json_response(usage.current_cycle(database, query.org_id))
    body = read_json(request)
    if not isinstance(body, dict):
        raise Unprocessable("The body must be a JSON object.", field="body")
    if "action" in body:
        command = validate(usage.FlushCommand, body)
        flushed = meter_flush.flush(database, stream, limit=command.limit)
        return json_response(flushed.as_dict())
    result = usage.record_usage(database, validate(usage.UsageReport, body))
    if result["meter_status"] == "pending" and not result["duplicate"]:
        flusher.queued()
    return json_response(result, usage.response_status(result))
