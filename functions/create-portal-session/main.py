"""POST create-portal-session: an owner or admin opens the Stripe customer portal; OPTIONS: CORS.

Body `{"organisation_id"?: uuid, "return_path"?: str}` -> `200 {"portal_url": str}`.
"""

from __future__ import annotations

import flask

from shared.auth import require_user
from shared.cors import browser_endpoint, browser_settings
from shared.db import get_database
from shared.http import json_response, parse_body
from shared.portal import PortalRequest, open_billing_portal
from shared.stripe_api import make_stripe_client

# Checked at start: a missing secret stops the function here, naming the variable.
settings = browser_settings()
stripe_client = make_stripe_client(settings)


@browser_endpoint(settings)
def create_portal_session(request: flask.Request) -> flask.Response:
    caller = require_user(request, settings)
    order = parse_body(request, PortalRequest)
    result = open_billing_portal(
        caller,
        order,
        settings=settings,
        database=get_database(settings),
        stripe_client=stripe_client,
    )
    return json_response(result)
