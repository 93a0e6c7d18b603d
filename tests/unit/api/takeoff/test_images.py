"""/image_generate and /image_generate_stream, image_paths, and images in Redis,
over fake Redis with a fake worker. Multipart bodies are built the way clients
build them: by requests' own encoder (as the Takeoff client sends them: the
image as a file part, json_data as a part with Content-Type application/json)
and by werkzeug's test client with (file, filename, content type) tuples."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image
from werkzeug.test import EnvironBuilder

from api import images, wsgi
from api.state import state_of
from shared import defaults, keys
from tests.support.api_fakes import INFERENCE_URL, add_reader, done, token, wait_for
from tests.support.tiny_vlms import sample_image
from tests.unit.api.conftest import client_on

PAYLOAD = {"text": "What is in the picture?", "max_new_tokens": 5}


@pytest.fixture(autouse=True)
def _vision_reader(connection):
    add_reader(connection, model_type="VISION", model_name="tiny-vlm")


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


RED_PNG = encoded(sample_image((220, 30, 30)))
BLUE_JPEG = encoded(sample_image((20, 40, 210)), "JPEG", quality=90)


def canonical_id(data: bytes) -> str:
    return images.canonical_image(data, max_pixels=10**8, source="test").image_id


def multipart(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    """A body and Content-Type exactly as requests (and so the Takeoff client) builds them."""
    prepared = requests.Request("POST", "http://localhost/image_generate", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def takeoff_files(image: bytes, payload: dict) -> dict:
    """What takeoff_client.TakeoffClient.generate(..., image_path=...) sends."""
    return {
        "image_data": ("/tmp/cat.png", io.BytesIO(image), "image/*"),
        "json_data": (None, json.dumps(payload), "application/json"),
    }


def post_image(client, image: bytes = RED_PNG, payload: dict | None = None, route: str = "/image_generate"):
    body, content_type = multipart(takeoff_files(image, payload or PAYLOAD))
    return client.post(route, data=body, content_type=content_type)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "error_type"}
    return body


def stored_images(connection) -> list[bytes]:
    return sorted(connection.scan_iter(keys.image_key("*")))


def answer(job):
    yield token(0, 0, "a red square")
    yield done(0, 3)


# -- the happy paths ---------------------------------------------------------------


def test_takeoff_style_body_is_answered_and_the_job_names_the_image(client, worker, connection):
    seen = {}

    def script(job):
        key = keys.image_key(job.image_ids[0])
        seen["data"] = connection.hget(key, keys.IMAGE_DATA_FIELD)
        seen["ttl"] = connection.ttl(key)
        yield from answer(job)

    worker.serve(script)
    response = post_image(client)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"text": "a red square"}
    worker.join()
    job = worker.jobs[0]
    assert job.image_ids == [hashlib.sha256(seen["data"]).hexdigest()]
    assert job.request.text == PAYLOAD["text"]
    assert 0 < seen["ttl"] <= defaults.IMAGE_TTL_SECONDS
    stored = Image.open(io.BytesIO(seen["data"]))
    assert stored.format == "PNG" and stored.mode == "RGB"
    assert stored.tobytes() == Image.open(io.BytesIO(RED_PNG)).convert("RGB").tobytes()
    assert stored_images(connection) == [], "the image outlived its request"


def test_json_data_as_a_plain_field_and_as_a_named_file_part(client, worker):
    worker.serve(answer)
    worker.serve(answer)
    as_field = client.post(
        "/image_generate",
        data={
            "image_data": (io.BytesIO(BLUE_JPEG), "blue.jpg", "image/jpeg"),
            "json_data": json.dumps(PAYLOAD),
        },
        content_type="multipart/form-data",
    )
    as_file = client.post(
        "/image_generate",
        data={
            "image_data": (io.BytesIO(BLUE_JPEG), "blue.jpg", "image/jpeg"),
            "json_data": (io.BytesIO(json.dumps(PAYLOAD).encode()), "payload.json", "application/json"),
        },
        content_type="multipart/form-data",
    )
    assert as_field.status_code == 200 and as_file.status_code == 200
    worker.join()
    assert worker.jobs[0].image_ids == worker.jobs[1].image_ids == [canonical_id(BLUE_JPEG)]


def test_stream_of_a_batch_carries_batch_ids(client, worker, connection):
    def two_rows(job):
        yield token(1, 0, "B")
        yield token(0, 0, "A")
        yield done(0, 1)
        yield done(1, 1)

    worker.serve(two_rows)
    payload = {"text": ["Colour?", "Shape?"], "max_new_tokens": 3}
    response = post_image(client, payload=payload, route="/image_generate_stream")
    assert response.mimetype == "text/event-stream"
    assert response.get_data(as_text=True) == (
        'data: {"text": "B", "batch_id": 1}\n\ndata: {"text": "A", "batch_id": 0}\n\n'
    )
    worker.join()
    assert len(worker.jobs[0].image_ids) == 1  # one image for every prompt
    assert stored_images(connection) == []


def test_a_large_json_data_field_passes_flasks_form_limit(client, worker):
    # Flask caps a multipart text field at 500 kB by default.
    worker.serve(lambda job: [done(row, 0) for row in range(5)])
    payload = {"text": ["x" * 150_000] * 5, "max_new_tokens": 1}
    body, content_type = multipart(takeoff_files(RED_PNG, payload))
    assert len(body) > 700_000
    response = client.post("/image_generate", data=body, content_type=content_type)
    assert response.status_code == 200, response.get_data(as_text=True)
    worker.join()


def test_exif_orientation_is_applied_and_images_become_rgb(connection):
    wide = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = images.canonical_image(encoded(wide, "JPEG", exif=exif), max_pixels=10**6, source="x")
    assert (rotated.width, rotated.height) == (20, 40)
    for mode in ("RGBA", "P", "L", "1", "CMYK"):
        data = encoded(Image.new(mode, (8, 8)), "JPEG" if mode == "CMYK" else "PNG")
        canonical = images.canonical_image(data, max_pixels=10**6, source="x")
        assert Image.open(io.BytesIO(canonical.data)).mode == "RGB"


def test_the_same_pixels_give_the_same_id_whatever_the_encoding():
    image = sample_image((1, 2, 3))
    assert canonical_id(encoded(image, "PNG")) == canonical_id(encoded(image, "BMP"))
    assert canonical_id(encoded(image, "PNG")) != canonical_id(encoded(sample_image((1, 2, 4)), "PNG"))


# -- rejections, before anything is queued -----------------------------------------


def assert_nothing_queued(connection):
    assert connection.llen(f"rq:queue:{keys.queue_name('primary')}") == 0
    assert stored_images(connection) == []


@pytest.mark.parametrize(
    ("files", "data", "named"),
    [
        ({"json_data": (None, json.dumps(PAYLOAD), "application/json")}, None, "image_data"),
        ({"image_data": ("a.png", RED_PNG, "image/png")}, None, "json_data"),
        ({"other": ("notes.txt", b"hi", "text/plain")}, {"json_data": json.dumps(PAYLOAD)}, "image_data"),
    ],
)
def test_a_missing_part_is_400_naming_it(client, connection, files, data, named):
    body, content_type = multipart(files, data)
    error = error_of(client.post("/image_generate", data=body, content_type=content_type), 400)
    assert error["error_type"] == "missing_part"
    assert named in error["error"]
    assert_nothing_queued(connection)


def test_image_data_sent_as_a_text_field_is_400(client):
    body, content_type = multipart(
        {"json_data": (None, json.dumps(PAYLOAD), "application/json")}, {"image_data": "not a file"}
    )
    error = error_of(client.post("/image_generate", data=body, content_type=content_type), 400)
    assert "file part" in error["error"]


@pytest.mark.parametrize(
    ("json_data", "status", "error_type", "mentions"),
    [
        ("{not json", 400, "invalid_request", "json_data is not valid JSON"),
        ("[1, 2]", 422, "validation_error", "json_data must be a JSON object"),
        ('{"text": "x", "colour": "red"}', 422, "validation_error", "colour"),
        ('{"text": "x", "max_new_tokens": 0}', 422, "validation_error", "max_new_tokens"),
        ('{"text": "x", "lora_id": "../a"}', 422, "validation_error", "lora_id"),
    ],
)
def test_a_bad_json_data_is_answered_like_a_bad_json_body(
    client, connection, json_data, status, error_type, mentions
):
    body, content_type = multipart(
        {"image_data": ("a.png", RED_PNG, "image/png"), "json_data": (None, json_data, "application/json")}
    )
    error = error_of(client.post("/image_generate", data=body, content_type=content_type), status)
    assert error["error_type"] == error_type and mentions in error["error"]
    assert_nothing_queued(connection)


def test_a_json_body_on_an_image_route_is_415(client):
    error = error_of(client.post("/image_generate", json=PAYLOAD), 415)
    assert "multipart/form-data" in error["error"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixels:
    decoding it would fail (truncated), so a 413 proves it was never decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


TRUNCATED_PNG = RED_PNG[: len(RED_PNG) // 2]
TRUNCATED_JPEG = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:600]


@pytest.mark.parametrize(
    ("image", "status", "error_type"),
    [
        (b"this is not an image at all", 400, "invalid_image"),
        (b"", 400, "invalid_image"),
        (b"GIF89a" + b"\0" * 20, 400, "invalid_image"),
        (TRUNCATED_PNG, 400, "invalid_image"),
        (TRUNCATED_JPEG, 400, "invalid_image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 400, "invalid_image"),  # never Ghostscript
        (png_header_only(5000, 5000), 413, "image_too_large"),
        (png_header_only(100_000, 100_000), 413, "image_too_large"),  # past Pillow's own bomb limit
    ],
    ids=["garbage", "empty", "gif-header-only", "truncated-png", "truncated-jpeg", "eps", "pixels", "bomb"],
)
def test_bad_images_are_rejected_before_queueing(client, connection, image, status, error_type):
    error = error_of(post_image(client, image), status)
    assert error["error_type"] == error_type
    assert_nothing_queued(connection)


def test_the_pixel_limit_is_configurable(make_app, connection):
    client = client_on(make_app(max_image_pixels=100), INFERENCE_URL)
    error = error_of(post_image(client, encoded(Image.new("RGB", (11, 10)))), 413)
    assert "110 pixels" in error["error"] and "100" in error["error"]


def test_a_body_over_the_limit_is_413(make_app, connection):
    client = client_on(make_app(body_size_limit_bytes=1000), INFERENCE_URL)
    big = encoded(Image.effect_noise((64, 64), 80).convert("RGB"))
    assert len(big) > 1000
    error = error_of(post_image(client, big), 413)
    assert error["error_type"] == "payload_too_large"
    assert_nothing_queued(connection)


def test_a_chunked_body_over_the_limit_is_413(make_app):
    app = make_app(body_size_limit_bytes=1000)
    body, content_type = multipart(takeoff_files(encoded(Image.effect_noise((64, 64), 80)), PAYLOAD))
    environ = EnvironBuilder(
        path="/image_generate",
        base_url=INFERENCE_URL,
        method="POST",
        input_stream=io.BytesIO(body),
        headers={"Content-Type": content_type, "Transfer-Encoding": "chunked"},
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True
    statuses = []
    app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses[0].startswith("413")


def test_a_text_only_model_refuses_images(client, connection):
    add_reader(connection, reader_id="reader-1", model_type="CAUSAL", model_name="SmolLM2")
    error = error_of(post_image(client), 400)
    assert error["error_type"] == "model_does_not_accept_images"
    assert "SmolLM2" in error["error"]
    assert_nothing_queued(connection)


def test_an_unknown_group_is_404_and_stores_nothing(client, connection):
    error_of(post_image(client, payload={**PAYLOAD, "consumer_group": "nope"}), 404)
    assert_nothing_queued(connection)


def test_too_many_images_is_422(make_app, tmp_path):
    for index in range(defaults.MAX_IMAGES_PER_REQUEST):
        (tmp_path / f"{index}.png").write_bytes(RED_PNG)
    client = client_on(make_app(image_dir=str(tmp_path)), INFERENCE_URL)
    paths = [f"{index}.png" for index in range(defaults.MAX_IMAGES_PER_REQUEST)]
    error = error_of(post_image(client, payload={**PAYLOAD, "image_paths": paths}), 422)
    assert str(defaults.MAX_IMAGES_PER_REQUEST) in error["error"]


# -- images in Redis: stored once, gone when the request ends ------------------------


def test_a_hundred_prompts_about_one_image_store_it_once(client, worker, connection):
    seen = {}

    def script(job):
        seen["keys"] = stored_images(connection)
        seen["refs"] = connection.hget(keys.image_key(job.image_ids[0]), keys.IMAGE_REFS_FIELD)
        for row in range(len(job.request.texts)):
            yield done(row, 0)

    worker.serve(script)
    response = post_image(client, payload={"text": [f"q{i}" for i in range(100)], "max_new_tokens": 1})
    assert response.status_code == 200
    worker.join()
    assert len(seen["keys"]) == 1 and seen["refs"] == b"1"
    assert stored_images(connection) == []


def test_requests_sharing_an_image_share_one_key_until_the_last_ends(connection):
    image = images.canonical_image(RED_PNG, max_pixels=10**6, source="x")
    first = images.ImageLease.take(connection, [image])
    second = images.ImageLease.take(connection, [image, image])
    key = keys.image_key(image.image_id)
    assert connection.hget(key, keys.IMAGE_REFS_FIELD) == b"2"
    assert second.image_ids == [image.image_id, image.image_id]
    first.release()
    first.release()  # idempotent
    assert connection.hget(key, keys.IMAGE_DATA_FIELD) == image.data
    second.release()
    assert not connection.exists(key)


def test_releasing_an_expired_image_leaves_nothing(connection):
    image = images.canonical_image(RED_PNG, max_pixels=10**6, source="x")
    lease = images.ImageLease.take(connection, [image])
    connection.delete(keys.image_key(image.image_id))  # as its TTL would
    lease.release()
    assert stored_images(connection) == []


def test_a_failed_request_leaves_no_image(client, worker, connection):
    from shared import events

    worker.serve(lambda job: [events.ErrorEvent(error="boom", error_type="generation_error", status=500)])
    error_of(post_image(client), 500)
    worker.join()
    assert stored_images(connection) == []


def test_a_timed_out_request_leaves_no_image(make_app, connection):
    client = client_on(make_app(first_event_timeout_seconds=0.1), INFERENCE_URL)
    error_of(post_image(client), 504)
    assert stored_images(connection) == []


def test_a_stream_closed_early_leaves_no_image(client, worker, connection):
    def slow(job):
        yield token(0, 0, "first")
        yield lambda job: wait_for(lambda: connection.exists(keys.cancel_key(job.request_id)))

    worker.serve(slow)
    body, content_type = multipart(takeoff_files(RED_PNG, PAYLOAD))
    response = client.post("/image_generate_stream", data=body, content_type=content_type, buffered=False)
    assert next(iter(response.response)) == b"data: first\n\n"
    assert len(stored_images(connection)) == 1
    response.close()
    worker.join()
    assert stored_images(connection) == []


def test_a_stream_never_read_leaves_no_image(app, connection):
    body, content_type = multipart(takeoff_files(RED_PNG, PAYLOAD))
    environ = EnvironBuilder(
        path="/image_generate_stream",
        base_url=INFERENCE_URL,
        method="POST",
        data=body,
        content_type=content_type,
    ).get_environ()
    app(environ, lambda status, headers, exc_info=None: None).close()
    assert stored_images(connection) == []
    assert state_of(app).hub.open_subscriptions == 0


# -- image_paths ---------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path) -> Path:
    directory = tmp_path / "images"
    (directory / "sub").mkdir(parents=True)
    (directory / "red.png").write_bytes(RED_PNG)
    (directory / "sub" / "blue.jpg").write_bytes(BLUE_JPEG)
    (tmp_path / "secret.png").write_bytes(RED_PNG)
    os.symlink(tmp_path / "secret.png", directory / "escape.png")
    os.symlink(directory / "red.png", directory / "alias.png")
    return directory


@pytest.fixture
def dir_client(make_app, image_dir):
    return client_on(make_app(image_dir=str(image_dir)), INFERENCE_URL)


def test_image_paths_read_files_inside_the_image_dir_on_any_route(dir_client, worker, image_dir, connection):
    worker.serve(answer)
    worker.serve(answer)
    paths = ["red.png", str(image_dir / "sub" / "blue.jpg"), "sub/../alias.png"]
    response = dir_client.post("/generate", json={**PAYLOAD, "image_paths": paths})
    assert response.status_code == 200, response.get_data(as_text=True)
    red, blue = canonical_id(RED_PNG), canonical_id(BLUE_JPEG)
    response = post_image(dir_client, BLUE_JPEG, payload={**PAYLOAD, "image_paths": ["red.png"]})
    assert response.status_code == 200, response.get_data(as_text=True)
    worker.join()
    assert worker.jobs[0].image_ids == [red, blue, red]
    assert worker.jobs[1].image_ids == [blue, red]  # the uploaded image comes first
    assert stored_images(connection) == []


@pytest.mark.parametrize(
    "path",
    [
        "../secret.png",
        "sub/../../secret.png",
        "escape.png",  # a symlink leading out
        "/etc/passwd",
        "missing.png",
        "sub",
        "",
        ".",
        "bad\0name.png",
    ],
)
def test_image_paths_outside_the_dir_or_not_files_are_400(dir_client, connection, path):
    error = error_of(dir_client.post("/generate", json={**PAYLOAD, "image_paths": [path]}), 400)
    assert error["error_type"] == "invalid_image"
    assert "image_paths[0]" in error["error"]
    assert_nothing_queued(connection)


def test_an_absolute_path_elsewhere_is_400_even_when_it_exists(dir_client, image_dir):
    outside = image_dir.parent / "secret.png"
    error = error_of(dir_client.post("/generate", json={**PAYLOAD, "image_paths": [str(outside)]}), 400)
    assert "inside the server's image dir" in error["error"]


def test_a_file_that_is_not_an_image_is_400_and_a_big_one_413(make_app, image_dir):
    (image_dir / "notes.png").write_text("hello")
    (image_dir / "huge.png").write_bytes(b"\0" * 2000)
    client = client_on(make_app(image_dir=str(image_dir), body_size_limit_bytes=1500), INFERENCE_URL)
    error = error_of(client.post("/generate", json={**PAYLOAD, "image_paths": ["notes.png"]}), 400)
    assert error["error_type"] == "invalid_image"
    error = error_of(client.post("/generate", json={**PAYLOAD, "image_paths": ["huge.png"]}), 413)
    assert error["error_type"] == "image_too_large"


def test_image_paths_without_an_image_dir_are_400(client):
    error = error_of(client.post("/generate", json={**PAYLOAD, "image_paths": ["red.png"]}), 400)
    assert error["error_type"] == "image_paths_disabled"
    assert "--image-dir" in error["error"]


# -- remote images -------------------------------------------------------------------


@pytest.fixture
def web_server(tmp_path) -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 serving red.png, big.png and a slow path."""
    root = tmp_path / "web"
    root.mkdir()
    (root / "red.png").write_bytes(RED_PNG)
    (root / "big.png").write_bytes(b"\0" * 5000)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_400_unless_remote_images_are_allowed(client, web_server):
    error = error_of(
        client.post("/generate", json={**PAYLOAD, "image_paths": [web_server + "/red.png"]}), 400
    )
    assert error["error_type"] == "remote_images_disabled"
    assert "--allow-remote-images" in error["error"]


