"""The website (WEBSITE_URL): the only origin browsers may call from, and the only place we redirect to.

CORS answers the `WEBSITE_URL` origin only. A browser page on another origin is refused with
403 `origin_not_allowed` (preflight and request alike); requests with no `Origin` header do not
come from a web page and are left to authentication.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from urllib.parse import unquote, urlsplit

import flask

from shared.errors import ConfigError, Forbidden
from shared.http import Handler, endpoint
from shared.settings import Settings, get_settings

ALLOW_HEADERS = "authorization, content-type"
PREFLIGHT_MAX_AGE = "600"
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}

# RFC 3986 path, query and fragment characters, a `%` only as a `%XX` escape (Stripe refuses a
# malformed URL with url_invalid, a 502 for what is bad input), and Stripe's session id template.
_PATH = re.compile(
    r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2}|\{CHECKOUT_SESSION_ID\})*"
)


def website_origin(website_url: str | None) -> str:
    """`scheme://host[:port]` of WEBSITE_URL, spelled as browsers send it in `Origin`."""
    parts = urlsplit((website_url or "").strip())
    netloc = parts.netloc.lower()
    if parts.scheme not in _DEFAULT_PORTS or not netloc or "@" in netloc:
        raise ConfigError("WEBSITE_URL must be an http(s) origin such as https://app.example.com.")
    return f"{parts.scheme}://{netloc.removesuffix(_DEFAULT_PORTS[parts.scheme])}"


def website_path(path: str) -> str:
    """`path` when it is a path on our website (a single leading `/`); ValueError otherwise.

    Refused: other origins (`https://...`, `//evil.com`), backslashes, control characters and
    `.`/`..` segments, also when percent-encoded, so no redirect can leave the website.
    """
    decoded = unquote(path)
    segments = decoded.split("?", 1)[0].split("#", 1)[0].split("/")
    if (
        not _PATH.fullmatch(path)
        or decoded.startswith("//")
        or "\\" in decoded
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded)
        or any(segment in {".", ".."} for segment in segments)
    ):
        raise ValueError("must be a path on this website starting with a single '/'")
    return path


def website_url(settings: Settings, path: str) -> str:
    """The absolute URL of a checked `path` on WEBSITE_URL's origin."""
    return website_origin(settings.WEBSITE_URL) + website_path(path)


def cors_headers(request: flask.Request) -> dict[str, str]:
    """Headers for every answer (errors too): the website origin is allowed, no other."""
    headers = {"Vary": "Origin"}
    origin = request.headers.get("Origin")
    if origin is not None and origin == website_origin(get_settings().WEBSITE_URL):
        headers["Access-Control-Allow-Origin"] = origin
    return headers


def require_website_origin(request: flask.Request, settings: Settings) -> None:
    """403 origin_not_allowed for a browser page on another origin."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != website_origin(settings.WEBSITE_URL):
        raise Forbidden("Requests from this origin are not allowed.", code="origin_not_allowed")


def preflight(request: flask.Request, settings: Settings, method: str = "POST") -> flask.Response:
    """204 for a preflight from the website allowing `method` (403 from anywhere else)."""
    require_website_origin(request, settings)
    response = flask.Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = f"{method}, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def browser_endpoint(settings: Settings, method: str = "POST") -> Callable[[Handler], Handler]:
    """An entry point for the website answering `method`: CORS on every answer, the preflight
    answered, and requests from other origins refused before `handler` runs."""

    def wrap(handler: Handler) -> Handler:
        @endpoint(methods=(method, "OPTIONS"), headers=cors_headers)
        @wraps(handler)
        def run(request: flask.Request) -> flask.Response:
            if request.method == "OPTIONS":
                return preflight(request, settings, method)
            require_website_origin(request, settings)
            return handler(request)

        return run

    return wrap


def browser_settings(*, stripe: bool = True) -> Settings:
    """The settings of the browser-facing functions, checked at start (ConfigError names the gap);
    `stripe=False` for one that never calls Stripe (no STRIPE_SECRET_KEY needed)."""
    settings = get_settings().require(*(["STRIPE_SECRET_KEY"] if stripe else []), "WEBSITE_URL")
    settings.require_database()
    if settings.SUPABASE_JWT_SECRET is not None:
        settings.require("SUPABASE_JWT_SECRET")
    elif settings.jwks_url is None:
        raise ConfigError(
            "SUPABASE_JWT_SECRET is not set, nor SUPABASE_URL or SUPABASE_JWKS_URL to find the"
            " signing keys; set one before starting."
        )
    website_origin(settings.WEBSITE_URL)
    fee = settings.STRIPE_SETUP_FEE_PRICE_ID
    if fee and not fee.startswith("price_"):
        raise ConfigError("STRIPE_SETUP_FEE_PRICE_ID must be a Stripe price id (price_...).")
    return settings
