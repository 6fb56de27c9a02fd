"""One settings object per process, read from the environment names of DESIGN.md.

A plain pydantic model over os.environ: pydantic-settings did the same, but took a quarter of
a function's cold start to import (its sources for .env files, clouds and vaults: 95 ms here).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ConfigError

# Values people leave in .env files that must never be taken for a real secret.
_PLACEHOLDERS = ("changeme", "change-me", "change_me", "placeholder", "your-", "your_", "todo")
_PLACEHOLDER_EXACT = {"", "xxx", "secret", "password", "sk_test_xxx", "sk_live_xxx", "whsec_xxx"}

SECRETS = (
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_JWT_SECRET",
    "DATABASE_URL",
)


def is_placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _PLACEHOLDER_EXACT or (lowered.startswith("<") and lowered.endswith(">")):
        return True
    return any(marker in lowered for marker in _PLACEHOLDERS) or set(lowered) <= {"x", "*", "."}


class Settings(BaseModel):
    """Configuration; secrets have no defaults and are checked by `require`.

    `Settings()` reads each field from the environment variable of the same name; keyword
    arguments take precedence (tests, ops commands). Values are validated as given: a bad number
    stops start-up with pydantic's message naming the variable.
    """

    model_config = ConfigDict(extra="ignore")

    DATABASE_URL: str | None = None
    SUPABASE_URL: str | None = None
    SUPABASE_SERVICE_ROLE_KEY: str | None = Field(default=None, repr=False)
    SUPABASE_JWT_SECRET: str | None = Field(default=None, repr=False)
    SUPABASE_JWKS_URL: str | None = None
    STRIPE_SECRET_KEY: str | None = Field(default=None, repr=False)
    STRIPE_WEBHOOK_SECRET: str | None = Field(default=None, repr=False)
    STRIPE_API_BASE: str | None = None
    STRIPE_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0, le=80)
    STRIPE_MAX_NETWORK_RETRIES: int = Field(default=1, ge=0, le=5)
    STRIPE_METER_EVENT_NAME: str = "voice_call_minutes"
    STRIPE_SETUP_FEE_PRICE_ID: str | None = None
    STRIPE_PORTAL_CONFIGURATION_ID: str | None = None
    WEBSITE_URL: str | None = None
    DATABASE_POOL_SIZE: int = Field(default=10, ge=1, le=100)
    # report-usage flushes queued meter events after this many seconds (or 100 events); 0: only
    # the scheduled flush sends them.
    METER_FLUSH_DELAY_SECONDS: float = Field(default=5.0, ge=0, le=50)

    def __init__(self, **values: Any) -> None:
        environment = {
            name: os.environ[name] for name in type(self).model_fields if name in os.environ
        }
        super().__init__(**{**environment, **values})

    def require(self, *names: str) -> Settings:
        """Stop start-up with a message naming the first missing or placeholder variable."""
        for name in names:
            value = getattr(self, name)
            # The webhook secret may be a list (rotation): each secret of it is checked.
            parts = value.split(",") if name == "STRIPE_WEBHOOK_SECRET" and value else [value]
            if value is None or any(isinstance(p, str) and is_placeholder(p) for p in parts):
                state = "is not set" if value is None else "is a placeholder"
                raise ConfigError(f"{name} {state}; set it in the environment before starting.")
        return self

    def require_database(self) -> Settings:
        """DATABASE_URL, or SUPABASE_URL with SUPABASE_SERVICE_ROLE_KEY for the REST transport."""
        if self.DATABASE_URL is not None:
            return self.require("DATABASE_URL")
        if self.SUPABASE_URL is None:
            raise ConfigError(
                "DATABASE_URL is not set (nor SUPABASE_URL with SUPABASE_SERVICE_ROLE_KEY)."
            )
        return self.require("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")

    @property
    def jwks_url(self) -> str | None:
        if self.SUPABASE_JWKS_URL:
            return self.SUPABASE_JWKS_URL
        if self.SUPABASE_URL:
            return self.SUPABASE_URL.rstrip("/") + "/auth/v1/.well-known/jwks.json"
        return None

    @property
    def webhook_secrets(self) -> list[str]:
        raw = self.STRIPE_WEBHOOK_SECRET or ""
        return [part.strip() for part in raw.split(",") if part.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
