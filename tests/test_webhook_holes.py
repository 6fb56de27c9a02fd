"""Two holes found from outside (issue 9): signed events Postgres could not store (U+0000, lone
surrogates) answered 500 on every retry, and a Checkout Session we never opened linked whichever
organisation its buyer typed as client_reference_id."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.webhooks import storable
from tests.conftest import stripe_fixture
from tests.test_webhook_support import (
    Buyer,
    audit_rows,
    checkout_session_object,
    deliver,
    event_object,
    event_row,
    new_id,
    subscribed,
    subscription_object,
    subscription_row,
)

# The fixtures `webhook`, `stripe_api` and `buyer`.
pytest_plugins = ("tests.test_webhook_support",)

NUL, LONE_SURROGATE, REPLACED = "\x00", "\ud800", "\ufffd"


def stored_text(db: Any, event_id: str) -> str:
    """The stored payload as Postgres renders it (a NUL would show as \\u0000)."""
    row = db.execute(
        "select payload::text as text from stripe_events where id = %s", (event_id,)
    ).fetchone()
    return str(row["text"])


def event_count(db: Any, event_id: str) -> int:
    row = db.execute(
        "select count(*) as n from stripe_events where id = %s", (event_id,)
    ).fetchone()
    return int(row["n"])


# --- 1. characters Postgres cannot store --------------------------------------------------------


def test_storable_replaces_nul_and_lone_surrogates_in_keys_and_values_only():
    value = {
        f"k{NUL}": [f"a{NUL}b", {"n": 1, "f": 1.5, "t": True, "z": None}, f"x{LONE_SURROGATE}"],
        "ok": "é 😀 \ufffd",
    }

    assert storable(value) == {
        f"k{REPLACED}": [f"a{REPLACED}b", {"n": 1, "f": 1.5, "t": True, "z": None}, f"x{REPLACED}"],
        "ok": "é 😀 \ufffd",
    }


def test_a_handled_event_with_nul_characters_is_applied_stored_without_them_and_once(
    db, webhook, stripe_api, buyer
):
    subscribed(buyer, stripe_api, webhook)
    # Stripe's subscription "now" has a NUL in its metadata too: the fetched state reaches SQL.
    fetched = buyer.subscription(cancel_at_period_end=True)
    fetched["metadata"]["note"] = f"fetched{NUL}"
    stripe_api.subscriptions[buyer.sub_id] = fetched
    event = buyer.subscription_event("customer.subscription.updated", cancel_at_period_end=True)
    subscription = event["data"]["object"]
    subscription["metadata"].update({"note": f"call{NUL}back", f"key{NUL}": NUL})
    subscription["description"] = f"{NUL}Acme{NUL}"
    subscription["items"]["data"][0]["metadata"] = {"seat": f"1{NUL}"}
    event["data"]["previous_attributes"] = {"metadata": {"note": NUL * 3}}
    assert "\\u0000" in json.dumps(event)  # the signed body carries the escapes

    first = deliver(webhook, event)
    again = deliver(webhook, event)

    assert first.status_code == 200, first.get_json()
    assert first.get_json() == {"received": True, "event_id": event["id"], "status": "processed"}
    assert again.status_code == 200
    assert again.get_json() == {"received": True, "event_id": event["id"], "status": "duplicate"}
    assert subscription_row(db, buyer.sub_id)["cancel_at_period_end"] is True
    assert event_count(db, event["id"]) == 1
    stored = event_row(db, event["id"])
    assert stored["status"] == "processed" and stored["attempts"] == 1 and stored["error"] is None
    assert "\\u0000" not in stored_text(db, event["id"])
    payload = stored["payload"]["data"]["object"]
    assert payload["metadata"]["note"] == f"call{REPLACED}back"
    assert payload["metadata"][f"key{REPLACED}"] == REPLACED
    assert payload["description"] == f"{REPLACED}Acme{REPLACED}"
    assert payload["items"]["data"][0]["metadata"] == {"seat": f"1{REPLACED}"}
    assert stored["payload"]["data"]["previous_attributes"] == {"metadata": {"note": REPLACED * 3}}
    # Everything else is stored as it was sent.
    assert payload["id"] == buyer.sub_id and payload["metadata"]["organisation_id"] == buyer.org_id


def test_an_unhandled_event_with_nul_and_lone_surrogates_is_recorded_ignored_and_once(db, webhook):
    customer = stripe_fixture("customer")
    customer.update(
        id=new_id("cus"),
        name=f"Acme{NUL} Pty{LONE_SURROGATE}",
        description=f"{LONE_SURROGATE}",
        metadata={f"{NUL}": f"{NUL}", "ref": f"a{NUL}b"},
    )
    customer["address"]["line1"] = f"1 Main St{NUL}"
    customer["preferred_locales"] = [f"en{NUL}", "fr"]
    event = event_object("customer.updated", customer)

    first = deliver(webhook, event)
    again = deliver(webhook, event)

    assert first.status_code == 200, first.get_json()
    assert first.get_json()["status"] == "ignored"
    assert again.status_code == 200 and again.get_json()["status"] == "duplicate"
    assert event_count(db, event["id"]) == 1
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored" and stored["type"] == "customer.updated"
    text = stored_text(db, event["id"])
    assert "\\u0000" not in text and "\\ud800" not in text
    payload = stored["payload"]["data"]["object"]
    assert payload["name"] == f"Acme{REPLACED} Pty{REPLACED}"
    assert payload["description"] == REPLACED
    assert payload["metadata"] == {REPLACED: REPLACED, "ref": f"a{REPLACED}b"}
    assert payload["address"]["line1"] == f"1 Main St{REPLACED}"
    assert payload["preferred_locales"] == [f"en{REPLACED}", "fr"]


def test_an_ignore_reason_quoting_a_nul_is_stored(db, webhook, stripe_api, make_org):
    """The reason goes to SQL as text: it quotes the session, so it must be storable too."""
    session = checkout_session_object(
        new_id("sub"), new_id("cus"), organisation_id=f"{make_org()['id']}{NUL}", in_metadata=False
    )
    event = event_object("checkout.session.completed", session)

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored" and REPLACED in stored["error"]
    assert NUL not in stored["error"]


def test_a_raw_nul_byte_in_a_json_string_is_invalid_json_not_a_500(db, webhook):
    """JSON forbids unescaped control characters; Stripe escapes them, so this is not Stripe."""
    event = event_object("customer.updated", {"id": "cus_1", "name": "x"})
    body = json.dumps(event).replace('"name": "x"', f'"name": "x{NUL}"')

    response = deliver(webhook, body)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"
    assert event_row(db, event["id"]) is None


# --- 2. whose Checkout Session -----------------------------------------------------------------


def open_checkout_row(db: Any, org: dict[str, Any], plan: dict[str, Any], session_id: str) -> None:
    """The checkout_sessions row create-checkout-session leaves once Stripe answered."""
    db.execute(
        "insert into checkout_sessions (organisation_id, plan_id, billing_period, created_by,"
        " success_url, cancel_url, stripe_session_id)"
        " values (%s, %s, 'monthly', %s, 'https://app/ok', 'https://app/no', %s)",
        (org["id"], plan["id"], org["owner_id"], session_id),
    )


def checkout_row(db: Any, session_id: str) -> dict[str, Any]:
    row: dict[str, Any] = db.execute(
        "select * from checkout_sessions where stripe_session_id = %s", (session_id,)
    ).fetchone()
    return row


def organisation_untouched(db: Any, org: dict[str, Any]) -> bool:
    row = db.execute(
        "select o.stripe_customer_id,"
        " (select count(*) from subscriptions s where s.organisation_id = o.id) as subscriptions,"
        " (select count(*) from billing_cycles c where c.organisation_id = o.id) as cycles"
        " from organisations o where o.id = %s",
        (org["id"],),
    ).fetchone()
    untouched = {"stripe_customer_id": org["stripe_customer_id"], "subscriptions": 0, "cycles": 0}
    return row == untouched and audit_rows(db, org["id"]) == []


def test_a_payment_link_session_naming_another_organisation_links_nothing(
    db, webhook, stripe_api, make_org, make_plan
):
    """A buyer of a payment link on our Stripe account typed a victim's id as reference."""
    victim, plan = make_org(name="Victim Ltd"), make_plan()
    sub_id, customer_id = new_id("sub"), new_id("cus")
    # What a payment link makes: no metadata of ours on the session or its subscription.
    stripe_api.subscriptions[sub_id] = subscription_object(sub_id, customer_id, plan)
    session = checkout_session_object(
        sub_id, customer_id, organisation_id=str(victim["id"]), in_metadata=False
    )
    assert session["client_reference_id"] == str(victim["id"]) and session["metadata"] == {}
    event = event_object("checkout.session.completed", session)

    response = deliver(webhook, event)
    again = deliver(webhook, event)

    assert response.status_code == 200
    assert response.get_json() == {"received": True, "event_id": event["id"], "status": "ignored"}
    assert again.get_json()["status"] == "duplicate"
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored"
    assert session["id"] in stored["error"] and "client_reference_id" in stored["error"]
    assert "not one we opened" in stored["error"]
    assert organisation_untouched(db, victim)
    assert subscription_row(db, sub_id) is None
    assert stripe_api.retrieves == [] and stripe_api.item_requests == []
    # Nor does the subscription's own event link it later: nothing of ours names the victim.
    created = event_object("customer.subscription.created", stripe_api.subscriptions[sub_id])
    assert deliver(webhook, created).get_json()["status"] == "ignored"
    assert organisation_untouched(db, victim)
    assert subscription_row(db, sub_id) is None


