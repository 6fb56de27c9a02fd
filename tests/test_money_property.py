"""Money through change (issue 9): catalogue changes, checkouts on old and new prices, renewals,
invoices, cancellations and calls reported at cycle edges, with the webhook events delivered in
any order and repeated, leave every cycle on its own terms with its minutes all accounted for.

Stripe is faked at the HTTP boundary (the stand-in of test_webhook_support for subscriptions, a
small meter below); the functions run for real. Periods sit on the real clock, since the SQL
uses now(): a subscription's anchor (the end of its previous period) is 30 minutes, 2 hours or 10
days ago, so that period is within Stripe's invoice grace hour, past it, or long past; or it is
anchored on a 31st (months clamped to their last day).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import psycopg
import pytest
import respx
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.conftest import SERVICE_KEY, function_client
from tests.test_report_usage import FakeMeter
from tests.test_webhook_support import (
    StripeStandIn,
    checkout_session_object,
    deliver,
    event_object,
    invoice_object,
    item_object,
    new_id,
    subscription_object,
)

# The fixture `webhook` (the real stripe-webhook-handler).
pytest_plugins = ("tests.test_webhook_support",)

AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}
ANCHORS = {"30min": timedelta(minutes=30), "2h": timedelta(hours=2), "10d": timedelta(days=10)}
ANCHOR_CHOICES = [*ANCHORS, "31st"]
LIVE = frozenset({"active", "trialing", "past_due", "unpaid"})


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def billed_minutes(seconds: float) -> int:
    return math.ceil(Fraction(repr(seconds)) / 60)


@pytest.fixture
def stripe_side() -> Iterator[tuple[StripeStandIn, FakeMeter]]:
    """Stripe's subscriptions (the stand-in) and its meter (v1 events, the v2 session and
    stream; an identifier is taken once, an event older than 35 days is not counted), on one
    respx router."""
    with respx.mock(base_url="https://api.stripe.com", assert_all_called=False) as router:
        meter = FakeMeter()
        meter.mount(router)
        yield StripeStandIn(router), meter


@pytest.fixture
def usage_api(function_env: dict[str, str]) -> Any:
    return function_client("report-usage", "report_usage")


# ------------------------------------------------------------------ Stripe's side, modelled


@dataclass(frozen=True)
class Terms:
    """One catalogue version of a plan: its three Stripe prices and the metered price's terms."""

    monthly: str
    yearly: str
    metered: str
    included: int
    rate: int

    @staticmethod
    def fresh(included: int, rate: int) -> Terms:
        tag = uuid.uuid4().hex[:10]
        return Terms(f"price_m_{tag}", f"price_y_{tag}", f"price_mt_{tag}", included, rate)


@dataclass
class Org:
    id: str
    customer: str


@dataclass
class Sub:
    """A subscription as Stripe has it now: bought on `flat` (monthly or yearly), on the metered
    price `metered` (a yearly one once the webhook added it), its metered item in period `index`
    (period i is [edges[i - 1], edges[i]); edges[0] is the anchor)."""

    org: Org
    stripe_id: str
    flat: str
    metered: str | None
    edges: dict[int, datetime]
    start: int  # its first period
    index: int
    year_end: datetime | None = None  # yearly: the end of the flat item's year
    status: str = "active"
    canceled_at: int | None = None
    invoiced: set[int] = field(default_factory=set)

    def period(self, i: int) -> tuple[int, int]:
        return unix(self.edges[i - 1]), unix(self.edges[i])


@dataclass
class Delivery:
    event: dict[str, Any]
    answered: bool = False  # once 2xx: a further delivery is a duplicate


