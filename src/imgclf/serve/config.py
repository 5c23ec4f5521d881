"""The server's settings and limits (``imgclf serve`` options), kept free of web imports so
the CLI can show the defaults without loading FastAPI."""

import os
from dataclasses import dataclass

MB = 1 << 20
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_FILES = 16


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # per image file
    max_pixels: int = DEFAULT_MAX_PIXELS  # width × height, checked before decoding
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_batch: int = DEFAULT_MAX_BATCH
    max_files: int = DEFAULT_MAX_FILES  # images per request
    decode_threads: int = max(2, os.cpu_count() or 2)

    def validate(self) -> "ServeConfig":
        """Check each setting; the error names the command-line option."""
        if not self.max_upload_mb > 0:
            raise ValueError("--max-upload-mb must be > 0")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError("--batch-wait-ms must be between 0 and 1000")
        if self.max_batch < 1:
            raise ValueError("--max-batch must be >= 1")
        if self.max_files < 1:
            raise ValueError("--max-files must be >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return self.max_file_bytes * self.max_files + 64 * 1024  # multipart framing and small fields
