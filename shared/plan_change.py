"""Changing plans (DESIGN.md, POST change-plan): an upgrade now, a downgrade at the period end.

    begin_plan_change (SQL)   who may change what, the direction, one change at a time (409)
    upgrade                   both items to the new prices in ONE Stripe call, the flat fee
                              prorated and invoiced at once, applied only if that invoice is paid
                              (payment_behavior=pending_if_incomplete): else 402, nothing changed
    schedule_downgrade        a subscription schedule whose next phase starts at the end of the
                              paid period: Stripe itself changes the prices at the boundary
    release_pending           the schedule released: the pending change is gone
    finish_plan_change (SQL)  the claim's outcome, pending_* and the audit row

Every Stripe call carries an idempotency key made of the claim's id (plan_changes.id), so a
retried request changes nothing twice. The webhook applies whatever Stripe ends up with (ours or a
Dashboard change) the same way; an upgrade is also applied here at once, so the answer and the
customer's figures agree before the webhook arrives. How Stripe bills the metered usage across a
change, and how our cycles mirror it: docs/plan-changes.md.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from shared.auth import Caller
from shared.db import Database
from shared.errors import Conflict, PaymentRequired, Unprocessable
from shared.meter_flush import MeterStream, flush
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe
from shared.subscriptions import ENDED_STATUSES, Fetched, apply_state, fetch_subscription, stripe_id
from shared.usage import MAX_FLUSH_LIMIT

ACTOR = "change-plan"


class PlanChangeRequest(BaseModel):
    """`{plan_id, billing_period, organisation_id?}` or `{cancel_pending: true, organisation_id?}`."""

    model_config = ConfigDict(extra="forbid")

    plan_id: uuid.UUID | None = None
    billing_period: Literal["monthly", "yearly"] | None = None
    organisation_id: uuid.UUID | None = None
    cancel_pending: Literal[True] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> PlanChangeRequest:
        if self.cancel_pending:
            if self.plan_id is not None or self.billing_period is not None:
                raise Unprocessable(
                    "cancel_pending: send it alone (with organisation_id at most), not with a plan.",
                    field="cancel_pending",
                )
            return self
        for name in ("plan_id", "billing_period"):
            if getattr(self, name) is None:
                raise Unprocessable(f"{name}: field required", field=name)
        return self


def change_plan(
    caller: Caller,
    order: PlanChangeRequest,
    *,
    database: Database,
    stripe_client: stripe.StripeClient,
    meter_stream: MeterStream | None = None,
) -> dict[str, Any]:
    """The answer of POST change-plan (403/404/409/422; 402 when an upgrade's payment fails)."""
    claim: dict[str, Any] = database.call(
        "begin_plan_change",
        p_user_id=caller.user_id,
        p_organisation_id=str(order.organisation_id) if order.organisation_id else None,
        p_plan_id=str(order.plan_id) if order.plan_id else None,
        p_billing_period=order.billing_period,
        p_cancel_pending=bool(order.cancel_pending),
    )
    subscription = claim["subscription"]
    if claim["kind"] == "already_scheduled":
        return answer(
            subscription,
            subscription["pending_plan_id"],
            subscription["pending_billing_period"],
            "period_end",
            subscription["pending_effective_at"],
        )
    steps = {"upgrade": upgrade, "downgrade": schedule_downgrade, "cancel_pending": release_pending}
    try:
        if claim["kind"] == "upgrade" and meter_stream is not None:
            # The usage so far reaches Stripe before its price changes, which bills it at the
            # old price (a call still queued would be billed as Stripe finds its timestamp).
            flush(
                database,
                meter_stream,
                limit=MAX_FLUSH_LIMIT,
                organisation_id=claim["organisation_id"],
            )
        return steps[claim["kind"]](claim, database=database, stripe_client=stripe_client)
    except PaymentRequired as declined:
        finish(database, claim, "payment_failed", error=declined.message)
        raise
    except Exception as error:
        finish(database, claim, "failed", error=f"{type(error).__name__}: {error}")
        raise


def upgrade(
    claim: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> dict[str, Any]:
    """Both items to the target prices now, prorated and invoiced; applied only if paid."""
    target, key = claim["target"], claim["change_id"]
    fetched = current_subscription(claim, database=database, stripe_client=stripe_client)
    # What Stripe has before the change, applied first: a cycle a call opened before its renewal
    # webhook is confirmed on the old price, so the change below splits it instead of rewriting
    # its terms (its usage so far is billed at the old price).
    apply_state(fetched, database=database, actor=ACTOR)
    schedule = stripe_id(fetched.subscription.get("schedule"))
    if schedule:  # a pending downgrade: the upgrade replaces it
        release(stripe_client, schedule, key)
    flat, metered = items_of(fetched.subscription)
    items: list[dict[str, Any]] = [{"id": flat["id"], "price": target["flat_price_id"]}]
    items.append(
        {"id": metered["id"], "price": target["metered_price_id"]}
        if metered
        else {"price": target["metered_price_id"]}
    )
    # Taken before the call, after the old price was confirmed above: the usage metered before
    # it stays on the old price's part of the cycle (docs/plan-changes.md).
    changed_at = database_now(database)
    with stripe_errors():
        updated = stripe_client.v1.subscriptions.update(
            str(fetched.subscription["id"]),
            params={  # type: ignore[arg-type]
                "items": items,
                "proration_behavior": "always_invoice",
                "payment_behavior": "pending_if_incomplete",
            },
            options={"idempotency_key": f"plan-change-{key}"},
        )
    if updated.to_dict().get("pending_update"):
        # The released schedule is not put back: Stripe still applies this update if its
        # invoice is paid before the update expires, and the schedule's phases would then be
        # wrong. The customer is told instead, and may schedule the downgrade again.
        dropped = " The change scheduled for the period end was canceled." if schedule else ""
        raise PaymentRequired(
            "The payment for the upgrade was declined; the subscription stays on its plan."
            f"{dropped} Update the payment method (Manage billing) and try again.",
        )
    # Applied at Stripe: recorded so before our copy is updated, so that a failure applying it
    # (the webhook applies it then) never leaves the claim saying the change failed.
    finish(database, claim, "applied")
    apply_state(
        Fetched(updated.to_dict(), changed_at),
        database=database,
        actor=ACTOR,
        changed_at=changed_at,
    )
    return answer(
        claim["subscription"], target["plan_id"], target["billing_period"], "now", changed_at
    )


def schedule_downgrade(
    claim: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> dict[str, Any]:
    """A schedule: the current prices until the paid period ends, then the target's."""
    target, key = claim["target"], claim["change_id"]
    fetched = current_subscription(claim, database=database, stripe_client=stripe_client)
    subscription = fetched.subscription
    if subscription.get("cancel_at_period_end") or subscription.get("cancel_at"):
        # A schedule would take the cancellation's place (end_behavior release): the customer
        # who canceled would be billed after the end they chose.
        raise Conflict(
            "The subscription is set to end; a plan change would start after it. Renew it"
            " (Manage billing) first.",
            code="subscription_ending",
        )
    flat, metered = items_of(subscription)
    effective_at = int(flat["current_period_end"])
    with stripe_errors():
        schedule_id = stripe_id(subscription.get("schedule"))
        if schedule_id is None:
            created = stripe_client.v1.subscription_schedules.create(
                params={"from_subscription": str(subscription["id"])},
                options={"idempotency_key": f"plan-schedule-{key}"},
            )
            schedule_id = str(created.id)
        schedule = stripe_client.v1.subscription_schedules.retrieve(schedule_id)
        current = [
            {"price": stripe_id(item.get("price")), **quantity_of(item)}
            for item in (flat, metered)
            if item
        ]
        following = [
            {"price": target["flat_price_id"], "quantity": 1},
            {"price": target["metered_price_id"]},
        ]
        interval = "year" if target["billing_period"] == "yearly" else "month"
        stripe_client.v1.subscription_schedules.update(
            schedule_id,
            params={  # type: ignore[arg-type]
                "end_behavior": "release",
                "proration_behavior": "none",
                "phases": [
                    {
                        "items": current,
                        # The current phase (Stripe refuses to move its start), not the first:
                        # after an earlier downgrade took effect the schedule stays attached for
                        # its last phase, and the phases before it are past (left out).
                        "start_date": int(
                            (schedule.current_phase or schedule.phases[0]).start_date
                        ),
                        "end_date": effective_at,
                    },
                    {"items": following, "duration": {"interval": interval, "interval_count": 1}},
                ],
            },
            options={"idempotency_key": f"plan-schedule-update-{key}"},
        )
    effective = datetime.fromtimestamp(effective_at, UTC)
    finish(database, claim, "scheduled", schedule_id=schedule_id, effective_at=effective)
    return answer(
        claim["subscription"],
        target["plan_id"],
        target["billing_period"],
        "period_end",
        effective,
    )


def release_pending(
    claim: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> dict[str, Any]:
    """Release the schedule carrying the pending change: the subscription stays as it is."""
    subscription = claim["subscription"]
    fetched = current_subscription(claim, database=database, stripe_client=stripe_client)
    # Our copy follows Stripe first: the change may have taken effect at the period end with its
    # webhook not here yet (the plan is read from the prices, whichever catalogue version).
    applied = apply_state(fetched, database=database, actor=ACTOR)
    pending = (subscription["pending_plan_id"], subscription["pending_billing_period"])
    if (str(applied.get("plan_id")), applied.get("billing_period")) == pending:
        raise Conflict(
            "No plan change is pending any more: it has already taken effect. Reload the page.",
            code="nothing_pending",
        )
    schedule = stripe_id(fetched.subscription.get("schedule")) or subscription["stripe_schedule_id"]
    if schedule:
        release(stripe_client, schedule, claim["change_id"])
    finish(database, claim, "released")
    return answer(
        subscription,
        subscription["plan_id"],
        subscription["billing_period"],
        "now",
        database_now(database),
    )


def current_subscription(
    claim: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> Fetched:
    fetched = fetch_subscription(
        stripe_client, str(claim["subscription"]["stripe_subscription_id"]), database=database
    )
    if fetched.subscription.get("status") in ENDED_STATUSES:
        apply_state(fetched, database=database, actor=ACTOR)
        raise Unprocessable("The subscription has just ended; there is nothing to change.")
    return fetched


def items_of(subscription: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The flat (licensed) item and the metered item, if any."""
    flat: dict[str, Any] | None = None
    metered: dict[str, Any] | None = None
    for item in (subscription.get("items") or {}).get("data") or []:
        usage = ((item.get("price") or {}).get("recurring") or {}).get("usage_type")
        if usage == "metered":
            metered = metered or item
        elif usage == "licensed":
            flat = flat or item
    if flat is None:
        raise Unprocessable("The subscription has no flat-fee item to change.")
    return flat, metered


def quantity_of(item: dict[str, Any]) -> dict[str, int]:
    """A licensed item's quantity; a metered item has none."""
    quantity = item.get("quantity")
    return {"quantity": int(quantity)} if quantity is not None else {}


def release(stripe_client: stripe.StripeClient, schedule_id: str, key: str) -> None:
    """Release the schedule; one already released (a retry, the Dashboard) is what we want."""
    with stripe_errors():
        schedule = stripe_client.v1.subscription_schedules.retrieve(schedule_id)
        if schedule.status in ("active", "not_started"):
            stripe_client.v1.subscription_schedules.release(
                schedule_id, options={"idempotency_key": f"plan-release-{key}"}
            )


def database_now(database: Database) -> datetime:
    return datetime.fromisoformat(str(database.call("stripe_fetch_started_at")))


def finish(database: Database, claim: dict[str, Any], status: str, **outcome: Any) -> None:
    database.call(
        "finish_plan_change",
        p_change_id=claim["change_id"],
        p_status=status,
        p_schedule_id=outcome.get("schedule_id"),
        p_effective_at=outcome["effective_at"].isoformat() if "effective_at" in outcome else None,
        p_error=outcome.get("error"),
    )


def answer(
    subscription: dict[str, Any],
    plan_id: Any,
    billing_period: Any,
    effective: str,
    effective_at: Any,
) -> dict[str, Any]:
    at = effective_at.isoformat() if isinstance(effective_at, datetime) else effective_at
    return {
        "subscription_id": subscription["stripe_subscription_id"],
        "plan_id": str(plan_id),
        "billing_period": billing_period,
        "effective": effective,
        "effective_at": at,
    }
