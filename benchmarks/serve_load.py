"""Load test for ``phiclip serve``: N concurrent clients on loopback, batching off and on, in one run.

Starts the server as a child process on 127.0.0.1 (never another address), once with dynamic
batching off (``--max-batch 1``: one request per generate() call) and once on
(``--max-batch N``), alternating for ``--rounds`` rounds. Each time it warms the server up,
then runs ``--clients`` clients that each send ``--requests`` chat requests (a mix of image and
text questions, some streamed). Prints, for both, throughput, p50/p99 latency, the error count
and the server's resident memory before and after, and ends with ``batching speedup: <ratio>x``
(requests/s on / off). Exit status 1 when any request failed, memory grew by
``--max-rss-growth`` or more after warm-up, or (with ``--min-speedup``) batching was slower
than that ratio or did not lower the median latency.

    python benchmarks/serve_load.py --run runs/demo    # the README's figures and floor (~30 min here)
    python benchmarks/serve_load.py --small            # 4 clients x 3 requests on a tiny run: seconds (make test)

The defaults are the settings behind the README's figures and the floors this project holds itself
to: 16 clients x 20 requests, 16 new tokens, every 3rd request streamed, 2 rounds; 0 errors, RSS
growth < 10%; batching at least 3x the throughput of one-at-a-time on the demo model, with a lower
p50 latency.
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
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--warmup", type=int, default=64, help="requests sent before the memory baseline")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1, help="server --concurrency (model copies)")
    p.add_argument("--max-batch", type=int, default=8, help="server --max-batch when batching is on")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="server --batch-wait-ms when batching is on")
    p.add_argument("--rounds", type=int, default=2, help="off/on rounds, alternated (the spread is over rounds)")
    p.add_argument("--min-speedup", type=float, default=3.0, help="fail below this batching speedup (0: report)")
    p.add_argument("--stream-every", type=int, default=3, help="every Nth request streams (0: none)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole load phase")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--no-ui", action="store_true", help="serve without the web UI")
    p.add_argument("--small", action="store_true",
                   help="4 clients x 3 requests, 4 warm-up requests, 4 tokens, 1 round, no speedup floor")
    args = p.parse_args(argv)
    if args.small:
        args.clients, args.requests, args.warmup, args.max_tokens, args.rounds, args.min_speedup = 4, 3, 4, 4, 1, 0.0
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10_000):
        p.error("--clients must be 1..256 and --requests 1..10000")
    if args.max_batch < 2 or args.rounds < 1:
        p.error("--max-batch must be at least 2 (1 is the 'off' run) and --rounds at least 1")
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


def start_server(run: Path, port: int, args, max_batch: int) -> subprocess.Popen:
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
        "--max-batch",
        str(max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--whisper-model",
        "none",
    ]
    if args.no_ui:
        cmd.append("--no-ui")
    log = open(Path(tempfile.gettempdir()) / f"phiclip-serve-load-{port}-batch{max_batch}.log", "w")
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


def one_load(run: Path, args, max_batch: int) -> dict:
    """Start a server with ``--max-batch max_batch``, warm it up, load it, stop it; its figures."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    proc = start_server(run, port, args, max_batch)
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
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "completed": len(latencies),
        "errors": errors,
        "skipped": skipped,
        "elapsed": elapsed,
        "throughput": len(latencies) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "rss": (rss_start, rss_warm, rss_end),
        "growth": (rss_end - rss_warm) / rss_warm,
        "served": health.get("served"),
    }


def spread(values: list[float], fmt: str) -> str:
    """The mean, with min..max when there are several rounds."""
    mean = sum(values) / len(values)
    return fmt.format(mean) + (f" ({fmt.format(min(values))}..{fmt.format(max(values))})" if len(values) > 1 else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = tempfile.TemporaryDirectory(prefix="phiclip-load-")
    run = Path(args.run) if args.run else tiny_run(Path(workdir.name))
    modes = {"off": 1, "on": args.max_batch}
    results: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                print(f"round {r + 1}/{args.rounds}: batching {mode} (--max-batch {modes[mode]})", flush=True)
                results[mode].append(one_load(run, args, modes[mode]))
    finally:
        workdir.cleanup()

    def column(mode: str) -> list[str]:
        rs = results[mode]
        return [
            f"{sum(x['completed'] for x in rs)}" + (f" ({sum(x['skipped'] for x in rs)} skipped)" if any(x["skipped"] for x in rs) else ""),
            f"{sum(len(x['errors']) for x in rs)}",
            spread([x["elapsed"] for x in rs], "{:.1f} s"),
            spread([x["throughput"] for x in rs], "{:.2f} req/s"),
            spread([x["p50"] for x in rs], "{:.0f} ms"),
            spread([x["p99"] for x in rs], "{:.0f} ms"),
            spread([x["rss"][0] for x in rs], "{:.0f} MiB"),
            spread([x["rss"][1] for x in rs], "{:.0f} MiB"),
            spread([x["growth"] * 100 for x in rs], "{:+.1f}%"),
            f"{sum(x['served'] or 0 for x in rs)}",
        ]

    names = ["completed", "errors", "wall time", "throughput", "latency p50", "latency p99",
             "server RSS at start", "server RSS after warm-up", "RSS growth under load", "served (server count)"]
    off, on = column("off"), column("on")
    print()
    print(f"run: {args.run or 'tiny run (built for this benchmark)'}; {args.clients} clients x {args.requests} requests, "
          f"max_tokens {args.max_tokens}, every {args.stream_every or 'no'}th streamed, {args.rounds} round(s), "
          f"server concurrency {args.concurrency}, batch wait {args.batch_wait_ms:g} ms")
    head = ["metric", "batching off (--max-batch 1)", f"batching on (--max-batch {args.max_batch})"]
    widths = [max(len(head[0]), *map(len, names)), max(len(head[1]), *map(len, off)), max(len(head[2]), *map(len, on))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in zip(names, off, on):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    errors = [e for mode in results.values() for x in mode for e in x["errors"]]
    for e in sorted(set(errors))[:10]:
        print(f"  error: {e} (x{errors.count(e)})")
    mean = {m: sum(x["throughput"] for x in results[m]) / len(results[m]) for m in results}
    p50 = {m: sum(x["p50"] for x in results[m]) / len(results[m]) for m in results}
    speedup = mean["on"] / mean["off"]
    ok = not errors and not any(x["skipped"] for m in results.values() for x in m)
    ok = ok and all(x["growth"] < args.max_rss_growth for m in results.values() for x in m)
    if args.min_speedup:
        ok = ok and speedup >= args.min_speedup and p50["on"] < p50["off"]
    print("\nPASS" if ok else "\nFAIL")
    print(f"batching speedup: {speedup:.2f}x", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
