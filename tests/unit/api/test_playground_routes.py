"""The playground's routes on the inference port: the page and its files load without the
API key, /playground/info tells the groups, readers, queue depth and backends (with the key),
and none of them answers on the management port. The page itself is tested in a browser
(tests/e2e/test_playground.py)."""

from __future__ import annotations

import re

from api.playground.routes import STATIC_DIR
from shared import constraints
from shared.payload import GenerateRequest
from tests.support.api_fakes import INFERENCE_URL, add_reader
from tests.unit.api.conftest import client_on


def test_the_page_and_every_file_it_loads_come_without_the_key(make_app):
    client = client_on(make_app(api_key="secret"), INFERENCE_URL)
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    loaded = re.findall(r'(?:src|href)="(/playground/[^"]+)"', html)
    assert loaded
    for path in loaded:
        assert client.get(path).status_code == 200, path
    assert client.get("/playground/info").status_code == 401
    assert client.get("/playground/info", headers={"X-API-Key": "secret"}).status_code == 200


def test_the_scripts_import_only_files_that_ship_with_the_page():
    for script in STATIC_DIR.glob("*.js"):
        source = script.read_text()
        assert "http://" not in source and "https://" not in source, script.name
        for imported in re.findall(r'from "\./([^"]+)"', source):
            assert (STATIC_DIR / imported).is_file(), f"{script.name} imports a missing {imported}"


def test_info_lists_groups_with_their_readers_queue_depth_and_the_backends(app, client, connection):
    add_reader(connection, loras={"available": ["alpha"], "loaded": [], "max_loaded": 2}, device="cpu")
    add_reader(connection, reader_id="vision-1", consumer_group="vision", model_type="VISION")
    info = client.get("/playground/info").get_json()
    assert set(info["groups"]) == {"primary", "vision"}
    (reader,) = info["groups"]["primary"]["readers"]
    assert reader["loras"]["available"] == ["alpha"]
    assert {"model_name", "model_type", "device", "dtype", "has_chat_template", "ready"} <= set(reader)
    assert "pids" not in reader and "stats" not in reader
    assert info["groups"]["vision"]["readers"][0]["model_type"] == "VISION"
    assert info["groups"]["primary"]["queue_depth"] == 0
    assert info["constrained_decoding_backends"] == list(constraints.BACKENDS)
    assert info["default_backend"] == constraints.DEFAULT_BACKEND


def test_the_playground_is_not_served_on_the_management_port(management):
    assert management.get("/").status_code == 404
    assert management.get("/playground/info").status_code == 404


def test_the_parameters_panel_is_built_from_the_payload_schema():
    """The page builds its fields from GenerateRequest's schema in /openapi.json: the keys it
    sets by other means must be keys of the payload, or the panel would silently miss one."""
    source = (STATIC_DIR / "parameters.js").read_text()
    handled = re.search(r"HANDLED_ELSEWHERE = new Set\(\[(.*?)\]\)", source, re.S).group(1)
    assert set(re.findall(r'"(\w+)"', handled)) <= set(GenerateRequest.model_fields)
