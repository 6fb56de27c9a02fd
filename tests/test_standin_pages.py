"""The stand-in's hosted pages (Checkout, portal, invoice): plain HTML forms, posted as a browser
would, with the webhooks each causes delivered before the browser is redirected."""

from __future__ import annotations

from typing import Any

import httpx
import stripe

from tests.test_stripe_standin import (
    Receiver,
    base_url,
    catalog,
    checkout,
    client,
    control,
    monthly_lines,
    new_customer,
    receiver,
)

__all__ = ["base_url", "catalog", "client", "receiver"]  # fixtures, used by name below


def browser(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=10, follow_redirects=False)


def new_session(client: stripe.StripeClient, catalog: dict[str, str]) -> stripe.checkout.Session:
    return checkout(client, new_customer(client), monthly_lines(catalog))


def test_checkout_page_shows_the_order_and_three_choices(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    session = new_session(client, catalog)
    assert session.url == f"{base_url}/checkout/{session.id}"
    page = browser(base_url).get(f"/checkout/{session.id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "Pro, per month" in text and "49.00 EUR" in text and "99.00 EUR" in text
    assert "148.00 EUR" in text  # due today: flat fee and setup fee, usage later
    assert f'action="/checkout/{session.id}/pay"' in text
    assert f'action="/checkout/{session.id}/decline"' in text
    assert 'href="http://localhost:3000/cancel"' in text  # Cancel: back to cancel_url


def test_pay_completes_like_the_control_route_then_redirects_to_success(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer": new_customer(client),
            "line_items": monthly_lines(catalog),  # type: ignore[typeddict-item]
            "success_url": "http://localhost:3000/ok?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "http://localhost:3000/cancel",
        }
    )
    paid = browser(base_url).post(f"/checkout/{session.id}/pay")
    assert paid.status_code == 303
    assert paid.headers["location"] == f"http://localhost:3000/ok?session_id={session.id}"
    # Delivered before the redirect, so the success page finds the subscription.
    assert receiver.types() == [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.paid",
    ]
    done = client.v1.checkout.sessions.retrieve(session.id)
    assert done.status == "complete" and done.subscription is not None
    assert client.v1.subscriptions.retrieve(done.subscription).status == "active"  # type: ignore[arg-type]

    again = browser(base_url).post(f"/checkout/{session.id}/pay")  # a double click
    assert again.status_code == 303 and len(receiver.deliveries) == 3
    assert (
        "This Checkout Session is complete" in browser(base_url).get(f"/checkout/{session.id}").text
    )


def test_a_declined_card_leaves_the_session_open_to_try_again(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    session = new_session(client, catalog)
    declined = browser(base_url).post(f"/checkout/{session.id}/decline")
    assert declined.status_code == 303
    page = browser(base_url).get(declined.headers["location"])
    assert "Your card was declined" in page.text and "/pay" in page.text
    assert client.v1.checkout.sessions.retrieve(session.id).status == "open"
    state = httpx.get(f"{base_url}/_standin/state").json()
    assert state["subscriptions"] == [] and state["invoices"] == []
    assert receiver.deliveries == []
    assert browser(base_url).post(f"/checkout/{session.id}/pay").status_code == 303


def test_unknown_pages_are_404(base_url: str) -> None:
    assert browser(base_url).get("/checkout/cs_test_nope").status_code == 404
    assert browser(base_url).get("/portal/bps_nope").status_code == 404


def portal_session(client: stripe.StripeClient, customer: str, **features: Any) -> str:
    config = client.v1.billing_portal.configurations.create(
        params={
            "features": {
                "invoice_history": {"enabled": True},
                "subscription_cancel": {"enabled": True, "mode": "at_period_end"},
                **features,
            }
        }
    )
    return client.v1.billing_portal.sessions.create(
        params={
            "customer": customer,
            "configuration": config.id,
            "return_url": "http://localhost:3000/billing",
        }
    ).id


def test_portal_cancels_at_period_end_and_renews(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    customer = new_customer(client)
    session = checkout(client, customer, monthly_lines(catalog))
    paid = control(base_url, f"checkout_sessions/{session.id}/complete")
    portal = portal_session(client, customer)
    page = browser(base_url).get(f"/portal/{portal}").text
    assert "Status: <strong>active</strong>" in page and "Renews on" in page
    assert "Cancel subscription at period end" in page
    assert 'href="http://localhost:3000/billing">Return' in page
    invoice = client.v1.invoices.retrieve(paid["invoice"])
    assert invoice.hosted_invoice_url == f"{base_url}/invoice/{invoice.id}"
    assert f"/invoice/{invoice.id}" in page  # invoice history
    assert "148.00 EUR" in browser(base_url).get(f"/invoice/{invoice.id}").text

    before = len(receiver.deliveries)
    action = f"/portal/{portal}/subscriptions/{paid['subscription']}"
    canceled = browser(base_url).post(f"{action}/cancel")
    assert canceled.status_code == 303 and canceled.headers["location"] == f"/portal/{portal}"
    [updated] = receiver.events()[before:]  # delivered before the redirect
    assert updated.type == "customer.subscription.updated"
    sub = client.v1.subscriptions.retrieve(paid["subscription"])
    assert sub.cancel_at_period_end is True and sub.status == "active"
    page = browser(base_url).get(f"/portal/{portal}").text
    assert "Cancels on" in page and "Renew subscription" in page

    assert browser(base_url).post(f"{action}/renew").status_code == 303
    assert client.v1.subscriptions.retrieve(paid["subscription"]).cancel_at_period_end is False


def test_portal_offers_only_what_its_configuration_allows(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    customer = new_customer(client)
    session = checkout(client, customer, monthly_lines(catalog))
    paid = control(base_url, f"checkout_sessions/{session.id}/complete")
    portal = portal_session(client, customer, subscription_cancel={"enabled": False})
    page = browser(base_url).get(f"/portal/{portal}").text
    assert "Cancel subscription" not in page
    refused = browser(base_url).post(
        f"/portal/{portal}/subscriptions/{paid['subscription']}/cancel"
    )
    assert "This portal cannot change that subscription" in refused.text
    assert client.v1.subscriptions.retrieve(paid["subscription"]).cancel_at_period_end is False

    now = portal_session(
        client, customer, subscription_cancel={"enabled": True, "mode": "immediately"}
    )
    assert "Cancel subscription now" in browser(base_url).get(f"/portal/{now}").text
    browser(base_url).post(f"/portal/{now}/subscriptions/{paid['subscription']}/cancel")
    assert client.v1.subscriptions.retrieve(paid["subscription"]).status == "canceled"
