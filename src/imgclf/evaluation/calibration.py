"""Post-hoc temperature scaling: one T that divides the logits, fitted on validation.

Why: a head trained to zero loss is over-confident, and stage 2's label smoothing makes
the fine-tuned model under-confident; either way the probabilities a clinician reads
are off while the ranking is right. One temperature (Guo et al. 2017) fixes the scale
without changing any decision that depends on the ranking (argmax is unchanged; the
binary threshold is chosen afterwards on the calibrated probabilities).

Robustness on small or perfectly separated validation splits: the maximum-likelihood T
falls towards 0 when validation has no mistakes (every smaller T lowers the loss), which
would make the model wildly over-confident on the first mistake it meets. So T is the
maximum a posteriori estimate under a Gaussian prior on log T centred on 1 (T = 1 means
"trust the trained model"): a few hundred validation images move T freely, a handful or a
separated split barely move it. T is bounded to [``T_MIN``, ``T_MAX``] as well.
"""

from __future__ import annotations

import math

import numpy as np

T_MIN, T_MAX = 0.05, 20.0
PRIOR_SD = 0.5  # of log T: T in [0.37, 2.7] is within two prior standard deviations


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def view_mean_log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """log of the probabilities averaged over test-time views: ``logits`` (V, n, C) or (n, C)."""
    z = np.asarray(logits, np.float64)
    if z.ndim == 2:
        return _log_softmax(z / temperature)
    per_view = _log_softmax((z / temperature).reshape(-1, z.shape[-1])).reshape(z.shape)
    top = per_view.max(axis=0)
    return top + np.log(np.exp(per_view - top).mean(axis=0))


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, prior_sd: float = PRIOR_SD) -> float:
    """The temperature T for ``softmax(logits / T)``, fitted on labelled validation rows.

    ``logits``: (n, C), or (V, n, C) for a model that averages the probabilities of V
    test-time views (T is then fitted for that average, which is what the model outputs).
    Pass raw logits, not the log of float32 probabilities: those saturate at a lead of ~100
    and would bias T. Returns 1.0 when there is nothing to fit on.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0 or z.ndim not in (2, 3) or not np.isfinite(z).all():
        return 1.0
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:  # negative log posterior (sum over rows + prior)
        nll = -view_mean_log_probs(z, math.exp(log_t))[rows, y].sum()
        return float(nll + 0.5 * (log_t / prior_sd) ** 2)

    res = minimize_scalar(objective, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / T)`` (averaged over views for (V, n, C) input)."""
    return np.exp(view_mean_log_probs(logits, temperature))
