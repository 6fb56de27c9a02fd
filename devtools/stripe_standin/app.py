"""The stand-in's WSGI app: routing, dispatch, authentication, idempotency.

Each resource module declares its routes (`ROUTES`, with each endpoint's allowed parameters);
this module joins them into one map and serves them: v1 routes in Stripe's form-encoded wire
format, v2 routes (`/v2/...`) with JSON bodies and v2's error shape, control routes in JSON.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from . import (
    catalog,
    checkout,
    customers,
    event_destinations,
    hosted_pages,
    invoices,
    meter_errors,
    meter_events,
    meter_stream,
    meter_summaries,
    plan_changes,
    portal,
    renewals,
    schedules,
    subscriptions,
    webhooks,
)
from .params import as_int, check_known, decode_form, json_keys
from .state import API_VERSION, Call, Endpoint, Json, State, StripeError, control, new_id

log = logging.getLogger("stripe_standin")


def dump_state(call: Call) -> Json:
    return call.state.dump()


def advance_clock(call: Call) -> Json:
    """`{"seconds": n}`: the stand-in's clock for meter events moves n seconds ahead (State.now):
    events received before are n seconds older (24 hours to cancel one), sessions nearer their
    expiry, and new events' default timestamp and allowed window move along."""
    seconds = as_int(call.params, "seconds", required=True) or 0
    if seconds < 0:
        raise StripeError(400, "The clock only moves forward: seconds must be positive.")
    call.state.clock["offset"] += seconds
    return {"offset": call.state.clock["offset"], "now": call.state.now()}


ROUTES = Map(
    [
        *customers.ROUTES,
        *catalog.ROUTES,
        *checkout.ROUTES,
        *subscriptions.ROUTES,
        *plan_changes.ROUTES,
        *schedules.ROUTES,
        *invoices.ROUTES,
        *meter_events.ROUTES,
        *meter_errors.ROUTES,
        *meter_stream.ROUTES,
        *meter_summaries.ROUTES,
        *portal.ROUTES,
        *hosted_pages.ROUTES,
        *webhooks.ROUTES,
        *event_destinations.ROUTES,
        *renewals.ROUTES,
        control("GET", "/_standin/state", dump_state),
        control("POST", "/_standin/clock/advance", advance_clock),
    ]
)


EXPANDABLE = {
    "customer": "customer",
    "latest_invoice": "invoice",
    "subscription": "subscription",
    "invoice": "invoice",
    "product": "product",
    "schedule": "subscription_schedule",
}


def expand(st: State, obj: Json, paths: Any) -> Json:
    """Replace expandable ids by their objects (prices are always embedded in items, as Stripe)."""
    obj = copy.deepcopy(obj)
    for path in paths if isinstance(paths, list) else []:
        targets, name = [obj], path
        if obj.get("object") == "list" and path.startswith("data."):
            targets, name = obj["data"], path[len("data.") :]
        for target in targets:
            kind, value = EXPANDABLE.get(name), target.get(name)
            if kind and isinstance(value, str) and value in st.store[kind]:
                target[name] = copy.deepcopy(st.store[kind][value])
    return obj


