"""Cross-fitted heads against the validation carve (issue 12): does every labelled training
image serve both the heads and the calibration when the K heads of a member each hold out a
different fold?

``carve`` is what the product does: a stratified 20 % of the training images is set aside, K
recipe heads train on the rest (early stopping on the carve), their averaged probabilities get
one temperature fitted on the carve. ``crossfit``: the training images are split into K
stratified folds, head k trains on the other folds and stops early on fold k, one temperature
is fitted on the out-of-fold logits (every training image scored by the one head that did
not see it), and the held-out images get the K heads' temperature-scaled probabilities
averaged (``crossfit-logit``: their logits averaged, then the temperature). Controls:
``subbag`` keeps the carve and gives head k the carve's complement minus its fold k (diversity
without more data); ``crossfit-carve10``/``-carve20`` carve 10 or 20 % for the temperature only,
cross-fit the heads over the rest and fit the temperature on the averaged heads, as the product
does. Every method fits K heads per member; a set of several views averages its members'
probabilities. Scored by 5-fold stratified cross-validation over all labelled images (train +
test), the same outer folds for every method, features from ``explore_input.py``'s cache:

    .venv/bin/python benchmarks/explore_crossfit.py --cache /tmp/views --seeds 0 1 --methods carve crossfit crossfit-logit subbag
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_head_size import carve, fit_logits  # noqa: E402
from explore_input import arguments, cv_table  # noqa: E402
from explore_stages import averaged_and_calibrated, calibrated_member  # noqa: E402


def crossfit_logits(x, y, train, held_out, n_classes, seed, heads):
    """``heads`` recipe heads, head k trained on the other inner folds of ``train`` and stopped
    early on fold k: (temperature fitted on the out-of-fold logits, each head's held-out logits)."""
    from sklearn.model_selection import StratifiedKFold

    from imgclf.evaluation.calibration import fit_temperature

    oof = np.zeros((len(train), n_classes))
    test = []
    for k, (fit, va) in enumerate(StratifiedKFold(heads, shuffle=True, random_state=seed + 10_000).split(train, y[train])):
        lv, lt, _ = fit_logits("recipe", x[train[fit]], y[train[fit]], x[train[va]], y[train[va]], x[held_out], n_classes, seed * 100 + k)
        oof[va] = lv
        test.append(lt)
    return fit_temperature(oof, y[train]), test


def crossfit_member(x, y, train, held_out, n_classes, seed, heads):
    """Held-out probabilities: the heads' temperature-scaled probabilities averaged (as ``ensemble_head`` averages)."""
    from scipy.special import softmax

    t, test = crossfit_logits(x, y, train, held_out, n_classes, seed, heads)
    return np.mean([softmax(lt / t, 1) for lt in test], 0)


def crossfit_logit_member(x, y, train, held_out, n_classes, seed, heads):
    """Held-out probabilities: the heads' logits averaged, then the temperature (less dispersed
    than averaged probabilities, closer to the single heads the temperature was fitted on)."""
    from scipy.special import softmax

    t, test = crossfit_logits(x, y, train, held_out, n_classes, seed, heads)
    return softmax(np.mean(test, 0) / t, 1)


def subbag_member(x, y, train, held_out, n_classes, seed, heads):
    """The product's carve kept (early stopping, one temperature for the averaged heads), but
    head k trains on the carve's complement minus its own fold k: diversity from the data."""
    from sklearn.model_selection import StratifiedKFold

    fit, carve_idx = carve(y[train], 0.2, seed)
    rest, va = train[fit], train[carve_idx]
    logits = [fit_logits("recipe", x[rest[keep]], y[rest[keep]], x[va], y[va], x[held_out], n_classes, seed * 100 + k)[:2]
              for k, (keep, _) in enumerate(StratifiedKFold(heads, shuffle=True, random_state=seed + 10_000).split(rest, y[rest]))]
    return averaged_and_calibrated([lv for lv, _ in logits], [lt for _, lt in logits], y[va])


def crossfit_carve_member(x, y, train, held_out, n_classes, seed, heads, fraction=0.1):
    """A stratified ``fraction`` of the training images carved for the temperature only; the
    heads cross-fitted over the rest (head k stops early on inner fold k); the carve's
    temperature fitted on the averaged heads' output itself, as the product calibrates."""
    from sklearn.model_selection import StratifiedKFold

    fit, carve_idx = carve(y[train], fraction, seed)
    rest, cal = train[fit], train[carve_idx]
    scored = np.concatenate([x[cal], x[held_out]])  # the carve and the held-out images, one pass per head
    logits = [fit_logits("recipe", x[rest[tr]], y[rest[tr]], x[rest[va]], y[rest[va]], scored, n_classes, seed * 100 + k)[1]
              for k, (tr, va) in enumerate(StratifiedKFold(heads, shuffle=True, random_state=seed + 10_000).split(rest, y[rest]))]
    return averaged_and_calibrated([lt[:len(cal)] for lt in logits], [lt[len(cal):] for lt in logits], y[cal])


METHODS = {"carve": calibrated_member, "crossfit": crossfit_member, "crossfit-logit": crossfit_logit_member, "subbag": subbag_member,
           "crossfit-carve10": crossfit_carve_member, "crossfit-carve20": lambda *a: crossfit_carve_member(*a, fraction=0.2)}


def main() -> None:
    ap = arguments(__doc__.split("\n\n")[0], heads=5, sets=["L0@224/0.875+L1@240/0.875"])
    ap.add_argument("--methods", nargs="+", default=["carve", "crossfit"], choices=list(METHODS))
    args = ap.parse_args()
    cv_table(args, {m: METHODS[m] for m in args.methods})


if __name__ == "__main__":
    main()
