"""Fixtures and helpers of the OpenAI route tests: a client on the OpenAI port
and one live reader of the group "primary"."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tests.support.api_fakes import add_reader, done, token
from tests.unit.api.conftest import client_on

OPENAI_URL = "http://localhost:3003"


@pytest.fixture
def openai(app):
    return client_on(app, OPENAI_URL)


@pytest.fixture(autouse=True)
def _reader(connection):
    add_reader(connection)


def chat(**fields):
    return {"model": "primary", "messages": [{"role": "user", "content": "Hi"}], **fields}


def hello(job):
    yield token(0, 0, "Hel")
    yield token(0, 1, "lo")
    yield done(0, 2, "eos")


def sse_chunks(response) -> list:
    """Each `data:` payload of an SSE body: JSON, or the string [DONE]."""
    chunks = []
    for block in response.get_data(as_text=True).split("\n\n"):
        data = [line[len("data: ") :] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            text = "\n".join(data)
            chunks.append(text if text == "[DONE]" else json.loads(text))
    return chunks


def png_data_uri(colour="red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