class World:
    """One example: a plan, three organisations, Stripe's side and our two functions."""

    def __init__(
        self, db: Any, webhook: Any, usage_api: Any, stripe_side: Any, make_org: Any, plan: Any
    ) -> None:
        self.db, self.webhook, self.usage_api, self.make_org = db, webhook, usage_api, make_org
        self.standin, self.meter = stripe_side
        self.plan_id = str(plan["id"])
        self.current = Terms(
            plan["stripe_price_id"],
            plan["stripe_yearly_price_id"],
            plan["stripe_metered_price_id"],
            plan["included_minutes"],
            plan["overage_rate_cents"],
        )
        self.versions = [self.current]
        self.orgs: list[Org] = []
        self.subs: list[Sub] = []
        self.queue: list[Delivery] = []
        self.event_ids: list[str] = []
        self.calls: dict[tuple[str, str], dict[str, Any]] = {}
        self.invoiced: dict[Any, tuple[int, set[Any]]] = {}
        self.story: list[str] = []
        self.retried = False
        self.default_edges = self.edges_for("2h")

    def say(self, line: str) -> None:
        self.story.append(line)

    def edges_at(self, anchor: datetime, first: int = 0) -> dict[int, datetime]:
        """anchor + (first + k) months for k in -2..1: Stripe's anchored months (the day clamped
        to the month's end, never drifting), computed by Postgres."""
        anchor = anchor.replace(microsecond=0)
        return {
            k: self.db.execute(
                "select ((%s::timestamptz at time zone 'UTC') + make_interval(months => %s))"
                " at time zone 'UTC' as edge",
                (anchor, first + k),
            ).fetchone()["edge"]
            for k in (-2, -1, 0, 1)
        }

    def edges_for(self, anchor: str) -> dict[int, datetime]:
        """A subscription's edges: its anchor 30 minutes, 2 hours or 10 days ago, or ("31st") a
        billing_cycle_anchor on a 31st whose latest edge is at least 2 hours ago."""
        now = datetime.now(UTC)
        if anchor != "31st":
            return self.edges_at(now - ANCHORS[anchor])
        limit = now - ANCHORS["2h"]
        on_31st = datetime(2020, 1, 31, tzinfo=UTC) + (
            limit - limit.replace(hour=0, minute=0, second=0, microsecond=0)
        )
        months = self.db.execute(
            "select max(k) as k from generate_series(0, 1200) as k"
            " where ((%s::timestamptz at time zone 'UTC') + make_interval(months => k))"
            " at time zone 'UTC' <= %s",
            (on_31st, limit),
        ).fetchone()["k"]
        return self.edges_at(on_31st, months)

    # ---------------------------------------------------------------- the catalogue

    def write_terms(self, terms: Terms) -> None:
        """What ./deploy.sh stripe-catalog writes: the plan's current prices and their terms."""
        self.db.execute(
            "update billing_plans set included_minutes = %s, overage_rate_cents = %s,"
            " stripe_price_id = %s, stripe_yearly_price_id = %s, stripe_metered_price_id = %s,"
            " updated_at = now() where id = %s",
            (
                terms.included,
                terms.rate,
                terms.monthly,
                terms.yearly,
                terms.metered,
                self.plan_id,
            ),
        )
        self.current = terms

    def catalogue(self, included: int, rate: int, flat_too: bool) -> None:
        """New metered terms need a new metered price; the flat prices are replaced too when
        `flat_too` (stripe-catalog replaces only the prices whose amounts changed)."""
        terms = Terms.fresh(included, rate)
        if not flat_too:
            terms = Terms(self.current.monthly, self.current.yearly, terms.metered, included, rate)
        self.write_terms(terms)
        self.versions.append(terms)
        self.say(
            f"catalogue v{len(self.versions) - 1}: {included} included, {rate} c/min"
            f"{'' if flat_too else ' (metered price only)'}"
        )

    def revert(self, k: int) -> None:
        k %= len(self.versions)
        self.write_terms(self.versions[k])
        self.say(f"catalogue back to v{k}")

    def other_terms_under_current_prices(self) -> None:
        before = self.db.execute("select * from billing_plans where id = %s", (self.plan_id,))
        before_row = before.fetchone()
        with pytest.raises(psycopg.Error) as refused:
            self.db.execute(
                "update billing_plans set included_minutes = included_minutes + 1 where id = %s",
                (self.plan_id,),
            )
        assert refused.value.sqlstate == "MB409"
        after = self.db.execute("select * from billing_plans where id = %s", (self.plan_id,))
        assert after.fetchone() == before_row
        self.say("operator writes other terms under the current prices: refused")

    # ---------------------------------------------------------------- Stripe's subscriptions

    def org(self, k: int) -> Org:
        while len(self.orgs) <= k % 3:
            self.orgs.append(Org(str(self.make_org()["id"]), new_id("cus")))
        return self.orgs[k % 3]

    def terms_of(self, metered: str | None) -> Terms | None:
        return next((t for t in self.versions if t.metered == metered), None)

    def state(self, sub: Sub) -> dict[str, Any]:
        period = sub.period(sub.index)
        obj = subscription_object(
            sub.stripe_id,
            sub.org.customer,
            {"id": self.plan_id, "stripe_price_id": sub.flat, "stripe_yearly_price_id": sub.flat},
            status=sub.status,
            organisation_id=sub.org.id,
            canceled_at=sub.canceled_at,
            created=sub.period(sub.start)[0],
            with_metered=False,
            billing_period="yearly" if sub.year_end else "monthly",
        )
        obj["billing_cycle_anchor"] = unix(sub.edges[0])
        if sub.year_end:
            year = (sub.period(sub.start)[0], unix(sub.year_end))
            items = [item_object(sub.stripe_id, sub.flat, year, interval="year")]
        else:
            items = [item_object(sub.stripe_id, sub.flat, period)]
        if sub.metered:
            items.append(item_object(sub.stripe_id, sub.metered, period, metered=True))
        obj["items"]["data"] = items
        return obj

    def send(self, event_type: str, obj: dict[str, Any], created: int) -> None:
        stripe_event = event_object(event_type, obj, event_id=new_id("evt"), created=created)
        self.queue.append(Delivery(stripe_event))
        self.event_ids.append(stripe_event["id"])

    def stripe_changed(self, sub: Sub, event_type: str) -> None:
        state = self.state(sub)
        self.standin.subscriptions[sub.stripe_id] = state
        self.send(event_type, state, int(time.time()))

    def invoice(self, sub: Sub, line: tuple[int, int], *, reason: str) -> dict[str, Any]:
        """An invoice of `sub` whose line bills `line`: usage of its metered price (the flat
        price at the first invoice, or while a yearly subscription has no metered item)."""
        price = sub.metered if sub.metered and reason != "subscription_create" else sub.flat
        return invoice_object(
            new_id("in"),
            sub.stripe_id,
            sub.org.customer,
            billed=line,
            created=line[1],
            metered_price=price,
            billing_reason=reason,
        )

    def live(self, k: int) -> Sub | None:
        live = [sub for sub in self.subs if sub.status in LIVE]
        return live[k % len(live)] if live else None

    def checkout(self, org_k: int, back: int, anchor: str, start: int, yearly: bool) -> None:
        """The organisation completes a checkout on the current prices, or (`back`) on the
        prices of an older catalogue version (a session opened before the change)."""
        org = self.org(org_k)
        if any(sub.org is org and sub.status in LIVE for sub in self.subs):
            return
        terms = self.current if back == 0 else self.versions[max(0, len(self.versions) - 1 - back)]
        edges = self.edges_for(anchor)
        sub = Sub(org, new_id("sub"), terms.monthly, terms.metered, edges, start, start)
        if yearly:
            sub.flat, sub.metered = terms.yearly, None
            sub.year_end = self.db.execute(
                "select ((%s::timestamptz at time zone 'UTC') + interval '1 year')"
                " at time zone 'UTC' as y",
                (edges[start - 1],),
            ).fetchone()["y"]
        self.subs.append(sub)
        self.say(
            f"{sub.stripe_id[:12]}: org{self.orgs.index(org)} checks out"
            f" {'yearly' if yearly else 'monthly'} on v{self.versions.index(terms)}"
            f" (anchor {anchor}, in period {start})"
        )
        self.stripe_changed(sub, "customer.subscription.created")
        session = checkout_session_object(
            sub.stripe_id,
            org.customer,
            organisation_id=org.id,
            plan={"id": self.plan_id},
            billing_period="yearly" if yearly else "monthly",
        )
        first = sub.period(start)[0]
        self.send("checkout.session.completed", session, first)
        self.send(
            "invoice.paid", self.invoice(sub, (first, first), reason="subscription_create"), first
        )

    def renew(self, k: int, billed: bool) -> None:
        """Stripe moves the subscription into its next period and (`billed`) invoices the one
        that ended: the invoice is paid and its invoice.paid sent."""
        sub = self.live(k)
        if sub is None or sub.index >= 1:
            return
        sub.index += 1
        self.say(f"{sub.stripe_id[:12]}: Stripe renews into period {sub.index}")
        self.stripe_changed(sub, "customer.subscription.updated")
        if billed:
            self.bill(sub, sub.index - 1)

    def invoice_paid(self, k: int) -> None:
        """Stripe invoices an ended period not yet invoiced, or a canceled subscription's last
        period up to the cancellation (a final invoice, invoice_now)."""
        billable = [
            (sub, i)
            for sub in self.subs
            for i in range(sub.start, sub.index + (sub.status == "canceled"))
            if i not in sub.invoiced
        ]
        if billable:
            self.bill(*billable[k % len(billable)])

    def bill(self, sub: Sub, i: int) -> None:
        start, end = sub.period(i)
        if i == sub.index:
            end = sub.canceled_at or end
        sub.invoiced.add(i)
        self.say(f"{sub.stripe_id[:12]}: Stripe invoices period {i}")
        self.send("invoice.paid", self.invoice(sub, (start, end), reason="subscription_cycle"), end)

    def cancel(self, k: int) -> None:
        sub = self.live(k)
        if sub is None:
            return
        sub.status, sub.canceled_at = "canceled", int(time.time())
        self.say(f"{sub.stripe_id[:12]}: canceled now")
        self.stripe_changed(sub, "customer.subscription.deleted")

    def hiccup(self) -> None:
        self.standin.fail_retrieves = 1
        self.say("Stripe answers the next retrieve with a 500")

    # ---------------------------------------------------------------- deliveries

    def deliver_one(self, delivery: Delivery) -> Any:
        sub = self.sub_of(delivery.event)
        if sub is not None:
            # A metered item the webhook adds (yearly checkout) starts in the current period.
            self.standin.metered_period = sub.period(sub.index)
        response = deliver(self.webhook, delivery.event)
        body = response.get_json()
        if response.status_code >= 500:
            # Only the 500s the stand-in was told to give: no unknown_price for an old price.
            assert body["error"]["code"] == "stripe_unavailable", (delivery.event["type"], body)
            self.retried = True
        else:
            assert response.status_code == 200, (delivery.event["type"], body)
            delivery.answered = True
        if sub is not None and sub.metered is None:
            items = self.standin.subscriptions[sub.stripe_id]["items"]["data"]
            added = [i["price"]["id"] for i in items if i["price"]["recurring"]["meter"]]
            if added:
                sub.metered = added[0]
                terms = self.terms_of(sub.metered)
                self.say(
                    f"{sub.stripe_id[:12]}: the webhook added the metered price of"
                    f" v{self.versions.index(terms) if terms else '?'}"
                )
        return response

    def sub_of(self, event: dict[str, Any]) -> Sub | None:
        obj = event["data"]["object"]
        details = (obj.get("parent") or {}).get("subscription_details") or {}
        stripe_id = obj.get("subscription") or details.get("subscription") or obj.get("id")
        return next((sub for sub in self.subs if sub.stripe_id == stripe_id), None)

    def deliver(self, k: int, again: bool) -> None:
        if not self.queue:
            return
        delivery = self.queue[k % len(self.queue)]
        was = delivery.answered
        status = self.deliver_one(delivery).status_code
        sub = self.sub_of(delivery.event)
        self.say(
            f"deliver {delivery.event['type']} of {sub.stripe_id[:12] if sub else '?'}"
            f"{' again' if was else ''}: {status}"
        )
        if delivery.answered and (was or not again):
            self.queue.remove(delivery)

    def settle(self, order: list[int] | None = None) -> list[tuple[str, int, Any]]:
        """Every delivery still due, in `order` (else as sent), each retried until Stripe gets a
        2xx; (type, status, body) of each last answer."""
        queue, self.queue = self.queue, []
        answers = []
        for index in range(len(queue)) if order is None else order:
            for _ in range(3):
                response = self.deliver_one(queue[index])
                if response.status_code < 500:
                    break
            assert queue[index].answered, queue[index].event["type"]
            answers.append((queue[index].event["type"], response.status_code, response.get_json()))
        self.standin.fail_retrieves = 0
        return answers

    # ---------------------------------------------------------------- usage

    def ended_at(self, when: str, edges: dict[int, datetime]) -> datetime | None:
        return {
            "now": None,
            "5min": datetime.now(UTC) - timedelta(minutes=5),
            "edge-1s": edges[0] - timedelta(seconds=1),
            "edge+1s": edges[0] + timedelta(seconds=1),
            "prev_start": edges[-1] + timedelta(seconds=1),
            "prev_prev": edges[-1] - timedelta(seconds=1),
            "36d": datetime.now(UTC) - timedelta(days=36),
        }[when]

    def report(
        self, who: int, seconds: float, when: str, failure: int | None = None
    ) -> dict[str, Any]:
        """A call of a subscription's organisation (who < 4), at an edge of its periods; or of
        any organisation, at an edge of its latest subscription's periods."""
        if self.subs and who < 4:
            sub = self.subs[who % len(self.subs)]
            org, edges = sub.org, sub.edges
        else:
            org = self.org(who)
            own = [sub.edges for sub in self.subs if sub.org is org]
            edges = own[-1] if own else self.default_edges
        call_id = f"call-{len(self.calls)}"
        body: dict[str, Any] = {"org_id": org.id, "call_id": call_id}
        body["call_duration_seconds"] = seconds
        ended = self.ended_at(when, edges)
        if ended is not None:
            body["ended_at"] = ended.isoformat()
        response = self.usage_api.post("/", json=body, headers=AUTH)
        answer = response.get_json()
        assert response.status_code in (201, 202), answer
        if answer["meter_status"] == "pending":
            # Its first delivery at once, as the background flush makes it, Stripe answering
            # `failure` (429: not taken; 500: perhaps taken); the flush step retries later.
            self.meter.failures = [failure] if failure else []
            flushed = self.usage_api.post("/", json={"action": "flush"}, headers=AUTH)
            self.meter.failures = []
            assert flushed.status_code == 200, flushed.get_json()
        assert answer["billed_minutes"] == billed_minutes(seconds), answer
        self.calls[(org.id, call_id)] = body
        self.say(
            f"report {call_id} org{self.orgs.index(org)} {seconds}s ended {when}"
            f"{f' (meter {failure})' if failure else ''}: {response.status_code}"
            f" late={answer['late']}"
        )
        return dict(answer)

    def repeat(self, k: int) -> None:
        if not self.calls:
            return
        body = list(self.calls.values())[k % len(self.calls)]
        response = self.usage_api.post("/", json=body, headers=AUTH)
        assert response.status_code == 200 and response.get_json()["duplicate"] is True
        self.say(f"report {body['call_id']} again: duplicate")

    def flush(self) -> None:
        """Time passes for the outbox (its backoffs run out), then the flush runs."""
        self.db.execute(
            "update usage_records set meter_next_attempt_at = now()"
            " where organisation_id = any(%s::uuid[]) and meter_status = 'pending'",
            ([org.id for org in self.orgs],),
        )
        response = self.usage_api.post("/", json={"action": "flush", "limit": 1000}, headers=AUTH)
        assert response.status_code == 200, response.get_json()
        self.say(f"flush: {response.get_json()}")

    # ---------------------------------------------------------------- what must hold

    def watch_invoiced(self) -> None:
        """After each step: no row and no minute enters a cycle once its invoice is made (taken
        out: allowed)."""
        for cycle in self.db.execute(
            "select c.id, c.minutes_used,"
            " coalesce(array_agg(u.id) filter (where u.id is not null), '{}') as rows"
            " from billing_cycles c left join usage_records u on u.billing_cycle_id = c.id"
            " where c.organisation_id = any(%s::uuid[])"
            " and (c.stripe_invoice_id is not null or c.closed_by_change)"
            " group by c.id",
            ([org.id for org in self.orgs],),
        ):
            minutes, rows = self.invoiced.setdefault(
                cycle["id"], (cycle["minutes_used"], set(cycle["rows"]))
            )
            assert set(cycle["rows"]) <= rows, f"rows entered invoiced cycle {cycle['id']}"
            assert cycle["minutes_used"] <= minutes, f"minutes entered invoiced {cycle['id']}"

    def check(self) -> dict[str, bool]:
        """Assert what must hold once every delivery is answered and the outbox flushed; which
        situations the example reached (for the statistics)."""
        orgs = [org.id for org in self.orgs]
        db = self.db
        # 1. every delivery answered 2xx in the end: no event left failed or in progress
        events = db.execute(
            "select id, type, status, error from stripe_events where id = any(%s)",
            (self.event_ids,),
        ).fetchall()
        assert len(events) == len(self.event_ids)
        assert [e for e in events if e["status"] != "processed"] == []

        subs = {
            row["stripe_subscription_id"]: row
            for row in db.execute(
                "select * from subscriptions where organisation_id = any(%s::uuid[])", (orgs,)
            )
        }
        prices = {
            row["stripe_price_id"]: row
            for row in db.execute(
                "select * from billing_plan_prices where plan_id = %s", (self.plan_id,)
            )
        }
        for sub in self.subs:
            row = subs[sub.stripe_id]
            assert row["status"] == sub.status
            flat_start = sub.edges[sub.start - 1] if sub.year_end else sub.edges[sub.index - 1]
            assert row["current_period_start"] == flat_start
            assert row["stripe_metered_price_id"] == sub.metered
        model = {sub.stripe_id: sub for sub in self.subs}

        cycles = db.execute(
            "select c.*, s.stripe_subscription_id from billing_cycles c"
            " join subscriptions s on s.id = c.subscription_id"
            " where c.organisation_id = any(%s::uuid[])",
            (orgs,),
        ).fetchall()
        usage = db.execute(
            "select * from usage_records where organisation_id = any(%s::uuid[])", (orgs,)
        ).fetchall()
        for cycle in cycles:
            sub = model[cycle["stripe_subscription_id"]]
            terms = (cycle["included_minutes"], cycle["overage_rate_cents"])
            # 2. the terms of the metered price the cycle is on, which is the one its
            # subscription is on; a cycle a call opened while a yearly subscription had no metered
            # item yet, and that the webhook never confirmed, carries the plan's terms of then.
            if cycle["stripe_metered_price_id"] is None:
                assert sub.year_end and cycle["confirmed_at"] is None, cycle
                assert terms in {(v.included, v.rate) for v in self.versions}, cycle
            else:
                assert cycle["stripe_metered_price_id"] == sub.metered, cycle
                price = prices[cycle["stripe_metered_price_id"]]
                assert terms == (price["included_minutes"], price["overage_rate_cents"]), cycle
                model_terms = self.terms_of(sub.metered)
                assert model_terms is not None
                assert terms == (model_terms.included, model_terms.rate), cycle
            # 5. overage follows the cycle's own terms
            overage = max(cycle["minutes_used"] - cycle["included_minutes"], 0)
            assert cycle["overage_minutes"] == overage, cycle
            assert cycle["overage_cost_cents"] == overage * cycle["overage_rate_cents"], cycle
            # 4. a cycle's minutes are its rows' minutes, each metered inside its period (3.)
            counted = [u for u in usage if u["billing_cycle_id"] == cycle["id"]]
            assert cycle["minutes_used"] == sum(u["billed_minutes"] for u in counted), cycle
            for u in counted:
                assert cycle["period_start"] <= u["metered_at"] < cycle["period_end"], (cycle, u)
                assert u["organisation_id"] == cycle["organisation_id"]

        # 4. every call one row, billed ceil(seconds / 60), and every counted minute in a cycle
        assert sorted((str(u["organisation_id"]), u["call_id"]) for u in usage) == sorted(
            self.calls
        )
        for u in usage:
            body = self.calls[(str(u["organisation_id"]), u["call_id"])]
            assert u["billed_minutes"] == billed_minutes(body["call_duration_seconds"])
        counted_minutes = sum(u["billed_minutes"] for u in usage if u["billing_cycle_id"])
        assert counted_minutes == sum(c["minutes_used"] for c in cycles)

        # Stripe's meter has what we say we sent, at the moment we counted it
        for u in usage:
            assert u["meter_status"] in ("sent", "skipped", "unconfirmed"), u
            if u["meter_status"] == "sent":
                assert u["billing_cycle_id"] is not None, u
                sent = self.meter.events[u["meter_identifier"]]
                assert sent["payload[value]"] == str(u["billed_minutes"]), (u, sent)
                assert int(sent["timestamp"]) == math.floor(u["metered_at"].timestamp()), u
            if u["billing_cycle_id"] is None:
                assert u["meter_status"] == "skipped", u

        coverage = {
            "late row in a cycle": any(u["late"] and u["billing_cycle_id"] for u in usage),
            "late row without a cycle": any(u["late"] and not u["billing_cycle_id"] for u in usage),
            "row moved late by the flush": db.execute(
                "select 1 from audit_log where organisation_id = any(%s::uuid[])"
                " and action = 'usage.late' and details ->> 'from_cycle' is not null",
                (orgs,),
            ).fetchone()
            is not None,
            "invoiced cycle": any(c["stripe_invoice_id"] for c in cycles),
            "cycle on old terms": any(
                model[c["stripe_subscription_id"]].metered != self.current.metered for c in cycles
            ),
            "yearly subscription": any(sub.year_end for sub in self.subs),
            "cycle opened before the metered item": any(
                c["stripe_metered_price_id"] is None for c in cycles
            ),
            "unconfirmed row": any(u["meter_status"] == "unconfirmed" for u in usage),
            "a 5xx retried": self.retried,
        }

        # GET report-usage: calls allowed exactly while Stripe has the organisation subscribed,
        # with the current cycle's minutes (or, before it opens, its subscription's terms)
        for org in self.orgs:
            summary = self.usage_api.get(f"/?org_id={org.id}", headers=AUTH).get_json()
            live = [sub for sub in self.subs if sub.org is org and sub.status in LIVE]
            assert summary["allowed"] is bool(live), (org, summary)
            if not live:
                continue
            now = [
                c
                for c in cycles
                if c["stripe_subscription_id"] == live[0].stripe_id
                and c["period_start"] <= datetime.now(UTC) < c["period_end"]
            ]
            terms = self.terms_of(live[0].metered)
            shown = (summary["included_minutes"], summary["minutes_used"])
            if now:
                assert shown == (now[0]["included_minutes"], now[0]["minutes_used"]), summary
            elif terms is not None:
                assert shown == (terms.included, 0), summary
        return {name: bool(seen) for name, seen in coverage.items()}


