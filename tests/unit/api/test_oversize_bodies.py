import io

from api.oversize_bodies import OVERSIZE_KEY, OversizeBodies, discard


class CountingStream(io.RawIOBase):
    """`size` bytes, counting what was read and the largest single read."""

    def __init__(self, size: int):
        self.left = size
        self.read_bytes = 0
        self.largest = 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        self.read_bytes += n
        self.largest = max(self.largest, n)
        return b"x" * n


class FakeSocket:
    def __init__(self):
        self.shut = []

    def shutdown(self, how):
        self.shut.append(how)


def run(middleware, environ):
    statuses = []
    body = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    chunks = list(body)
    if hasattr(body, "close"):
        body.close()
    return statuses[0], b"".join(chunks)


def app_answering(status: str, seen: dict):
    def app(environ, start_response):
        seen["oversize"] = environ.get(OVERSIZE_KEY)
        seen["body"] = environ["wsgi.input"].read(100)
        start_response(status, [("Content-Type", "application/json")])
        return [b"{}"]

    return app


def test_discard_stops_at_the_limit_in_small_pieces():
    stream = CountingStream(10_000_000)
    assert discard(stream, 3_000_000) == 3_000_000
    assert stream.read_bytes == 3_000_000
    assert stream.largest <= 64 * 1024


def test_discard_stops_at_the_end():
    assert discard(CountingStream(1000), 10_000) == 1000


def test_a_body_within_the_limit_reaches_the_app():
    seen = {}
    stream = io.BytesIO(b"hello")
    environ = {"CONTENT_LENGTH": "5", "wsgi.input": stream}
    status, _ = run(OversizeBodies(app_answering("200 OK", seen), 10, 100), environ)
    assert status == "200 OK" and seen == {"oversize": None, "body": b"hello"}


def test_an_oversize_body_is_read_and_dropped_before_the_app_runs():
    seen, stream, sock = {}, CountingStream(500), FakeSocket()
    environ = {"CONTENT_LENGTH": "500", "wsgi.input": stream, "gunicorn.socket": sock}
    run(OversizeBodies(app_answering("413 REQUEST ENTITY TOO LARGE", seen), 10, 1000), environ)
    assert stream.read_bytes == 500  # all of it: the client can then read the answer
    assert seen == {"oversize": 500, "body": b""}
    assert sock.shut == []  # the connection stays usable


def test_past_the_discard_bound_nothing_is_read_and_the_socket_is_shut():
    seen, stream, sock = {}, CountingStream(5000), FakeSocket()
    environ = {"CONTENT_LENGTH": "5000", "wsgi.input": stream, "gunicorn.socket": sock}
    run(OversizeBodies(app_answering("413 REQUEST ENTITY TOO LARGE", seen), 10, 1000), environ)
    assert stream.read_bytes == 0
    assert seen["oversize"] == 5000
    assert len(sock.shut) == 1


def test_the_rest_of_a_chunked_body_is_dropped_after_a_413():
    seen, stream, sock = {}, CountingStream(800), FakeSocket()
    environ = {"wsgi.input": stream, "gunicorn.socket": sock}  # no Content-Length
    run(OversizeBodies(app_answering("413 REQUEST ENTITY TOO LARGE", seen), 10, 1000), environ)
    assert stream.read_bytes == 800 and sock.shut == []


def test_a_chunked_body_past_the_bound_shuts_the_socket():
    seen, stream, sock = {}, CountingStream(5000), FakeSocket()
    environ = {"wsgi.input": stream, "gunicorn.socket": sock}
    run(OversizeBodies(app_answering("413 REQUEST ENTITY TOO LARGE", seen), 10, 1000), environ)
    assert stream.read_bytes == 1100  # what the app read, then the bound
    assert len(sock.shut) == 1


def test_a_chunked_body_of_an_answered_request_is_left_alone():
    seen, stream = {}, CountingStream(800)
    run(OversizeBodies(app_answering("200 OK", seen), 10, 1000), {"wsgi.input": stream})
    assert stream.read_bytes == 100  # only what the app read
