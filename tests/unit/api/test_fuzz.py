"""Property: whatever JSON or multipart body arrives, bad input gets a 4xx, never a
5xx. Requests that do validate reach the queue (and, with no worker here, time out)."""

from __future__ import annotations

import io
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from shared.payload import GenerateRequest
from tests.support.api_fakes import INFERENCE_URL, add_reader
from tests.unit.api.conftest import client_on

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(sorted(GenerateRequest.model_fields)) | st.text(max_size=12)
payloads = st.dictionaries(keys, json_values, max_size=6) | json_values


@pytest.fixture
def fuzz_client(make_app, connection):
    add_reader(connection)
    return client_on(make_app(first_event_timeout_seconds=0.01), INFERENCE_URL)


def validates(payload) -> bool:
    try:
        GenerateRequest.model_validate(payload)
    except (ValidationError, TypeError):
        return False
    return isinstance(payload, dict)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads)
def test_any_json_body_is_answered_without_a_server_error(fuzz_client, payload):
    response = fuzz_client.post(
        "/generate", data=json.dumps(payload), headers={"Content-Type": "application/json"}
    )
    if validates(payload):
        assert response.status_code in {422, 501, 504}, response.get_data(as_text=True)
    else:
        assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    assert response.get_json()["error_type"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 20, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PNG = _png()
image_bytes = st.one_of(
    st.binary(max_size=64),
    st.just(VALID_PNG),
    st.integers(1, len(VALID_PNG) - 1).map(lambda cut: VALID_PNG[:cut]),  # truncated
    st.binary(min_size=1, max_size=16).map(lambda junk: VALID_PNG[:40] + junk + VALID_PNG[56:]),  # corrupted
)
json_parts = st.one_of(payloads.map(json.dumps), st.text(max_size=30), st.just('{"text": "what is this?"}'))
part_names = st.sampled_from(["image_data", "json_data", "other", "image_data"])


@pytest.fixture
def vision_client(make_app, connection):
    add_reader(connection, model_type="VISION", model_name="tiny-vlm")
    return client_on(make_app(first_event_timeout_seconds=0.01), INFERENCE_URL)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    image=image_bytes,
    json_data=json_parts,
    names=st.tuples(part_names, part_names),
    as_file=st.booleans(),
)
def test_any_multipart_body_is_answered_without_a_server_error(
    vision_client, image, json_data, names, as_file
):
    import io

    image_name, json_name = names
    files = {image_name: ("x.png", io.BytesIO(image), "image/png")}
    data = None
    if as_file:
        files[json_name] = (None, json_data, "application/json")
    else:
        data = {json_name: json_data}
    prepared = requests.Request("POST", "http://localhost/image_generate", files=files, data=data).prepare()
    response = vision_client.post(
        "/image_generate", data=prepared.body, content_type=prepared.headers["Content-Type"]
    )
    # 504: a valid request reached the queue (no worker here); everything else must be a 4xx
    assert response.status_code == 504 or 400 <= response.status_code < 500, response.get_data(as_text=True)
    assert response.get_json()["error_type"]