@pytest.mark.parametrize(
    "says",
    ["what create-checkout-session writes", "nothing but another client_reference_id"],
)
def test_a_session_we_opened_links_the_organisation_of_our_row(
    db, webhook, stripe_api, buyer, make_org, says
):
    other = make_org(name="Other Ltd")
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    session = event["data"]["object"]
    if says != "what create-checkout-session writes":
        session.update(metadata={}, client_reference_id=str(other["id"]))
    open_checkout_row(db, buyer.org, buyer.plan, session["id"])

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "processed"
    sub = subscription_row(db, buyer.sub_id)
    assert sub["organisation_id"] == buyer.org["id"] and sub["status"] == "active"
    org = db.execute("select * from organisations where id = %s", (buyer.org["id"],)).fetchone()
    assert org["stripe_customer_id"] == buyer.customer_id
    row = checkout_row(db, session["id"])
    assert row["status"] == "complete" and row["stripe_subscription_id"] == buyer.sub_id
    assert event_row(db, event["id"])["status"] == "processed"
    assert organisation_untouched(db, other)


@pytest.mark.parametrize("reference", ["the same organisation", "another organisation"])
def test_a_session_whose_row_was_lost_is_linked_by_its_metadata(
    db, webhook, stripe_api, buyer, make_org, reference
):
    """Metadata is written by our server only; the buyer cannot set it on a payment link."""
    other = make_org(name="Other Ltd")
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    session = event["data"]["object"]
    if reference == "another organisation":
        session["client_reference_id"] = str(other["id"])
    assert checkout_row(db, session["id"]) is None

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "processed"
    assert subscription_row(db, buyer.sub_id)["organisation_id"] == buyer.org["id"]
    assert organisation_untouched(db, other)