# ------------------------------------------------------------------ the property

indexes = st.integers(0, 5)
durations = st.one_of(st.integers(1, 3 * 3600), st.sampled_from([61, 0, 1, 59, 60, 90.5, 3600]))
checkouts = st.tuples(
    st.just("checkout"),
    indexes,
    st.integers(0, 2),
    st.sampled_from(ANCHOR_CHOICES),
    st.integers(0, 1),
    st.booleans(),
)
reports = st.tuples(
    st.just("report"),
    indexes,
    durations,
    st.sampled_from(["edge-1s", "edge+1s", "now", "5min", "prev_start", "prev_prev", "36d"]),
    st.sampled_from([None, 429, 500]),
)
# Each kind of step with its arguments, and how often it is drawn (reports and deliveries most).
STEPS: dict[str, tuple[int, st.SearchStrategy[tuple[Any, ...]]]] = {
    "report": (6, reports),
    "deliver": (3, st.tuples(st.just("deliver"), indexes, st.booleans())),
    "settle": (2, st.tuples(st.just("settle"))),
    "checkout": (2, checkouts),
    "renew": (2, st.tuples(st.just("renew"), indexes, st.booleans())),
    "invoice": (2, st.tuples(st.just("invoice"), indexes)),
    "flush": (2, st.tuples(st.just("flush"))),
    "catalogue": (
        1,
        st.tuples(
            st.just("catalogue"),
            st.sampled_from([2000, 0, 100, 500]),
            st.sampled_from([80, 0, 25]),
            st.booleans(),
        ),
    ),
    "cancel": (1, st.tuples(st.just("cancel"), indexes)),
    "repeat": (1, st.tuples(st.just("repeat"), indexes)),
    "hiccup": (1, st.tuples(st.just("hiccup"))),
    "revert": (1, st.tuples(st.just("revert"), indexes)),
    "bad_terms": (1, st.tuples(st.just("bad_terms"))),
}
steps = st.sampled_from(
    [kind for kind, (weight, _) in STEPS.items() for _ in range(weight)]
).flatmap(lambda kind: STEPS[kind][1])


