"""shared.auth against keys made here and a JWKS served by respx: no network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import flask
import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwt

from shared import auth
from shared.errors import BillingError, Forbidden, Unauthorized, Unavailable
from shared.settings import Settings

SECRET = "test-hs256-secret-0123456789abcdef0123456789"
SERVICE_KEY = "sb_secret_Q2x1ZGVfc2VydmljZV9rZXlfZm9yX3Rlc3Rz"
SUPABASE_URL = "https://proj.supabase.co"
JWKS_URL = SUPABASE_URL + "/auth/v1/.well-known/jwks.json"
USER_ID = str(uuid.uuid4())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "use": "sig",
        "kid": kid,
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def _rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": kid,
        "n": _int_b64(numbers.n),
        "e": _int_b64(numbers.e),
    }


EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_JWK = _ec_jwk(EC_KEY, "ec-1")
RSA_JWK = _rsa_jwk(RSA_KEY, "rsa-1")


def _user_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": USER_ID,
        "aud": "authenticated",
        "role": "authenticated",
        "email": "ada@example.com",
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def _service_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "supabase", "ref": "proj", "role": "service_role", "iat": now}
    claims["exp"] = now + 3600
    claims.update(changes)
    return claims


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def es256(claims: dict[str, Any], key: Any = EC_KEY, kid: str = "ec-1") -> str:
    return jwt.encode(claims, _pem(key).decode(), algorithm="ES256", headers={"kid": kid})


def rs256(claims: dict[str, Any], kid: str = "rsa-1") -> str:
    return jwt.encode(claims, _pem(RSA_KEY).decode(), algorithm="RS256", headers={"kid": kid})


def hand_signed(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand, so it can carry what jose refuses to sign (alg none, PEM HMAC keys)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if hmac_key is None:
        return signing_input + "."
    digest = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(digest)


def make_settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": SUPABASE_URL,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        "SUPABASE_JWKS_URL": None,
    }
    values.update(changes)
    return Settings(**values)


def request_with(headers: dict[str, str]) -> flask.Request:
    return flask.Flask(__name__).test_request_context(headers=headers).request


def bearer(token: str) -> flask.Request:
    return request_with({"Authorization": f"Bearer {token}"})


def raises(error: type[BillingError], code: str, call: Any, *args: Any) -> BillingError:
    with pytest.raises(error) as caught:
        call(*args)
    assert caught.value.code == code
    return caught.value


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def jwks() -> Iterator[respx.Route]:
    auth.clear_jwks_cache()
    with respx.mock(assert_all_called=False) as mock:
        yield mock.get(JWKS_URL).respond(json={"keys": [EC_JWK, RSA_JWK]})
    auth.clear_jwks_cache()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(auth, "_now", lambda: now[0])
    return now


# --- user tokens -----------------------------------------------------------------------------


def test_good_hs256_token_names_the_user(settings: Settings, jwks: respx.Route) -> None:
    caller = auth.require_user(bearer(hs256(_user_claims())), settings)
    assert caller == auth.Caller(user_id=USER_ID, role="authenticated", email="ada@example.com")
    assert jwks.call_count == 0


def test_good_es256_token_passes(settings: Settings, jwks: respx.Route) -> None:
    caller = auth.verify_user_token(es256(_user_claims()), settings)
    assert (caller.user_id, caller.role) == (USER_ID, "authenticated")


def test_good_rs256_token_passes(settings: Settings, jwks: respx.Route) -> None:
    caller = auth.verify_user_token(rs256(_user_claims(email=None)), settings)
    assert (caller.user_id, caller.email) == (USER_ID, None)


def test_expired_token_is_token_expired(settings: Settings, jwks: respx.Route) -> None:
    expired = _user_claims(exp=int(time.time()) - 10)
    raises(Unauthorized, "token_expired", auth.verify_user_token, hs256(expired), settings)
    raises(Unauthorized, "token_expired", auth.verify_user_token, es256(expired), settings)


@pytest.mark.parametrize(
    "claims",
    [
        _user_claims(aud="anon"),
        _user_claims(aud=None),
        _user_claims(exp=None),
        _user_claims(sub=None),
        _user_claims(sub="not-a-uuid"),
        _user_claims(role="anon"),
        _user_claims(role="service_role"),
    ],
    ids=["wrong-aud", "no-aud", "no-exp", "no-sub", "bad-sub", "role-anon", "role-service"],
)
def test_bad_claims_are_invalid(
    claims: dict[str, Any], settings: Settings, jwks: respx.Route
) -> None:
    raises(Unauthorized, "invalid_token", auth.verify_user_token, hs256(claims), settings)


def test_a_missing_audience_is_named_in_the_message(settings: Settings, jwks: respx.Route) -> None:
    token = hs256(_user_claims(aud=None))
    error = raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)
    assert "aud" in error.message


def test_wrong_hs256_secret_is_invalid(settings: Settings, jwks: respx.Route) -> None:
    token = hs256(_user_claims(), secret="another-secret-of-decent-length-123456")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)


def test_es256_signed_by_another_key_with_same_kid_is_invalid(
    settings: Settings, jwks: respx.Route
) -> None:
    token = es256(_user_claims(), key=OTHER_EC_KEY, kid="ec-1")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)


def test_alg_none_is_invalid(settings: Settings, jwks: respx.Route) -> None:
    token = hand_signed({"alg": "none", "typ": "JWT"}, _user_claims(), None)
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)
    raises(Unauthorized, "invalid_token", auth.require_service, bearer(token), settings)


def test_tampered_payload_is_invalid_and_not_echoed(settings: Settings, jwks: respx.Route) -> None:
    header, _, signature = hs256(_user_claims()).split(".")
    forged = _b64(json.dumps(_user_claims(sub=str(uuid.uuid4()))).encode())
    token = f"{header}.{forged}.{signature}"
    error = raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)
    assert signature not in error.message and forged not in error.message


@pytest.mark.parametrize("jwt_secret", [SECRET, None], ids=["secret-set", "secret-unset"])
@pytest.mark.parametrize(
    "hmac_key",
    [_public_pem(EC_KEY), json.dumps(EC_JWK).encode(), _public_pem(RSA_KEY)],
    ids=["ec-pem", "ec-jwk", "rsa-pem"],
)
def test_algorithm_confusion_is_invalid(
    hmac_key: bytes, jwt_secret: str | None, jwks: respx.Route
) -> None:
    token = hand_signed({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}, _user_claims(), hmac_key)
    settings = make_settings(SUPABASE_JWT_SECRET=jwt_secret)
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)
    assert jwks.call_count == 0


def test_rs256_header_on_an_ec_key_is_invalid(settings: Settings, jwks: respx.Route) -> None:
    token = rs256(_user_claims(), kid="ec-1")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "e30.e30.",
        ".....",
        hand_signed({"alg": ["ES256"], "kid": "ec-1"}, _user_claims(), b"x"),
        hand_signed({"alg": "HS512"}, _user_claims(), b"x"),
        hand_signed({"alg": "ES256", "kid": 1}, _user_claims(), b"x"),
    ],
)
def test_malformed_token_is_invalid(token: str, settings: Settings, jwks: respx.Route) -> None:
    raises(Unauthorized, "invalid_token", auth.verify_user_token, token, settings)


# --- the JWKS cache --------------------------------------------------------------------------


def test_unknown_kid_refetches_once_per_30_seconds(
    settings: Settings, jwks: respx.Route, clock: list[float]
) -> None:
    auth.verify_user_token(es256(_user_claims()), settings)
    assert jwks.call_count == 1
    stranger = es256(_user_claims(), kid="rotated-away")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, stranger, settings)
    assert jwks.call_count == 2
    clock[0] += 29
    another = es256(_user_claims(), kid="random-kid")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, another, settings)
    assert jwks.call_count == 2
    clock[0] += 2
    raises(Unauthorized, "invalid_token", auth.verify_user_token, another, settings)
    assert jwks.call_count == 3


def test_unknown_kid_on_a_cold_cache_fetches_once(
    settings: Settings, jwks: respx.Route, clock: list[float]
) -> None:
    stranger = es256(_user_claims(), kid="rotated-away")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, stranger, settings)
    assert jwks.call_count == 1


def test_jwks_is_cached_for_ten_minutes(
    settings: Settings, jwks: respx.Route, clock: list[float]
) -> None:
    auth.verify_user_token(es256(_user_claims()), settings)
    auth.verify_user_token(rs256(_user_claims()), settings)
    assert jwks.call_count == 1
    clock[0] += 601
    auth.verify_user_token(es256(_user_claims()), settings)
    assert jwks.call_count == 2


@pytest.mark.parametrize(
    "reply",
    [httpx.Response(500), httpx.Response(200, text="<html>"), httpx.ConnectError("down")],
    ids=["500", "not-json", "connect-error"],
)
def test_jwks_down_is_unavailable(reply: Any, settings: Settings, jwks: respx.Route) -> None:
    jwks.mock(side_effect=[reply])
    raises(Unavailable, "auth_unavailable", auth.verify_user_token, es256(_user_claims()), settings)


def test_jwks_down_after_its_ttl_keeps_the_cached_keys_for_half_an_hour(
    settings: Settings, jwks: respx.Route, clock: list[float]
) -> None:
    auth.verify_user_token(es256(_user_claims()), settings)
    fetched = clock[0]
    jwks.side_effect = httpx.ConnectError("down")
    # Past the TTL the fetch fails: the cached keys go on verifying, and fail-fast for 30 s.
    clock[0] += 601
    assert auth.verify_user_token(es256(_user_claims()), settings).user_id == USER_ID
    assert jwks.call_count == 2
    clock[0] += 29
    assert auth.verify_user_token(rs256(_user_claims()), settings).user_id == USER_ID
    # A key the cache does not know may be a new one: unavailable, not invalid.
    stranger = es256(_user_claims(), kid="rotated-in")
    raises(Unavailable, "auth_unavailable", auth.verify_user_token, stranger, settings)
    assert jwks.call_count == 2
    # A forged token is still refused with the cached keys.
    forged = es256(_user_claims(), key=OTHER_EC_KEY, kid="ec-1")
    raises(Unauthorized, "invalid_token", auth.verify_user_token, forged, settings)
    clock[0] += 1
    auth.verify_user_token(es256(_user_claims()), settings)
    assert jwks.call_count == 3
    # Half an hour after the last good fetch the cached keys are no longer trusted.
    clock[0] = fetched + auth.JWKS_STALE_SECONDS
    raises(Unavailable, "auth_unavailable", auth.verify_user_token, es256(_user_claims()), settings)
    # Back up: the next try (30 s after the last) fetches again and verifies.
    jwks.side_effect = None
    clock[0] += 30
    assert auth.verify_user_token(es256(_user_claims()), settings).user_id == USER_ID
    assert jwks.call_count == 5
    raises(Unauthorized, "invalid_token", auth.verify_user_token, stranger, settings)


# --- the Authorization header ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic x"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}],
    ids=["none", "basic", "bearer-empty", "bearer-bare"],
)
@pytest.mark.parametrize("require", [auth.require_user, auth.require_service])
def test_missing_token(headers: dict[str, str], require: Any, settings: Settings) -> None:
    raises(Unauthorized, "missing_token", require, request_with(headers), settings)


# --- the service role ------------------------------------------------------------------------

SERVICE = auth.Caller(user_id=None, role="service_role", email=None)


def test_exact_service_key_passes(settings: Settings) -> None:
    assert auth.require_service(bearer(SERVICE_KEY), settings) == SERVICE


def test_service_key_with_one_char_changed_is_invalid(settings: Settings) -> None:
    altered = SERVICE_KEY[:-1] + ("A" if SERVICE_KEY[-1] != "A" else "B")
    raises(Unauthorized, "invalid_token", auth.require_service, bearer(altered), settings)


def test_service_key_is_refused_when_not_configured(jwks: respx.Route) -> None:
    settings = make_settings(SUPABASE_SERVICE_ROLE_KEY=None)
    raises(Unauthorized, "invalid_token", auth.require_service, bearer(SERVICE_KEY), settings)


def test_legacy_service_role_jwt_without_aud_passes(settings: Settings) -> None:
    assert auth.require_service(bearer(hs256(_service_claims())), settings) == SERVICE


def test_service_role_jwt_from_jwks_passes(settings: Settings, jwks: respx.Route) -> None:
    assert auth.require_service(bearer(es256(_service_claims())), settings) == SERVICE


def test_service_role_jwt_must_be_signed_and_live(settings: Settings) -> None:
    forged = hs256(_service_claims(), secret="not-the-project-secret-0123456789")
    raises(Unauthorized, "invalid_token", auth.require_service, bearer(forged), settings)
    expired = hs256(_service_claims(exp=int(time.time()) - 10))
    raises(Unauthorized, "token_expired", auth.require_service, bearer(expired), settings)
    no_exp = {k: v for k, v in _service_claims().items() if k != "exp"}
    raises(Unauthorized, "invalid_token", auth.require_service, bearer(hs256(no_exp)), settings)


def test_user_token_is_forbidden_for_the_service(settings: Settings) -> None:
    token = hs256(_user_claims())
    raises(Forbidden, "service_key_required", auth.require_service, bearer(token), settings)


def test_other_validly_signed_roles_are_forbidden(settings: Settings) -> None:
    # Any validly signed role other than service_role (anon, authenticated, ...) is a 403.
    anon = hs256(_service_claims(role="anon"))
    raises(Forbidden, "service_key_required", auth.require_service, bearer(anon), settings)
