"""The official `openai` Python client (and LangChain's ChatOpenAI) against a
real API and real workers: a tiny random Llama in "primary", a tiny random
LLaVA in "vision"."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import requests

from tests.integration.conftest import Api, Launcher
from tests.support.tiny_vlms import sample_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(redis_server, tiny_model_dir, tiny_llava_dir, tmp_path_factory) -> Iterator[Api]:
    launched = Launcher(redis_server.url, tiny_model_dir, tmp_path_factory.mktemp("openai-server"))
    launched.worker()
    launched.worker(group="vision", model=tiny_llava_dir)
    yield launched.api()
    launched.stop_all()


@pytest.fixture
def client(server: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", max_retries=0)


def ask(content: str | list) -> list[dict]:
    return [{"role": "system", "content": "You answer."}, {"role": "user", "content": content}]


def test_chat_and_its_stream_agree(client):
    whole = client.chat.completions.create(
        model="primary", messages=ask("Hello there"), max_tokens=8, temperature=0
    )
    (choice,) = whole.choices
    assert whole.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model="primary",
            messages=ask("Hello there"),
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_cuts_the_answer(client):
    full = client.chat.completions.create(model="primary", messages=ask("Go"), max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 4
    stop = text[3:5]
    cut = client.chat.completions.create(
        model="primary", messages=ask("Go"), max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_sampled_with_a_seed(client):
    answer = client.chat.completions.create(
        model="primary", messages=ask("Pick"), max_tokens=6, n=2, seed=11, temperature=1.0
    )
    assert [choice.index for choice in answer.choices] == [0, 1]
    again = client.chat.completions.create(
        model="primary", messages=ask("Pick"), max_tokens=6, n=2, seed=11, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]


def test_json_schema_response_format_output_validates(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}},
        "required": ["ok", "colour"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model="primary",
        messages=ask("Answer as JSON"),
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_an_image_content_part_answers_like_image_generate(client, server):
    buffer = io.BytesIO()
    sample_image((220, 30, 30)).save(buffer, format="PNG")
    content = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
        },
        {"type": "text", "text": "What colour?"},
    ]
    answer = client.chat.completions.create(
        model="vision", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
    )
    takeoff = requests.post(
        server.url + "/image_generate",
        files={
            "image_data": ("red.png", buffer.getvalue(), "image/png"),
            "json_data": (
                None,
                json.dumps(
                    {
                        "text": "What colour?",
                        "use_chat_template": True,
                        "max_new_tokens": 6,
                        "consumer_group": "vision",
                    }
                ),
            ),
        },
        timeout=60,
    )
    assert takeoff.status_code == 200, takeoff.text
    assert answer.choices[0].message.content == takeoff.json()["text"]


def test_completions_and_models(client):
    completion = client.completions.create(
        model="primary", prompt=["one", "two"], max_tokens=4, temperature=0
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert all(choice.text for choice in completion.choices)
    assert {model.id for model in client.models.list()} >= {"primary", "vision"}


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ask("x"))
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model="primary", messages=ask("x"), frequency_penalty=0.5)
    assert unsupported.value.param == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as images_to_text:
        client.chat.completions.create(
            model="primary",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                }
            ],
        )
    assert images_to_text.value.status_code == 400


def test_langchain_chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model="primary",
        base_url=f"{server.openai_url}/v1",
        api_key="unused",
        max_tokens=6,
        temperature=0,
        max_retries=0,
    )
    reply = chat.invoke("Hello")
    assert isinstance(reply.content, str) and reply.content
    streamed = "".join(chunk.content for chunk in chat.stream("Hello"))
    assert streamed == reply.content