def run_step(world: World, step: tuple[Any, ...], data: Any) -> None:
    kind, *args = step
    if kind == "settle":
        order = data.draw(st.permutations(range(len(world.queue))), label="settle order")
        world.say(f"settle {len(order)} deliveries")
        world.settle(order)
        return
    action = {
        "report": world.report,
        "deliver": world.deliver,
        "checkout": world.checkout,
        "renew": world.renew,
        "invoice": world.invoice_paid,
        "catalogue": world.catalogue,
        "cancel": world.cancel,
        "repeat": world.repeat,
        "flush": world.flush,
        "hiccup": world.hiccup,
        "revert": world.revert,
        "bad_terms": world.other_terms_under_current_prices,
    }[kind]
    action(*args)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # The first subscription starts in the previous period (it can be renewed and invoiced) and
    # its checkout is delivered first; later ones and everything else come in any order.
    first=st.tuples(
        st.just("checkout"),
        st.just(0),
        st.just(0),
        st.sampled_from(ANCHOR_CHOICES),
        st.just(0),
        st.booleans(),
    ),
    plan=st.lists(steps, min_size=12, max_size=40),
    data=st.data(),
)
def test_money_stays_right_through_catalogue_changes_renewals_and_late_usage(
    db, webhook, usage_api, stripe_side, make_org, make_plan, first, plan, data
):
    world = World(db, webhook, usage_api, stripe_side, make_org, make_plan())
    stripe_side[0].fail_retrieves = 0
    try:
        for step in [first, ("settle",), *plan]:
            run_step(world, step, data)
            world.watch_invoiced()
        order = data.draw(st.permutations(range(len(world.queue))), label="final order")
        world.settle(order)
        world.watch_invoiced()
        world.flush()
        world.watch_invoiced()
        for name, seen in world.check().items():
            event(f"{name}: {seen}")
    finally:
        note("\n".join(world.story))


