"""report-usage (service role only): POST records one finished call's minutes, or with
{"action": "flush"} delivers due meter events; GET ?org_id= reads the current cycle."""

from __future__ import annotations

import flask

from shared import usage
from shared.auth import require_service
from shared.db import get_database
from shared.errors import Unprocessable
from shared.http import endpoint, json_response, read_json, validate
from shared.outbox import Outbox
from shared.settings import get_settings

settings = get_settings().require("STRIPE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY")
settings.require_database()
# Made once at start, before any request thread exists: one pool and one outbox (its meter
# event session and flushing thread) per process.
database = get_database(settings)
outbox = Outbox(database, settings)


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
        return json_response(outbox.flush(limit=command.limit))
    result = usage.record_usage(database, validate(usage.UsageReport, body))
    if result["meter_status"] == "pending" and not result["duplicate"]:
        outbox.queued()
    return json_response(result, usage.response_status(result))
