"""/openapi.json and /docs."""

import json
import re
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from api.openapi import build_openapi
from shared.payload import GenerateRequest
from shared.settings import ApiSettings

SHAPE = Path(__file__).with_name("openapi_shape.json")
"""The document without its descriptions: routes, parameters, bodies, statuses and schemas."""


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def document_shape() -> Any:
    document = build_openapi(ApiSettings(redis_url="redis://unused"))
    return json.loads(json.dumps(without_descriptions(document)))


def test_openapi_is_a_json_document_with_the_payload_schema(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.get_data())
    assert document["openapi"].startswith("3.")
    payload_schema = document["components"]["schemas"]["GenerateRequest"]
    assert payload_schema["properties"].keys() == GenerateRequest.model_json_schema()["properties"].keys()
    assert payload_schema["additionalProperties"] is False
    for route in ("/generate", "/generate_stream"):
        body = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/GenerateRequest"}
        assert set(document["paths"][route]["post"]["responses"]) >= {
            "200",
            "400",
            "413",
            "415",
            "422",
            "503",
        }


def test_every_reference_in_the_document_resolves():
    document = build_openapi(ApiSettings(redis_url="redis://unused"))
    schemas = document["components"]["schemas"]

    def references(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    refs = set(references(document))
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas


def test_openapi_lists_every_route_of_the_app(app):
    documented = set(build_openapi(ApiSettings(redis_url="redis://unused"))["paths"])
    served = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in app.url_map.iter_rules()
        if not rule.endpoint.startswith("playground.")  # the browser page and its own route, not the API
    }
    assert served - {"/static/{filename}", "/openapi.json", "/docs"} <= documented


def test_api_key_security_is_declared_only_when_a_key_is_set():
    assert "security" not in build_openapi(ApiSettings(redis_url="redis://unused"))
    assert build_openapi(ApiSettings(redis_url="redis://unused", api_key="k"))["security"]


def test_docs_page_is_self_contained_html(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "/generate_stream" in page
    assert "max_new_tokens" in page
    assert "http://" not in page and "https://" not in page


def test_openapi_document_validates_as_openapi_3(client):
    validate(client.get("/openapi.json").get_json())  # raises on any schema violation


def test_the_document_changes_only_in_descriptions():
    """Clients are generated from this document: anything but a description changing is an API
    change. Regenerate the pinned shape only for a deliberate one: python -m tests.unit.api.test_openapi"""
    assert document_shape() == json.loads(SHAPE.read_text())


if __name__ == "__main__":
    SHAPE.write_text(json.dumps(document_shape(), indent=1, sort_keys=True) + "\n")
