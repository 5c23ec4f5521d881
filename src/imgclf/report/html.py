"""One self-contained ``report.html`` per run: the evidence a reviewer needs, in one file.

Built only from the files in the run folder (config.json, metrics.csv, test_metrics.json,
test_predictions.csv, split.csv, model.json, train.log, skipped.csv), plus the dataset
folder when it still exists (problems, exact and near-duplicate leakage between the
run's actual splits) and the model itself for Grad-CAM. Plots are also written as PNG
files to ``RUN/plots/``; in the HTML they are embedded as ``data:`` URIs and the page
has no scripts, fonts, stylesheets or images from anywhere else, so it opens offline in
any browser and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from imgclf.config import layout
from imgclf.report.cv import CV_SECTION, cv_section, small_test_split_note

log = logging.getLogger("imgclf")

__all__ = ["write_run_report"]

SECTIONS = [
    ("summary", "Summary"),
    ("dataset", "Dataset"),
    ("configuration", "Configuration"),
    ("training", "Training curves"),
    ("metrics", "Metrics"),
    ("plots", "Plots"),
    ("mistakes", "Worst mistakes"),
    ("environment", "Environment"),
]

_CSS = """
:root { --fg:#1d2430; --muted:#5b6573; --line:#d9dee5; --bg:#ffffff; --alt:#f5f7fa; --warn:#fff4d6; --warnline:#e0a800; --bad:#b00020; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color:var(--fg); background:var(--bg); }
header { padding:18px 28px 8px; border-bottom:1px solid var(--line); }
header h1 { margin:0 0 4px; font-size:22px; }
header p { margin:0; color:var(--muted); }
nav { position:sticky; top:0; background:#fff; border-bottom:1px solid var(--line); padding:6px 28px; z-index:1; }
nav a { margin-right:14px; color:#0b5cad; text-decoration:none; font-size:14px; }
main { max-width:1180px; padding:0 28px 40px; }
section { padding-top:8px; border-bottom:1px solid var(--line); padding-bottom:18px; }
h2 { font-size:19px; margin:20px 0 10px; }
h3 { font-size:16px; margin:16px 0 8px; }
table { border-collapse:collapse; margin:6px 0 12px; font-size:14px; }
th, td { border:1px solid var(--line); padding:4px 9px; text-align:left; vertical-align:top; }
th { background:var(--alt); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background:#fbfcfd; }
.kv td:first-child { color:var(--muted); white-space:nowrap; }
.warn { background:var(--warn); border-left:4px solid var(--warnline); padding:8px 12px; margin:8px 0; }
.ok { background:#eaf6ec; border-left:4px solid #2e7d32; padding:8px 12px; margin:8px 0; }
.note { color:var(--muted); font-size:14px; }
.bad { color:var(--bad); }
figure { margin:10px 0 18px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); }
figcaption { color:var(--muted); font-size:13px; }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap:12px; }
.pair img { width:96px; height:96px; object-fit:cover; border:1px solid var(--line); margin-right:4px; }
.cases td img { width:64px; height:64px; object-fit:cover; border:1px solid var(--line); display:block; }
.cases td.same { background:#eaf6ec; } .cases td.other { background:#fdecee; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:13px; }
pre { background:var(--alt); padding:8px; overflow:auto; max-height:360px; }
details summary { cursor:pointer; color:#0b5cad; }
.big { font-size:17px; }
.chips { display:flex; flex-wrap:wrap; gap:6px; margin:6px 0 12px; }
.chips span { border:1px solid var(--line); background:var(--alt); border-radius:4px; padding:2px 8px; font-size:13px; }
.chips b { font-weight:600; color:var(--muted); margin-right:4px; }
"""


# --------------------------------------------------------------------------- reading


def _read_json(path: Path, required: bool = False):
    if not path.is_file():
        if required:
            raise ValueError(f"{path.parent}: not a finished run folder ({path.name} is missing)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]})") from None


def _read_model_meta(path: Path):
    """The run's :class:`~imgclf.model.metadata.ModelMeta`, or None when there is no usable
    ``model.json`` (the report then leaves out the model's configuration, and says why)."""
    from imgclf.model.metadata import BundleError, read_model_meta

    if not path.is_file():
        return None
    try:
        return read_model_meta(path)
    except BundleError as e:
        log.warning("%s; the report leaves out the model's configuration", e)
        return None


def _read_csv(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None


def _tail(path: Path, n: int = 400) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()[-n:]


# --------------------------------------------------------------------------- html helpers


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _fmt_setting(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ci(m: dict, key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    return f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "n/a"


def _table(header: list[str], rows: list[list], num_cols: set[int] = frozenset(), cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>"]
    out += [f'<th class="num">{_e(h)}</th>' if i in num_cols else f"<th>{_e(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _kv(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = f"<code>{_e(json.dumps(v, default=str))}</code>"
        else:
            v = _e("n/a" if v is None else _fmt_setting(v))
        rows.append([_e(k), v])
    return _table(["setting", "value"], rows, cls="kv") if rows else '<p class="note">nothing recorded</p>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure(path: Path | None, alt: str, caption: str = "") -> str:
    if path is None or not path.is_file():
        return f'<p class="note">{_e(alt)}: not available</p>'
    uri = _data_uri(path.read_bytes(), "image/png")
    cap = f"<figcaption>{_e(caption)} (also <code>plots/{_e(path.name)}</code>)</figcaption>"
    return f'<figure><img src="{uri}" alt="{_e(alt)}">{cap}</figure>'


def _thumb_uri(path: str, size: int = 96) -> str | None:
    from imgclf.data.imaging import load_rgb

    try:
        img = load_rgb(path)
    except Exception:  # noqa: BLE001 - a missing or broken file just gets no thumbnail
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _warn(text: str) -> str:
    return f'<div class="warn">⚠ {text}</div>'


# --------------------------------------------------------------------------- data


def _predictions(rows: list[dict] | None, class_names: list[str]):
    """(paths, y_true, probs) from test_predictions.csv rows; rows with unknown labels dropped."""
    if not rows:
        return [], np.zeros(0, np.int64), np.zeros((0, len(class_names)))
    index = {c: i for i, c in enumerate(class_names)}
    paths, y, probs = [], [], []
    for r in rows:
        try:
            p = [float(r[c]) for c in class_names]
        except (KeyError, TypeError, ValueError):
            continue
        if r.get("true") not in index or any(math.isnan(v) for v in p):
            continue
        paths.append(r.get("path", ""))
        y.append(index[r["true"]])
        probs.append(p)
    return paths, np.array(y, np.int64), np.array(probs, np.float64).reshape(-1, len(class_names))


def _run_placement(split_csv: Path) -> dict[str, tuple[str, str]]:
    """real path → (split, class) of the run's own split.csv (empty when the run has none)."""
    from imgclf.data.datasets import read_split_csv

    if not split_csv.is_file():
        return {}
    return {os.path.realpath(p): (split, c) for split, rows in read_split_csv(split_csv).items() for p, c in rows}


def _test_copies(insp: dict, test_paths: list[str], placed: dict[str, tuple[str, str]]) -> tuple[set[str], set[str]]:
    """Real paths of the scored test images that have an exact or near copy in train or
    validation, and those of them whose copy there is filed under another class.

    ``placed``: :func:`_run_placement`; an image it does not place is judged by its group's
    classes."""
    test = {os.path.realpath(p) for p in test_paths}
    near = insp.get("near_duplicates") or {}
    copied = {r for r in map(os.path.realpath, near.get("test_with_copies", [])) if r in test}
    relabelled = set()
    # cross-split groups: a scored test image's group always holds a train or validation copy
    for g in insp["duplicates"]["cross_split"]:
        members = [os.path.realpath(p) for p in g["paths"]]
        for r in (r for r in members if r in test):
            copied.add(r)
            if r in placed:
                others = {placed[m][1] for m in members if m in placed and placed[m][0] != "test"}
                differs = bool(others - {placed[r][1]})
            else:
                differs = len(g["classes"]) > 1
            if differs:
                relabelled.add(r)
    # near pairs are [earlier, later] across splits; the listed ones (capped) tell relabelled copies
    relabelled |= {r for g in near.get("cross_split", []) if g["splits"][1] == "test" and len(g["classes"]) > 1
                   for r in [os.path.realpath(g["paths"][1])] if r in test}
    return copied, relabelled


def _without_copies(ctx: dict) -> dict | None:
    """Test metrics over the test images that have no copy in train or validation (None when
    the check did not run or found none): a copy scores memory, not generalisation, and one
    filed under another class scores the labels."""
    insp, m = ctx["inspection"], ctx["metrics"]
    if insp is None or not ctx["n_pred"]:
        return None
    copied, relabelled = _test_copies(insp, ctx["paths"], ctx.get("placed") or {})
    if not copied:
        return None
    from imgclf.evaluation.metrics import classification_metrics

    keep = np.array([os.path.realpath(p) not in copied for p in ctx["paths"]])
    ci = m.get("ci") or {}
    clean = classification_metrics(ctx["y_true"][keep], ctx["probs"][keep], ctx["class_names"], threshold=m.get("threshold"),
                                   bootstrap=int(ci.get("n_resamples") or 0) if keep.any() else 0, seed=ci.get("seed") or 0)
    return {"copied": len(copied), "relabelled": len(relabelled), "metrics": clean}


# --------------------------------------------------------------------------- sections


def _summary(ctx: dict) -> str:
    m, cfg = ctx["metrics"], ctx["config"]
    classes = ctx["class_names"]
    out = ['<section id="summary"><h2>Summary</h2>']
    backbone = ctx["model"].backbone_name if ctx["model"] else (cfg.get("args") or {}).get("backbone", "?")
    out.append(
        f'<p class="big">{len(classes)} classes ({_e(", ".join(classes))}), backbone <b>{_e(backbone)}</b>, '
        f'{_e(m.get("n", 0))} test images.</p>'
    )
    rows = []
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC-AUC")):
        rows.append([label, _fmt(m.get(key)), _ci(m, key)])
    if "at_threshold" in m:
        op = m["at_threshold"]
        rows.append([f"sensitivity at threshold {op['threshold']:.3g}", _fmt(op["sensitivity"]), ""])
        rows.append([f"specificity at threshold {op['threshold']:.3g}", _fmt(op["specificity"]), ""])
    out.append(_table(["metric (test split)", "value", "95% CI"], rows, {1, 2}))
    out.append(_perfect_note(m))
    small = small_test_split_note(m)
    out.append(f'<p class="note">{_e(small)}</p>' if small else "")
    warns = ctx["summary_warnings"]
    if warns:
        out += [_warn(w) for w in warns]
    else:
        out.append('<div class="ok">No leakage between the splits found, no unreadable files.</div>')
    out.append("</section>")
    return "".join(out)


def _perfect_note(m: dict) -> str:
    """With no test error every bootstrap resample is perfect too: say what n still allows."""
    n = m.get("n") or 0
    if not n or m.get("accuracy") != 1.0:
        return ""
    lower = 0.025 ** (1 / n)  # Clopper-Pearson: P(all n right | accuracy = lower) = 2.5 %
    return (f'<p class="note">No test image was misclassified, so every bootstrap resample is perfect and the interval is a '
            f"single point. With {n} test images the exact (Clopper–Pearson) 95% lower bound on accuracy is {lower:.3f}: "
            "a larger test set is needed to show more.</p>")


def _dataset(ctx: dict) -> str:
    cfg = ctx["config"]
    ds = cfg.get("dataset") or {}
    out = ['<section id="dataset"><h2>Dataset</h2>']
    out.append(f'<p>Root <code>{_e(ds.get("root", "?"))}</code>, layout {_e(ds.get("layout", "?"))}.</p>')
    counts = ds.get("counts") or {}
    classes = ctx["class_names"]
    splits = [s for s in ("train", "validation", "test") if s in counts]
    if counts:
        rows = []
        for c in classes:
            vals = [int(counts[s].get(c, 0)) for s in splits]
            rows.append([_e(c)] + vals + [sum(vals)])
        tot = [sum(int(counts[s].get(c, 0)) for c in classes) for s in splits]
        rows.append(["<b>total</b>"] + tot + [sum(tot)])
        out.append("<h3>Images per split and class (as used by the run)</h3>")
        out.append(_table(["class"] + splits + ["total"], rows, set(range(1, len(splits) + 2))))
    src = ds.get("split_source") or {}
    if src:
        out.append("<p>Split sources: " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in src.items()) + f" (split seed {_e(ds.get('split_seed', '?'))}).</p>")

    out.append("<h3>Problems found</h3>")
    insp = ctx["inspection"]
    if insp is None:
        out.append(f'<p class="note">{_e(ctx["inspection_note"])}</p>')
    else:
        probs = insp["problems"]
        if probs:
            out.append(f"<p>{len(probs)} file(s) cannot be decoded:</p>")
            out.append(_table(["kind", "file"], [[_e(p["kind"]), f"<code>{_e(p['message'])}</code>"] for p in probs[:50]]))
            if len(probs) > 50:
                out.append(f'<p class="note">…and {len(probs) - 50} more</p>')
        else:
            out.append("<p>Every image in the dataset folder decodes.</p>")
        other = [w for w in insp["warnings"] if not w.startswith("LEAKAGE")]
        if other:
            out.append("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in other) + "</ul>")
        st = insp["image_stats"]
        if st.get("decoded"):
            out.append(
                f'<p class="note">{st["decoded"]} images; width {st["width"]["min"]}–{st["width"]["max"]} '
                f'(median {st["width"]["median"]:g}), height {st["height"]["min"]}–{st["height"]["max"]} '
                f'(median {st["height"]["median"]:g}); formats: {_e(", ".join(f"{k} {v}" for k, v in st["formats"].items()))}.</p>'
            )
    skipped = ctx["skipped"]
    if skipped:
        out.append(f"<p>{len(skipped)} file(s) skipped during the run (<code>skipped.csv</code>):</p>")
        out.append(_table(["file", "error"], [[f"<code>{_e(r.get('path', ''))}</code>", _e(r.get("error", ""))] for r in skipped[:50]]))

    out.append('<h3 id="leakage">Leakage between splits</h3>')
    if insp is None:
        out.append(f'<p class="note">Not checked: {_e(ctx["inspection_note"])}</p>')
    else:
        from imgclf.data.inspection import NEAR_DUP_MAX_DISTANCE, NEAR_DUP_MIN_CORRELATION

        out.append(
            '<p class="note">Checked between the splits the run actually used (<code>split.csv</code>). Exact duplicates: identical '
            f"decoded pixels. Near-duplicates: 64-bit perceptual hash (<code>imagehash.phash</code> of a 32×32 grey thumbnail) within "
            f"{NEAR_DUP_MAX_DISTANCE} bits <i>and</i> thumbnail correlation ≥ {NEAR_DUP_MIN_CORRELATION} — catches re-encoded (other "
            "JPEG quality) and resized copies.</p>"
        )
        exact = insp["duplicates"]["cross_split"]
        near = (insp.get("near_duplicates") or {}).get("cross_split", [])
        if not exact and not near:
            out.append('<div class="ok">No exact or near-duplicate images across train, validation and test.</div>')
        for w in insp["warnings"]:
            if w.startswith("LEAKAGE"):
                out.append(_warn(_e(w)))
        if exact:
            out.append(f"<p>{len(exact)} group(s) of identical images in more than one split:</p>")
            out.append(_table(["splits", "files"], [[_e(" / ".join(g["splits"])), "<br>".join(f"<code>{_e(p)}</code>" for p in g["paths"])] for g in exact[:50]]))
        if near:
            rows = []
            for i, g in enumerate(near[:50]):
                pics = ""
                if i < 8:
                    uris = [_thumb_uri(p) for p in g["paths"]]
                    pics = '<span class="pair">' + "".join(f'<img src="{u}" alt="thumbnail">' for u in uris if u) + "</span>"
                rows.append([
                    _e(f"{g['splits'][1]} ~ {g['splits'][0]}"),
                    "<br>".join(f"<code>{_e(p)}</code>" for p in g["paths"]),
                    g["distance"], f"{g['correlation']:.3f}", pics,
                ])
            out.append(f"<p>{len(near)} near-duplicate pair(s) across splits:</p>")
            out.append(_table(["splits", "files (earlier split first)", "hash distance", "correlation", "images"], rows, {2, 3}))
            if len(near) > 50:
                out.append(f'<p class="note">…and {len(near) - 50} more pairs</p>')
    out.append("</section>")
    return "".join(out)


def _refit_text(fit_summary: dict, settings: dict) -> str:
    """What ``refit`` did to the delivered heads, in words."""
    refit = fit_summary.get("refit")
    if refit:
        return (f"yes: after validation chose their epochs ({', '.join(map(str, refit['member_epochs']))}), the temperature and the threshold, "
                f"the heads trained again on train + validation ({refit['images']} images, {refit['validation_images']} of them validation)")
    if settings.get("refit") is False:
        return "no (--no-refit): the heads trained without the validation images"
    return "no: the heads trained without the validation images (see the run log for why)"


def _configuration(ctx: dict) -> str:
    cfg, model = ctx["config"], ctx["model"]
    out = ['<section id="configuration"><h2>Configuration</h2>']
    if model is not None:
        b, w = model.backbone, model.weights
        out.append("<h3>Model</h3>")
        out.append(_kv({
            "backbone": model.backbone_name,
            "architecture": b.get("arch"),
            "features": f"{b.get('feature_point')} ({b.get('feature_dim')}-d)",
            "pretrained weights": w.get("description"),
            "weights identity": model.weights_identity,
            "preprocessing": model.preprocessing.to_dict(),
            "head": model.head,
            "frozen backbone": model.frozen_backbone,
            "fine-tuned backbone": model.backbone_tuned,
            "recipe": model.recipe,
            "calibration": (f"temperature {model.head['temperature']:.3f} (logits divided by it), fitted on the validation split"
                            if model.head.get("temperature") is not None else "none (the trained head's probabilities)"),
            "decision threshold": model.threshold,
            "threshold policy": model.threshold_policy,
            "test-time augmentation": model.tta,
            "heads refit": _refit_text(cfg.get("fit_summary") or {}, model.settings or {}),
        }))
    args = {k: v for k, v in (cfg.get("args") or {}).items() if k not in ("func",)}
    if args:
        out.append("<h3>Command and flags</h3>")
        out.append('<p class="note">As given on the command line; "default" = the recipe\'s value (resolved settings below).</p>')
        chips = "".join(
            f"<span><b>{_e(k)}</b> {_e('default' if v is None else json.dumps(v) if isinstance(v, (dict, list)) else _fmt_setting(v))}</span>"
            for k, v in args.items()
        )
        out.append(f'<div class="chips">{chips}</div>')
    if model is not None and model.settings:
        out.append("<details><summary>Resolved training settings (model.json)</summary>" + _kv(model.settings) + "</details>")
    out.append("</section>")
    return "".join(out)


def _training(ctx: dict) -> str:
    out = ['<section id="training"><h2>Training curves</h2>']
    out.append(_figure(ctx["plots"].get("training_curves"), "training curves", "Loss and accuracy per epoch, train vs validation; the dashed line marks the checkpoint kept. Each stage picks its epoch by its monitor (table below), which for stage 2 is by default the temperature-calibrated validation loss, not the plotted one."))
    fs = (ctx["config"].get("fit_summary") or {})
    stages = fs.get("stages") or ([fs] if fs.get("epochs_run") else [])
    if stages:
        def outcome(s):
            if s.get("stage") != "finetune":
                return ""
            heads = s.get("frozen_heads") or {}
            if heads.get("kept"):
                kept = (f"the {heads.get('heads')} frozen heads kept: calibrated validation loss {_fmt(heads.get('val_calibrated_loss'), 4)}, "
                        f"the tuned model's {_fmt(heads.get('tuned_val_calibrated_loss'), 4)}")
            elif s.get("kept_start"):
                kept = "frozen model kept: no fine-tuned epoch beat it"
            else:
                kept = "fine-tuned blocks kept: " + ", ".join(s.get("trainable_blocks") or [])
            return f"{kept} ({_fmt(s.get('images_per_second'), 1)} img/s in stage 2)"

        rows = [[_e(s.get("stage", "head")), s.get("epochs_run", ""), s.get("best_epoch", ""), _e(s.get("monitor", "")),
                 _e(f"{s['best_monitor']:.4g}") if isinstance(s.get("best_monitor"), float) else _fmt(s.get("best_monitor")),
                 _fmt(s.get("stopped_early")), _e(outcome(s))] for s in stages]
        out.append(_table(["stage", "epochs run", "best epoch", "monitor", "best value", "stopped early", "outcome"], rows, {1, 2, 4}))
    if not ctx["history"]:
        out.append('<p class="note">metrics.csv is missing or empty.</p>')
    out.append("</section>")
    return "".join(out)


def _metrics(ctx: dict) -> str:
    m = ctx["metrics"]
    out = ['<section id="metrics"><h2>Metrics</h2>']
    if not m.get("n"):
        out.append('<p class="note">No test images were scored.</p></section>')
        return "".join(out)
    ci = m.get("ci") or {}
    note = (f"95% intervals: percentile bootstrap over test images, {ci.get('n_resamples')} resamples, seed {ci.get('seed')}."
            if ci else "No bootstrap intervals recorded.")
    rows = []
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy (mean recall)"), ("roc_auc", "ROC-AUC" + (" (one-vs-rest macro)" if len(ctx["class_names"]) > 2 else "")),
                       ("pr_auc", "PR-AUC (average precision)"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"),
                       ("log_loss", "log loss (lower is better)"), ("brier", "Brier score (lower is better)"), ("ece", "expected calibration error (15 bins)")):
        if key in m:
            rows.append([_e(label), _fmt(m.get(key)), _ci(m, key) if key in ("accuracy", "balanced_accuracy", "roc_auc") else ""])
    for k, v in (m.get("top_k_accuracy") or {}).items():
        rows.append([f"top-{_e(k)} accuracy", _fmt(v), ""])
    out.append(_table(["metric", "value", "95% CI"], rows, {1, 2}))
    out.append(_perfect_note(m))
    out.append(f'<p class="note">{_e(note)} Predictions are the model\'s decisions'
               + (f" (positive = {_e(m.get('positive_class'))} when p ≥ {m['threshold']:.4g})" if "threshold" in m else " (highest probability)") + ".</p>")
    if "at_threshold" in m:
        ops = [m["at_threshold"]] + ([m["at_0_5"]] if m.get("at_0_5") and m["at_0_5"]["threshold"] != m["at_threshold"]["threshold"] else [])
        rows = [[f"{o['threshold']:.4g}" + (" (model's)" if i == 0 else ""), _fmt(o["sensitivity"]), _fmt(o["specificity"]), _fmt(o["ppv"]), _fmt(o["npv"]),
                 o["tp"], o["fn"], o["tn"], o["fp"]] for i, o in enumerate(ops)]
        out.append(f"<h3>Operating points (positive class: {_e(m.get('positive_class'))})</h3>")
        out.append(_table(["threshold", "sensitivity", "specificity", "PPV", "NPV", "TP", "FN", "TN", "FP"], rows, set(range(1, 9))))
    wc = ctx.get("without_copies")
    if wc is not None:
        c = wc["metrics"]
        out.append('<h3 id="without-copies">Without the test images copied from train or validation</h3>')
        rows = [[_e(label), _fmt(m.get(key)), _fmt(c.get(key)), _ci(c, key) if key in ("accuracy", "balanced_accuracy", "roc_auc") else ""]
                for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC-AUC"),
                                   ("log_loss", "log loss"), ("ece", "expected calibration error")) if key in m]
        out.append(_table(["metric", f"all test images (n = {m.get('n')})", f"without copies (n = {c['n']})", "95% CI (without copies)"], rows, {1, 2, 3}))
        out.append(f'<p class="note">{wc["copied"]} test image(s) have an exact or near copy in train or validation (see '
                   '<a href="#leakage">Leakage</a>)' + (f", {wc['relabelled']} of them under another class there" if wc["relabelled"] else "")
                   + ". A copy with the same label measures memory rather than generalisation; one filed under another class measures the "
                   "labels. The second column scores the same predictions without those images; neither column is the single truth when "
                   "the labels conflict.</p>")
    pc = m.get("per_class") or {}
    auc_pc = m.get("roc_auc_per_class") or {}
    rows = [[_e(c), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]] + ([_fmt(auc_pc.get(c))] if auc_pc else []) for c, v in pc.items()]
    out.append("<h3>Per class</h3>")
    out.append(_table(["class", "precision", "recall (sensitivity)", "F1", "support"] + (["ROC-AUC (one vs rest)"] if auc_pc else []), rows, {1, 2, 3, 4, 5}))
    cm = m.get("confusion_matrix")
    if cm:
        labels = cm["labels"]
        rows = [[f"<b>{_e(t)}</b>"] + list(r) for t, r in zip(labels, cm["counts"])]
        out.append("<h3>Confusion matrix (rows: true, columns: predicted)</h3>")
        out.append(_table(["true \\ predicted"] + labels, rows, set(range(1, len(labels) + 1))))
    out.append("</section>")
    return "".join(out)


def _cross_validation(ctx: dict) -> str:
    return cv_section(ctx["cv"], ctx["metrics"])  # "" without --cv (imgclf.report.cv)


def _plots(ctx: dict) -> str:
    p = ctx["plots"]
    binary = len(ctx["class_names"]) == 2
    out = ['<section id="plots"><h2>Plots</h2>']
    out.append(_figure(p.get("confusion_matrix"), "confusion matrix", "Confusion matrix: counts and row-normalised (each row = recall of that true class)."))
    out.append('<div class="grid2">')
    out.append(_figure(p.get("roc"), "ROC curve", "ROC curve" + (" with the model's operating point (circle) and 0.5 (square)." if binary else ", one vs rest per class.")))
    out.append(_figure(p.get("pr"), "precision-recall curve", "Precision-recall" + (" with the operating point(s); dashed: prevalence." if binary else ", one vs rest per class.")))
    out.append(_figure(p.get("reliability"), "reliability diagram", "Reliability: accuracy vs confidence of the predicted class; bars below the diagonal = over-confident."))
    out.append(_figure(p.get("per_class_f1"), "per-class F1", "F1 per class with precision and recall ticks."))
    out.append("</div></section>")
    return "".join(out)


def _mistakes(ctx: dict) -> str:
    out = ['<section id="mistakes"><h2>Worst mistakes</h2>']
    worst = ctx["worst"]
    if not ctx["n_pred"]:
        out.append('<p class="note">test_predictions.csv is missing or empty: nothing to show.</p></section>')
        return "".join(out)
    if not worst:
        out.append('<div class="ok">No test image was misclassified.</div></section>')
        return "".join(out)
    gallery = ctx["plots"].get("worst_mistakes") is not None
    out.append(f'<p>The {len(worst)} misclassified test images with the highest loss (−log p(true class))'
               + (", each with its Grad-CAM heatmap for the <i>predicted</i> class: where the model found the evidence it acted on." if gallery else ".")
               + "</p>")
    if ctx["gradcam_note"]:
        out.append(f'<p class="note">{_e(ctx["gradcam_note"])}</p>')
    out.append(_figure(ctx["plots"].get("worst_mistakes"), "worst mistakes with Grad-CAM", "Left: the model's input crop; right: Grad-CAM overlay (red = strongest evidence)."))
    rows = [[i + 1, f"<code>{_e(w['path'])}</code>", _e(w["true"]), _e(w["predicted"]), _fmt(w["p_pred"], 3), _fmt(w["p_true"], 3), _fmt(w["loss"], 3)]
            for i, w in enumerate(worst)]
    out.append(_table(["#", "file", "true", "predicted", "p(predicted)", "p(true)", "loss"], rows, {0, 4, 5, 6}))
    out.append(_nearest_cases_html(ctx))
    out.append("</section>")
    return "".join(out)


def _nearest_cases_html(ctx: dict) -> str:
    """The worst mistakes beside their most similar training cases (thumbnails from the model's
    similar-cases index): a mistake whose neighbours carry the predicted label points at
    look-alike classes or mislabelled training images."""
    out = ['<h3 id="nearest-cases">Nearest training cases of the worst mistakes</h3>']
    nearest = ctx.get("nearest") or []
    if not nearest:
        out.append(f'<p class="note">{_e(ctx.get("nearest_note") or "No nearest training cases to show.")}</p>')
        return "".join(out)
    out.append("<p>Each worst mistake (by loss, as in the table above) with the training images nearest to it in the model's feature space "
               "(cosine similarity of the backbone features predict computes). Green: the case carries the image's true label; red: another label.</p>")
    rows = []
    for i, (w, cases) in enumerate(nearest):
        cells = [f"<td class=\"num\">{i + 1}</td>", f"<td>{_img_tag(w.get('thumb'), w['path'])}<code>{_e(Path(w['path']).name)}</code><br>"
                 f"true <b>{_e(w['true'])}</b><br>predicted <b>{_e(w['predicted'])}</b> ({_fmt(w['p_pred'], 2)})</td>"]
        for c in cases:
            cls = "same" if c["label"] == w["true"] else "other"
            cells.append(f'<td class="{cls}">{_img_tag(c["thumb"], c["path"])}<b>{_e(c["label"])}</b><br>{_fmt(c["similarity"], 3)}<br>'
                         f'<span class="note">{_e(Path(c["path"]).name)}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    k = max(len(c) for _, c in nearest)
    head = "".join(["<th>#</th><th>test image</th>", *(f"<th>neighbour {j + 1}</th>" for j in range(k))])
    out.append(f'<table class="cases"><tr>{head}</tr>{"".join(rows)}</table>')
    if ctx.get("nearest_note"):
        out.append(f'<p class="note">{_e(ctx["nearest_note"])}</p>')
    return "".join(out)


def _img_tag(uri: str | None, path: str) -> str:
    return f'<img src="{uri}" alt="{_e(Path(path).name)}">' if uri else '<span class="note">(no picture)</span><br>'


def _nearest_cases(ctx: dict, run_dir: Path, clf, k: int = 5) -> tuple[list, str]:
    """[(worst mistake, its k nearest training cases as dicts with a thumbnail data: URI)], note."""
    worst = ctx["worst"]
    if not worst:
        return [], ""
    model = ctx["model"]
    if clf is None and not (model and model.neighbors):
        return [], "The model has no similar-cases index (trained with --no-neighbors or by an older imgclf)."
    try:
        if clf is None:
            from imgclf.model.classifier import Classifier

            clf = Classifier.load(run_dir)
        index = clf.neighbor_index()
        found = clf.neighbors([w["path"] for w in worst], k)
    except Exception as e:  # noqa: BLE001 - the rest of the report stands without this part
        return [], f"Nearest training cases not available: {str(e).splitlines()[0] if str(e) else type(e).__name__}."
    out, gone = [], 0
    for w, cases in zip(worst, found):
        if cases is None:
            gone += 1
            continue
        shown = [{**c.to_dict(), "thumb": _data_uri(index.thumbnail(c.index), "image/jpeg") if index.thumbnail(c.index) else None} for c in cases]
        out.append(({**w, "thumb": _thumb_uri(w["path"], 64)}, shown))
    note = f"{gone} worst mistake(s) could not be read again (moved or deleted since the run)." if gone else ""
    return out, note


def _environment(ctx: dict) -> str:
    cfg = ctx["config"]
    env = dict(cfg.get("environment") or {})
    out = ['<section id="environment"><h2>Environment</h2>']
    fs = cfg.get("fit_summary") or {}
    timing = {
        "total wall time (train command)": f"{cfg['wall_seconds']:.1f} s" if isinstance(cfg.get("wall_seconds"), (int, float)) else "n/a",
        "feature extraction": f"{fs['feature_seconds']:.1f} s" if isinstance(fs.get("feature_seconds"), (int, float)) else "n/a",
        "fit (features + training)": f"{fs['fit_seconds']:.1f} s" if isinstance(fs.get("fit_seconds"), (int, float)) else "n/a",
        "backbone engine": cfg.get("backbone_engine"),
    }
    out.append(_kv(timing))
    out.append("<h3>Versions and machine (training run)</h3>")
    out.append(_kv(env))
    from imgclf._version import __version__

    out.append(f'<p class="note">Report generated {_e(ctx["generated"])} by imgclf {_e(__version__)} in {_e(ctx["report_seconds"])} s.</p>')
    logs = ctx["log_lines"]
    if logs:
        out.append("<details><summary>train.log (last lines)</summary><pre>" + _e("\n".join(logs)) + "</pre></details>")
    out.append("</section>")
    return "".join(out)


# --------------------------------------------------------------------------- main


def _kept_stage(config: dict) -> str | None:
    """The stage whose model the run delivered: stage 1's when stage 2 ran but the frozen heads
    beat it or no tuned epoch beat its start; None (the last best epoch) otherwise."""
    stages = (config.get("fit_summary") or {}).get("stages") or []
    if len(stages) > 1 and ((stages[1].get("frozen_heads") or {}).get("kept") or stages[1].get("kept_start")):
        return str(stages[0].get("stage") or "head")
    return None


def _make_plots(ctx: dict, plots_dir: Path) -> dict[str, Path]:
    from imgclf.evaluation import plots

    m, names = ctx["metrics"], ctx["class_names"]
    out: dict[str, Path] = {}

    def attempt(key: str, fn, *a, **kw):
        try:
            out[key] = fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - one broken plot must not lose the report
            log.warning("report: plot %s failed: %s", key, str(e).splitlines()[0] if str(e) else type(e).__name__)

    attempt("training_curves", plots.training_curves, ctx["history"], plots_dir / "training_curves.png", kept_stage=_kept_stage(ctx["config"]))
    if m.get("confusion_matrix"):
        attempt("confusion_matrix", plots.confusion_matrices, m["confusion_matrix"]["counts"], m["confusion_matrix"]["labels"], plots_dir / "confusion_matrix.png")
    if m.get("per_class"):
        attempt("per_class_f1", plots.per_class_f1, m["per_class"], plots_dir / "per_class_f1.png")
    y, probs = ctx["y_true"], ctx["probs"]
    if len(y):
        t = m.get("threshold")
        t = 0.5 if t is None or len(names) != 2 else float(t)
        attempt("roc", plots.roc_curves, y, probs, names, plots_dir / "roc.png", threshold=t)
        attempt("pr", plots.pr_curves, y, probs, names, plots_dir / "pr.png", threshold=t)
        attempt("reliability", plots.reliability_diagram, y, probs, plots_dir / "reliability.png")
    return out


def _worst(ctx: dict, n: int) -> list[dict]:
    from imgclf.evaluation.thresholds import apply_threshold

    names = ctx["class_names"]
    y, probs = ctx["y_true"], ctx["probs"]
    if not len(y):
        return []
    threshold = ctx["metrics"].get("threshold") if len(names) == 2 else None
    pred = apply_threshold(probs, threshold)
    p_true = probs[np.arange(len(y)), y]
    loss = -np.log(np.clip(p_true, 1e-12, 1.0))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-loss[wrong], kind="stable")][:n]
    return [
        {"path": ctx["paths"][i], "true": names[y[i]], "predicted": names[pred[i]], "p_pred": float(probs[i, pred[i]]),
         "p_true": float(p_true[i]), "loss": float(loss[i])}
        for i in wrong
    ]


def _gradcam_grid(ctx: dict, run_dir: Path, clf, plots_dir: Path) -> tuple[Path | None, str]:
    """Worst-mistakes grid with Grad-CAM overlays; returns (png, note for the reader)."""
    from imgclf.evaluation import plots
    from imgclf.data.imaging import load_rgb
    from imgclf.data.preprocess import resize_and_crop

    worst = ctx["worst"]
    if not worst:
        return None, ""
    note = ""
    if clf is None:
        try:
            from imgclf.model.classifier import Classifier

            clf = Classifier.load(run_dir)
        except Exception as e:  # noqa: BLE001 - the report still shows the images
            note = f"Grad-CAM not available: the model could not be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__})."
            clf = None
    prep = ctx["model"].preprocessing if ctx["model"] else None
    cells, missing = [], 0
    for w in worst:
        try:
            img = load_rgb(w["path"])
        except Exception:  # noqa: BLE001 - moved or deleted since training
            missing += 1
            continue
        crop = resize_and_crop(img, prep) if prep else img
        images = [crop]
        if clf is not None:
            try:
                from imgclf.explain.gradcam import gradcam, overlay

                heat, _, _ = gradcam(clf, img, w["predicted"])
                images.append(overlay(crop, heat))
                if not float(heat.max()) > 0:
                    w["cam_note"] = "no region raises this class's score"
            except ValueError as e:
                note = f"Grad-CAM not available: {str(e).splitlines()[0]}"
                clf = None
        caption = f"{Path(w['path']).name}\ntrue {w['true']} → predicted {w['predicted']} (p={w['p_pred']:.2f})"
        if w.get("cam_note"):
            caption += f"\nGrad-CAM: {w['cam_note']}"
        cells.append({"images": images, "caption": caption, "bad": True})
    if missing:
        note = (note + " " if note else "") + f"{missing} image(s) no longer exist at their recorded path."
    if not cells:
        return None, note or "The images are no longer at their recorded paths."
    return plots.image_grid(cells, plots_dir / "worst_mistakes.png", columns=2 if len(cells) > 1 else 1), note


def write_run_report(run_dir: Path, *, clf=None, gradcam_images: int = 8) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.html`` (atomically); returns the HTML path.

    ``clf``: the trained classifier when the caller has it (saves loading it again for
    Grad-CAM); ``gradcam_images``: how many of the worst mistakes to show (0: none).
    """
    from imgclf.fileio import atomic_write_bytes

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a run folder")
    if gradcam_images < 0:
        raise ValueError("--gradcam-images must be >= 0")
    config = _read_json(run_dir / layout.CONFIG, required=True)
    metrics = _read_json(run_dir / layout.TEST_METRICS, required=True)
    model = _read_model_meta(run_dir / layout.MODEL_META)
    class_names = list((model.class_names if model else None) or (config.get("dataset") or {}).get("class_names") or (metrics.get("confusion_matrix") or {}).get("labels") or [])
    if not class_names:
        raise ValueError(f"{run_dir}: no class names in model.json, config.json or test_metrics.json")
    paths, y_true, probs = _predictions(_read_csv(run_dir / layout.TEST_PREDICTIONS), class_names)
    ctx = {
        "config": config, "metrics": metrics, "model": model, "class_names": class_names,
        "history": _read_csv(run_dir / layout.EPOCH_METRICS) or [],
        "paths": paths, "y_true": y_true, "probs": probs, "n_pred": len(y_true),
        "skipped": _read_csv(run_dir / layout.SKIPPED) or [],
        "log_lines": _tail(run_dir / layout.LOG),
    }

    root = (config.get("dataset") or {}).get("root")
    ctx["inspection"], ctx["inspection_note"] = None, ""
    if root and Path(root).is_dir():
        from imgclf.data.inspection import inspect_dataset

        try:
            manifest = (config.get("dataset") or {}).get("manifest")  # a manifest run: inspect the listed images, not the CSV's folder
            source = {"manifest": manifest} if manifest and Path(manifest).is_file() else {"root": root}
            ctx["placed"] = placed = _run_placement(run_dir / layout.SPLIT)
            ctx["inspection"] = inspect_dataset(**source, split_of={p: split for p, (split, _) in placed.items()} or None)
        except Exception as e:  # noqa: BLE001 - report the rest
            ctx["inspection_note"] = f"dataset check failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    else:
        ctx["inspection_note"] = f"the dataset folder {root} no longer exists; problems and leakage were not checked"

    warns = []
    insp = ctx["inspection"]
    ctx["without_copies"] = wc = _without_copies(ctx)
    if wc is not None:
        c = wc["metrics"]
        warns.append(f"<b>{wc['copied']} test image(s) are copies of train or validation images</b>"
                     + (f" ({wc['relabelled']} of them filed there under another class)" if wc["relabelled"] else "")
                     + f": without them (n = {c['n']}) accuracy {_fmt(c['accuracy'])}, balanced accuracy {_fmt(c['balanced_accuracy'])}"
                     + (f", ROC-AUC {_fmt(c['roc_auc'])}" if c.get("roc_auc") is not None else "")
                     + '. See <a href="#without-copies">Metrics</a>.')
    if insp is not None:
        near_counts = (insp.get("near_duplicates") or {}).get("counts", {})
        if near_counts.get("test~train"):
            warns.append(f"<b>{near_counts['test~train']} test image(s) have near-copies in train</b> (re-encoded or resized "
                         'versions of training images): test metrics are likely optimistic. See <a href="#leakage">Leakage</a>.')
        for w in insp["warnings"]:
            if w.startswith("LEAKAGE:"):
                warns.append(_e(w))
        for k, v in near_counts.items():
            if k != "test~train":
                later, earlier = k.split("~")
                warns.append(f"{v} {_e(later)} image(s) have near-copies in {_e(earlier)}.")
        if insp["problems"]:
            warns.append(f"{len(insp['problems'])} file(s) in the dataset folder cannot be decoded.")
    elif ctx["inspection_note"]:
        warns.append(_e(f"Leakage not checked: {ctx['inspection_note']}."))
    if ctx["skipped"]:
        warns.append(f"{len(ctx['skipped'])} file(s) were skipped during the run (unreadable).")
    for c, v in (metrics.get("per_class") or {}).items():
        if v.get("support") == 0:
            warns.append(f"Class {_e(c)} has no test images: its recall is undefined.")
    ctx["summary_warnings"] = warns

    plots_dir = run_dir / layout.PLOTS
    ctx["plots"] = _make_plots(ctx, plots_dir)
    ctx["worst"] = _worst(ctx, gradcam_images or 8)  # the table lists 8 even without the gallery
    ctx["gradcam_note"] = ""
    if gradcam_images > 0:
        png, ctx["gradcam_note"] = _gradcam_grid(ctx, run_dir, clf, plots_dir)
        if png:
            ctx["plots"]["worst_mistakes"] = png
    else:
        ctx["gradcam_note"] = "Grad-CAM gallery switched off (--gradcam-images 0)."
    ctx["nearest"], ctx["nearest_note"] = _nearest_cases(ctx, run_dir, clf)
    ctx["cv"] = _read_json(run_dir / layout.CV_SUMMARY)  # None unless the run had --cv
    ctx["generated"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ctx["report_seconds"] = f"{time.perf_counter() - t0:.1f}"

    title = f"imgclf report — {run_dir.name}"
    nav_sections = list(SECTIONS)
    if ctx["cv"]:  # a section of --cv runs only, after Metrics
        nav_sections.insert(nav_sections.index(("metrics", "Metrics")) + 1, CV_SECTION)
    nav = "".join(f'<a href="#{sid}">{_e(label)}</a>' for sid, label in nav_sections)
    body = "".join(f(ctx) for f in (_summary, _dataset, _configuration, _training, _metrics, _cross_validation, _plots, _mistakes, _environment))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>Run folder <code>{_e(os.path.abspath(run_dir))}</code> · "
        f"{_e(config.get('command', 'train'))} · generated {_e(ctx['generated'])}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
    out = run_dir / layout.REPORT
    atomic_write_bytes(out, page.encode("utf-8"))
    log.debug("report written: %s (%.1f s)", out, time.perf_counter() - t0)
    return out
