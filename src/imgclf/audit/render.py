"""What the audit writes: ``audit.csv``, a self-contained ``audit.html`` and a thumbnail grid.

The HTML shows each top suspect beside a few typical images of its given class and of the
class the out-of-fold head suggests, so a wrong label is seen at a glance; thumbnails are
embedded as small JPEG data URIs, so the page opens anywhere without the dataset.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from imgclf.audit.core import AUDIT_COLUMNS, ISSUE_DUPLICATE_CONFLICT, ISSUE_LABEL, ISSUE_OUTLIER, AuditResult
from imgclf.data.imaging import load_rgb
from imgclf.fileio import atomic_write_bytes, write_csv, write_json

THUMB = 112
TYPICAL_PER_CLASS = 3

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
img{width:auto;height:auto;max-width:112px;max-height:112px;border:1px solid #ccc;margin:1px}
.suspect img{border:3px solid #c0392b}.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.muted{color:#777;font-size:12px}
"""


def _thumbnail(path: str, size: int = THUMB) -> Image.Image | None:
    try:
        img = load_rgb(path, draft_size=size * 2)
    except Exception:  # noqa: BLE001 - a file that cannot be decoded just gets no picture
        return None
    img.thumbnail((size, size))
    return img


def _data_uri(path: str) -> str | None:
    img = _thumbnail(path)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(path: str, root: Path, cache: dict[str, str | None]) -> str:
    if path not in cache:
        cache[path] = _data_uri(path)
    uri = cache[path]
    name = html.escape(_relative(path, root))
    return f'<img src="{uri}" alt="{name}" title="{name}">' if uri else f'<span class="muted">{name} (unreadable)</span>'


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return path


def audit_html(result: AuditResult, top: int = 50) -> str:
    """The page: summary, the ``top`` label suspects with typical images, outliers, duplicates."""
    root, thumbs = result.root, {}
    s = result.summary()
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>imgclf audit: {esc(str(root))}</title><style>{_CSS}</style></head><body>",
             f"<h1>Data audit: {esc(str(root))}</h1>",
             f"<p>{s['images']} training/validation images, {len(result.class_names)} classes. Out-of-fold probabilities from "
             f"{result.folds}-fold stratified cross-validation (seed {result.seed}) of a {esc(result.head)} on frozen "
             f"<code>{esc(result.backbone)}</code> features (out-of-fold accuracy {s['out_of_fold_accuracy']:.3f}); label issues by "
             "confident learning (cleanlab <code>find_label_issues</code>), ranked by label quality = the out-of-fold probability of "
             "the given label. Nothing in the dataset was changed.</p>",
             "<p>Issues: " + ", ".join(f"{esc(k)}: {v}" for k, v in s["issues"].items()) + f"; skipped unreadable: {s['skipped']}. "
             "To train without the images you reject, list their paths in a file (or keep their rows of audit.csv) and run "
             "<code>imgclf train DATA --exclude FILE</code>.</p>"]
    suspects = result.issues(ISSUE_LABEL)[:top]
    parts.append(f"<h2>Top {len(suspects)} label suspects</h2>")
    if suspects:
        parts.append("<table><tr><th>#</th><th>suspect</th><th>given → suggested</th><th>typical of given class</th><th>typical of suggested class</th></tr>")
        for rank, r in enumerate(suspects, 1):
            parts.append(
                f"<tr><td>{rank}</td><td class='suspect'>{_img(r['path'], root, thumbs)}<div class='mono'>{esc(_relative(r['path'], root))}</div></td>"
                f"<td><b>{esc(r['given_label'])}</b> → <b>{esc(r['suggested_label'])}</b><br>label quality {r['label_quality']:.3f}<br>"
                f"p(suggested) {r['suggested_probability']:.3f}<br><span class='muted'>{esc(r['issue'])}</span></td>"
                f"<td>{''.join(_img(p, root, thumbs) for p in result.typical(r['given_label'], TYPICAL_PER_CLASS))}</td>"
                f"<td>{''.join(_img(p, root, thumbs) for p in result.typical(r['suggested_label'], TYPICAL_PER_CLASS))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No label issues found.</p>")
    for kind, title in ((ISSUE_OUTLIER, "Outliers (far from every other image in feature space)"),
                        (ISSUE_DUPLICATE_CONFLICT, "Identical images with different labels")):
        rows = sorted(result.issues(kind), key=lambda r: r["outlier_score"] if kind == ISSUE_OUTLIER else r["path"])[:top]
        if rows:
            parts.append(f"<h2>{esc(title)}: {len(result.issues(kind))}</h2><p>")
            parts.append("".join(f"<span title='{esc(r['given_label'])}'>{_img(r['path'], root, thumbs)}</span>" for r in rows))
            parts.append("</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def suspects_grid(result: AuditResult, n: int = 20, columns: int = 5, size: int = 180) -> Image.Image:
    """The ``n`` worst-quality label suspects as one picture, each captioned with its given
    label (red), the suggested one (black) and the label quality."""
    rows = result.issues(ISSUE_LABEL)[:n] or result.rows[:n]
    caption, chars = 44, size // 6  # Pillow's default bitmap font is about 6 px a character
    grid_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * size, grid_rows * (size + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(rows):
        x, y = (k % columns) * size, (k // columns) * (size + caption)
        img = _thumbnail(r["path"], size - 8)
        if img is not None:
            sheet.paste(img, (x + (size - img.width) // 2, y + 4))
        draw.text((x + 4, y + size - 2), r["given_label"][:chars], fill="#c0392b")
        draw.text((x + 4, y + size + 11), f"-> {r['suggested_label']}"[:chars], fill="black")
        draw.text((x + 4, y + size + 24), f"label quality {r['label_quality']:.2g}", fill="#555")
    return sheet


def write_audit(result: AuditResult, out_dir: str | os.PathLike, top: int = 50) -> dict[str, Path]:
    """``audit.csv`` (every audited image, worst label quality first), ``audit.html``,
    ``audit.json`` (the summary) and ``skipped.csv`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"csv": out / "audit.csv", "html": out / "audit.html", "json": out / "audit.json", "skipped": out / "skipped.csv"}
    write_csv(paths["csv"], result.rows, AUDIT_COLUMNS)
    write_csv(paths["skipped"], [{"path": p, "error": e} for p, e in result.skipped], ["path", "error"])
    write_json(paths["json"], result.summary())
    atomic_write_bytes(paths["html"], audit_html(result, top).encode("utf-8", "surrogateescape"))
    return paths


def write_suspects_png(result: AuditResult, path: str | os.PathLike, n: int = 20, colors: int | None = None) -> Path:
    """The suspects grid as a PNG; ``colors`` (e.g. 256) stores a palette image, a third of the size."""
    sheet = suspects_grid(result, n)
    if colors:
        sheet = sheet.quantize(colors, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


__all__ = ["audit_html", "suspects_grid", "write_audit", "write_suspects_png"]
