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
does. ``refit`` (``refit-logit``) cross-fits K heads for the out-of-fold temperature and their
best epochs, then trains K heads on all training images for the median best epoch;
``carve-refit`` is what the product's ``refit`` does: the carve chooses each head's epoch and
the temperature, then each head trains again on all training images for its epoch
(``carve-refit-steps``: 0.8 times it, the same optimiser steps). Every method fits K heads per member; a set of several views averages its members'
probabilities. Scored by 5-fold stratified cross-validation over all labelled images (train +
test), the same outer folds for every method, features from ``explore_input.py``'s cache:

    .venv/bin/python benchmarks/explore_crossfit.py --cache /tmp/views --seeds 0 1 --methods carve crossfit crossfit-logit subbag
    .venv/bin/python benchmarks/explore_crossfit.py --cache /tmp/views --seeds 0 1 --methods carve refit refit-logit carve-refit
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
    early on fold k: (temperature fitted on the out-of-fold logits, each head's held-out logits,
    each head's best epoch)."""
    from sklearn.model_selection import StratifiedKFold

    from imgclf.evaluation.calibration import fit_temperature

    oof = np.zeros((len(train), n_classes))
    test, epochs = [], []
    for k, (fit, va) in enumerate(StratifiedKFold(heads, shuffle=True, random_state=seed + 10_000).split(train, y[train])):
        lv, lt, summary = fit_logits("recipe", x[train[fit]], y[train[fit]], x[train[va]], y[train[va]], x[held_out], n_classes, seed * 100 + k)
        oof[va] = lv
        test.append(lt)
        epochs.append(max(1, summary["best_epoch"]))
    return fit_temperature(oof, y[train]), test, epochs


def tempered(test, t, average="probability"):
    """Held-out probabilities of several heads under one temperature ``t``: their tempered
    probabilities averaged (as ``ensemble_head`` averages), or (``logit``) their logits averaged,
    then tempered (less dispersed than averaged probabilities, closer to the single heads the
    temperature was fitted on)."""
    from scipy.special import softmax

    if average == "logit":
        return softmax(np.mean(test, 0) / t, 1)
    return np.mean([softmax(lt / t, 1) for lt in test], 0)


def crossfit_member(x, y, train, held_out, n_classes, seed, heads, average="probability"):
    """Held-out probabilities of the cross-fitted heads, temperature from their out-of-fold logits."""
    t, test, _ = crossfit_logits(x, y, train, held_out, n_classes, seed, heads)
    return tempered(test, t, average)


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


def refit_member(x, y, train, held_out, n_classes, seed, heads, average="probability"):
    """Cross-validate, then refit: ``heads`` heads cross-fitted over the training images give the
    out-of-fold logits (one temperature) and their best epochs; then ``heads`` heads (other
    seeds) train on every training image for the median best epoch, no early stopping; the
    held-out images get their probabilities as :func:`tempered` combines them."""
    t, _, epochs = crossfit_logits(x, y, train, held_out[:0], n_classes, seed, heads)
    n_epochs = int(round(np.median(epochs)))
    test = [fit_logits("recipe", x[train], y[train], x[:0], y[:0], x[held_out], n_classes, seed * 100 + 50 + k,
                       epochs=n_epochs, patience=0, checkpoint="last")[1] for k in range(heads)]
    return tempered(test, t, average)


def carve_refit_member(x, y, train, held_out, n_classes, seed, heads, same_steps=False):
    """The product's carve decides, then the heads retrain on everything: ``heads`` heads on
    ``train`` minus the carve (early stopping on it) give each head's best epoch and one
    temperature (fitted on their averaged output on the carve, as the product calibrates);
    head k then trains again, same seed, on all of ``train`` for its own best epoch
    (``same_steps``: that epoch times 0.8, as many optimiser steps as on the carve's
    complement), and the held-out images get the retrained heads' probabilities averaged,
    with the carve's temperature."""
    fit, carve_idx = carve(y[train], 0.2, seed)
    tr, va = train[fit], train[carve_idx]
    cal, best = [], []
    for k in range(heads):
        lv, _, summary = fit_logits("recipe", x[tr], y[tr], x[va], y[va], x[:0], n_classes, seed * 100 + k)
        cal.append(lv)
        best.append(max(1, summary["best_epoch"]))
    factor = len(tr) / len(train) if same_steps else 1.0
    test = [fit_logits("recipe", x[train], y[train], x[:0], y[:0], x[held_out], n_classes, seed * 100 + k,
                       epochs=max(1, int(round(best[k] * factor))), patience=0, checkpoint="last")[1] for k in range(heads)]
    return averaged_and_calibrated(cal, test, y[va])


METHODS = {"carve": calibrated_member, "crossfit": crossfit_member, "crossfit-logit": lambda *a: crossfit_member(*a, average="logit"), "subbag": subbag_member,
           "crossfit-carve10": crossfit_carve_member, "crossfit-carve20": lambda *a: crossfit_carve_member(*a, fraction=0.2),
           "refit": refit_member, "refit-logit": lambda *a: refit_member(*a, average="logit"),
           "carve-refit": carve_refit_member, "carve-refit-steps": lambda *a: carve_refit_member(*a, same_steps=True)}


def main() -> None:
    ap = arguments(__doc__.split("\n\n")[0], heads=5, sets=["L0@224/0.875+L1@240/0.875"])
    ap.add_argument("--methods", nargs="+", default=["carve", "crossfit"], choices=list(METHODS))
    args = ap.parse_args()
    cv_table(args, {m: METHODS[m] for m in args.methods})


if __name__ == "__main__":
    main()
