"""Property: whatever JSON arrives at /generate, bad input gets a 4xx, never a 5xx.
Payloads that do validate reach the queue (and, with no worker here, time out)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.payload import GenerateRequest
from tests.unit.api.conftest import client_on
from tests.unit.api.fakes import INFERENCE_URL, add_reader

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
