"""Every file name of a run folder (and of the model bundle inside it), in one place.

A run folder ``PROJECT/NAME/`` holds the bundle (``model.json`` + ``model.safetensors``,
all that predict needs) and the run's record: how it was configured, split and trained,
what it measured, what it skipped, its log, report and plots.
"""

MODEL_META = "model.json"  # bundle metadata: backbone entry, weights identity, preprocessing, classes, head
MODEL_TENSORS = "model.safetensors"  # head (and fine-tuned backbone) tensors, pickle-free
NEIGHBORS_TENSORS = "neighbors.safetensors"  # optional: similar-cases index (training features, labels, thumbnails), sha256 in model.json
NEIGHBORS_META = "neighbors.json"  # optional: its paths, class names, thumbnail size (imgclf.model.neighbors)
STATUS = "run.json"  # running → complete | failed (with the error), see imgclf.model.run_status
CONFIG = "config.json"  # resolved settings, command line, dataset, environment, wall time
SPLIT = "split.csv"  # split, class, path of every image used
EPOCH_METRICS = "metrics.csv"  # one row per epoch and stage
TEST_METRICS = "test_metrics.json"  # metrics on the test split (schema: imgclf.evaluation.metrics)
TEST_PREDICTIONS = "test_predictions.csv"  # per test image: path, true, predicted, probabilities
CHECKPOINT = "checkpoint-{stage}.safetensors"  # per training stage (head, head2…, finetune): state after the last complete epoch, for --resume; removed when the run completes
SKIPPED = "skipped.csv"  # unreadable files and why
LOG = "train.log"
REPORT = "report.html"
PLOTS = "plots"  # folder of PNG figures
CV_FOLDS = "cv_folds.csv"  # --cv: one row per repeat and fold, the held-out fold's metrics
CV_PREDICTIONS = "cv_predictions.csv"  # --cv: out-of-fold per-image predictions with repeat and fold
CV_SUMMARY = "cv_summary.json"  # --cv: folds, across-fold means and intervals, pooled out-of-fold metrics
ONNX = "model.onnx"  # default export target inside a run folder

# what a run folder holds, which no command may overwrite from outside (e.g. an --out)
RUN_FILES = frozenset({MODEL_META, MODEL_TENSORS, NEIGHBORS_TENSORS, NEIGHBORS_META, STATUS, CONFIG, SPLIT, EPOCH_METRICS, TEST_METRICS, TEST_PREDICTIONS, SKIPPED, LOG, REPORT, ONNX, CV_FOLDS, CV_PREDICTIONS, CV_SUMMARY})


def head_checkpoint_stage(member: int) -> str:
    """CHECKPOINT's stage name of stage-1 head ``member`` (0-based; --heads trains several): head, head2, head3, …"""
    return "head" if member == 0 else f"head{member + 1}"


def refit_checkpoint_stage(member: int) -> str:
    """CHECKPOINT's stage name of head ``member`` retrained on train + validation (``refit``): refit, refit2, …"""
    return "refit" if member == 0 else f"refit{member + 1}"
