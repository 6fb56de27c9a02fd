"""Without Chromium the browser tests skip with one line saying how to install it; under CI
they fail instead, so CI never passes without having run them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import browser_support


def test_missing_chromium_skips_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_support, "find_chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="sudo apt-get install chromium"):
        browser_support.chromium_or_skip()


def test_missing_chromium_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_support, "find_chromium", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set: the browser tests must run"):
        browser_support.chromium_or_skip()


def test_chromium_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = tmp_path / "chromium"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(binary))
    assert browser_support.find_chromium() == str(binary)
