from urllib.parse import parse_qs, urlsplit

import pytest
from redis.connection import SSLConnection, parse_url

from shared.connection import connect, with_tls_files


def test_no_files_leave_the_url_alone():
    assert with_tls_files("redis://h:1/0") == "redis://h:1/0"


def test_files_become_the_query_redis_py_reads():
    url = with_tls_files(
        "rediss://user:pw@h:6380/2?health_check_interval=5", "/ca.pem", "/cert.pem", "/key.pem"
    )
    kwargs = parse_url(url)
    assert kwargs["connection_class"] is SSLConnection
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "pw", 2)
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        "/ca.pem",
        "/cert.pem",
        "/key.pem",
    )
    assert kwargs["health_check_interval"] == 5


def test_files_given_again_replace_those_in_the_url():
    url = with_tls_files(with_tls_files("rediss://h/0", ca_file="/old.pem"), ca_file="/new.pem")
    assert parse_qs(urlsplit(url).query)["ssl_ca_certs"] == ["/new.pem"]


def test_a_key_in_the_url_keeps_its_certificate():
    url = with_tls_files("rediss://h/0?ssl_certfile=/c.pem", key_file="/k.pem")
    assert parse_qs(urlsplit(url).query) == {"ssl_certfile": ["/c.pem"], "ssl_keyfile": ["/k.pem"]}


@pytest.mark.parametrize("url", ["redis://h/0", "unix:///tmp/redis.sock"])
def test_files_need_a_tls_url(url):
    with pytest.raises(ValueError, match="rediss://"):
        with_tls_files(url, ca_file="/ca.pem")


def test_a_key_needs_its_certificate():
    with pytest.raises(ValueError, match="--redis-cert-file"):
        with_tls_files("rediss://h/0", key_file="/k.pem")


def test_connect_builds_tls_connections_from_the_url():
    client = connect(with_tls_files("rediss://h:6380/0", "/ca.pem"))
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
