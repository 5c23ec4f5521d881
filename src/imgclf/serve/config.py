"""The server's settings and limits, declared once (type, default, bounds, help): ``imgclf serve``
generates its flags from these declarations and checks values with the same rules as the
training settings. Kept free of web imports so ``imgclf --help`` does not load FastAPI."""

import os
from dataclasses import dataclass

from imgclf.config.settings import Declared, register_settings, setting

MB = 1 << 20
GROUP = "server"


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


@dataclass(frozen=True)
class ServeConfig(Declared):
    """What ``imgclf serve`` accepts and how long it waits; checked when made (SettingError names the setting)."""

    api_key: str | None = setting(None, "require this key in the X-API-Key header of /v1/* requests (default: $IMGCLF_API_KEY if set)", check=_not_blank, group=GROUP)
    max_upload_mb: float = setting(10.0, "largest accepted image file, MB", gt=0, group=GROUP)
    max_pixels: int = setting(40_000_000, "largest accepted image, width x height, checked before decoding", ge=1, group=GROUP)
    max_files: int = setting(16, "images per request", ge=1, group=GROUP)
    batch_wait_ms: float = setting(5.0, "how long to wait for concurrent requests to batch together, ms", ge=0, le=1000, group=GROUP)
    max_batch: int = setting(16, "most images per inference batch", ge=1, group=GROUP)
    decode_threads: int = setting(max(2, os.cpu_count() or 2), "threads decoding uploads (default: the CPU count, at least 2)", ge=1, group=GROUP)
    max_requests: int | None = setting(None, "requests handled at once; more are answered 503 at once, GET /healthz never is (unset: 64 or 4 x --max-batch, whichever is larger)", ge=1, group=GROUP)
    max_connections: int = setting(512, "open connections; one more closes the longest-waiting connection that has no request in progress", ge=2, group=GROUP)
    header_timeout_s: float = setting(10.0, "seconds a client has to send a request's headers, from connecting or from the previous answer", gt=0, group=GROUP)
    body_timeout_s: float = setting(30.0, "most seconds between two pieces of a request body", gt=0, group=GROUP)
    keep_alive_s: float = setting(5.0, "seconds an idle connection stays open after an answer", gt=0, group=GROUP)
    max_neighbors: int = setting(20, "most similar training cases per image a client may ask for (/v1/predict?neighbors=K); 0 = no similar cases (the index and the feature path are not loaded)", ge=0, le=100, group=GROUP)
    neighbor_paths: bool = setting(False, "include the training images' paths, as stored at training, in similar cases (off: they show the server's folders and file names, which may identify people; label, similarity and thumbnail are given either way)", group=GROUP)

    def validate(self) -> "ServeConfig":
        """Check every setting again (the checks already ran when the object was made)."""
        self.__post_init__()
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return self.max_file_bytes * self.max_files + 64 * 1024  # multipart framing and small fields

    @property
    def request_limit(self) -> int:
        """Requests in progress at once (``max_requests``, or its default)."""
        return self.max_requests if self.max_requests is not None else max(64, 4 * self.max_batch)


SERVE_FIELDS = register_settings(ServeConfig)
