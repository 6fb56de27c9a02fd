"""stripe-python, imported without `requests`: every module of ours takes `stripe` from here.

At import, stripe-python 16 loads `requests` only to choose a default HTTP client. We never use
it: shared/stripe_api.py gives every client an HTTPXClient. `requests` (with urllib3 and
charset_normalizer) is a seventh of a function's cold start (53 ms of 360 ms here), so while
stripe imports, `import requests` fails in the importing thread; stripe then picks its urllib
client as the unused default. Only that thread is refused (report-usage's outbox loads stripe
from its flushing thread while requests are served), and only during the import.
"""

from __future__ import annotations

import sys
import threading
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any


class RequestsRefused(MetaPathFinder):
    """Refuses `import requests` in the thread that made it; other threads import as usual."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name == "requests" and threading.get_ident() == self.thread:
            raise ImportError("not loaded: stripe-python only picks a default client with it")
        return None


_refused = RequestsRefused()
sys.meta_path.insert(0, _refused)
try:
    import stripe
finally:
    sys.meta_path.remove(_refused)

__all__ = ["stripe"]
