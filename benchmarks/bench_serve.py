#!/usr/bin/env python
"""Load test of ``imgclf serve`` on 127.0.0.1: bounded loads of 1, 8 and 32 concurrent clients,
then a slow-client flood.

    .venv/bin/python benchmarks/bench_serve.py                      # ~2 min on 2 cores (training included)
    .venv/bin/python benchmarks/bench_serve.py --clients 4 16 --seconds 20
    .venv/bin/python benchmarks/bench_serve.py --model runs/train --out serve.json

Starts ``imgclf serve MODEL --port 0 --engine ENGINE`` (default auto: the model's ONNX export,
made at start if missing, or the feature path where it measured faster) in its own process on 127.0.0.1; nothing leaves the machine. Then:

1. warm-up: 10 sequential requests, then ``--warmup-seconds`` of 8 clients;
2. for each ``--clients`` value, that many asyncio clients each POST one 224×224 JPEG to
   /v1/predict in a loop for ``--seconds`` (each client also stops after ``MAX_REQUESTS_PER_CLIENT``);
3. /healthz latency from one keep-alive client for a few seconds (the baseline), then the flood:
   ``--idle-connections`` sockets connect, send half a request (a request line and
   one header, no blank line) and then nothing, held open while one client measures GET /healthz
   for ``--flood-seconds`` (keep this under the server's ``--header-timeout-s``, 10 s by default,
   or the server rightly closes the idle ones mid-measurement; how many it closed is reported).

Per phase: requests/s, latency p50/p95/p99/max, errors (any non-200 or transport error; must be
0), and the server's peak RSS so far (``VmHWM`` in ``/proc/PID/status``). The clients share the
machine's CPUs with the server: on a small machine the numbers are a floor, not the server's ceiling.

The model is ``--model`` (run folder or .onnx) or, by default, a quick one trained here on
``--data`` (``--recipe fast``: efficientnet_lite0_stages, ``--train-epochs``, no report); its quality does
not matter for serving speed. Everything lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import DEFAULT_DATA, load_note, log, make_jpeg_folder  # noqa: E402

LOOPBACK = "127.0.0.1"
MAX_REQUESTS_PER_CLIENT = 20_000  # the count bound of every client loop (time is the other)
REQUEST_TIMEOUT_S = 30.0


def proc_status_mb(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of a process, MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: Path, env, batch_wait_ms: float, max_batch: int, engine: str = "auto") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "-q", "serve", str(model), "--host", LOOPBACK, "--port", "0", "--no-explain",
         "--batch-wait-ms", str(batch_wait_ms), "--max-batch", str(max_batch), "--engine", engine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    errs: list[str] = []
    threading.Thread(target=lambda: [errs.append(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = re.search(r"on (http://127\.0\.0\.1:\d+/)", lines.get(timeout=1))
        except queue.Empty:
            continue
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit(f"server did not start: {''.join(errs)[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def summarize(latencies: list[float], errors: list[str], wall: float) -> dict:
    lat = sorted(latencies)

    def pct(q):  # nearest rank
        return round(1000 * lat[min(len(lat) - 1, max(0, int(q * len(lat) + 0.5) - 1))], 1) if lat else None

    return {
        "requests": len(lat), "errors": len(errors), "error_samples": errors[:5], "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1) if wall > 0 else None,
        "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": round(1000 * lat[-1], 1) if lat else None},
    }


async def predict_load(base: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` concurrent clients POSTing one image each, for ``seconds`` (bounded in count too)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient):
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= stop:
                return
            body = bodies[(k + i * clients) % len(bodies)]
            t = time.perf_counter()
            try:
                r = await http.post("v1/predict", files={"file": ("img.jpg", body, "image/jpeg")})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*[client(k, http) for k in range(clients)]), seconds + 2 * REQUEST_TIMEOUT_S)
    return summarize(latencies, errors, time.perf_counter() - t0)


def open_half_requests(port: int, n: int, budget_s: float) -> list[socket.socket]:
    """``n`` loopback connections, each having sent a request line and one header and then
    nothing (a client stalled mid-headers); stops early when ``budget_s`` is spent."""
    conns: list[socket.socket] = []
    deadline = time.monotonic() + budget_s
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        try:
            c = socket.create_connection((LOOPBACK, port), timeout=2)
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        except OSError as e:
            log(f"  could not open idle connection {len(conns) + 1}: {e}")
            break
        conns.append(c)
    return conns


def count_closed(conns: list[socket.socket]) -> int:
    """How many of ``conns`` the server has closed (readable and at EOF, or reset)."""
    import select

    closed = 0
    for c in conns:
        readable, _, _ = select.select([c], [], [], 0)
        if readable:
            try:
                closed += c.recv(4096) == b""
            except OSError:
                closed += 1
    return closed


def healthz_while_flooded(base: str, port: int, idle: int, seconds: float) -> dict:
    """/healthz latency (one client, keep-alive) while ``idle`` stalled connections are held open."""
    import httpx

    t_open = time.perf_counter()
    conns = open_half_requests(port, idle, budget_s=10.0)
    open_s = time.perf_counter() - t_open
    latencies: list[float] = []
    errors: list[str] = []
    try:
        t0 = time.perf_counter()
        stop = t0 + seconds
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as http:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.perf_counter() >= stop:
                    break
                t = time.perf_counter()
                try:
                    r = http.get("healthz")
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
        res = summarize(latencies, errors, time.perf_counter() - t0)
        res.update({"idle_connections_opened": len(conns), "seconds_to_open": round(open_s, 2), "idle_closed_by_server_during_run": count_closed(conns)})
        return res
    finally:
        for c in conns:
            c.close()


def train_quick_model(images: Path, work: Path, env, epochs: int) -> Path:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "imgclf", "-q", "train", str(images), "--project", str(work / "runs"), "--name", "bench",
         "--recipe", "fast", "--epochs", str(epochs), "--no-report", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if r.returncode != 0:
        raise SystemExit(f"training the benchmark model failed: {r.stderr.strip()[-2000:]}")
    log(f"trained in {time.perf_counter() - t:.0f} s")
    return work / "runs" / "bench"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="run folder (with or without model.onnx) or .onnx (default: train a quick one here)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="photos for the request images and the quick model (default: ../shared/data/flowers12)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, one measured phase each (default: 1 8 32)")
    ap.add_argument("--seconds", type=float, default=12, help="length of each load phase (default: 12)")
    ap.add_argument("--warmup-seconds", type=float, default=3, help="8-client load before the first phase (default: 3)")
    ap.add_argument("--idle-connections", type=int, default=200, help="stalled connections held open in the flood (default: 200)")
    ap.add_argument("--flood-seconds", type=float, default=8, help="/healthz measurement during the flood (default: 8)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="server --batch-wait-ms (default: 5, the server's default)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"], help="imgclf serve --engine (default: auto)")
    ap.add_argument("--train-epochs", type=int, default=3, help="head epochs of the quick model (default: 3)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--keep-temp", action="store_true")
    args = ap.parse_args(argv)
    if min(args.clients) < 1 or max(args.clients) > 256 or args.seconds <= 0 or args.seconds > 600:
        raise SystemExit("--clients must be 1..256 and --seconds in (0, 600]")
    if not 0 <= args.idle_connections <= 1000 or not 0 < args.flood_seconds <= 60:
        raise SystemExit("--idle-connections must be 0..1000 and --flood-seconds in (0, 60]")

    import httpx

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-serve-"))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(work / "cache"), "IMGCLF_OFFLINE": os.environ.get("IMGCLF_OFFLINE", "1")}
    phases: list[dict] = []
    info: dict = {}
    try:
        log(f"{os.cpu_count()} CPUs; {load_note()}")
        images = work / "images"
        paths = make_jpeg_folder(Path(args.data), images, 64)
        bodies = [p.read_bytes() for p in paths]
        model = Path(args.model) if args.model else train_quick_model(images, work, env, args.train_epochs)
        t = time.perf_counter()
        proc, base = start_server(model, env, args.batch_wait_ms, args.max_batch, args.engine)
        log(f"server up in {time.perf_counter() - t:.0f} s at {base}")
        port = int(base.rstrip("/").rsplit(":", 1)[1])
        try:
            info = httpx.get(base + "v1/model", timeout=30).json()
            for body in bodies[:10]:
                httpx.post(base + "v1/predict", files={"file": ("w.jpg", body, "image/jpeg")}, timeout=60).raise_for_status()
            asyncio.run(predict_load(base, bodies, 8, args.warmup_seconds))
            for clients in args.clients:
                log(f"{clients} clients for {args.seconds:g} s ({load_note()})")
                res = asyncio.run(predict_load(base, bodies, clients, args.seconds))
                res.update({"phase": f"predict, {clients} client{'s' if clients > 1 else ''}", "clients": clients, "rss_mb": round(proc_status_mb(proc.pid, "VmRSS"), 1),
                            "peak_rss_mb": round(proc_status_mb(proc.pid, "VmHWM"), 1), "load": load_note()})
                phases.append(res)
            if args.idle_connections:
                res = healthz_while_flooded(base, port, 0, min(args.flood_seconds, 4.0))  # the same client, no flood: the baseline
                res.update({"phase": "healthz, no stalled connections", "clients": 1,
                            "rss_mb": round(proc_status_mb(proc.pid, "VmRSS"), 1), "peak_rss_mb": round(proc_status_mb(proc.pid, "VmHWM"), 1), "load": load_note()})
                phases.append(res)
                log(f"flood: {args.idle_connections} stalled connections, /healthz for {args.flood_seconds:g} s ({load_note()})")
                res = healthz_while_flooded(base, port, args.idle_connections, args.flood_seconds)
                res.update({"phase": f"healthz, {res['idle_connections_opened']} stalled connections", "clients": 1,
                            "rss_mb": round(proc_status_mb(proc.pid, "VmRSS"), 1), "peak_rss_mb": round(proc_status_mb(proc.pid, "VmHWM"), 1), "load": load_note()})
                phases.append(res)
            stats = httpx.get(base + "v1/model", timeout=30).json().get("stats", {})
        finally:
            stop_server(proc)
        print(f"\n{'phase':<36} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6} {'peak RSS MB':>11}")
        for r in phases:
            lat = r["latency_ms"]
            print(f"{r['phase']:<36} {r['requests_per_s']!s:>7} {lat['p50']!s:>7} {lat['p95']!s:>7} {lat['p99']!s:>7} {lat['max']!s:>7} {r['errors']:>6} {r['peak_rss_mb']:>11.0f}")
        flood = [r for r in phases if r.get("idle_connections_opened")]
        if flood:
            print(f"flood: {flood[0]['idle_connections_opened']} stalled connections opened in {flood[0]['seconds_to_open']} s; "
                  f"{flood[0]['idle_closed_by_server_during_run']} closed by the server during the measurement")
        print(f"engine {info.get('engine', '?')}, one 224x224 JPEG per request, batch wait {args.batch_wait_ms:g} ms, "
              f"mean batch {stats.get('mean_batch')}; {load_note()} at the end; whole run {time.perf_counter() - t_start:.0f} s")
        for r in phases:
            for sample in r["error_samples"]:
                print(f"  error ({r['phase']}): {sample}")
        if args.out:
            Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "engine": info.get("engine"), "model_id": info.get("model_id"), "server_stats": stats, "phases": phases}, indent=2) + "\n")
    finally:
        if args.keep_temp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["errors"] for r in phases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
