"""What a run was made with: versions and machine, recorded in config.json."""

from __future__ import annotations

import os
import platform

from imgclf._version import __version__


def environment_info() -> dict:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "imgclf": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": v("torch"),
        **{k: v(k) for k in ("torchvision", "timm", "onnxruntime", "openvino", "numpy", "pillow", "scikit-learn")},
    }
