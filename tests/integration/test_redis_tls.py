"""The API and a worker over a TLS-only Redis that asks for client certificates and knows only
an ACL user: TLS files by flag and by URL parameter, and what happens when they are wrong."""

from __future__ import annotations

import pytest
import redis
import requests

from shared.connection import connect, with_tls_files
from tests.support.tls_redis import PASSWORD, USER, TlsRedis


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    server = TlsRedis(tmp_path_factory.mktemp("tls-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def tls_launcher(tls_redis, tiny_model_dir, tmp_path):
    from tests.integration.conftest import Launcher

    launched = Launcher(tls_redis.client_url(), tiny_model_dir, tmp_path)
    yield launched
    launched.stop_all()


def test_generation_over_tls_with_an_acl_user(tls_redis, tls_launcher):
    files = tls_redis.files
    # the worker is given its TLS files in the URL, the API by flags (certificate and key apart)
    tls_launcher.worker(redis_url=tls_redis.client_url())
    api = tls_launcher.api(
        "--redis-ca-file",
        str(files.ca),
        "--redis-cert-file",
        str(files.client_cert_only),
        "--redis-key-file",
        str(files.client_key),
        redis_url=tls_redis.acl_url(),
    )
    assert requests.get(api.url + "/readyz", timeout=10).status_code == 200
    response = requests.post(api.url + "/generate", json={"text": "hello", "max_new_tokens": 4}, timeout=60)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)
    client = connect(tls_redis.client_url())
    assert client.acl_whoami() == USER


def test_the_server_certificate_is_checked(tls_redis):
    """Without the CA that signed it, the server's certificate is refused."""
    url = with_tls_files(tls_redis.acl_url(), cert_file=str(tls_redis.files.client_cert))
    with pytest.raises(redis.ConnectionError):
        connect(url).ping()


def test_a_client_without_a_certificate_is_refused(tls_redis):
    url = with_tls_files(tls_redis.acl_url(), ca_file=str(tls_redis.files.ca))
    with pytest.raises(redis.ConnectionError):
        connect(url).ping()


def test_a_wrong_password_is_refused(tls_redis):
    url = with_tls_files(
        tls_redis.acl_url(password=PASSWORD + "x"), str(tls_redis.files.ca), str(tls_redis.files.client_cert)
    )
    with pytest.raises(redis.AuthenticationError):
        connect(url).ping()
