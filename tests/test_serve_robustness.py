"""The server against clients that misbehave or just go away: silent and slow connections
(a real uvicorn on a 127.0.0.1 port), hang-ups mid-upload, HEAD probes, too many requests
at once; and the serve settings declared once, flags generated from them.

Every loop here is bounded in count and in time; all traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from imgclf.serve.app import create_app
from imgclf.serve.config import SERVE_FIELDS, ServeConfig
from imgclf.serve.server import bind_socket, uvicorn_config


class StubModel:
    """Two classes, probability from the mean brightness; optional delay; notes each batch."""

    def __init__(self, delay: float = 0.0):
        from imgclf.backbones.specs import Preprocessing
        from imgclf.export.metadata import Decision

        self.class_names_ = ["dark", "bright"]
        self.decision = Decision.from_meta({"class_names": self.class_names_})
        self.preprocessing = Preprocessing(input_size=32, resize_size=36)
        self.model_id, self.engine = "stub", "stub"
        self.delay = delay
        self.called = threading.Event()

    def predict_proba_arrays(self, batch):
        self.called.set()
        time.sleep(self.delay)
        mean = batch.reshape(len(batch), -1).mean(1) / 255.0
        return np.stack([1 - mean, mean], 1).astype(np.float32)

    def info(self):
        return {"model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": 32, "threshold": None, "decision": self.decision.description}


def png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def wait_until(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@contextmanager
def live_server(config: ServeConfig):
    """The app on a real uvicorn (the guards ``imgclf serve`` uses), on 127.0.0.1, any free port."""
    app = create_app(StubModel(), config, explain=False)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started or not thread.is_alive(), 30), "uvicorn did not start"
        assert server.started, "uvicorn did not start"
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def open_idle(port: int, n: int, budget_s: float = 10.0) -> list[socket.socket]:
    """``n`` loopback connections that send nothing (stops early when out of time)."""
    conns, deadline = [], time.monotonic() + budget_s
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    return conns


def closed_by_server(conn: socket.socket) -> bool:
    """True when the server has closed ``conn`` (readable, and the read returns nothing)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def wait_closed(conn: socket.socket, timeout: float) -> bool:
    return wait_until(lambda: closed_by_server(conn), timeout, step=0.05)


def close_all(conns) -> None:
    for c in conns:
        c.close()


# --------------------------------------------------------------------------- silent and slow clients


def test_idle_connections_do_not_lock_the_server_out():
    with live_server(ServeConfig()) as (server, port):
        conns = open_idle(port, 80)
        try:
            assert len(conns) == 80
            assert wait_until(lambda: len(server.server_state.connections) >= 80, 5)  # the server holds them all
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1.0) as c:
                t0 = time.monotonic()
                r = c.get("/healthz")
                assert r.status_code == 200 and r.json()["status"] == "ok" and time.monotonic() - t0 < 1.0
                assert c.get("/v1/model").status_code == 200  # not only liveness: the API answers too
                r = c.post("/v1/predict", files={"file": ("g.png", png(), "image/png")}, timeout=10)
                assert r.status_code == 200, r.text
        finally:
            close_all(conns)


def test_past_the_connection_cap_the_longest_waiting_idle_connection_is_closed():
    with live_server(ServeConfig(max_connections=8)) as (server, port):
        conns = []
        try:
            for _ in range(20):  # one at a time, so "longest waiting" is well defined
                conns += open_idle(port, 1)
                n = len(conns)
                wait_until(lambda: len(server.server_state.connections) >= min(n, 8), 2)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1.0) as c:
                assert c.get("/healthz").status_code == 200
            assert wait_until(lambda: len(server.server_state.connections) <= 8, 5)
            assert wait_closed(conns[0], 2)  # the oldest went first
            assert not closed_by_server(conns[-1])  # the newest is still open
            assert sum(closed_by_server(c) or c.fileno() == -1 for c in conns[:12]) >= 10
        finally:
            close_all(conns)


