#!/usr/bin/env python
"""Load test of ``imgclf serve``: N concurrent loopback clients for a bounded time.

    .venv/bin/python benchmarks/bench_serve.py                         # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --clients 16 --seconds 30 --batch-wait-ms 5 0
    .venv/bin/python benchmarks/bench_serve.py --model runs/train --out serve.json

Starts ``imgclf serve MODEL --port 0`` (ONNX Runtime on the model's export; access log off)
in its own process, then for each ``--batch-wait-ms`` value: warm-up (sequential requests,
then a few seconds of the full load), the server's RSS (``/proc/PID/status`` VmRSS), the
measured run (``--clients`` asyncio clients each POSTing one 224×224 JPEG to /v1/predict
in a loop for ``--seconds``), the RSS again. Reports requests/s, images/s, latency
p50/p90/p99/max, errors (any non-200 or transport error; must be 0), RSS before/after and
the server's mean micro-batch size. The clients share the machine's CPUs with the server:
on a small machine the numbers are a floor, not the server's ceiling.

The model is ``--model`` (run folder or .onnx) or, by default, a quick one trained here
(see bench_predict.py). Everything lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import DEFAULT_DATA, load_note, log, make_jpeg_folder, train_and_export  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: Path, env, batch_wait_ms: float, max_batch: int, extra=()) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "-q", "serve", str(model), "--port", "0", "--batch-wait-ms", str(batch_wait_ms), "--max-batch", str(max_batch), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    errs: list[str] = []
    threading.Thread(target=lambda: [errs.append(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = re.search(r"on (http://127\.0\.0\.1:\d+/)", lines.get(timeout=1))
        except queue.Empty:
            continue
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit(f"server did not start: {''.join(errs)[-2000:]}")


async def load(base: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient):
        i = k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += clients
            t = time.perf_counter()
            try:
                r = await http.post("v1/predict", files={"file": ("img.jpg", body, "image/jpeg")})
                ok = r.status_code == 200
                if not ok:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                errors.append(f"{type(e).__name__}: {e}")
            if ok:
                latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        await asyncio.gather(*[client(k, http) for k in range(clients)])
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q):
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {
        "requests": len(lat), "errors": len(errors), "error_samples": errors[:5], "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1), "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": round(1000 * lat[-1], 1) if lat else None},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="run folder (with or without model.onnx) or .onnx (default: train and export one here)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="photos for the request images (default: ../shared/data/flowers12)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    ap.add_argument("--seconds", type=float, default=20, help="measured run per setting (default: 20)")
    ap.add_argument("--warmup-seconds", type=float, default=4, help="load before the first RSS reading (default: 4)")
    ap.add_argument("--batch-wait-ms", type=float, nargs="+", default=[5.0, 0.0], help="settings to measure (default: 5 0)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--keep-temp", action="store_true")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        raise SystemExit("--clients must be >= 1 and --seconds > 0")

    import httpx

    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-serve-"))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(work / "cache"), "IMGCLF_OFFLINE": os.environ.get("IMGCLF_OFFLINE", "1")}
    results = []
    try:
        log(f"{os.cpu_count()} CPUs; {load_note()}")
        images = work / "images"
        paths = make_jpeg_folder(Path(args.data), images, 64)
        bodies = [p.read_bytes() for p in paths]
        if args.model:
            model = Path(args.model)
        else:
            log("training a quick default-backbone model and exporting it")
            model, _ = train_and_export(images, work, env)
        for wait in args.batch_wait_ms:
            proc, base = start_server(model, env, wait, args.max_batch)
            try:
                info = httpx.get(base + "v1/model", timeout=30).json()
                for body in bodies[:10]:
                    httpx.post(base + "v1/predict", files={"file": ("w.jpg", body, "image/jpeg")}, timeout=60).raise_for_status()
                asyncio.run(load(base, bodies, args.clients, args.warmup_seconds))
                before = rss_mb(proc.pid)
                log(f"batch-wait {wait} ms: {args.clients} clients for {args.seconds:g} s ({load_note()})")
                res = asyncio.run(load(base, bodies, args.clients, args.seconds))
                after = rss_mb(proc.pid)
                stats = httpx.get(base + "v1/model", timeout=30).json().get("stats", {})
                res.update({
                    "batch_wait_ms": wait, "max_batch": args.max_batch, "clients": args.clients, "engine": info["engine"], "model_id": info["model_id"],
                    "server_rss_mb_before": round(before, 1), "server_rss_mb_after": round(after, 1), "server_rss_growth_mb": round(after - before, 1),
                    "server_mean_batch_all_requests": stats.get("mean_batch"), "load": load_note(),
                })
                results.append(res)
                lat = res["latency_ms"]
                log(f"  {res['requests_per_s']} req/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {res['errors']}, RSS {before:.0f} → {after:.0f} MB, mean batch {stats.get('mean_batch')}")
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print(f"\n{'wait ms':>7} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'errors':>6} {'RSS before→after MB':>20} {'mean batch':>10}")
        for r in results:
            lat = r["latency_ms"]
            print(f"{r['batch_wait_ms']:>7g} {r['clients']:>7} {r['requests_per_s']:>7} {lat['p50']:>7} {lat['p90']:>7} {lat['p99']:>7} {r['errors']:>6} {r['server_rss_mb_before']:>9.0f} → {r['server_rss_mb_after']:<8.0f} {str(r['server_mean_batch_all_requests']):>10}")
        print(f"engine {results[0]['engine'] if results else '?'}, one 224x224 JPEG per request; {load_note()} at the end")
        if args.out:
            Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    finally:
        if args.keep_temp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