# ------------------------------------------------------------------ the scenarios of issue 9


@pytest.fixture
def world(db, webhook, usage_api, stripe_side, make_org, make_plan) -> World:
    return World(db, webhook, usage_api, stripe_side, make_org, make_plan())


def cycle_terms(db: Any, sub: Sub) -> list[tuple[int, int, bool]]:
    """(included minutes, overage rate, invoiced) of each of the subscription's cycles."""
    return [
        (row["included_minutes"], row["overage_rate_cents"], row["stripe_invoice_id"] is not None)
        for row in db.execute(
            "select c.* from billing_cycles c join subscriptions s on s.id = c.subscription_id"
            " where s.stripe_subscription_id = %s order by c.period_start",
            (sub.stripe_id,),
        )
    ]


@pytest.mark.parametrize("flat_too", [True, False], ids=["all-prices", "metered-price-only"])
def test_an_old_subscriber_s_update_and_deletion_are_processed_after_a_catalogue_change(
    world, db, usage_api, flat_too
):
    world.checkout(0, 0, "2h", 0, False)
    world.settle()
    world.catalogue(2000, 80, flat_too)
    [old] = world.subs

    world.renew(0, False)
    assert [(kind, status, body["status"]) for kind, status, body in world.settle()] == [
        ("customer.subscription.updated", 200, "processed")
    ]
    world.cancel(0)
    assert [(kind, status, body["status"]) for kind, status, body in world.settle()] == [
        ("customer.subscription.deleted", 200, "processed")
    ]

    row = db.execute(
        "select * from subscriptions where stripe_subscription_id = %s", (old.stripe_id,)
    ).fetchone()
    assert (
        row["status"] == "canceled" and row["stripe_metered_price_id"] == world.versions[0].metered
    )
    summary = usage_api.get(f"/?org_id={old.org.id}", headers=AUTH).get_json()
    assert summary["allowed"] is False and summary["subscription_status"] == "canceled"
    world.flush()
    world.check()


