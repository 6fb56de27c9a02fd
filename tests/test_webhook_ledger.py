"""The webhook's front door and ledger: signatures, bad bodies, duplicates, concurrent deliveries,
failures Stripe retries, events that are not ours, and the repair commands."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from ops import repair
from shared.settings import get_settings
from tests.conftest import WEBHOOK_SECRET, acting_as, function_client, stripe_fixture
from tests.test_webhook_support import (
    Buyer,
    audit_rows,
    checkout_session_object,
    deliver,
    deliver_together,
    event_object,
    event_row,
    invoice_object,
    month,
    new_id,
    subscribed,
    subscription_row,
)

# The fixtures `webhook`, `stripe_api` and `buyer`.
pytest_plugins = ("tests.test_webhook_support",)


def post(client: Any, body: str | bytes, signature: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return client.post("/", data=body, headers=headers)


def hand_signed(body: str, secret: str, timestamp: int) -> str:
    """Stripe's scheme written out: t=<ts>,v1=<hmac_sha256(secret, f"{ts}.{body}")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def unhandled_event() -> dict[str, Any]:
    return event_object("plan.created", stripe_fixture("event")["data"]["object"])


# --- the front door ---------------------------------------------------------------------------


def test_a_hand_made_stripe_signature_is_accepted(db, webhook):
    event = unhandled_event()
    body = json.dumps(event)

    response = post(webhook, body, hand_signed(body, WEBHOOK_SECRET, int(time.time())))

    assert response.status_code == 200
    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "ignored"}


def test_every_secret_of_a_roll_is_accepted(db, function_env, monkeypatch):
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_new_secret_one, whsec_old_secret_two")
    get_settings.cache_clear()
    client = function_client("stripe-webhook-handler", "stripe_webhook_handler")

    for secret in ("whsec_new_secret_one", "whsec_old_secret_two"):
        response = deliver(client, unhandled_event(), secret=secret)
        assert response.status_code == 200, secret
    assert deliver(client, unhandled_event(), secret=WEBHOOK_SECRET).status_code == 400


def bad_signatures(body: str) -> dict[str, str | None]:
    now = int(time.time())
    return {
        "missing": None,
        "empty": "",
        "garbage": "not-a-signature",
        "other secret": hand_signed(body, "whsec_someone_else", now),
        "other body": hand_signed(body + " ", WEBHOOK_SECRET, now),
        "no v1": f"t={now},v0=abc",
        "replayed, 301 s old": hand_signed(body, WEBHOOK_SECRET, now - 301),
        "replayed, a day old": hand_signed(body, WEBHOOK_SECRET, now - 86_400),
    }


@pytest.mark.parametrize("case", list(bad_signatures("{}")))
def test_a_bad_missing_or_stale_signature_is_400_and_nothing_is_stored(db, webhook, case):
    event = unhandled_event()
    body = json.dumps(event)

    response = post(webhook, body, bad_signatures(body)[case])

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_signature"
    assert event_row(db, event["id"]) is None


def test_only_post_is_allowed(webhook):
    response = webhook.get("/")

    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "body, code",
    [
        ('{"id": "evt_1", "type": ', "invalid_json"),
        ("\u00ff not json", "invalid_json"),
        ("[1, 2, 3]", "invalid_event"),
        ('{"id": "evt_123", "type": "invoice.paid"}', "invalid_event"),
        ('{"id": "cus_123", "type": "x", "created": 1, "data": {"object": {}}}', "invalid_event"),
        ('{"id": "evt_123", "type": "x", "created": "1", "data": {"object": {}}}', "invalid_event"),
        ('{"id": "evt_123", "type": "x", "created": 1, "data": {"object": []}}', "invalid_event"),
    ],
)
def test_a_signed_body_that_is_not_an_event_is_400(db, webhook, body, code):
    response = post(webhook, body, hand_signed(body, WEBHOOK_SECRET, int(time.time())))

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == code
    assert event_row(db, "evt_123") is None


def test_a_body_that_is_not_utf8_is_refused_as_unsigned(webhook):
    body = b'{"id": "evt_\xff"}'
    response = post(webhook, body, hand_signed("x", WEBHOOK_SECRET, int(time.time())))

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_signature"


