"""Load test for ``phiclip serve``: N concurrent clients on loopback, bounded in count and time.

Starts the server as a child process on 127.0.0.1 (never another address), warms it up,
then runs ``--clients`` clients that each send ``--requests`` chat requests (a mix of
image and text questions, some streamed). Prints throughput, p50/p99 latency, the error
count and the server's resident memory before and after. Exit status 1 when any request
failed or memory grew by ``--max-rss-growth`` or more after warm-up.

    python benchmarks/serve_load.py                       # a tiny run built on the fly
    python benchmarks/serve_load.py --run "$PHICLIP_DEMO_RUN" --max-tokens 8

The floor this project holds itself to: 16 clients x 200 requests, 0 errors, RSS growth < 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

LOOPBACK = "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run",
        default=os.environ.get("PHICLIP_DEMO_RUN"),
        help="run directory to serve (default: $PHICLIP_DEMO_RUN, else a tiny run built now)",
    )
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--warmup", type=int, default=64, help="requests sent before the memory baseline")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1, help="server --concurrency (model copies)")
    p.add_argument("--stream-every", type=int, default=4, help="every Nth request streams (0: none)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole load phase")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--no-ui", action="store_true", help="serve without the web UI")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10_000):
        p.error("--clients must be 1..256 and --requests 1..10000")
    return args


def tiny_run(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny-model builders
    from tiny_models import build_tiny_run, tiny_backbones

    lm, clip = tiny_backbones(folder)
    return build_tiny_run(folder, lm, clip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "serve",
        str(run),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--concurrency",
        str(args.concurrency),
        "--max-queue",
        str(max(64, args.clients * 2)),
    ]
    if args.no_ui:
        cmd.append("--no-ui")
    log = open(Path(tempfile.gettempdir()) / f"phiclip-serve-load-{port}.log", "w")
    print(f"server log: {log.name}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [image_url(i) for i in range(8)]


def request_body(i: int, max_tokens: int, stream_every: int) -> dict:
    if i % 2:
        content = [
            {"type": "text", "text": f"What shape is this? ({i})"},
            {"type": "image_url", "image_url": {"url": IMAGES[i % len(IMAGES)]}},
        ]
    else:
        content = f"Say something about the number {i}."
    return {
        "model": "phiclip",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": bool(stream_every) and i % stream_every == 0,
    }


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, str | None]:
    start = time.perf_counter()
    try:
        if body["stream"]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return time.perf_counter() - start, f"HTTP {response.status_code}"
                last = ""
                async for line in response.aiter_lines():
                    if line:
                        last = line
                if last != "data: [DONE]":
                    return time.perf_counter() - start, "stream did not end with [DONE]"
        else:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return time.perf_counter() - start, f"HTTP {response.status_code}: {response.text[:120]}"
            if "content" not in response.json()["choices"][0]["message"]:
                return time.perf_counter() - start, "no content"
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return time.perf_counter() - start, f"{type(err).__name__}: {err}"
    return time.perf_counter() - start, None


async def run_clients(
    url: str, clients: int, per_client: int, args, deadline: float
) -> tuple[list[float], list[str], int]:
    latencies: list[float] = []
    errors: list[str] = []
    skipped = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:

        async def worker(c: int) -> None:
            nonlocal skipped
            for r in range(per_client):
                if time.monotonic() > deadline:
                    skipped += per_client - r
                    return
                latency, error = await one_request(
                    client, request_body(c * per_client + r, args.max_tokens, args.stream_every)
                )
                latencies.append(latency)
                if error:
                    errors.append(error)

        await asyncio.gather(*(worker(c) for c in range(clients)))
    return latencies, errors, skipped


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = tempfile.TemporaryDirectory(prefix="phiclip-load-")
    run = Path(args.run) if args.run else tiny_run(Path(workdir.name))
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    proc = start_server(run, port, args)
    try:
        wait_healthy(url, proc)
        rss_start = rss_mb(proc.pid)
        warm_clients = min(args.clients, args.warmup)
        asyncio.run(
            run_clients(
                url, warm_clients, max(1, args.warmup // warm_clients), args, time.monotonic() + args.time_limit
            )
        )
        rss_warm = rss_mb(proc.pid)
        start = time.perf_counter()
        latencies, errors, skipped = asyncio.run(
            run_clients(url, args.clients, args.requests, args, time.monotonic() + args.time_limit)
        )
        elapsed = time.perf_counter() - start
        rss_end = rss_mb(proc.pid)
        health = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        workdir.cleanup()

    total = len(latencies)
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    growth = (rss_end - rss_warm) / rss_warm
    rows = [
        ("run", str(run) if args.run else "tiny run (built for this benchmark)"),
        (
            "clients x requests",
            f"{args.clients} x {args.requests} (max_tokens {args.max_tokens}, server concurrency {args.concurrency})",
        ),
        ("completed", f"{total}" + (f" ({skipped} skipped: time limit)" if skipped else "")),
        ("errors", f"{len(errors)}"),
        ("wall time", f"{elapsed:.1f} s"),
        ("throughput", f"{total / elapsed:.1f} req/s"),
        ("latency p50", f"{np.percentile(lat, 50):.0f} ms"),
        ("latency p99", f"{np.percentile(lat, 99):.0f} ms"),
        ("server RSS at start", f"{rss_start:.0f} MiB"),
        ("server RSS after warm-up", f"{rss_warm:.0f} MiB"),
        ("server RSS after load", f"{rss_end:.0f} MiB ({growth:+.1%} since warm-up)"),
        ("served (server count)", f"{health.get('served')}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    for e in sorted(set(errors))[:10]:
        print(f"  error: {e} (x{errors.count(e)})")
    ok = not errors and not skipped and growth < args.max_rss_growth
    print("\nPASS" if ok else "\nFAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