def test_a_renewal_keeps_the_old_terms_and_a_new_checkout_gets_the_new_ones(world, db):
    world.checkout(0, 0, "2h", 0, False)
    world.settle()
    world.report(0, 61, "edge-1s")  # period 0, before the renewal
    world.catalogue(2000, 80, True)
    world.renew(0, True)
    world.checkout(1, 0, "30min", 1, False)
    world.settle()
    old, new = world.subs

    assert world.report(0, 600, "now")["included_minutes"] == 500
    assert world.report(1, 600, "now")["included_minutes"] == 2000
    assert cycle_terms(db, old) == [(500, 50, True), (500, 50, False)]
    assert cycle_terms(db, new) == [(2000, 80, False)]
    world.flush()
    world.check()


@pytest.mark.parametrize(
    "change",
    [
        "included_minutes = included_minutes + 1",
        "overage_rate_cents = overage_rate_cents + 1",
        "monthly_price_cents = monthly_price_cents + 100",
        "yearly_price_cents = yearly_price_cents + 100",
        "currency = 'usd'",
    ],
)
def test_other_terms_under_an_existing_price_id_are_refused(db, make_plan, change):
    plan = make_plan()
    before = db.execute("select * from billing_plans where id = %s", (plan["id"],)).fetchone()

    with pytest.raises(psycopg.Error) as refused:
        db.execute(f"update billing_plans set {change} where id = %s", (plan["id"],))

    assert refused.value.sqlstate == "MB409"
    assert (
        db.execute("select * from billing_plans where id = %s", (plan["id"],)).fetchone() == before
    )


