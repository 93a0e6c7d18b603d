"""Image requests through `mmserve serve` with each family's tiny random vision-language model
(or a real one), the image tokens a 640x480 and a 1920x1080 image add to a prompt, and what the
API spends on one image upload.

    .venv/bin/python -m bench.image_throughput --help

Per family (bench/tiny_vlms.py FAMILIES; --model DIR serves a real model instead), one server:
every request streams /image_generate_stream with its own image, greedy, exactly --new-tokens
tokens, at each --concurrency; then /image_generate and /generate with `return_metadata`, without
the chat template, give the prompt tokens of the same text with and without an image of each
size. Then, once, a ~1 MB JPEG: the HTTP latency of a one-token request carrying it vs a small PNG
(on the first family served), and the API's in-process cost to check, re-encode and store it.
Prints one JSON document; a family that fails to serve gets its error and the server's log."""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.common import add_model_flags, bench_parser, machine, percentile, threads_or_default
from bench.serving import ServeProcess, read_answer
from mmserve.redis_server import RedisServer
from shared import keys

QUESTION = "What is in this picture?"
# Images whose prompt tokens are counted per family: (width, height).
TOKEN_IMAGE_SIZES = [(640, 480), (1920, 1080)]
SMALL_IMAGE_SIZE = (64, 48)  # the throughput requests' images


def small_image(index: int) -> bytes:
    """A distinct 64x48 PNG per request, so no two requests share an image."""
    rng = np.random.default_rng(index)
    width, height = SMALL_IMAGE_SIZE
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_like(width: int, height: int, noise: float = 18.0) -> Image.Image:
    """A photo-like image: gradients + sensor-like noise."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate(
        [x * 200 + 30 * np.sin(y * 20), y * 180 + 40 * np.cos(x * 15), (x + y) * 100], axis=2
    )
    pixels = np.clip(base + rng.normal(0, noise, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def sized_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG of this size, small enough to upload (little noise)."""
    buffer = io.BytesIO()
    photo_like(width, height, noise=4.0).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def photo_jpeg(target_bytes: int = 1_000_000) -> bytes:
    """A photo-like 1600x1200 JPEG of about `target_bytes`."""
    image = photo_like(1600, 1200)
    best = b""
    for quality in range(60, 100, 2):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if abs(buffer.tell() - target_bytes) < abs(len(best) - target_bytes):
            best = buffer.getvalue()
    return best


def post(url: str, image: bytes, payload: dict, *, stream: bool) -> requests.Response:
    files = {
        "image_data": ("image", image, "application/octet-stream"),
        "json_data": (None, json.dumps(payload), "application/json"),
    }
    route = "/image_generate_stream" if stream else "/image_generate"
    return requests.post(url + route, files=files, stream=stream, timeout=600)


def stream_one(url: str, image: bytes, new_tokens: int) -> tuple[float, float]:
    """(time to first token, total seconds) of one streamed image request."""
    payload = {
        "text": QUESTION,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "use_chat_template": True,
    }
    started = time.perf_counter()
    with post(url, image, payload, stream=True) as response:
        first, _ = read_answer(checked(response), started)
    return first, time.perf_counter() - started


def bench_http(url: str, concurrency: int, rounds: int, new_tokens: int, offset: int) -> dict:
    images = [small_image(offset + i) for i in range(concurrency * rounds)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda image: stream_one(url, image, new_tokens), images))
    elapsed = time.perf_counter() - started
    ttfts = [ttft for ttft, _ in results]
    return {
        "concurrency": concurrency,
        "requests": len(images),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(images) / elapsed, 2),
        "tokens_per_s": round(len(images) * new_tokens / elapsed, 1),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def checked(response: requests.Response) -> requests.Response:
    """`response`, or an HTTPError whose message holds the server's answer."""
    if not response.ok:
        raise requests.HTTPError(
            f"{response.status_code} from {response.url}: {response.text[:2000]}", response=response
        )
    return response


