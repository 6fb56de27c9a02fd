"""Headless Chromium for the browser tests: Debian's `chromium` driven by Playwright (which never
downloads a browser of its own here), every console error and page error collected, screenshots
kept as artefacts under `$BROWSER_ARTIFACTS` (default `.artifacts/browser/`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = (
    "the browser tests need Debian's Chromium: `sudo apt-get install chromium`"
    " (`./deploy.sh test` installs it when run as root)"
)


def find_chromium() -> str | None:
    """`$CHROMIUM`, else `chromium` on PATH, else Debian's /usr/bin/chromium; None when none."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def chromium_or_skip() -> str:
    """The Chromium to drive. Missing: the calling test module is skipped with one line saying
    how to install it, except under CI (`CI` set), where a missing browser is a failure."""
    problem = None
    path = find_chromium()
    if path is None:
        problem = f"Chromium is not installed: {INSTALL}"
    elif importlib.util.find_spec("playwright") is None:
        problem = "Playwright is not installed: `.venv/bin/pip install -e '.[dev]'`"
    if problem is None and path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{problem} (CI is set: the browser tests must run)", pytrace=False)
    pytest.skip(problem or "", allow_module_level=True)
    raise AssertionError("unreachable")


def artifacts_dir() -> Path:
    path = Path(os.environ.get("BROWSER_ARTIFACTS") or ROOT / ".artifacts" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Watched:
    """A page whose console errors and uncaught exceptions are kept; `allow` names the ones a
    test provokes on purpose (a declined payment's 402 logged by Chromium, say)."""

    page: Any
    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console error on {self.page.url}: {message.text}")

    @contextlib.contextmanager
    def allow(self, pattern: str) -> Iterator[None]:
        self.allowed.append(re.compile(pattern))
        try:
            yield
        finally:
            self.page.wait_for_timeout(100)  # late console messages still count as provoked
            self.errors = [e for e in self.errors if not self.allowed[-1].search(e)]
            self.allowed.pop()

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path
