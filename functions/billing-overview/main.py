"""GET billing-overview: everything a member's billing page shows, in one read; OPTIONS: CORS.

`?organisation_id=` (optional for a user of one organisation) -> `200 {"organisation",
"subscription", "cycle", "daily_usage", "alerts", "invoices", "plans"}` (DESIGN.md).
"""

from __future__ import annotations

import flask

from shared import overview
from shared.auth import require_user
from shared.cors import browser_endpoint, browser_settings
from shared.db import get_database
from shared.http import json_response, validate

# Checked at start: a missing secret stops the function here, naming the variable. No Stripe.
settings = browser_settings(stripe=False)


@browser_endpoint(settings, method="GET")
def billing_overview(request: flask.Request) -> flask.Response:
    caller = require_user(request, settings)
    query = validate(overview.OverviewQuery, request.args.to_dict())
    result = overview.billing_overview(caller, query, database=get_database(settings))
    return json_response(result)