def prompt_tokens(answer: dict) -> int:
    """The prompt tokens of a one-prompt answer's metadata (`return_metadata`)."""
    metadata = answer["metadata"]
    if isinstance(metadata, list):
        (metadata,) = metadata
    return int(metadata["prompt_tokens"])


def image_tokens_added(with_image: int, text_only: int) -> int:
    """The prompt tokens an image adds: the same text's prompt with the image minus without it."""
    if with_image < text_only:
        raise ValueError(f"{with_image} prompt tokens with an image, fewer than {text_only} without")
    return with_image - text_only


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def image_token_counts(url: str) -> dict:
    """Prompt tokens each image size adds to QUESTION, as the server counts them (metadata of a
    one-token request without the chat template, with the image and without)."""
    payload = {"text": QUESTION, "max_new_tokens": 1, "use_chat_template": False, "return_metadata": True}
    text_only = prompt_tokens(checked(requests.post(url + "/generate", json=payload, timeout=600)).json())
    images = {size_name(size): sized_jpeg(*size) for size in TOKEN_IMAGE_SIZES}
    images[size_name(SMALL_IMAGE_SIZE)] = small_image(0)
    counts = {}
    for name, image in images.items():
        with_image = prompt_tokens(checked(post(url, image, payload, stream=False)).json())
        counts[name] = image_tokens_added(with_image, text_only)
    return {"text_only_prompt_tokens": text_only, "image_tokens": counts}


def upload_latency(url: str, image: bytes, repeats: int = 5) -> float:
    """Median seconds of a one-token /image_generate request carrying `image`."""
    times = []
    for index in range(repeats):
        payload = {"text": f"{QUESTION} {index}", "max_new_tokens": 1}
        started = time.perf_counter()
        checked(post(url, image, payload, stream=False))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def api_upload_cost(jpeg: bytes, repeats: int = 5) -> dict:
    """What api.images spends on one upload, in this process, against a real Redis."""
    from api import images
    from shared import defaults

    def timed(function) -> tuple[float, object]:
        best, result = float("inf"), None
        for _ in range(repeats):
            started = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - started)
        return best * 1000, result

    check_ms, canonical = timed(
        lambda: images.canonical_image(jpeg, max_pixels=defaults.DEFAULT_MAX_IMAGE_PIXELS, source="bench")
    )
    with RedisServer() as server:
        from shared.connection import connect

        connection = connect(server.url)
        store_ms, lease = timed(lambda: _store_fresh(connection, images, canonical))
        lease.release()
        first = images.ImageLease.take(connection, [canonical])
        shared_ms, second = timed(lambda: images.ImageLease.take(connection, [canonical]))
        first.release()
        release_started = time.perf_counter()
        second.release()
        release_ms = (time.perf_counter() - release_started) * 1000
        connection.close()
    return {
        "jpeg_bytes": len(jpeg),
        "pixels": f"{canonical.width}x{canonical.height}",
        "decode_check_reencode_hash_ms": round(check_ms, 1),
        "stored_png_bytes": len(canonical.data),
        "bytes_written_to_redis_first_request": len(canonical.data),
        "bytes_written_to_redis_when_already_stored": 0,
        "store_in_redis_ms": round(store_ms, 2),
        "take_already_stored_ms": round(shared_ms, 2),
        "release_ms": round(release_ms, 2),
    }


def _store_fresh(connection, images, canonical):
    connection.delete(keys.image_key(canonical.image_id))
    return images.ImageLease.take(connection, [canonical])


def start_server(model: Path, args, log_path: Path) -> ServeProcess:
    return ServeProcess.for_benchmark(
        "--model",
        str(model),
        max_batch_size=max(args.concurrency),
        dtype=args.dtype,
        threads=args.threads,
        log_path=log_path,
    )


# An access-log line of the API (gunicorn): its request and status.
ACCESS_LINE = re.compile(r'^\S+ - - \[[^\]]*\] "(?P<request>[^"]*)" (?P<status>\d{3}) ')