class StripeStandin:
    """The WSGI app; `state` is public for helpers such as `seed_prices`."""

    def __init__(
        self, webhook_url: str | None, webhook_secret: str, *, async_meter_validation: bool = True
    ) -> None:
        self.webhook_url, self.webhook_secret = webhook_url, webhook_secret
        self.state = State(
            has_webhook=bool(webhook_url), async_meter_validation=async_meter_validation
        )

    def __call__(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except StripeError as error:
            v2 = request.path.startswith("/v2/")
            response = json_response(error.v2_body() if v2 else error.body(), error.status)
        except Exception:  # a bug here: answer like Stripe's own 500s, and keep the traceback
            log.exception("stand-in failed on %s %s", request.method, request.path)
            failure = StripeError(500, "The stand-in failed; see its log.", type="api_error")
            response = json_response(failure.body(), 500)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        try:
            endpoint, args = ROUTES.bind_to_environ(request.environ).match()
        except HTTPException:
            message = f"Unrecognized request URL ({request.method}: {request.path})."
            raise StripeError(404, message) from None
        call = Call(self.state, {}, request.host_url.rstrip("/"))
        self.state.public_url = self.state.public_url or call.base_url
        if endpoint.kind == "api":
            return self.serve_api(request, endpoint, args, call)
        if endpoint.kind in ("v2", "v2_session"):
            return self.serve_v2(request, endpoint, args, call)
        if endpoint.kind == "page":
            return self.serve_page(request, endpoint, args, call)
        try:
            call.params = json.loads(request.get_data(as_text=True) or "{}")
        except json.JSONDecodeError:
            raise StripeError(400, "The body is not JSON.") from None
        if not isinstance(call.params, dict):
            raise StripeError(400, "The body must be a JSON object.")
        with self.state.lock:
            answer = endpoint.handler(call, **args)
        if call.events or call.thin:
            answer["deliveries"] = self.deliver(call.events, call.thin)
        return json_response(answer, 200)

    def serve_page(
        self, request: Request, endpoint: Endpoint, args: Mapping[str, Any], call: Call
    ) -> Response:
        """A hosted page (hosted_pages.py): HTML, or a redirect after a form; the events a form
        causes are delivered before the browser moves on, as control routes do."""
        call.params = {**request.args.to_dict(), **request.form.to_dict()}
        with self.state.lock:
            answer = endpoint.handler(call, **args)
        if call.events or call.thin:
            self.deliver(call.events, call.thin)
        if isinstance(answer, Response):
            return answer
        return Response(answer, mimetype="text/html")

    def serve_api(
        self, request: Request, endpoint: Endpoint, args: Mapping[str, Any], call: Call
    ) -> Response:
        authenticate(request)
        raw = request.get_data(as_text=True) if request.method == "POST" else ""
        pairs = parse_qsl(raw or request.query_string.decode(), keep_blank_values=True)
        call.params = decode_form(pairs)
        call.request_id = new_id("req")
        call.idempotency_key = request.headers.get("Idempotency-Key") if raw else None
        headers = {
            "Request-Id": call.request_id,
            "Stripe-Version": request.headers.get("Stripe-Version", API_VERSION),
        }
        fingerprint = json.dumps([request.method, request.path, sorted(pairs)])
        with self.state.lock:
            key = call.idempotency_key
            if key and key in self.state.idempotency:
                return replay(self.state.idempotency[key], fingerprint, key)
            check_known((k for k, _ in pairs), endpoint.allowed)
            obj = endpoint.handler(call, **args)
            body = json.dumps(expand(self.state, obj, call.params.get("expand")))
            if key:  # only requests that executed are kept (as Stripe does)
                entry = {"fingerprint": fingerprint, "body": body, "headers": headers}
                self.state.idempotency[key] = entry
        response = Response(body, 200, headers, mimetype="application/json")
        self.deliver_after(response, call)
        return response

    def serve_v2(
        self, request: Request, endpoint: Endpoint, args: Mapping[str, Any], call: Call
    ) -> Response:
        """API v2: a JSON body (POST) or a query string (GET), a secret key or, for the meter
        event stream, a session's token; idempotency as in v1."""
        if endpoint.kind == "v2_session":
            call.token = bearer(request)
            with self.state.lock:
                meter_stream.check_session(self.state, call.token)
        else:
            authenticate(request)
        raw = request.get_data(as_text=True) if request.method == "POST" else ""
        query = request.query_string.decode()
        if raw:
            try:
                call.params = json.loads(raw)
            except json.JSONDecodeError:
                raise StripeError(400, "The request body is not valid JSON.") from None
            if not isinstance(call.params, dict):
                raise StripeError(400, "The request body must be a JSON object.")
            keys = json_keys(call.params)
        else:
            pairs = parse_qsl(query, keep_blank_values=True)
            call.params, keys = decode_form(pairs), [k for k, _ in pairs]
        call.request_id = new_id("req")
        call.idempotency_key = request.headers.get("Idempotency-Key") if raw else None
        headers = {
            "Request-Id": call.request_id,
            "Stripe-Version": request.headers.get("Stripe-Version", API_VERSION),
        }
        fingerprint = json.dumps([request.method, request.path, raw or query])
        with self.state.lock:
            key = call.idempotency_key
            if key and key in self.state.idempotency:
                return replay(self.state.idempotency[key], fingerprint, key)
            check_known(keys, endpoint.allowed)
            body = json.dumps(endpoint.handler(call, **args))
            if key:
                entry = {"fingerprint": fingerprint, "body": body, "headers": headers}
                self.state.idempotency[key] = entry
        response = Response(body, 200, headers, mimetype="application/json")
        self.deliver_after(response, call)
        return response

    def deliver_after(self, response: Response, call: Call) -> None:
        """Deliver what a call emitted once the caller has its answer."""
        events, thin = call.events, call.thin
        if events or thin:
            response.call_on_close(lambda: self.deliver(events, thin))

    def deliver(self, events: list[Json], thin: list[Json] | None = None) -> list[Json]:
        """v1 events to the webhook URL, then thin events to their event destinations."""
        results = webhooks.deliver(self.state, self.webhook_url, self.webhook_secret, events)
        return results + event_destinations.deliver_thin(self.state, thin or [])

    def report_meter_errors(self) -> Json:
        """Deliver the pending meter error reports now (what the control route does)."""
        call = Call(self.state, {})
        with self.state.lock:
            answer = meter_errors.deliver_error_reports(call)
        answer["deliveries"] = self.deliver(call.events, call.thin)
        return answer


def authenticate(request: Request) -> None:
    """Any `sk_test_` key, as Bearer (stripe-python) or Basic (`curl -u sk_test_...:`)."""
    auth = request.authorization
    key = auth and (auth.token if auth.type == "bearer" else auth.username)
    if not key:
        message = (
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
        )
        raise StripeError(401, message)
    if not key.startswith("sk_test_"):
        raise StripeError(401, f"Invalid API Key provided: {key[:8]}{'*' * 8}")


def bearer(request: Request) -> str:
    """The meter event stream's credential: a session's token as Bearer."""
    auth = request.authorization
    if not auth or auth.type != "bearer" or not auth.token:
        message = (
            "You did not provide a meter event session token. Create a session with "
            "POST /v2/billing/meter_event_session and send its authentication_token as Bearer."
        )
        raise StripeError(401, message)
    return str(auth.token)


def replay(stored: Json, fingerprint: str, key: str) -> Response:
    if stored["fingerprint"] != fingerprint:
        message = (
            "Keys for idempotent requests can only be used with the same parameters they were "
            f"first used with. Try using a key other than '{key}' if you meant to execute a "
            "different request."
        )
        raise StripeError(400, message, code="idempotency_error", type="idempotency_error")
    headers = {**stored["headers"], "Idempotent-Replayed": "true"}
    return Response(stored["body"], 200, headers, mimetype="application/json")


def json_response(body: Json, status: int, headers: Json | None = None) -> Response:
    return Response(json.dumps(body), status, headers, mimetype="application/json")
