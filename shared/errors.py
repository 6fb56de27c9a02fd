"""The one exception tree of metered-billing; `shared.http` turns it into the JSON error shape.

    BillingError                  status, stable snake_case code, message for a person
    ├── BadRequest            400 bad_request (invalid_signature, invalid_json, ...)
    ├── Unauthorized          401 unauthorized (missing_token, invalid_token, token_expired, ...)
    ├── PaymentRequired       402 payment_failed: a charge we asked for was declined
    ├── Forbidden             403 forbidden
    ├── NotFound              404 not_found (organisation_not_found, plan_not_found, ...)
    ├── MethodNotAllowed      405 method_not_allowed
    ├── Conflict              409 conflict (already_subscribed, ...)
    ├── PayloadTooLarge       413 payload_too_large
    ├── UnsupportedMediaType  415 unsupported_media_type (a body that is not application/json)
    ├── Unprocessable         422 validation_error (names the field)
    ├── UpstreamError         502 stripe_error: Stripe refused a request we made
    └── Unavailable           503 service_unavailable: retry later (Stripe or the database)
ConfigError                   a missing or placeholder setting: the process must not start
"""

from __future__ import annotations

from typing import Any, ClassVar


class ConfigError(RuntimeError):
    """A required setting is missing or still a placeholder."""


class BillingError(Exception):
    """An error with an HTTP status and a stable code that callers can branch on."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.details)
        return {"error": error}


class BadRequest(BillingError):
    status = 400
    default_code = "bad_request"


class Unauthorized(BillingError):
    status = 401
    default_code = "unauthorized"


class PaymentRequired(BillingError):
    status = 402
    default_code = "payment_failed"


class Forbidden(BillingError):
    status = 403
    default_code = "forbidden"


class NotFound(BillingError):
    status = 404
    default_code = "not_found"


class MethodNotAllowed(BillingError):
    status = 405
    default_code = "method_not_allowed"


class Conflict(BillingError):
    status = 409
    default_code = "conflict"


class PayloadTooLarge(BillingError):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(BillingError):
    status = 415
    default_code = "unsupported_media_type"


class Unprocessable(BillingError):
    status = 422
    default_code = "validation_error"


class UpstreamError(BillingError):
    status = 502
    default_code = "stripe_error"


class Unavailable(BillingError):
    status = 503
    default_code = "service_unavailable"


_BY_STATUS: dict[int, type[BillingError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        PaymentRequired,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        Unprocessable,
        UpstreamError,
        Unavailable,
    )
}


def error_for_status(status: int, code: str, message: str) -> BillingError:
    """The BillingError for an HTTP status raised from SQL (errcode MBnnn, hint = code)."""
    cls = _BY_STATUS.get(status, BillingError)
    return cls(message, code=code)