def test_slow_headers_and_silent_connections_time_out():
    with live_server(ServeConfig(header_timeout_s=0.4)) as (_, port):
        silent, trickle = open_idle(port, 1)[0], open_idle(port, 1)[0]
        try:
            t0 = time.monotonic()
            head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60
            sent = 0
            while sent < len(head) and time.monotonic() - t0 < 3 and not closed_by_server(trickle):  # one byte per 50 ms: never idle long
                try:
                    trickle.send(head[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                time.sleep(0.05)
            assert wait_closed(trickle, 3) and time.monotonic() - t0 < 3.5
            assert wait_closed(silent, 3)
        finally:
            close_all([silent, trickle])
        # a client that keeps its connection between requests is not hurt by the header timeout
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as c:
            assert [c.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]


def _upload_start(port: int, declared: int) -> bytes:
    part = b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + png()[:20]
    return (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: multipart/form-data; boundary=XYZ\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, declared)) + part


def test_stalled_body_times_out_and_hang_ups_are_one_log_line(caplog):
    caplog.set_level(logging.DEBUG, logger="imgclf")
    uvicorn_error = logging.getLogger("uvicorn.error")  # does not propagate to the root logger
    with live_server(ServeConfig(body_timeout_s=0.4)) as (_, port):
        uvicorn_error.addHandler(caplog.handler)  # after uvicorn configured its loggers
        try:
            stalled = socket.create_connection(("127.0.0.1", port), timeout=2)
            stalled.sendall(_upload_start(port, 50_000))
            t0 = time.monotonic()
            assert wait_closed(stalled, 3) and time.monotonic() - t0 < 3
            stalled.close()
            # the client hangs up mid-upload
            gone = socket.create_connection(("127.0.0.1", port), timeout=2)
            gone.sendall(_upload_start(port, 50_000))
            time.sleep(0.1)
            gone.close()
            assert wait_until(lambda: sum("disconnected" in r.getMessage() for r in caplog.records) >= 2, 5)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as c:
                assert c.get("/healthz").status_code == 200
        finally:
            uvicorn_error.removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name in ("imgclf", "uvicorn.error")]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in records]
    assert not [r for r in records if "internal error" in r.getMessage() or "Exception in ASGI" in r.getMessage()]
    hang_ups = [r for r in records if "disconnected" in r.getMessage()]
    assert len(hang_ups) == 2 and all(r.levelno in (logging.INFO, logging.WARNING) for r in hang_ups)
    assert all("/v1/predict" in r.getMessage() and "\n" not in r.getMessage() for r in hang_ups)
    assert any("no request body data for 0.4 s" in r.getMessage() for r in records)


def test_client_disconnect_mid_upload_is_not_an_internal_error(caplog):
    """At the ASGI level, as any server reports a hang-up: no exception out of the app, one line."""
    app = create_app(StubModel(), ServeConfig(), explain=False)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=XYZ"), (b"content-length", b"50000")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    incoming = [{"type": "http.request", "body": _upload_start(8000, 50_000).split(b"\r\n\r\n", 1)[1], "more_body": True}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    caplog.set_level(logging.DEBUG, logger="imgclf")
    try:
        asyncio.run(app(scope, receive, send))  # before: ClientDisconnect escaped, logged as an internal error
    finally:
        app.state.batcher.close()
    mine = [r for r in caplog.records if r.name == "imgclf"]
    assert not [r for r in mine if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in mine]
    (line,) = [r for r in mine if "disconnected" in r.getMessage()]
    assert line.levelno == logging.INFO and "POST /v1/predict" in line.getMessage() and "127.0.0.1:50000" in line.getMessage()


# --------------------------------------------------------------------------- HEAD and the request limit


def test_head_answers_like_get_without_a_body():
    with TestClient(create_app(StubModel(), ServeConfig(api_key="k"), explain=False)) as c:
        for path, headers in (("/healthz", {}), ("/", {}), ("/static/app.js", {}), ("/favicon.ico", {}), ("/v1/model", {"X-API-Key": "k"})):
            got, head = c.get(path, headers=headers), c.head(path, headers=headers)
            assert head.status_code == got.status_code and got.status_code in (200, 204), (path, head.status_code)
            assert head.content == b"" and head.headers.get("content-type") == got.headers.get("content-type"), path
            if got.content:
                assert int(head.headers["content-length"]) == len(got.content), path
        assert c.head("/v1/model").status_code == 401  # HEAD does not get around the key
        assert c.head("/v1/predict").status_code == 405
        spec = c.get("/openapi.json").json()
        assert not [p for p, ops in spec["paths"].items() if "head" in ops]
    with live_server(ServeConfig()) as (_, port):  # and through uvicorn, as a load balancer sees it
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as c:
            for path in ("/healthz", "/"):
                r = c.head(path)
                assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0, path


def test_requests_over_the_limit_get_503_but_healthz_answers():
    stub = StubModel(delay=0.6)
    app = create_app(stub, ServeConfig(max_requests=1, batch_wait_ms=0), explain=False)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as client:
            first = asyncio.create_task(client.post("/v1/predict", files={"file": ("a.png", png(), "image/png")}))
            for _ in range(250):  # at most 5 s for the first request to reach the model
                if stub.called.is_set():
                    break
                await asyncio.sleep(0.02)
            assert stub.called.is_set()
            busy = await client.post("/v1/predict", files={"file": ("b.png", png(), "image/png")})
            health = await client.get("/healthz")
            return await first, busy, health

    try:
        first, busy, health = asyncio.run(run())
    finally:
        app.state.batcher.close()
    assert first.status_code == 200
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "1"
    assert busy.headers["x-content-type-options"] == "nosniff"
    assert health.status_code == 200


