"""Running the server: bind the socket first (a taken port is a one-line error, port 0
works), then load the model and hand both to uvicorn, with the connection guards of
:mod:`imgclf.serve.connections` in place of uvicorn's connection-counting limit."""

import ipaddress
import logging
import socket

import uvicorn

from imgclf.serve.app import create_app, load_serving_model
from imgclf.serve.config import ServeConfig
from imgclf.serve.connections import guarded_protocol

log = logging.getLogger("imgclf")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a taken port is a one-line error (and port 0 works)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve ({e.strerror or e})") from None
    family, _, proto, _, addr = infos[0]
    # proto (IPPROTO_TCP), not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections of a
    # socket that says it is TCP; with Nagle on, h11's separate header and body writes wait for
    # the client's delayed ACK, ~40 ms on every keep-alive answer.
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, config: ServeConfig, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for ``app``: h11 with read timeouts and a connection cap; no
    ``limit_concurrency``, which counts idle connections too (the app limits requests in
    progress itself, see :mod:`imgclf.serve.limits`)."""
    return uvicorn.Config(
        app, http=guarded_protocol(config), log_level=log_level, access_log=log_level in ("debug", "info"),
        timeout_keep_alive=config.keep_alive_s, server_header=False,
    )


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None, engine: str = "auto", weights=None, cache_dir=None, log_level: str = "info", announce=print, explain: bool = True) -> None:
    """Load the model, bind, and run uvicorn until interrupted."""
    config = (config or ServeConfig()).validate()
    if not is_loopback(host) and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this machine can use the model", host)
    sock = bind_socket(host, port)  # fail fast on a taken port, before loading anything
    try:
        clf, bundle = load_serving_model(model, engine, weights=weights, cache_dir=cache_dir)
        app = create_app(clf, config, bundle_dir=bundle, explain=None if explain else False, weights=weights, cache_dir=cache_dir)
        actual = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        announce(
            f"imgclf: serving {model} (model {clf.model_id}, {clf.engine}, classes {', '.join(clf.class_names_)}) "
            f"on http://{shown}:{actual}/ (API docs /docs){'; Grad-CAM at /v1/explain' if app.state.explainer is not None else ''}"
            f"{'; API key required' if config.api_key else ''}; Ctrl+C stops"
        )
        uvicorn.Server(uvicorn_config(app, config, log_level)).run(sockets=[sock])
    finally:
        sock.close()
