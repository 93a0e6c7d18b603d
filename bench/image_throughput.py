"""Image requests through `mmserve serve` with a vision-language model (by default a tiny
random LLaVA, so the figures are the server's own overhead), and what the API spends on one
image upload.

    .venv/bin/python -m bench.image_throughput --help

Every request streams /image_generate_stream with its own image, greedy, exactly --new-tokens
tokens. Then a ~1 MB JPEG: the API's in-process cost to check, re-encode and store it, and the
HTTP latency of a one-token request carrying it vs a small PNG. Prints one JSON document."""

from __future__ import annotations

import concurrent.futures
import io
import json
import statistics
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


def small_image(index: int) -> bytes:
    """A distinct 64x48 PNG per request, so no two requests share an image."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg(target_bytes: int = 1_000_000) -> bytes:
    """A photo-like 1600x1200 JPEG (gradients + sensor-like noise) of about `target_bytes`."""
    rng = np.random.default_rng(0)
    width, height = 1600, 1200
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate(
        [x * 200 + 30 * np.sin(y * 20), y * 180 + 40 * np.cos(x * 15), (x + y) * 100], axis=2
    )
    pixels = np.clip(base + rng.normal(0, 18, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
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
        first, _ = read_answer(response, started)
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


def upload_latency(url: str, image: bytes, repeats: int = 5) -> float:
    """Median seconds of a one-token /image_generate request carrying `image`."""
    times = []
    for index in range(repeats):
        payload = {"text": f"{QUESTION} {index}", "max_new_tokens": 1}
        started = time.perf_counter()
        post(url, image, payload, stream=False).raise_for_status()
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


def start_server(model: Path, args) -> ServeProcess:
    return ServeProcess.for_benchmark(
        "--model", str(model), max_batch_size=max(args.concurrency), dtype=args.dtype, threads=args.threads
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", type=Path, default=None, help="VLM folder (default: a tiny random LLaVA)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=16)
    add_model_flags(parser, dtype="float32", pack_weights=False)
    args = parser.parse_args()

    args.threads = threads_or_default(args.threads)
    with tempfile.TemporaryDirectory(prefix="mmserve-bench-") as scratch:
        model = args.model
        if model is None:
            from bench.tiny_vlms import build_tiny_llava

            model = build_tiny_llava(Path(scratch) / "tiny-llava")
        report: dict = {
            "model": str(args.model) if args.model else "tiny random LLaVA (bench/tiny_vlms.py)",
            "new_tokens": args.new_tokens,
            "dtype": args.dtype,
            "threads": args.threads,
            **machine(),
        }
        jpeg = photo_jpeg()
        server = start_server(model, args)
        url = server.url
        try:
            bench_http(url, 1, 1, 4, offset=10_000)  # warm-up
            report["http"] = [
                bench_http(url, c, args.rounds, args.new_tokens, offset=1000 * c) for c in args.concurrency
            ]
            small = upload_latency(url, small_image(0))
            large = upload_latency(url, jpeg)
            report["one_token_request_s"] = {
                "small_png": round(small, 3),
                "jpeg_1mb": round(large, 3),
                "difference_ms": round((large - small) * 1000, 1),
            }
        finally:
            server.stop()
    report["api_cost_per_upload"] = api_upload_cost(jpeg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
