"""A real Chromium for the playground's tests: Debian's package (`make test` installs it when
missing) driven by Playwright, whose Python package bundles its driver (no `playwright
install`, no download). Screenshots go to $MMSERVE_PLAYGROUND_SCREENSHOTS, else to a folder
under pytest's tmp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS_ENV = "MMSERVE_PLAYGROUND_SCREENSHOTS"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return f"{CHROMIUM} is missing: `make test` installs Debian's chromium package"
    return None


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[BrowserContext]:
    """Chromium with a fresh profile in `user_data_dir`, headless, quiet on the network. Each new
    page is a tab of its own (its own sessionStorage)."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


def screenshot_dir(default: Path) -> Path:
    directory = Path(os.environ.get(SCREENSHOTS_ENV) or default)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def key_in_session(page: Page, api_key: str) -> None:
    """Every page of this tab starts with the API key already given (as after the key dialog)."""
    page.add_init_script(f"sessionStorage.setItem('mmserve-api-key', {api_key!r});")


STREAM_SAMPLER = """
() => {
  // Sample the newest answer's text once per animation frame (one per paint) while it streams.
  window.paintedTexts = [];
  const sample = () => {
    const answers = document.querySelectorAll(".message.assistant");
    const last = answers[answers.length - 1];
    if (last) window.paintedTexts.push([last.dataset.state, last.querySelector(".answer-text").textContent]);
    window.samplerFrame = requestAnimationFrame(sample);
  };
  sample();
}
"""
"""Install in the page before sending: window.paintedTexts collects (state, text) per frame."""
