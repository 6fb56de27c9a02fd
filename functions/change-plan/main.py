"""POST change-plan: an owner or admin changes the organisation's plan (DESIGN.md); OPTIONS: CORS.

Body `{"plan_id", "billing_period", "organisation_id"?}` or `{"cancel_pending": true,
"organisation_id"?}` -> `200 {"subscription_id", "plan_id", "billing_period", "effective",
"effective_at"}`.
"""

from __future__ import annotations

import flask

from shared import meter_flush, plan_change
from shared.auth import require_user
from shared.cors import browser_endpoint, browser_settings
from shared.db import get_database
from shared.http import json_response, parse_body
from shared.stripe_api import make_stripe_client

# Checked at start: a missing secret stops the function here, naming the variable.
settings = browser_settings()
stripe_client = make_stripe_client(settings)
meter_stream = meter_flush.MeterStream(stripe_client, settings)


@browser_endpoint(settings)
def change_plan(request: flask.Request) -> flask.Response:
    caller = require_user(request, settings)
    order = parse_body(request, plan_change.PlanChangeRequest)
    result = plan_change.change_plan(
        caller,
        order,
        database=get_database(settings),
        stripe_client=stripe_client,
        meter_stream=meter_stream,
    )
    return json_response(result)