def test_allowed_urls_are_fetched_checked_and_size_capped(make_app, worker, web_server, connection):
    client = client_on(make_app(allow_remote_images=True, body_size_limit_bytes=4000), INFERENCE_URL)
    worker.serve(answer)
    response = client.post("/generate", json={**PAYLOAD, "image_paths": [web_server + "/red.png"]})
    assert response.status_code == 200, response.get_data(as_text=True)
    worker.join()
    assert worker.jobs[0].image_ids == [canonical_id(RED_PNG)]
    for path, status in (("/missing.png", 400), ("/big.png", 413)):
        error_of(client.post("/generate", json={**PAYLOAD, "image_paths": [web_server + path]}), status)
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,AAAA"):
        error = error_of(client.post("/generate", json={**PAYLOAD, "image_paths": [url]}), 400)
        assert "http" in error["error"]
    error = error_of(
        client.post("/generate", json={**PAYLOAD, "image_paths": ["http://127.0.0.1:1/x.png"]}), 400
    )
    assert "could not fetch" in error["error"]
    assert stored_images(connection) == []


# -- settings ------------------------------------------------------------------------


def test_image_settings_come_from_the_environment(tmp_path):
    settings = wsgi.settings_from_env(
        {
            "MMSERVE_REDIS_URL": "redis://x",
            "MMSERVE_IMAGE_DIR": str(tmp_path),
            "MMSERVE_ALLOW_REMOTE_IMAGES": "1",
            "MMSERVE_MAX_IMAGE_PIXELS": "1000",
        }
    )
    assert settings.image_dir == str(tmp_path)
    assert settings.allow_remote_images is True
    assert settings.max_image_pixels == 1000
    unset = wsgi.settings_from_env({"MMSERVE_REDIS_URL": "redis://x"})
    assert unset.image_dir is None and unset.allow_remote_images is False
    assert unset.max_image_pixels == defaults.DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="MMSERVE_ALLOW_REMOTE_IMAGES"):
        wsgi.settings_from_env({"MMSERVE_REDIS_URL": "redis://x", "MMSERVE_ALLOW_REMOTE_IMAGES": "maybe"})