# --------------------------------------------------------------------------- one declaration: settings and flags


def test_serve_settings_are_declared_once_and_checked_by_name():
    from imgclf.config.settings import SettingError

    for bad, name in ((dict(max_upload_mb=0), "max_upload_mb"), (dict(max_pixels=0), "max_pixels"), (dict(batch_wait_ms=1001), "batch_wait_ms"),
                      (dict(max_batch=0), "max_batch"), (dict(max_files=0), "max_files"), (dict(api_key=" "), "api_key"),
                      (dict(header_timeout_s=0), "header_timeout_s"), (dict(max_connections=1), "max_connections"), (dict(max_pixels=1.5), "max_pixels")):
        with pytest.raises(SettingError, match=f"^{name} "):
            ServeConfig(**bad)
    cfg = ServeConfig(max_batch=40)
    assert cfg.request_limit == 160 and ServeConfig().request_limit == 64 and ServeConfig(max_requests=3).request_limit == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch = 0  # checked once: no unchecked changes afterwards
    assert all(f.metadata["group"] == "server" and f.metadata["help"] for f in SERVE_FIELDS.values())


def test_serve_flags_are_generated_from_the_declarations(monkeypatch):
    from imgclf.cli.common import UsageError
    from imgclf.cli.main import build_parser
    from imgclf.cli.serve import serve_config_from_args
    from imgclf.config.cli_args import flag

    parser = build_parser()
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for f in SERVE_FIELDS.values():
        assert flag(f) in serve_help, flag(f)
    monkeypatch.delenv("IMGCLF_API_KEY", raising=False)
    cfg = serve_config_from_args(parser.parse_args(["serve", "m", "--max-upload-mb", "2", "--header-timeout-s", "1.5", "--max-batch", "4"]))
    assert (cfg.max_upload_mb, cfg.header_timeout_s, cfg.max_batch, cfg.api_key) == (2.0, 1.5, 4, None)
    assert cfg.max_pixels == SERVE_FIELDS["max_pixels"].default and cfg.body_timeout_s == SERVE_FIELDS["body_timeout_s"].default
    for argv, needle in ((["--batch-wait-ms", "2000"], "batch_wait_ms must be <= 1000"), (["--max-connections", "1"], "max_connections must be >= 2"),
                         (["--max-files", "two"], "not an integer"), (["--api-key", " "], "api_key must not be empty")):
        with pytest.raises(UsageError) as err:
            parser.parse_args(["serve", "m", *argv])
        assert argv[0] in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("IMGCLF_API_KEY", "from-env")
    assert serve_config_from_args(parser.parse_args(["serve", "m"])).api_key == "from-env"
    assert serve_config_from_args(parser.parse_args(["serve", "m", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.setenv("IMGCLF_API_KEY", "  ")
    with pytest.raises(ValueError, match="IMGCLF_API_KEY is blank"):
        serve_config_from_args(parser.parse_args(["serve", "m"]))
    monkeypatch.setenv("IMGCLF_API_KEY", "")
    assert serve_config_from_args(parser.parse_args(["serve", "m"])).api_key is None


def test_cli_help_does_not_load_the_web_stack():
    code = ("import sys; from imgclf.cli.main import build_parser; build_parser(); "
            "print(','.join(m for m in ('fastapi', 'starlette', 'uvicorn', 'h11', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_keep_alive_answers_are_not_held_back_by_nagle():
    """Connections have TCP_NODELAY: h11 writes an answer's headers and body separately, and with
    Nagle on the body waits for the client's delayed ACK (~40 ms on every keep-alive request)."""
    with live_server(ServeConfig()) as (server, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            latencies = []
            for _ in range(15):
                t = time.perf_counter()
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                while not answer.endswith(b"}"):
                    chunk = conn.recv(4096)
                    assert chunk, answer
                    answer += chunk
                latencies.append(time.perf_counter() - t)
                assert answer.startswith(b"HTTP/1.1 200"), answer
            server_side = [c.transport.get_extra_info("socket") for c in server.server_state.connections]
            assert server_side and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in server_side)
    assert sorted(latencies)[len(latencies) // 2] < 0.025, latencies  # with Nagle: never under 40 ms
