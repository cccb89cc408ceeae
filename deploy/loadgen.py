"""Steady load for the service: small generated PNGs POSTed to /predict at a fixed rate (the standard library and
the service's own percentiles, app.observability.stats: it runs where the service is installed, as in the app's image).

    python deploy/loadgen.py --url http://127.0.0.1:8000 --rate 5 --duration 60
    docker-compose --profile loadgen up      (the `loadgen` service runs this in the app's image)

Requests start on a fixed schedule (open loop), so a slow mode shows up as latency rather than as a
lower request rate; at most --concurrency are in flight, later ones wait for a free worker. Each image
is a random rectangle on a random background. Stops after --count requests or --duration seconds, or
on Ctrl-C, and prints a summary; the exit status is 1 if any request failed. With API_KEY in its environment,
every request carries it as `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from app.engine.timing import percentiles_ms


def png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG of `rows` (each width * 3 bytes), unfiltered, zlib-compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    pixels = b"".join(b"\x00" + row for row in rows)  # filter type 0 before every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def sample_image(rng: random.Random, size: int = 64) -> bytes:
    """A random-coloured rectangle on a random-coloured background, as PNG bytes."""
    background, colour = (bytes(rng.randrange(256) for _ in range(3)) for _ in range(2))
    x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
    x1, y1 = x0 + rng.randrange(4, size // 2), y0 + rng.randrange(4, size // 2)
    inside = background * x0 + colour * (x1 - x0) + background * (size - x1)
    return png(size, size, [inside if y0 <= y < y1 else background * size for y in range(size)])


def wait_ready(base_url: str, timeout_s: float) -> None:
    """Polls /readyz until it answers 200; raises TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=5):
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/readyz not ready after {timeout_s:.0f} s: {exc}") from None
            time.sleep(1)


class Stats:
    """Outcomes (HTTP status, or the error's type) and latencies per mode, shared by the workers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.latency_s: dict[str, list[float]] = {}

    def record(self, outcome: str, mode: str | None = None, seconds: float = 0.0) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if mode is not None:
                self.latency_s.setdefault(mode, []).append(seconds)

    def summary(self) -> str:
        lines = [f"outcomes: {dict(sorted(self.outcomes.items()))}"]
        for mode, values in sorted(self.latency_s.items()):
            p50, p95 = percentiles_ms(values, [50, 95])
            lines.append(f"{mode:>10}: {len(values)} ok, p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        return "\n".join(lines)


def send(url: str, image: bytes, stats: Stats, timeout_s: float, api_key: str | None) -> None:
    headers = {"Content-Type": "image/png"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    request = urllib.request.Request(url, data=image, method="POST", headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            mode = json.load(response).get("mode", "unknown")
        stats.record(str(response.status), mode, time.perf_counter() - started)
    except urllib.error.HTTPError as exc:
        stats.record(str(exc.code))
    except (urllib.error.URLError, OSError) as exc:
        stats.record(type(exc).__name__)


def run(args: argparse.Namespace) -> Stats:
    base_url = args.url.rstrip("/")
    if args.wait > 0:
        wait_ready(base_url, args.wait)
    url = f"{base_url}/predict?mode={args.mode}"
    rng, stats = random.Random(args.seed), Stats()
    interval = 1 / args.rate
    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    free = threading.Semaphore(args.concurrency)

    def task(image: bytes) -> None:
        try:
            send(url, image, stats, args.timeout, os.environ.get("API_KEY"))
        finally:
            free.release()

    with ThreadPoolExecutor(args.concurrency) as pool:
        sent, next_at = 0, time.monotonic()
        try:
            while (not args.count or sent < args.count) and next_at < deadline:
                time.sleep(max(0.0, next_at - time.monotonic()))
                free.acquire()
                pool.submit(task, sample_image(rng, args.size))
                sent, next_at = sent + 1, next_at + interval
        except KeyboardInterrupt:
            print("interrupted; waiting for the requests in flight", file=sys.stderr)
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=env("LOADGEN_URL", "http://127.0.0.1:8000"), help="the service's base URL")
    parser.add_argument("--mode", default=env("LOADGEN_MODE", "compare"), help="?mode= of every request")
    parser.add_argument("--rate", type=float, default=float(env("LOADGEN_RATE", "5")), help="requests per second")
    parser.add_argument(
        "--count", type=int, default=int(env("LOADGEN_COUNT", "0")), help="stop after this many requests (0: never)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=float(env("LOADGEN_DURATION", "0")),
        help="stop after this many seconds (0: never)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="most requests in flight at once")
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one response")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /readyz first (0: no wait)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the generated images")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.concurrency < 1 or args.size < 16 or args.count < 0 or args.duration < 0:
        parser.error("--rate must be > 0, --concurrency >= 1, --size >= 16, --count and --duration >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `docker stop`: finish and print the summary
    try:
        stats = run(args)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(stats.summary(), flush=True)
    return 0 if set(stats.outcomes) <= {"200"} else 1


if __name__ == "__main__":
    sys.exit(main())