def test_a_session_whose_metadata_contradicts_our_row_is_ignored_with_the_reason(
    db, webhook, stripe_api, make_org, make_plan
):
    """Something other than our checkout wrote one of them: neither is guessed at."""
    ours, named, plan = make_org(name="Ours Ltd"), make_org(name="Named Ltd"), make_plan()
    buyer = Buyer(named, plan, new_id("sub"), new_id("cus"))
    stripe_api.subscriptions[buyer.sub_id] = buyer.subscription()
    event = buyer.checkout_event()
    session = event["data"]["object"]
    open_checkout_row(db, ours, plan, session["id"])

    response = deliver(webhook, event)

    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    stored = event_row(db, event["id"])
    assert stored["status"] == "ignored"
    assert str(ours["id"]) in stored["error"] and str(named["id"]) in stored["error"]
    assert organisation_untouched(db, ours) and organisation_untouched(db, named)
    assert subscription_row(db, buyer.sub_id) is None
    assert checkout_row(db, session["id"])["status"] == "open"
    assert stripe_api.retrieves == []


def test_the_owner_lookup_is_for_the_service_role_only(db):
    fn = "public.checkout_session_organisation(text)"
    row = db.execute(
        "select has_function_privilege('anon', %s, 'execute') as anon,"
        " has_function_privilege('authenticated', %s, 'execute') as authenticated,"
        " has_function_privilege('service_role', %s, 'execute') as service,"
        " p.proconfig from pg_proc p where p.oid = %s::regprocedure",
        (fn, fn, fn, fn),
    ).fetchone()
    assert (row["anon"], row["authenticated"], row["service"]) == (False, False, True)
    assert row["proconfig"] == ['search_path=""']
    assert db.execute("select public.checkout_session_organisation('cs_none') as r").fetchone() == {
        "r": None
    }
