"""What each function loads at start (issue 12, cold start): checked by module, never by time.

bench/hot_path.py measures the cold starts; these keep the costly imports it found from coming
back unnoticed: `requests` (stripe-python's default HTTP client, which we never use), and
pydantic-settings; and no Stripe at all where a function never calls Stripe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT

FUNCTIONS = {
    "report-usage": False,  # a report never waits for Stripe (the outbox loads it to flush)
    "billing-overview": False,
    "stripe-webhook-handler": True,
    "create-checkout-session": True,
    "create-portal-session": True,
    "change-plan": True,
}

LOAD = """
import json, sys
import functions_framework
app = functions_framework.create_app(target=sys.argv[1], source=sys.argv[2])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_at_start(function: str) -> set[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "STRIPE_SECRET_KEY": "sk_test_imports0only",
        "STRIPE_WEBHOOK_SECRET": "whsec_imports0only",
        "SUPABASE_SERVICE_ROLE_KEY": "service-key-imports-only-0123456789",
        "SUPABASE_JWT_SECRET": "jwt-secret-imports-only-0123456789",
        "WEBSITE_URL": "http://127.0.0.1:5173",
    }
    source = ROOT / "functions" / function / "main.py"
    out = subprocess.run(
        [sys.executable, "-c", LOAD, function.replace("-", "_"), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize(("function", "uses_stripe"), FUNCTIONS.items())
def test_a_function_loads_only_what_it_needs(function, uses_stripe):
    modules = loaded_at_start(function)
    assert "flask" in modules and "psycopg" in modules  # it did load
    assert "requests" not in modules
    assert "pydantic_settings" not in modules
    assert ("stripe" in modules) is uses_stripe


def test_only_the_thread_importing_stripe_is_refused_requests():
    """Another thread may import `requests` while stripe loads (report-usage's outbox loads
    stripe from its flushing thread while requests are served)."""
    from shared.stripe_lib import RequestsRefused

    refused = RequestsRefused()  # made by this thread, as shared/stripe_lib.py makes its own
    with pytest.raises(ImportError):
        refused.find_spec("requests")
    assert refused.find_spec("urllib3") is None
    elsewhere: list[object] = []
    other = threading.Thread(target=lambda: elsewhere.append(refused.find_spec("requests")))
    other.start()
    other.join()
    assert elsewhere == [None]
    assert not any(isinstance(finder, RequestsRefused) for finder in sys.meta_path)
