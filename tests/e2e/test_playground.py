"""The browser playground (GET / on the inference port) in a real Chromium, against `mmserve
serve --api-key` with a tiny random Llama (group "primary", with two LoRA adapters) and a tiny
LLaVA (group "vision", started through the management port). Each test opens a new tab;
screenshots of the main states are saved (see tests.support.playground_browser)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import requests
from playwright.sync_api import BrowserContext, Page, expect

from bench.serving import ServeProcess
from tests.support.image_requests import IMAGES, png
from tests.support.playground_browser import (
    STREAM_SAMPLER,
    chromium,
    chromium_missing_reason,
    key_in_session,
    screenshot_dir,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(chromium_missing_reason() is not None, reason=str(chromium_missing_reason())),
]

API_KEY = "playground-secret"
READY_TIMEOUT = 180.0
WAIT_MS = 60_000  # generous: the machine may be busy; nothing here waits this long when it works


class Served:
    def __init__(self, serve: ServeProcess) -> None:
        self.serve = serve
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    @property
    def url(self) -> str:
        return self.serve.url

    def generate(self, payload: dict) -> requests.Response:
        return requests.post(self.url + "/generate", json=payload, headers=self.headers, timeout=120)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_llava_dir, tiny_lora_dir, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve-playground")
    serve = ServeProcess.tiny(
        tiny_model_dir,
        "--lora-dir",
        str(tiny_lora_dir),
        "--api-key",
        API_KEY,
        log_path=root / "serve.log",
    )
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        _wait(serve, lambda: _get(serve.url + "/readyz", headers).status_code == 200, "the API")
        started = requests.post(
            serve.management_url + "/reader",
            json={"model_name": str(tiny_llava_dir), "consumer_group": "vision"},
            headers=headers,
            timeout=30,
        )
        assert started.status_code == 201, started.text
        _wait(serve, lambda: any(reader["ready"] for reader in _readers(serve, headers)), "the vision worker")
    except (RuntimeError, AssertionError) as exc:
        serve.stop()  # Ctrl-C: serve stops its Redis, API and workers with it (kill() would orphan them)
        pytest.fail(str(exc))
    yield Served(serve)
    serve.stop()


def _get(url: str, headers: dict) -> requests.Response:
    try:
        return requests.get(url, headers=headers, timeout=5)
    except requests.RequestException as exc:
        response = requests.Response()
        response.status_code, response.reason = 599, str(exc)
        return response


def _readers(serve: ServeProcess, headers: dict) -> list[dict]:
    return _get(serve.management_url + "/reader_groups", headers).json().get("vision", [])


def _wait(serve: ServeProcess, ready, what: str) -> None:
    """Wait for `ready()` (ServeProcess.wait_ready asks /readyz without the key: a 401 here)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if serve.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} never became ready:\n" + serve.log()[-5000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        context.set_default_timeout(WAIT_MS)
        yield context


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshot_dir(tmp_path_factory.getbasetemp() / "playground-screenshots")


@pytest.fixture
def page(browser: BrowserContext, served: Served) -> Iterator[Page]:
    """A new tab on the playground, the API key already given, loaded."""
    tab = new_tab(browser)
    key_in_session(tab, API_KEY)
    tab.goto(served.url + "/")
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    yield tab
    tab.close()


def new_tab(browser: BrowserContext) -> Page:
    tab = browser.new_page()
    tab.set_viewport_size({"width": 1180, "height": 820})
    return tab


def answers(page: Page):
    return page.locator("#conversation .message.assistant")


