"""Loading an export only after its integrity checks, so what is checked is what runs.

A file whose sha256 differs from the sidecar's, or a sidecar that disagrees with the
metadata inside the graph, is refused (:class:`~imgclf.export.metadata.ExportError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imgclf.export.metadata import EXPORT_FORMAT, META_PREFIX, ONNX_NAME, ExportError, sha256_bytes, sidecar_path


def resolve_onnx_path(path: str | os.PathLike) -> Path:
    """An ``.onnx`` file, or a folder's ``model.onnx``; ExportError if there is none."""
    p = Path(path)
    if p.is_dir():
        p = p / ONNX_NAME
    if not p.is_file():
        raise ExportError(f"{p}: no such ONNX file (export one with `imgclf export MODEL`)")
    return p


def load_verified(path: str | os.PathLike) -> tuple[Path, bytes, dict, dict[str, str]]:
    """(onnx path, its bytes, sidecar, embedded metadata) after every integrity check.

    The bytes returned are the ones hashed, so what is checked is what gets loaded.
    """
    p = resolve_onnx_path(path)
    sc = sidecar_path(p)
    if not sc.is_file():
        raise ExportError(f"{p}: its metadata file {sc.name} is missing; re-export with `imgclf export MODEL`")
    try:
        side = json.loads(sc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{sc}: not valid JSON ({e}); re-export with `imgclf export MODEL`") from None
    if not isinstance(side, dict) or side.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{sc}: not an {EXPORT_FORMAT} metadata file")
    data = p.read_bytes()
    digest = sha256_bytes(data)
    if digest != side.get("onnx_sha256"):
        raise ExportError(
            f"{p}: sha256 {digest[:12]}… differs from the {str(side.get('onnx_sha256'))[:12]}… recorded in {sc.name} at export "
            "(the file was modified or is corrupt); refusing to load it — re-export with `imgclf export MODEL`"
        )
    try:
        import onnx

        model = onnx.load_from_string(data)
    except Exception as e:
        raise ExportError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    props = {kv.key: kv.value for kv in model.metadata_props}
    if props.get(f"{META_PREFIX}format") != EXPORT_FORMAT:
        raise ExportError(f"{p}: not an imgclf export (no {META_PREFIX}format metadata)")
    problems = []
    if side.get("onnx_metadata") != props:
        problems.append("onnx_metadata")
    checks = {
        "class_names": json.loads(props.get(f"{META_PREFIX}class_names", "null")),
        "input_size": int(props.get(f"{META_PREFIX}input_size", "-1")),
        "threshold": json.loads(props.get(f"{META_PREFIX}threshold", "null")),
        "model_id": props.get(f"{META_PREFIX}model_id"),
        "preprocessing": json.loads(props.get(f"{META_PREFIX}preprocessing", "null")),
    }
    problems += [k for k, v in checks.items() if side.get(k) != v]
    if problems:
        raise ExportError(
            f"{sc}: disagrees with the metadata inside {p.name} ({', '.join(problems)}); the metadata file was edited — "
            "refusing it; re-export with `imgclf export MODEL`"
        )
    return p, data, side, props
