"""`python -m bench.soak`: the service in Docker under a real memory limit, attacked for a minute by every hostile
kind of request we know of while honest clients keep asking, and what it cost them.

It runs the image (`--build`: built first from this checkout, with the test preset's models) with `--memory 2g`,
WORKERS=2 and an API key on loopback ports; times the honest clients on a quiet service (QUIET_S), then, for
--seconds, ATTACKERS threads cycle through every kind of bench/hostile.py and a SIGHUP to the container while the
HONEST clients go on. It reports the worker restarts, the honest failures (anything but 200 or a 503 with
Retry-After), the honest p99 attacked over quiet, the container's peak memory (its cgroup's) and each kind's
statuses, each with what it should be. Run as root (Docker, and the cgroup file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.hostile import AttackTarget, Kind, Ordinary, kinds, more_kinds
from bench.service import free_port, ready

REPO = Path(__file__).resolve().parent.parent
IMAGE = "onnx-ensemble-serving:soak"
API_KEY = "a-soak-test-key-of-32-characters!"
MODEL = "shapes-test"  # the test preset's model: 32x32 images
HONEST, ATTACKERS = 4, 16
QUIET_S = 20.0
MIB = 2**20


def docker(*args: str, timeout: float = 900) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def honest(target: AttackTarget) -> Ordinary:
    """Ordinary 1-row v2 requests asking for the scores, in a loop."""
    body = target.tensor_body(1, outputs='{"name":"class_probs"}')
    return Ordinary(target, lambda client: client.post(f"/v2/models/{MODEL}/infer", content=body))


def run_honest(target: AttackTarget, seconds: float, beside: Callable[[float], None] | None = None) -> list[Ordinary]:
    until = time.monotonic() + seconds
    clients = [honest(target) for _ in range(HONEST)]
    threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
    if beside is not None:
        threads.append(threading.Thread(target=beside, args=(until,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients


def attack(every: list[Kind], target: AttackTarget, until: float, statuses: dict[str, Counter[int]]) -> None:
    """ATTACKERS threads, each sending every kind in turn from a different start, until `until`."""
    lock = threading.Lock()

    def attacker(index: int) -> None:
        turn = index
        with httpx.Client(base_url=target.url, timeout=60) as client:
            while time.monotonic() < until:
                kind = every[turn % len(every)]
                turn += 1
                name = kind.name
                try:
                    status = kind.send(client)
                except (httpx.TransportError, OSError, subprocess.SubprocessError) as error:
                    status, name = -1, f"{name} ({type(error).__name__})"
                with lock:
                    statuses.setdefault(name, Counter())[status] += 1

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(ATTACKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def p99(clients: list[Ordinary]) -> float:
    latencies = sorted(x for c in clients for x in c.latencies)
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else float("nan")


def peak_memory_file(container_id: str) -> Path | None:
    """The container's peak memory in its cgroup: v2's memory.peak (cgroupfs or systemd driver), or v1's."""
    candidates = [
        Path(f"/sys/fs/cgroup/docker/{container_id}/memory.peak"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak"),
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes"),
    ]
    return next((path for path in candidates if path.exists()), None)


def recovery_s(target: AttackTarget, limit_s: float = 120.0) -> float:
    """How long after the attack a fresh honest request takes to be answered 200 (NaN: not within limit_s)."""
    start, send = time.monotonic(), honest(target).send
    with httpx.Client(base_url=target.url, timeout=60, headers=target.headers()) as client:
        while time.monotonic() - start < limit_s:
            try:
                if send(client).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
    return float("nan")


def restarts(target: AttackTarget) -> float:
    try:
        text = httpx.get(f"{target.url}/metrics", timeout=60).text
    except httpx.TransportError:
        return float("nan")
    lines = [line for line in text.splitlines() if line.startswith("ensemble_worker_restarts_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--build", action="store_true", help="build the image from this checkout first")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--memory", default="2g")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args()
    if args.build:
        docker("build", "--build-arg", "MODEL_PRESET=test", "--tag", args.image, str(REPO), timeout=3600)
    port, grpc_port = free_port(), free_port()
    container = docker(
        "run", "--detach", "--rm", "--memory", args.memory, "--memory-swap", args.memory,
        "--env", f"WORKERS={args.workers}", "--env", f"API_KEY={API_KEY}",
        "--publish", f"127.0.0.1:{port}:8000", "--publish", f"127.0.0.1:{grpc_port}:8081", args.image,
    ).strip()  # fmt: skip
    target = AttackTarget(f"http://127.0.0.1:{port}", API_KEY, MODEL, 32, grpc_address=f"127.0.0.1:{grpc_port}")
    sighup = Kind("SIGHUP to the container", lambda _: (docker("kill", "--signal", "HUP", container), 0)[1])
    every = [*kinds(target), *more_kinds(target), sighup]
    try:
        deadline = time.monotonic() + 300
        while not ready(f"{target.url}/readyz"):
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready: " + docker("logs", container)[-2000:])
            time.sleep(0.5)
        quiet = run_honest(target, QUIET_S)
        peak_file = peak_memory_file(container)
        attackers: dict[str, Counter[int]] = {}
        attacked = run_honest(target, args.seconds, beside=lambda until: attack(every, target, until, attackers))
        recovered_s = recovery_s(target)
        running = json.loads(docker("inspect", container))[0]["State"]["Running"]
        restarted = restarts(target) if running else float("nan")
        report(quiet, attacked, attackers, (restarted, recovered_s, running), peak_file, args)
    finally:
        subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)


def report(
    quiet: list[Ordinary],
    attacked: list[Ordinary],
    attackers: dict[str, Counter[int]],
    after: tuple[float, float, bool],  # worker restarts, seconds until an honest request succeeds again, running
    peak_file: Path | None,
    args: argparse.Namespace,
) -> None:
    restarted, recovered_s, running = after
    failures = sum(n for c in attacked for status, n in c.statuses.items() if status <= 0)
    answered = sum(sum(c.statuses.values()) for c in attacked)
    peak = int(peak_file.read_text()) / MIB if peak_file else float("nan")
    print(f"soak: {args.image}, --memory {args.memory}, WORKERS={args.workers}, {ATTACKERS} attackers and {HONEST} "
          f"honest clients for {args.seconds:g} s (quiet run {QUIET_S:g} s)")  # fmt: skip
    print(f"container still running:     {running} (want True)")
    print(f"worker restarts:             {restarted:g} (want 0; nan: /metrics did not answer within 60 s)")
    print(f"first honest 200 after:      {recovered_s:.2f} s (want ~0)")
    print(f"honest failures:             {failures} of {answered} (want 0)")
    print(f"honest p99 attacked / quiet: {p99(attacked) * 1000:.1f} / {p99(quiet) * 1000:.1f} ms = "
          f"{p99(attacked) / p99(quiet):.2f}x (want <= 2)")  # fmt: skip
    print(f"peak memory:                 {peak:,.0f} MiB of {args.memory} (want under the limit; {peak_file})")
    print("honest statuses:", dict(sum((c.statuses for c in attacked), Counter())))
    bad = 0
    for name, statuses in sorted(attackers.items()):
        bad += sum(n for status, n in statuses.items() if 500 <= status < 600 and status != 503)
        print(f"  {name:34} {dict(statuses)}")
    print(f"attackers' 5xx other than 503: {bad} (want 0); gRPC codes shown as 1000 + code")


if __name__ == "__main__":
    main()