def set_parameter(page: Page, key: str, value: object) -> None:
    page.get_by_label(re.compile(rf"\b{key}\b"), exact=False).first.fill(str(value))


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def test_the_page_asks_for_the_api_key_once_and_keeps_it_for_the_session(browser, served, shots):
    tab = new_tab(browser)
    tab.goto(served.url + "/")
    dialog = tab.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("asks for an API key")
    tab.screenshot(path=shots / "api-key.png")
    tab.get_by_role("textbox", name="API key").fill("wrong-key")
    tab.get_by_role("button", name="Use this key").click()
    expect(dialog).to_contain_text("The key was refused")
    tab.get_by_role("textbox", name="API key").fill(API_KEY)
    tab.get_by_role("button", name="Use this key").click()
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    options = tab.locator("#group option")
    expect(options).to_have_count(2)
    expect(options.nth(0)).to_have_attribute("value", "primary")
    expect(options.nth(1)).to_have_attribute("value", "vision")
    expect(tab.locator("#readers")).to_contain_text("VISION")
    expect(tab.locator("#lora option")).to_have_count(3)  # the base model, alpha, beta

    tab.reload()  # the same tab keeps its session: no second question
    expect(tab.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    tab.close()


def test_tokens_appear_as_they_stream_and_the_answer_gets_its_numbers(page, shots):
    set_parameter(page, "max_new_tokens", 200)
    set_parameter(page, "min_new_tokens", 200)
    page.evaluate(STREAM_SAMPLER)
    send(page, "Tell me a long story.")
    answer = answers(page).first
    expect(answer).to_have_attribute("data-state", "done")
    final = answer.locator(".answer-text").text_content()
    painted = page.evaluate("cancelAnimationFrame(window.samplerFrame) || window.paintedTexts")
    partial = {text for state, text in painted if state == "streaming" and text and text != final}
    assert len(partial) >= 2, f"the answer was painted only {len(partial)} time(s) while streaming"
    assert all(final.startswith(text) for text in partial)
    numbers = answer.locator(".numbers")
    expect(numbers).to_contain_text("time to first token")
    expect(numbers).to_contain_text("tokens/s")
    expect(numbers).to_contain_text("200 generated tokens")
    expect(numbers).to_contain_text("finish: length")
    expect(answer.get_by_role("button", name="Copy this answer")).to_be_visible()

    # A second turn: the conversation goes through the reader's chat template.
    set_parameter(page, "max_new_tokens", 8)
    set_parameter(page, "min_new_tokens", 8)
    send(page, "And another one?")
    expect(answers(page)).to_have_count(2)
    expect(answers(page).nth(1)).to_have_attribute("data-state", "done")
    expect(answers(page).nth(1).locator(".numbers")).to_contain_text("8 generated tokens")
    page.screenshot(path=shots / "chat.png")


def test_stop_cancels_the_request_on_the_server(page, served):
    set_parameter(page, "max_new_tokens", 900)
    set_parameter(page, "min_new_tokens", 900)
    send(page, "Count to a thousand.")
    answer = answers(page).first
    expect(answer.locator(".answer-text")).not_to_have_text("")
    page.get_by_role("button", name="Stop").click()
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    cancelled = re.compile(r"job \S+ done: 1 row\(s\), (\d+) token\(s\), cancelled")
    deadline = time.monotonic() + 30
    while not (found := cancelled.search(served.serve.log())):
        assert time.monotonic() < deadline, "the worker never ended the request as cancelled"
        time.sleep(0.2)
    assert int(found.group(1)) < 900


def test_images_attach_to_a_vision_group_only(page, served, tmp_path, shots):
    picture = tmp_path / "red.png"
    picture.write_bytes(png(IMAGES["red"]))
    drop_png = list(png(IMAGES["blue"]))

    page.get_by_label("Consumer group").select_option("primary")
    drop(page, drop_png)
    expect(page.locator("#composer-error")).to_contain_text("text-only")
    expect(page.locator("#attachments img")).to_have_count(0)

    page.get_by_label("Consumer group").select_option("vision")
    page.locator("#image-input").set_input_files(str(picture))
    drop(page, drop_png)
    expect(page.locator("#attachments img")).to_have_count(2)
    set_parameter(page, "max_new_tokens", 6)
    send(page, "What colours are these?")
    expect(page.locator("#attachments img")).to_have_count(0)
    expect(page.locator("#conversation .message.user img")).to_have_count(2)
    answer = answers(page).first
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".numbers")).to_contain_text("6 generated tokens")
    assert answer.locator(".answer-text").text_content()
    page.screenshot(path=shots / "image.png")

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
    page.screenshot(path=shots / "phone.png", full_page=True)


def drop(page: Page, data: list[int]) -> None:
    """Drop a PNG file on the message box, as a file dragged from the desktop."""
    page.evaluate(
        """(bytes) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
          const target = document.getElementById("message");
          for (const type of ["dragover", "drop"]) {
            const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
            target.dispatchEvent(new DragEvent(type, init));
          }
        }""",
        data,
    )


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_a_schema_constrained_answer_is_json_of_that_schema(page, shots):
    page.get_by_label("Constrain the answer to").select_option("json_schema")
    page.get_by_label("Schema or regex").fill(json.dumps(SCHEMA))
    page.get_by_label("Backend (constrained_decoding_backend)").select_option("outlines")
    set_parameter(page, "max_new_tokens", 24)
    send(page, "How many legs has a cat? Answer in JSON.")
    answer = answers(page).first
    expect(answer).to_have_attribute("data-state", "done")
    jsonschema.validate(json.loads(answer.locator(".answer-text").text_content()), SCHEMA)
    page.screenshot(path=shots / "schema.png")


def test_an_invalid_schema_shows_the_api_message_next_to_the_box(page, served):
    bad = {"type": "object", "properties": {"name": {"type": "strnig"}}}
    expected = served.generate({"text": "Hi", "json_schema": bad})
    assert expected.status_code in (400, 422), expected.text
    page.get_by_label("Constrain the answer to").select_option("json_schema")
    page.get_by_label("Schema or regex").fill(json.dumps(bad))
    send(page, "A person, please.")
    expect(page.locator("#constraint-error")).to_have_text(expected.json()["error"])
    expect(page.get_by_label("Schema or regex")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Message", exact=True)).to_have_value("A person, please.")  # kept to retry
    expect(answers(page)).to_have_count(0)


def test_a_batch_of_three_prompts_streams_into_three_columns(page, served, shots):
    prompts = ["Name a colour.", "Name a fruit.", "Name a city."]
    page.get_by_role("radio", name="Batch").check()
    set_parameter(page, "max_new_tokens", 10)
    page.get_by_label(re.compile("^Prompts, one per line")).fill("\n".join(prompts))
    page.get_by_role("button", name="Run batch").click()
    columns = page.locator("#batch-answers .message")
    expect(columns).to_have_count(3)
    for index in range(3):
        expect(columns.nth(index)).to_have_attribute("data-state", "done")
    shown = [columns.nth(index).locator(".answer-text").text_content() for index in range(3)]
    reference = served.generate(
        {"text": prompts, "use_chat_template": True, "max_new_tokens": 10, "sampling_topk": 1}
    )
    assert reference.status_code == 200, reference.text
    assert shown == reference.json()["text"]
    expect(columns.nth(2).locator(".numbers")).to_contain_text("10 generated tokens")
    page.screenshot(path=shots / "batch.png")
