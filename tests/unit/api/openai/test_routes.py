"""The OpenAI-compatible generation routes over fake Redis: a fake worker takes
the RQ job and publishes events; the API answers in OpenAI's shapes."""

from __future__ import annotations

import base64
import json

import pytest

from shared import keys
from tests.support.api_fakes import INFERENCE_URL, add_reader, done, token, wait_for
from tests.unit.api.conftest import client_on
from tests.unit.api.openai.conftest import OPENAI_URL, chat, hello, png_data_uri, sse_chunks

# -- chat completions -----------------------------------------------------------------


NOT_CACHED = {"prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_completion_answers_in_openai_shape(openai, worker):
    worker.serve(hello)
    response = openai.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "primary"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9, **NOT_CACHED}
    worker.join()


def test_chat_request_becomes_a_job_with_messages_and_sampling(openai, worker):
    worker.serve(hello)
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    response = openai.post(
        "/v1/chat/completions",
        json={"model": "primary", "messages": messages, "temperature": 0.7, "top_p": 0.9, "seed": 5},
    )
    assert response.status_code == 200, response.get_json()
    worker.join()
    job = worker.jobs[0]
    assert job.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    request = job.request
    assert request.use_chat_template
    assert (request.sampling_temperature, request.sampling_topk, request.sampling_topp) == (0.7, 0, 0.9)
    assert job.seed == 5
    assert request.max_new_tokens == 512  # the default, half the context (2048) is more


def test_temperature_zero_is_greedy_and_max_completion_tokens_is_the_limit(openai, worker):
    worker.serve(hello)
    openai.post("/v1/chat/completions", json=chat(temperature=0, max_completion_tokens=9))
    worker.join()
    request = worker.jobs[0].request
    assert request.is_greedy and request.sampling_topk == 1
    assert request.max_new_tokens == 9


def test_n_choices_are_rows_of_one_job(openai, worker):
    def two(job):
        yield token(0, 0, "A")
        yield token(1, 0, "B")
        yield done(0, 1, "length")
        yield done(1, 1, "eos")

    worker.serve(two)
    body = openai.post("/v1/chat/completions", json=chat(n=2, seed=1)).get_json()
    worker.join()
    assert worker.jobs[0].request.texts == ["", ""]
    assert [c["message"]["content"] for c in body["choices"]] == ["A", "B"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9, **NOT_CACHED}


def test_chat_stream_sends_chunks_and_ends_with_done(openai, worker):
    worker.serve(hello)
    response = openai.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    chunks = sse_chunks(response)
    worker.join()
    assert chunks[-1] == "[DONE]"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks[:-1])
    assert len({chunk["id"] for chunk in chunks[:-1]}) == 1
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[0]


def test_stream_options_include_usage_adds_a_final_usage_chunk(openai, worker):
    worker.serve(hello)
    response = openai.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    chunks = sse_chunks(response)
    worker.join()
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "total_tokens": 9,
        **NOT_CACHED,
    }
    assert all(chunk["usage"] is None for chunk in chunks[:-2])


def test_a_stop_string_cuts_the_answer_and_cancels_the_job(openai, worker, connection):
    def long_answer(job):
        yield token(0, 0, "one ST")
        yield token(0, 1, "OP two")
        yield lambda job: wait_for(lambda: connection.exists(keys.cancel_key(job.request_id)))
        yield done(0, 9, "cancelled")

    worker.serve(long_answer)
    body = openai.post("/v1/chat/completions", json=chat(stop="STOP")).get_json()
    worker.join()
    assert body["choices"][0]["message"]["content"] == "one "
    assert body["choices"][0]["finish_reason"] == "stop"
    # tokens received until the stop, not the 9 the worker made before it noticed
    assert body["usage"]["completion_tokens"] == 2


def test_a_stream_never_shows_text_of_a_stop_string_spanning_tokens(openai, worker):
    def script(job):
        yield token(0, 0, "ab<")
        yield token(0, 1, "/")
        yield token(0, 2, "s>cd")
        yield done(0, 3, "cancelled")

    worker.serve(script)
    response = openai.post("/v1/chat/completions", json=chat(stream=True, stop=["</s>"]))
    chunks = sse_chunks(response)
    worker.join()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "ab"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1] == "[DONE]"


def test_an_error_inside_a_stream_is_an_openai_error_event_without_done(openai, worker):
    from shared import events

    def failing(job):
        yield token(0, 0, "x")
        yield events.ErrorEvent(error="the model broke", error_type="generation_error", status=500)

    worker.serve(failing)
    chunks = sse_chunks(openai.post("/v1/chat/completions", json=chat(stream=True)))
    worker.join()
    assert chunks[-1]["error"]["message"] == "the model broke"
    assert chunks[-1]["error"]["code"] == "generation_error"
    assert chunks[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in chunks


def test_a_worker_error_without_stream_is_an_openai_error(openai, worker):
    from shared import events

    worker.serve(lambda job: [events.ErrorEvent(error="too long", error_type="invalid_prompt", status=422)])
    response = openai.post("/v1/chat/completions", json=chat())
    worker.join()
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_prompt"


# -- response_format ------------------------------------------------------------


def test_json_schema_response_format_constrains_the_job(openai, worker):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    worker.serve(lambda job: [token(0, 0, '{"a": 1}'), done(0, 5, "stop")])
    body = openai.post(
        "/v1/chat/completions",
        json=chat(
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
        ),
    ).get_json()
    worker.join()
    assert worker.jobs[0].request.json_schema == schema
    assert json.loads(body["choices"][0]["message"]["content"]) == {"a": 1}


def test_json_object_response_format_is_an_object_schema(openai, worker):
    worker.serve(lambda job: [done(0, 0, "stop")])
    openai.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
    worker.join()
    assert worker.jobs[0].request.json_schema == {"type": "object"}


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_response_format(openai):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}}
    response = openai.post("/v1/chat/completions", json=chat(response_format=bad))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["param"] == "response_format"
    assert "minimum" in error["message"]


