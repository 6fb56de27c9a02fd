"""stripe-python, imported without `requests`: every module of ours takes `stripe` from here.

At import, stripe-python 16 loads `requests` only to choose a default HTTP client. We never use
it: shared/stripe_api.py gives every client an HTTPXClient. `requests` (with urllib3 and
charset_normalizer) is a seventh of a function's cold start (53 ms of 360 ms here), so the
import below runs with `requests` marked absent; stripe then picks its urllib client as the
unused default. The mark is removed at once, so anything else may still import `requests`.
"""

from __future__ import annotations

import sys

_marked = "requests" not in sys.modules
if _marked:
    sys.modules["requests"] = None  # type: ignore[assignment]  # `import requests` -> ImportError
try:
    import stripe
finally:
    if _marked:
        del sys.modules["requests"]

__all__ = ["stripe"]