def log_lines(text: str, limit: int = 60) -> list[str]:
    """The last `limit` non-empty lines of a server's log, without the access-log lines of
    answered requests and of the bench's own /readyz polling."""
    kept = []
    for line in text.splitlines():
        access = ACCESS_LINE.match(line)
        if not line.strip() or (
            access and (int(access["status"]) < 400 or access["request"].startswith("GET /readyz"))
        ):
            continue
        kept.append(line)
    return kept[-limit:]


def bench_family(model: Path, args, log_path: Path, *, upload_jpeg: bytes | None) -> dict:
    """One server on `model`: throughput at each concurrency, the image tokens, and (given
    `upload_jpeg`) the one-token latency of a request carrying it. An HTTP error, an answer
    not as expected or a server that does not start ends the family with "error" and the
    server's log lines."""
    report: dict = {}
    started = time.perf_counter()
    try:
        server = start_server(model, args, log_path)
    except RuntimeError as exc:
        log = log_path.read_text(errors="replace")
        return {"error": str(exc).splitlines()[0], "server_log": log_lines(log)}
    report["server_start_s"] = round(time.perf_counter() - started, 1)
    url = server.url
    try:
        bench_http(url, 1, 1, 4, offset=10_000)  # warm-up
        report["http"] = []
        for concurrency in args.concurrency:
            figures = bench_http(url, concurrency, args.rounds, args.new_tokens, offset=1000 * concurrency)
            report["http"].append(figures)
            progress(f"  concurrency {concurrency}: {figures['requests_per_s']} requests/s")
        report.update(image_token_counts(url))
        if upload_jpeg is not None:
            small = upload_latency(url, small_image(0))
            large = upload_latency(url, upload_jpeg)
            report["one_token_request_s"] = {
                "small_png": round(small, 3),
                "jpeg_1mb": round(large, 3),
                "difference_ms": round((large - small) * 1000, 1),
            }
    except (requests.RequestException, RuntimeError, ValueError, KeyError) as exc:  # answers not as expected
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["server_log"] = log_lines(server.log())
    finally:
        server.stop()
    return report


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = bench_parser(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--family",
        nargs="+",
        metavar="NAME",
        default=None,
        help="tiny random models to serve, by bench/tiny_vlms.py FAMILIES name (default: all of them)",
    )
    which.add_argument("--model", type=Path, default=None, help="a VLM folder to serve instead (one entry)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=16)
    add_model_flags(parser, dtype="float32", pack_weights=False)
    args = parser.parse_args()

    from bench.tiny_vlms import FAMILIES

    unknown = [name for name in args.family or [] if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown --family {', '.join(unknown)}: choose from {', '.join(FAMILIES)}")
    args.threads = threads_or_default(args.threads)
    bench_started = time.perf_counter()
    report: dict = {
        "model": str(args.model) if args.model else "tiny random models (bench/tiny_vlms.py)",
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "dtype": args.dtype,
        "threads": args.threads,
        **machine(),
        "families": {},
    }
    jpeg = photo_jpeg()
    with tempfile.TemporaryDirectory(prefix="mmserve-bench-") as scratch:
        if args.model is not None:
            models = {args.model.resolve().name: lambda _: args.model}
        else:
            models = {name: FAMILIES[name] for name in args.family or FAMILIES}
        for name, build in models.items():
            progress(f"{name}: building and serving")
            model = build(Path(scratch) / name)
            upload = jpeg if "one_token_request_s" not in report else None  # once, on the first served
            family = bench_family(model, args, Path(scratch) / f"{name}.log", upload_jpeg=upload)
            if "one_token_request_s" in family:
                report["one_token_request_s"] = {"family": name, **family.pop("one_token_request_s")}
            if "error" in family:
                progress(f"{name}: {family['error']}")
            report["families"][name] = family
    report["api_cost_per_upload"] = api_upload_cost(jpeg)
    report["bench_seconds"] = round(time.perf_counter() - bench_started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