def test_a_1_mb_body_is_413_before_anything_is_parsed_or_stored(db, webhook):
    event = unhandled_event()
    event["data"]["object"]["metadata"] = {"padding": "x" * 1_000_000}
    body = json.dumps(event)

    response = post(webhook, body, hand_signed(body, WEBHOOK_SECRET, int(time.time())))

    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    assert event_row(db, event["id"]) is None


def test_the_function_does_not_start_without_its_webhook_secret(function_env, monkeypatch):
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET")
    get_settings.cache_clear()

    with pytest.raises(Exception, match="STRIPE_WEBHOOK_SECRET"):
        function_client("stripe-webhook-handler", "stripe_webhook_handler")


# --- the ledger -------------------------------------------------------------------------------


def test_an_unhandled_type_is_recorded_ignored_and_its_repeat_is_a_duplicate(db, webhook):
    event = unhandled_event()

    first = deliver(webhook, event)
    again = deliver(webhook, event)

    assert first.get_json()["status"] == "ignored"
    assert again.get_json() == {"received": True, "event_id": event["id"], "status": "duplicate"}
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored" and stored["type"] == "plan.created"


def test_a_repeated_event_is_a_no_op(db, webhook, stripe_api, buyer):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    deliver(webhook, event)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(status="past_due")

    response = deliver(webhook, event)

    assert response.get_json()["status"] == "duplicate"
    assert len(stripe_api.retrieves) == 1  # the duplicate did not even ask Stripe
    assert subscription_row(db, buyer.sub_id)["status"] == "active"
    assert event_row(db, event["id"])["attempts"] == 1


def test_the_same_event_delivered_concurrently_has_one_effect(db, webhook, stripe_api, buyer):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    stripe_api.delay_seconds = 0.3  # keep the first delivery busy while the others arrive
    event = buyer.checkout_event()
    answers = deliver_together(webhook, [json.dumps(event)] * 8)

    processed = [
        body for status, body in answers if status == 200 and body["status"] == "processed"
    ]
    assert len(processed) == 1
    for status, body in answers:
        assert (status, body.get("status") or body["error"]["code"]) in {
            (200, "processed"),
            (200, "duplicate"),
            (503, "event_in_progress"),
        }
    assert any(status == 503 for status, _ in answers)  # someone arrived while it was in progress
    assert len(stripe_api.retrieves) == 1
    assert len(audit_rows(db, buyer.org["id"])) == 1
    assert (
        db.execute(
            "select count(*) as n from billing_cycles c join subscriptions s on s.id = c.subscription_id"
            " where s.stripe_subscription_id = %s",
            (buyer.sub_id,),
        ).fetchone()["n"]
        == 1
    )
    assert event_row(db, event["id"])["attempts"] == 1
    # Stripe retries the 503s later: they are duplicates then.
    assert deliver(webhook, event).get_json()["status"] == "duplicate"