def test_another_plan_cannot_take_an_existing_price_id(db, make_plan):
    plan = make_plan()
    with pytest.raises(psycopg.Error) as refused:
        make_plan(stripe_metered_price_id=plan["stripe_metered_price_id"])
    assert refused.value.sqlstate == "MB409"
    assert (
        db.execute(
            "select count(*) as n from billing_plans where stripe_metered_price_id = %s",
            (plan["stripe_metered_price_id"],),
        ).fetchone()["n"]
        == 1
    )


def test_replaced_prices_stay_known_with_their_terms_and_inactive(world, db):
    first = world.current
    world.catalogue(2000, 80, True)
    second = world.current
    world.catalogue(100, 25, False)  # the metered price only
    third = world.current

    prices = {
        row["stripe_price_id"]: (
            row["kind"],
            row["included_minutes"],
            row["overage_rate_cents"],
            row["active"],
        )
        for row in db.execute(
            "select * from billing_plan_prices where plan_id = %s", (world.plan_id,)
        )
    }
    assert prices == {
        first.monthly: ("monthly", None, None, False),
        first.yearly: ("yearly", None, None, False),
        first.metered: ("metered", 500, 50, False),
        second.monthly: ("monthly", None, None, True),
        second.yearly: ("yearly", None, None, True),
        second.metered: ("metered", 2000, 80, False),
        third.metered: ("metered", 100, 25, True),
    }
    # Each old price still names the plan, with its own terms.
    old = db.execute(
        "select plan_for_stripe_prices(%s::jsonb) as plan",
        (json.dumps([first.monthly, first.metered]),),
    ).fetchone()["plan"]
    assert (old["plan_id"], old["included_minutes"], old["overage_rate_cents"]) == (
        world.plan_id,
        500,
        50,
    )

    world.revert(0)  # an operator puts the first prices back: they are current again
    active = {
        row["stripe_price_id"]
        for row in db.execute(
            "select * from billing_plan_prices where plan_id = %s and active", (world.plan_id,)
        )
    }
    assert active == {first.monthly, first.yearly, first.metered}


def test_a_yearly_cycle_opened_before_its_metered_item_takes_the_added_price_s_terms(world, db):
    """The property found it (fixed by sql/0050): a call-opened cycle kept the plan's terms of
    its opening after a catalogue change, while Stripe bills the metered price added later."""
    world.checkout(0, 0, "2h", 1, True)
    world.deliver(0, False)  # customer.subscription.created: live, no metered item yet
    world.report(0, 61, "now")  # the agent may call: allowed is true; the cycle opens
    world.catalogue(2000, 80, False)
    world.deliver(0, False)  # checkout.session.completed: the webhook adds v1's metered price
    world.settle()
    [sub] = world.subs
    assert sub.metered == world.versions[1].metered

    assert cycle_terms(db, sub) == [(2000, 80, False)]  # Stripe bills v1's tiers
    world.flush()
    world.check()