# -- validation and errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"made_up": 1, "audio": {}}, "made_up"),
    ],
)
def test_unsupported_parameters_are_400_naming_them(openai, fields, named):
    response = openai.post("/v1/chat/completions", json=chat(**fields))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == named
    assert named in error["message"]


def test_off_values_of_unsupported_parameters_and_nulls_are_accepted(openai, worker):
    worker.serve(hello)
    response = openai.post(
        "/v1/chat/completions",
        json=chat(
            frequency_penalty=0, presence_penalty=0.0, logprobs=False, logit_bias=None, user="u1", n=None
        ),
    )
    worker.join()
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.role"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_values_are_400(openai, fields, param):
    response = openai.post("/v1/chat/completions", json=chat(**fields))
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == param


def test_errors_on_the_openai_port_have_openai_shape(openai, make_app):
    assert openai.get("/v1/nothing").get_json()["error"]["code"] == "not_found"
    response = openai.post("/v1/chat/completions", data="{", content_type="application/json")
    assert response.status_code == 400
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}
    keyed = client_on(make_app(api_key="secret"), OPENAI_URL)
    response = keyed.post("/v1/chat/completions", json=chat())
    assert response.status_code == 401
    assert response.get_json()["error"]["type"] == "authentication_error"


def test_openai_routes_answer_only_on_their_port(app, openai):
    assert client_on(app, INFERENCE_URL).get("/v1/models").status_code == 404
    response = openai.post("/generate", json={"text": "x"})
    assert response.status_code == 404
    assert "error" in response.get_json() and "code" in response.get_json()["error"]


# -- images ------------------------------------------------------------------------


def image_chat(url: str) -> dict:
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "primary", "messages": [{"role": "user", "content": content}]}


def test_an_image_part_is_stored_and_named_in_the_messages(openai, worker, connection):
    add_reader(connection, model_type="VISION")
    seen = {}

    def script(job):
        seen["stored"] = connection.exists(keys.image_key(job.image_ids[0]))
        yield from hello(job)

    worker.serve(script)
    response = openai.post("/v1/chat/completions", json=image_chat(png_data_uri()))
    worker.join()
    assert response.status_code == 200, response.get_json()
    job = worker.jobs[0]
    assert len(job.image_ids) == 1 and seen["stored"]
    assert job.template_messages() == [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}
    ]
    assert not connection.exists(keys.image_key(job.image_ids[0]))  # released when answered


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/cat.png", "remote_images_disabled"),
        ("file:///etc/passwd", "invalid_image"),
        ("data:image/png;base64,!!!", "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
    ],
)
def test_unusable_image_urls_are_400(openai, connection, url, code):
    add_reader(connection, model_type="VISION")
    response = openai.post("/v1/chat/completions", json=image_chat(url))
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == code


def test_images_to_a_text_only_model_are_400(openai):
    response = openai.post("/v1/chat/completions", json=image_chat(png_data_uri()))
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "model_does_not_accept_images"


# -- text completions -------------------------------------------------------------------


def test_completions_rows_are_prompts_times_n(openai, worker):
    def rows(job):
        for row in range(4):
            yield token(row, 0, f"r{row}")
            yield done(row, 1, "length")

    worker.serve(rows)
    body = openai.post(
        "/v1/completions", json={"model": "primary", "prompt": ["a", "b"], "n": 2, "max_tokens": 3}
    ).get_json()
    worker.join()
    request = worker.jobs[0].request
    assert request.texts == ["a", "a", "b", "b"]
    assert not request.use_chat_template and worker.jobs[0].messages is None
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["r0", "r1", "r2", "r3"]
    assert body["usage"] == {"prompt_tokens": 14, "completion_tokens": 4, "total_tokens": 18, **NOT_CACHED}


def test_completions_stream(openai, worker):
    worker.serve(hello)
    chunks = sse_chunks(
        openai.post("/v1/completions", json={"model": "primary", "prompt": "x", "stream": True})
    )
    worker.join()
    assert worker.jobs[0].request.max_new_tokens == 16  # OpenAI's default for completions
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello"
    assert chunks[-1] == "[DONE]"


@pytest.mark.parametrize("fields", [{"echo": True}, {"best_of": 2}, {"suffix": "x"}, {"prompt": [[1, 2]]}])
def test_completions_refuse_what_they_do_not_support(openai, fields):
    response = openai.post("/v1/completions", json={"model": "primary", "prompt": "x", **fields})
    assert response.status_code == 400


# -- the port ---------------------------------------------------------------------------


def test_the_openai_port_is_a_flag_bound_by_gunicorn_and_read_by_the_app():
    from api.wsgi import settings_from_env
    from mmserve import cli

    settings = settings_from_env({"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_OPENAI_PORT": "4003"})
    assert settings.openai_port == 4003
    assert settings_from_env({"MMSERVE_REDIS_URL": "redis://x"}).openai_port == 3003
    api = {"host": "0.0.0.0", "port": 1, "management_port": 2, "openai_port": 4003, "api_processes": 1}
    argv = cli._gunicorn_argv(api, "INFO", "text")
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bind"] == [
        "0.0.0.0:1",
        "0.0.0.0:2",
        "0.0.0.0:4003",
    ]
