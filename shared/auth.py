"""Who is calling: a Supabase user (Bearer JWT) or the service role (key or legacy JWT)."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import flask

from shared.errors import Forbidden, Unauthorized, Unavailable
from shared.http import bearer_token
from shared.settings import Settings

JWKS_TTL_SECONDS = 600.0
JWKS_REFETCH_SECONDS = 30.0  # an unknown kid refetches at most this often per URL
JWKS_TIMEOUT_SECONDS = 5.0
# While the JWKS cannot be fetched, keys fetched this recently go on verifying tokens (the fetch
# is tried again once per JWKS_REFETCH_SECONDS): an outage of Supabase's JWKS endpoint neither
# turns every signed-in request away nor makes each wait JWKS_TIMEOUT_SECONDS. Kept short: a
# key revoked during such an outage stays trusted at most this long after its last fetch.
JWKS_STALE_SECONDS = 1800.0
_KEY_TYPES = {"ES256": "EC", "RS256": "RSA"}


@dataclass(frozen=True)
class Caller:
    user_id: str | None
    role: str
    email: str | None


@dataclass
class _Jwks:
    keys: dict[str, dict[str, Any]]
    fetched_at: float
    refetched_at: float = float("-inf")
    failed_at: float = float("-inf")


_jwks_cache: dict[str, _Jwks] = {}
_now = time.monotonic
log = logging.getLogger("metered_billing")


def clear_jwks_cache() -> None:
    """Forget every fetched JWKS."""
    _jwks_cache.clear()


def _invalid(reason: str) -> Unauthorized:
    return Unauthorized(f"The token is not valid: {reason}.", code="invalid_token")


def _keys_unavailable() -> Unavailable:
    return Unavailable("The signing keys could not be fetched.", code="auth_unavailable")


def _fetch_jwks(url: str) -> dict[str, dict[str, Any]]:
    """GET the JWKS as {kid: jwk}; 503 auth_unavailable when it cannot be read."""
    import httpx  # only for asymmetric tokens: the service key never needs it

    unavailable = _keys_unavailable()
    try:
        response = httpx.get(url, timeout=JWKS_TIMEOUT_SECONDS)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        raise unavailable from exc
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise unavailable
    return {
        key["kid"]: key
        for key in body["keys"]
        if isinstance(key, dict) and isinstance(key.get("kid"), str)
    }


def _jwks_key(kid: str, settings: Settings) -> dict[str, Any]:
    """The JWK for `kid`; an unknown kid refetches, at most once per JWKS_REFETCH_SECONDS, and
    is 503 auth_unavailable, not 401, while the JWKS cannot be read."""
    url = settings.jwks_url
    if url is None:
        raise _invalid("no JWKS is configured for asymmetric tokens")
    entry, now = _jwks_cache.get(url), _now()
    if entry is None or now - entry.fetched_at >= JWKS_TTL_SECONDS:
        entry = _refreshed(url, entry, now, entry.refetched_at if entry else float("-inf"))
    elif kid not in entry.keys and now - entry.refetched_at >= JWKS_REFETCH_SECONDS:
        entry = _refreshed(url, entry, now, now)
    if kid not in entry.keys:
        if now - entry.failed_at < JWKS_REFETCH_SECONDS:
            raise _keys_unavailable()  # it may be a new key: the JWKS could not be read to know
        raise _invalid("unknown signing key")
    return entry.keys[kid]


def _refreshed(url: str, entry: _Jwks | None, now: float, refetched_at: float) -> _Jwks:
    """The JWKS fetched now; while it cannot be, the cached keys up to JWKS_STALE_SECONDS old
    (503 auth_unavailable without any, or after that)."""
    if entry is not None and now - entry.failed_at < JWKS_REFETCH_SECONDS:
        fresh = entry  # failed moments ago: not again on every request
    else:
        try:
            fresh = _Jwks(_fetch_jwks(url), now, refetched_at)
        except Unavailable:
            if entry is None:
                raise
            fresh = dataclasses.replace(entry, refetched_at=now, failed_at=now)
            log.warning("JWKS not fetched; the cached keys are %.0f s old", now - entry.fetched_at)
        _jwks_cache[url] = fresh
    if now - fresh.fetched_at >= JWKS_STALE_SECONDS:
        raise _keys_unavailable()
    return fresh


def _verification_key(token: str, settings: Settings) -> tuple[Any, str]:
    """The one key and algorithm this token may be verified with."""
    from jose import jwk, jwt  # loaded with the first token (the service key never needs it)
    from jose.exceptions import JOSEError

    try:
        header = jwt.get_unverified_header(token)
    except JOSEError as exc:
        raise _invalid("malformed") from exc
    alg = header.get("alg")
    if alg == "HS256":
        if not settings.SUPABASE_JWT_SECRET:
            raise _invalid("HS256 tokens are not accepted")
        key_data: Any = settings.SUPABASE_JWT_SECRET
    elif isinstance(alg, str) and alg in _KEY_TYPES:
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("no key id")
        key_data = _jwks_key(kid, settings)
        if key_data.get("kty") != _KEY_TYPES[alg] or key_data.get("alg", alg) != alg:
            raise _invalid("algorithm does not match the signing key")
    else:
        raise _invalid("algorithm not allowed")
    try:
        return jwk.construct(key_data, alg), alg
    except JOSEError as exc:
        raise _invalid("unusable signing key") from exc


def _claims(token: str, settings: Settings, *, audience: str | None) -> dict[str, Any]:
    """Verified claims: signature, exp (required) and, when given, aud."""
    from jose import jwt
    from jose.exceptions import ExpiredSignatureError, JOSEError, JWTClaimsError

    key, alg = _verification_key(token, settings)
    checks_aud = audience is not None
    options = {"require_exp": True, "verify_aud": checks_aud, "require_aud": checks_aud}
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[alg], audience=audience, options=options
        )
    except ExpiredSignatureError as exc:
        raise Unauthorized("The token has expired.", code="token_expired") from exc
    except JWTClaimsError as exc:
        raise _invalid("wrong audience or claims") from exc
    except JOSEError as exc:
        # jose's plain JWTError also means a required claim is missing (checked after the signature)
        raise _invalid("bad signature, malformed, or a required claim (exp, aud) missing") from exc
    return claims


def verify_user_token(token: str, settings: Settings) -> Caller:
    """The user a Supabase access token belongs to; 401 unless valid with role authenticated."""
    claims = _claims(token, settings, audience="authenticated")
    if claims.get("role") != "authenticated":
        raise _invalid("not a user token")
    try:
        user_id = str(uuid.UUID(str(claims.get("sub"))))
    except ValueError as exc:
        raise _invalid("missing or malformed sub") from exc
    email = claims.get("email")
    email = email if isinstance(email, str) and email else None
    return Caller(user_id=user_id, role="authenticated", email=email)


def require_user(request: flask.Request, settings: Settings) -> Caller:
    """The user behind `Authorization: Bearer <user JWT>`; 401 otherwise."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Send Authorization: Bearer <access token>.", code="missing_token")
    return verify_user_token(token, settings)


def require_service(request: flask.Request, settings: Settings) -> Caller:
    """The service role: the exact service key or a signed service_role JWT; 403 for other roles."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Send Authorization: Bearer <service key>.", code="missing_token")
    service_key = settings.SUPABASE_SERVICE_ROLE_KEY
    if service_key and hmac.compare_digest(token.encode(), service_key.encode()):
        return Caller(user_id=None, role="service_role", email=None)
    # Legacy service_role JWTs carry no aud; the signature and exp still decide.
    claims = _claims(token, settings, audience=None)
    if claims.get("role") != "service_role":
        raise Forbidden("This endpoint needs the service-role key.", code="service_key_required")
    return Caller(user_id=None, role="service_role", email=None)
