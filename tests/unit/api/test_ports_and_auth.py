"""One app, two ports: routes answer on their own port only; the API key guards all but /healthz."""

import pytest

from tests.support.api_fakes import INFERENCE_URL, MANAGEMENT_URL, add_reader
from tests.unit.api.conftest import client_on

INFERENCE_ONLY = [
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/image_generate"),
    ("POST", "/tokenize/reader-1"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]
MANAGEMENT_ONLY = [("GET", "/reader_groups"), ("GET", "/status"), ("GET", "/config/reader-1")]
BOTH = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")]


@pytest.mark.parametrize(("method", "path"), INFERENCE_ONLY)
def test_inference_routes_are_404_on_the_management_port(management, method, path):
    response = management.open(path, method=method, json={"text": "hi"})
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "not_found"


@pytest.mark.parametrize(("method", "path"), MANAGEMENT_ONLY)
def test_management_routes_are_404_on_the_inference_port(client, connection, method, path):
    add_reader(connection)
    assert client.open(path, method=method).status_code == 404


@pytest.mark.parametrize(("method", "path"), MANAGEMENT_ONLY)
def test_management_routes_answer_on_the_management_port(management, connection, method, path):
    add_reader(connection)
    assert management.open(path, method=method).status_code == 200


@pytest.mark.parametrize(("method", "path"), BOTH)
@pytest.mark.parametrize("base_url", [INFERENCE_URL, MANAGEMENT_URL])
def test_probes_answer_on_both_ports(app, connection, method, path, base_url):
    add_reader(connection)
    assert client_on(app, base_url).open(path, method=method).status_code == 200


def test_ports_follow_the_settings(make_app):
    app = make_app(port=8000, management_port=8001)
    assert client_on(app, "http://localhost:8001").get("/status").status_code == 200
    assert client_on(app, "http://localhost:8000").get("/status").status_code == 404
    assert client_on(app, "http://localhost:8000").get("/openapi.json").status_code == 200


def test_unknown_route_is_a_json_404(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.get_json()["error_type"] == "not_found"


def test_wrong_method_is_a_json_405(client):
    response = client.get("/generate")
    assert response.status_code == 405
    assert response.get_json()["error_type"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


@pytest.fixture
def keyed(make_app, connection):
    add_reader(connection)
    app = make_app(api_key="s3cret")
    return client_on(app, INFERENCE_URL), client_on(app, MANAGEMENT_URL)


@pytest.mark.parametrize(
    ("port", "method", "path"),
    [(0, "POST", "/generate"), (0, "GET", "/readyz"), (0, "GET", "/metrics"), (0, "GET", "/docs")]
    + [(1, method, path) for method, path in MANAGEMENT_ONLY],
)
def test_routes_need_the_api_key(keyed, port, method, path):
    response = keyed[port].open(path, method=method, json={"text": "hi"})
    assert response.status_code == 401
    assert response.get_json()["error_type"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_key_is_401(keyed):
    response = keyed[1].get("/status", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer s3cret"}, {"authorization": "bearer s3cret"}, {"X-API-Key": "s3cret"}],
)
def test_key_in_either_header_is_accepted(keyed, headers):
    assert keyed[1].get("/status", headers=headers).status_code == 200
    response = keyed[0].post("/generate", json={"text": "hi", "max_new_tokens": 0}, headers=headers)
    assert response.status_code == 422


def test_healthz_needs_no_key(keyed):
    assert keyed[0].get("/healthz").status_code == 200


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32
    garbage = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["X-Request-ID"]
    assert garbage != "bad id\twith spaces"


def test_one_log_line_per_request(client, caplog):
    caplog.set_level("INFO", logger="mmserve.api")
    with client.get("/healthz", headers={"X-Request-ID": "req-42"}):
        pass
    lines = [record.getMessage() for record in caplog.records if record.name == "mmserve.api"]
    assert len(lines) == 1
    assert lines[0].startswith("GET /healthz 200 request_id=req-42 duration_ms=")
