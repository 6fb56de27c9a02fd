"""The billing page's one read (DESIGN.md, GET billing-overview): what any member may see.

Who may see which organisation, and every figure, are decided by one SQL call
(`billing_overview`, sql/0080: the decisions are written there), so the page, GET report-usage
and the tables can never disagree.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.auth import Caller
from shared.db import Database


class OverviewQuery(BaseModel):
    """`?organisation_id=`, optional for a user of one organisation; other parameters refused."""

    model_config = ConfigDict(extra="forbid")

    organisation_id: uuid.UUID | None = None


def billing_overview(caller: Caller, query: OverviewQuery, *, database: Database) -> dict[str, Any]:
    """{organisation, subscription, cycle, daily_usage, alerts, invoices, plans} (403/404/422)."""
    overview: dict[str, Any] = database.call(
        "billing_overview",
        p_user_id=caller.user_id,
        p_organisation_id=str(query.organisation_id) if query.organisation_id else None,
    )
    return overview
