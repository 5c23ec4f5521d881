"""The optional ``/v1/explain`` endpoint's engine: Grad-CAM on its own PyTorch copy of the
model, one image at a time on its own thread (hooks and gradients must not meet the predict
path's concurrent forwards)."""

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("imgclf")


def explain_module():
    """:mod:`imgclf.explain.gradcam` if it can be imported (it provides gradcam and overlay), else None."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec("imgclf.explain.gradcam") is None:
            return None
        mod = importlib.import_module("imgclf.explain.gradcam")
    except Exception as e:  # noqa: BLE001 - a broken optional module must not stop serving
        log.warning("Grad-CAM endpoint disabled: imgclf.explain.gradcam cannot be imported (%s)", e)
        return None
    if not (callable(getattr(mod, "gradcam", None)) and callable(getattr(mod, "overlay", None))):
        return None
    return mod


class Explainer:
    """Grad-CAM overlays with ``module`` (gradcam, overlay, optionally model_input_image) on the
    bundle in ``bundle_dir``, loaded on first use."""

    def __init__(self, module, bundle_dir: str | os.PathLike, *, weights=None, cache_dir=None):
        self.module = module
        self.bundle_dir = bundle_dir
        self.weights = weights
        self.cache_dir = cache_dir
        self.executor: ThreadPoolExecutor | None = None  # made on first use, again after close()
        self._classifier = None

    def classifier(self):
        if self._classifier is None:
            from imgclf.model.classifier import Classifier

            self._classifier = Classifier.load(self.bundle_dir, weights=self.weights, cache_dir=self.cache_dir, engine="torch", precision="fp32", use_cache=False)
        return self._classifier

    def render(self, image, class_name: str | None) -> tuple[bytes, str, float]:
        """(overlay PNG bytes, explained class, its probability) for a PIL image."""
        clf = self.classifier()
        heat, k, prob = self.module.gradcam(clf, image, class_name)
        crop = self.module.model_input_image(clf, image) if hasattr(self.module, "model_input_image") else image
        buf = io.BytesIO()
        self.module.overlay(crop, heat).save(buf, format="PNG")
        return buf.getvalue(), clf.class_names_[int(k)], float(prob)

    async def explain(self, image, class_name: str | None) -> tuple[bytes, str, float]:
        """:meth:`render` on the explain thread."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-explain")
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.render, image, class_name)

    def close(self):
        """Stop the explain thread (the app's shutdown); the next request after a restart makes a new one."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