def test_different_events_racing_for_a_new_subscription_make_one_row(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    stripe_api.delay_seconds = 0.1
    events = [buyer.checkout_event(), buyer.checkout_event()] + [
        buyer.subscription_event(kind)
        for kind in ("customer.subscription.created", "customer.subscription.updated") * 2
    ]
    answers = deliver_together(webhook, events)

    assert [status for status, _ in answers] == [200] * len(events), answers
    assert (
        db.execute(
            "select count(*) as n from subscriptions where stripe_subscription_id = %s",
            (buyer.sub_id,),
        ).fetchone()["n"]
        == 1
    )
    assert [row["action"] for row in audit_rows(db, buyer.org["id"])] == ["subscription.created"]


def test_a_claim_abandoned_by_a_dead_process_is_taken_again_after_the_lease(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    db.execute(
        "insert into stripe_events (id, type, created, payload, status, attempts, claimed_at)"
        " values (%s, %s, now(), %s, 'processing', 1, now())",
        (event["id"], event["type"], json.dumps(event)),
    )

    fresh = deliver(webhook, event)
    assert fresh.status_code == 503
    assert fresh.get_json()["error"]["code"] == "event_in_progress"
    assert subscription_row(db, buyer.sub_id) is None

    db.execute(
        "update stripe_events set claimed_at = now() - interval '3 minutes' where id = %s",
        (event["id"],),
    )
    assert deliver(webhook, event).get_json()["status"] == "processed"
    stored = event_row(db, event["id"])
    assert stored["status"] == "processed" and stored["attempts"] == 2
    assert subscription_row(db, buyer.sub_id)["status"] == "active"


def test_stripe_failing_during_the_fetch_is_503_stored_and_the_retry_succeeds(
    db, webhook, stripe_api, buyer
):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    stripe_api.fail_retrieves = 1
    event = buyer.checkout_event()

    failed = deliver(webhook, event)

    assert failed.status_code == 503
    assert failed.get_json()["error"]["code"] == "stripe_unavailable"
    stored = event_row(db, event["id"])
    assert stored["status"] == "failed" and stored["attempts"] == 1
    assert "APIError (500" in stored["error"]
    assert subscription_row(db, buyer.sub_id) is None

    retried = deliver(webhook, event)

    assert retried.status_code == 200 and retried.get_json()["status"] == "processed"
    stored = event_row(db, event["id"])
    assert stored["status"] == "processed" and stored["attempts"] == 2 and stored["error"] is None
    assert subscription_row(db, buyer.sub_id)["status"] == "active"


def test_a_price_outside_the_catalog_is_503_until_the_catalog_knows_it(
    db, webhook, stripe_api, make_org, make_plan
):
    unknown = {
        "id": None,
        "stripe_price_id": new_id("price"),
        "stripe_yearly_price_id": new_id("price"),
        "stripe_metered_price_id": new_id("price"),
    }
    buyer = Buyer(make_org(), unknown, new_id("sub"), new_id("cus"))
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()

    response = deliver(webhook, event)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "unknown_price"
    stored = event_row(db, event["id"])
    assert stored["status"] == "failed" and unknown["stripe_price_id"] in stored["error"]

    make_plan(**{key: value for key, value in unknown.items() if key != "id"})
    assert deliver(webhook, event).get_json()["status"] == "processed"
    assert subscription_row(db, buyer.sub_id)["status"] == "active"


# --- events that are not ours -----------------------------------------------------------------
# Decision: a 5xx only where a retry can succeed. An event naming an organisation we do not have,
# or a subscription with no organisation_id metadata whose customer is no organisation's, cannot
# succeed on any retry (the checkout that would link them carries the organisation itself and
# fetches the subscription anew), so it is answered 200 "ignored" and its row keeps the reason.
# Retrying it for three days would only get the endpoint disabled by Stripe.


def test_a_checkout_for_an_organisation_we_do_not_have_is_ignored_with_the_reason(
    db, webhook, stripe_api, make_plan
):
    missing_org = "00000000-0000-4000-8000-00000000abcd"
    sub_id, customer_id, plan = new_id("sub"), new_id("cus"), make_plan()
    stripe_api.subscriptions[sub_id] = Buyer(
        {"id": missing_org}, plan, sub_id, customer_id
    ).subscription()
    session = checkout_session_object(sub_id, customer_id, organisation_id=missing_org, plan=plan)
    event = event_object("checkout.session.completed", session)

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored" and missing_org in stored["error"]
    assert subscription_row(db, sub_id) is None


def test_a_subscription_of_a_customer_we_do_not_know_is_ignored(db, webhook, stripe_api, make_plan):
    sub_id = new_id("sub")
    stripe_api.subscriptions[sub_id] = Buyer(
        {"id": None}, make_plan(), sub_id, new_id("cus")
    ).subscription(organisation_id=None)
    event = event_object("customer.subscription.updated", stripe_api.subscriptions[sub_id])

    response = deliver(webhook, event)

    assert response.get_json()["status"] == "ignored"
    assert "belongs to no organisation" in event_row(db, event["id"])["error"]
    assert subscription_row(db, sub_id) is None


def test_a_subscription_without_metadata_is_found_by_its_customer(
    db, webhook, stripe_api, make_org, make_plan
):
    customer_id = new_id("cus")
    buyer = Buyer(make_org(stripe_customer_id=customer_id), make_plan(), new_id("sub"), customer_id)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(organisation_id=None)
    event = event_object("customer.subscription.created", stripe_api.subscriptions[buyer.sub_id])

    assert deliver(webhook, event).get_json()["status"] == "processed"
    assert subscription_row(db, buyer.sub_id)["organisation_id"] == buyer.org["id"]


@pytest.mark.parametrize(
    "kind", ["payment-mode checkout", "checkout without organisation", "invoice"]
)
def test_events_with_nothing_of_ours_in_them_are_ignored(db, webhook, stripe_api, kind):
    if kind == "payment-mode checkout":
        obj = checkout_session_object(None, new_id("cus"), organisation_id=None)
        event = event_object("checkout.session.completed", obj)
    elif kind == "checkout without organisation":
        obj = checkout_session_object(new_id("sub"), new_id("cus"), organisation_id=None)
        event = event_object("checkout.session.completed", obj)
    else:
        obj = invoice_object(
            new_id("in"), None, new_id("cus"), billed=month(0), created=month(1)[0]
        )
        event = event_object("invoice.paid", obj)

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored" and stored["error"]
    assert stripe_api.retrieves == []


# --- repair commands --------------------------------------------------------------------------


def test_repair_failed_events_processes_them_once(db, webhook, stripe_api, buyer, capsys):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    stripe_api.fail_retrieves = 1
    event = buyer.checkout_event()
    assert deliver(webhook, event).status_code == 503

    assert repair.main(["failed-events", "--dry-run"]) == 0
    assert f"would process {event['id']}" in capsys.readouterr().out
    assert event_row(db, event["id"])["status"] == "failed"

    repair.main(["failed-events"])  # other tests' failed events may still fail: not ours to judge
    assert f"processed {event['id']}" in capsys.readouterr().out
    assert event_row(db, event["id"])["status"] == "processed"
    assert subscription_row(db, buyer.sub_id)["status"] == "active"

    repair.main(["failed-events"])
    assert event["id"] not in capsys.readouterr().out
    assert deliver(webhook, event).get_json()["status"] == "duplicate"


def test_repair_reports_an_event_that_still_fails(db, webhook, stripe_api, buyer, capsys):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    stripe_api.fail_retrieves = 2
    event = buyer.checkout_event()
    deliver(webhook, event)

    assert repair.main(["failed-events"]) == 1

    assert f"failed {event['id']}" in capsys.readouterr().out
    stored = event_row(db, event["id"])
    assert stored["status"] == "failed" and stored["attempts"] == 2


def test_repair_resync_applies_what_stripe_has_now(db, webhook, stripe_api, buyer, capsys):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(status="past_due", month_index=1)

    assert repair.main(["resync", "--subscription", buyer.sub_id, "--dry-run"]) == 0
    assert f"would apply {buyer.sub_id}: past_due" in capsys.readouterr().out
    assert subscription_row(db, buyer.sub_id)["status"] == "active"

    assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0
    out = capsys.readouterr().out
    assert f"synced {buyer.sub_id}: past_due" in out and "status" in out
    assert subscription_row(db, buyer.sub_id)["status"] == "past_due"
    change = audit_rows(db, buyer.org["id"])[-1]
    assert change["action"] == "subscription.status_changed" and change["actor"] == "ops-repair"

    assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert len(audit_rows(db, buyer.org["id"])) == 2


def test_repair_resync_all_takes_every_live_subscription(db, webhook, stripe_api, buyer, capsys):
    subscribed(buyer, stripe_api, webhook)
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(cancel_at_period_end=True)
    # Other tests' subscriptions are in the same database; Stripe does not know them here.
    repair.main(["resync", "--all"])

    assert f"synced {buyer.sub_id}: active (cancel_at_period_end)" in capsys.readouterr().out
    assert subscription_row(db, buyer.sub_id)["cancel_at_period_end"] is True


def test_repair_resync_refuses_something_that_is_not_a_subscription_id(function_env):
    with pytest.raises(SystemExit):
        repair.main(["resync", "--subscription", "cus_123"])


def test_a_failed_event_of_a_type_no_longer_handled_is_settled_as_ignored(db, webhook):
    event = unhandled_event()
    db.execute(
        "insert into stripe_events (id, type, created, payload, status, attempts, error)"
        " values (%s, %s, now(), %s, 'failed', 1, 'old failure')",
        (event["id"], event["type"], json.dumps(event)),
    )

    assert deliver(webhook, event).get_json()["status"] == "ignored"
    assert event_row(db, event["id"])["status"] == "ignored"
    assert deliver(webhook, event).get_json()["status"] == "duplicate"


def test_the_ledger_and_apply_run_as_supabase_service_role(db, buyer):
    """Production calls these through Supabase as service_role (no superuser powers)."""
    state = {
        "stripe_subscription_id": buyer.sub_id,
        "stripe_customer_id": buyer.customer_id,
        "status": "active",
        "organisation_id": buyer.org_id,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "items": [
            {
                "price_id": buyer.plan["stripe_price_id"],
                "usage_type": "licensed",
                "current_period_start": month(0)[0],
                "current_period_end": month(0)[1],
            },
            {
                "price_id": buyer.plan["stripe_metered_price_id"],
                "usage_type": "metered",
                "current_period_start": month(0)[0],
                "current_period_end": month(0)[1],
            },
        ],
    }
    event_id = new_id("evt")
    with acting_as(db, "service_role") as cur:
        claim = cur.execute(
            "select public.claim_stripe_event(p_id => %s, p_type => 'customer.subscription.created',"
            " p_created => 1767225600, p_payload => '{}'::jsonb, p_handled => true)",
            (event_id,),
        ).fetchone()[0]
        result = cur.execute(
            "select public.apply_subscription_state(p_state => %s::jsonb, p_state_at => now(),"
            " p_event_id => %s)",
            (json.dumps(state), event_id),
        ).fetchone()[0]
        status = cur.execute("select status from stripe_events where id = %s", (event_id,))
        assert status.fetchone()[0] == "processed"
        cycles = cur.execute(
            "select count(*) from billing_cycles where subscription_id = %s",
            (result["subscription_id"],),
        ).fetchone()[0]
    assert claim["status"] == "claimed"
    assert result["created"] is True and result["subscription_status"] == "active"
    assert cycles == 1


def test_a_repair_run_on_a_machine_with_a_fast_clock_does_not_block_later_events(
    db, webhook, stripe_api, buyer, monkeypatch, capsys
):
    """Fetches are ordered by one clock (the database's), not by each machine's own: an
    operator's laptop ten minutes fast must not make the webhook refuse ten minutes of changes."""
    subscribed(buyer, stripe_api, webhook)

    class FastClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + timedelta(minutes=10)

    with monkeypatch.context() as patched:
        patched.setattr("shared.subscriptions.datetime", FastClock)
        assert repair.main(["resync", "--subscription", buyer.sub_id]) == 0
    capsys.readouterr()
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription(
        status="canceled", canceled_at=int(time.time())
    )

    deleted = deliver(webhook, buyer.subscription_event("customer.subscription.deleted"))

    assert deleted.get_json()["status"] == "processed"
    assert subscription_row(db, buyer.sub_id)["status"] == "canceled"


# --- what is stored --------------------------------------------------------------------------


def test_the_stored_payload_keeps_no_secret_or_bearer_link(db, webhook, stripe_api, buyer):
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    checkout = buyer.checkout_event()
    session = checkout["data"]["object"]
    session.update(
        ui_mode="embedded_page",
        client_secret="cs_test_a1b2_secret_c3d4e5f6",
        url="https://checkout.stripe.com/c/pay/cs_test_a1b2#fidkdWxOYHwnPyd1blpxYHZxWjA0",
    )
    session["after_expiration"] = {
        "recovery": {
            "allow_promotion_codes": False,
            "enabled": True,
            "expires_at": 1_767_300_000,
            "url": "https://buy.stripe.com/r/live_recovery_link_abc",
        }
    }
    invoice = buyer.invoice_event("invoice.paid", billed=month(0), created=month(1)[0])
    invoice["data"]["object"].update(
        hosted_invoice_url="https://invoice.stripe.com/i/acct_1/live_YWNjdF8xLF9pbnZvaWNl",
        invoice_pdf="https://pay.stripe.com/invoice/acct_1/live_YWNjdF8xLF9pbnZvaWNl/pdf",
        confirmation_secret={"client_secret": "pi_3abc_secret_def", "type": "payment_intent"},
    )

    for event in (checkout, invoice):
        assert deliver(webhook, event).get_json()["status"] == "processed"

        stored = json.dumps(event_row(db, event["id"])["payload"])
        for secret in ("_secret_", "checkout.stripe.com", "buy.stripe.com", "invoice.stripe.com"):
            assert secret not in stored
        assert "pay.stripe.com" not in stored
    # What the handlers and an operator need is all there.
    stored = event_row(db, checkout["id"])["payload"]
    assert stored["data"]["object"]["subscription"] == buyer.sub_id
    assert stored["data"]["object"]["client_reference_id"] == buyer.org_id
    assert stored["data"]["object"]["success_url"] == session["success_url"]
