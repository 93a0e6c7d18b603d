"""Validation of /generate and /generate_stream bodies: every path answers 4xx/501, never 5xx."""

import json

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from tests.support.api_fakes import INFERENCE_URL, add_reader, done, token

ROUTES = ["/generate", "/generate_stream"]


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def post(client, body, route="/generate", **kwargs):
    return client.post(route, json=body, **kwargs)


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "error_type"}
    return body


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_keys_are_named(client, route):
    body = error_of(post(client, {"text": "hi", "foo": 1, "bar": None, "baz": 2}, route), 422)
    assert body["error_type"] == "validation_error"
    # null means "default" only for known keys: an unknown key is named even when null
    assert "unknown key(s): foo, bar, baz" in body["error"]


def test_missing_text_is_named(client):
    body = error_of(post(client, {"max_new_tokens": 5}), 422)
    assert "text: required" in body["error"]


def test_nulls_mean_defaults(client, worker):
    worker.serve(lambda job: [token(0, 0, "ok"), done(0, 1)])
    payload = {"text": "hi", "max_new_tokens": None, "sampling_temperature": None, "consumer_group": None}
    response = post(client, payload)
    assert response.status_code == 200, response.get_json()
    worker.join()
    request = worker.jobs[0].request
    assert request.max_new_tokens == 128
    assert request.sampling_temperature == 1.0
    assert request.consumer_group == "primary"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("sampling_topp", 2, "sampling_topp: Input should be less than or equal to 1 (got 2)"),
        ("sampling_topp", 0, "sampling_topp: Input should be greater than 0 (got 0)"),
        ("sampling_temperature", -1, "sampling_temperature: Input should be greater than or equal to 0"),
        ("sampling_topk", -3, "sampling_topk: Input should be greater than or equal to 0 (got -3)"),
        ("max_new_tokens", 0, "max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
        ("max_new_tokens", "many", "max_new_tokens: Input should be a valid integer"),
        ("max_new_tokens", 1.5, "max_new_tokens: Input should be a valid integer"),
        ("repetition_penalty", 0, "repetition_penalty: Input should be greater than 0"),
        ("no_repeat_ngram_size", 65, "no_repeat_ngram_size: Input should be less than or equal to 64"),
        ("seed", -1, "seed: Input should be greater than or equal to 0"),
        ("seed", 2**63, "seed: Input should be less than or equal to"),
        ("consumer_group", "a b", "consumer_group: String should match pattern"),
        ("use_chat_template", "maybe", "use_chat_template: Input should be a valid boolean"),
        ("prompt_max_tokens", 0, "prompt_max_tokens: Input should be greater than or equal to 1"),
    ],
)
def test_out_of_range_values_say_which_and_why(client, key, value, expected):
    body = error_of(post(client, {"text": "hi", key: value}), 422)
    assert expected in body["error"]


def test_several_bad_keys_are_all_named(client):
    body = error_of(post(client, {"text": "hi", "sampling_topp": 5, "sampling_topk": -1, "zzz": 1}), 422)
    assert "unknown key(s): zzz" in body["error"]
    assert "sampling_topp:" in body["error"]
    assert "sampling_topk:" in body["error"]


def test_min_above_max_new_tokens(client):
    body = error_of(post(client, {"text": "hi", "min_new_tokens": 9, "max_new_tokens": 5}), 422)
    assert "min_new_tokens (9) must not exceed max_new_tokens (5)" in body["error"]


def test_empty_text_list(client):
    body = error_of(post(client, {"text": []}), 422)
    assert "text: text must be a string or a non-empty list of strings" in body["error"]


def test_text_list_too_long(client):
    body = error_of(post(client, {"text": ["a"] * 257}), 422)
    assert "text: at most 256 prompts per request" in body["error"]


def test_text_of_the_wrong_type(client):
    body = error_of(post(client, {"text": 5}), 422)
    assert "text: expected str or list[str], got a number" in body["error"]


def test_text_list_with_a_non_string_names_the_item(client):
    body = error_of(post(client, {"text": ["a", 3]}), 422)
    assert "text[1]: Input should be a valid string" in body["error"]


def test_invalid_json_schema_string(client):
    body = error_of(post(client, {"text": "a", "json_schema": "{oops"}), 422)
    assert "json_schema: json_schema is not valid JSON" in body["error"]


def test_body_must_be_an_object(client):
    body = error_of(post(client, ["text"]), 422)
    assert body["error"] == "the body must be a JSON object, got an array"


@pytest.mark.parametrize("route", ROUTES)
def test_wrong_content_type(client, route):
    response = client.post(route, data="text=hi", content_type="application/x-www-form-urlencoded")
    assert error_of(response, 415)["error_type"] == "unsupported_media_type"


def test_missing_content_type(client):
    assert error_of(client.post("/generate", data=b'{"text": "hi"}'), 415)["error"].endswith("got none")


def test_json_with_charset_is_accepted_as_json(client):
    response = client.post("/generate", data=b'{"text": 1}', content_type="application/json; charset=utf-8")
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"text": "hi"', "the body is not valid JSON"),
        (b"", "the body is not valid JSON"),
        (b'{"text": "\xff\xfe"}', "the body is not valid UTF-8"),
        (b'{"text": "hi", "sampling_temperature": NaN}', "NaN is not a JSON value"),
        (b"[" * 50_000, "nested too deeply"),
        (b'{"text": "hi", "seed": ' + b"9" * 5000 + b"}", "the body is not valid JSON"),
    ],
)
def test_unreadable_body_is_a_400(client, raw, message):
    response = client.post("/generate", data=raw, content_type="application/json")
    body = error_of(response, 400)
    assert body["error_type"] == "invalid_request"
    assert message in body["error"]


def test_oversize_body_by_content_length(make_app):
    client = make_app(body_size_limit_bytes=100).test_client()
    response = client.post("/generate", json={"text": "x" * 200})
    assert error_of(response, 413)["error_type"] == "payload_too_large"


def post_chunked(app, body: bytes):
    """POST a body the way gunicorn hands over a chunked request: no Content-Length,
    input marked as terminated, so the size limit must be enforced while reading."""
    environ = EnvironBuilder(
        path="/generate", base_url=INFERENCE_URL, method="POST", data=body, content_type="application/json"
    ).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    return Response(b"".join(app_iter), status=status, headers=headers)


def test_oversize_chunked_body_is_cut_while_reading(make_app):
    response = post_chunked(make_app(body_size_limit_bytes=100), json.dumps({"text": "x" * 200}).encode())
    assert error_of(response, 413)["error_type"] == "payload_too_large"


def test_chunked_body_within_the_limit_is_read(make_app):
    response = post_chunked(make_app(body_size_limit_bytes=100), b'{"text": 1}')
    assert error_of(response, 422)["error_type"] == "validation_error"


def test_validation_comes_before_routing(client):
    # An unknown group would be a 404, but the payload is checked first.
    body = error_of(post(client, {"text": "hi", "consumer_group": "nope", "max_new_tokens": 0}), 422)
    assert "max_new_tokens" in body["error"]
