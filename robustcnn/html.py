"""``report.html``: one self-contained page of a report that opens in any browser, offline.

The page is built from the document :func:`robustcnn.report.write_report` saves as ``report.json`` (in memory, with
NaN, or read back from JSON, with null) and the pictures next to it: ``accuracy_vs_eps.png`` and ``gallery.png`` are
embedded as base64 ``data:`` URIs, the style sheet is inline, and there is no script and no external resource.
Every section has a stable id: ``summary``, ``model``, ``curve``, ``results`` (one ``eps-<i>`` table per budget),
``other``, ``warnings``, ``gallery``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

from robustcnn.fsutil import HTML_GENERATOR, atomic_write
from robustcnn.report import NO_ATTACK_AT_ZERO, _num, _pct

HTML_FILE = "report.html"

_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #f6f7f9;
       margin: 0; }
main { max-width: 1160px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 18px 22px; margin: 18px 0; }
.sub { color: #5b6474; margin: 0 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 10px; }
.card { flex: 1 1 150px; border: 1px solid #e3e6eb; border-radius: 6px; padding: 10px 14px; background: #fafbfc; }
.card .label { font-size: 12px; color: #5b6474; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; font-size: 14px; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e8ebef; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; font-weight: 600; white-space: normal; vertical-align: bottom; }
table.narrow { width: auto; min-width: 320px; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.total td { font-weight: 700; border-top: 2px solid #c9ced6; }
h3 { font-size: 16px; margin: 18px 0 6px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { color: #5b6474; } dd { margin: 0; font-family: ui-monospace, monospace; font-size: 13px; word-break: break-all; }
img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
ul.warnings { margin: 0; padding-left: 0; list-style: none; }
ul.warnings li { background: #fff6e0; border-left: 4px solid #e0a100; padding: 8px 12px; margin: 6px 0; }
p.ok { background: #e9f7ee; border-left: 4px solid #2e9d57; padding: 8px 12px; margin: 0; }
footer { color: #7a8292; font-size: 12px; text-align: center; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _image(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` inlined, or a note when it is not there."""
    if not path.is_file():
        return f'<p class="sub">{_e(alt)}: not drawn.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], *, text_columns: int = 1,
           total: Iterable[str] | None = None, narrow: bool = False) -> str:
    """A table of already escaped cells; the first ``text_columns`` columns are left-aligned."""
    head = "".join(f"<th{' class=text' if i < text_columns else ''}>{h}</th>" for i, h in enumerate(header))
    body = ["<tr>" + "".join(f"<td{' class=text' if i < text_columns else ''}>{c}</td>" for i, c in enumerate(row))
            + "</tr>" for row in rows]
    if total is not None:
        body.append('<tr class="total">' + "".join(f"<td>{c}</td>" for c in total) + "</tr>")
    kind = ' class="narrow"' if narrow else ""
    return f'<div class="scroll"><table{kind}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _card(label: str, value: str) -> str:
    return f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div></div>'


def _summary(doc: dict) -> str:
    req = doc["request"]
    results = sorted(doc["results"], key=lambda r: r["eps"])
    worst = min((r["robust_accuracy"] for r in results), default=None)
    attacks = req.get("suite") or ", ".join(req.get("attacks") or [])
    cards = _card("clean accuracy", _pct(doc["clean_accuracy"])) + _card("worst-case robust accuracy", _pct(worst)) \
        + _card("samples", str(doc["n"])) + _card("warnings", str(len(doc["warnings"])))
    table = _table(["eps", "worst-case robust accuracy"],
                   ([f"{r['eps']:g}", _pct(r["robust_accuracy"])] for r in results), narrow=True)
    return (f'<section id="summary"><h1>Robustness report: {_e(req["dataset"])}</h1>'
            f'<p class="sub">norm {_e(req["norm"])} &middot; attacks {_e(attacks)} &middot; seed {_e(req["seed"])}'
            f' &middot; budgets in pixel units of [0, 1]</p><div class="cards">{cards}</div>'
            f"<h3>Worst case per budget</h3>{table}</section>")


def _model(doc: dict) -> str:
    req = doc["request"]
    rows = [("model sha256", req.get("checkpoint_sha256", ""))]
    for key, value in (doc.get("model") or {}).items():
        if value is not None:
            rows.append((key, value))
    rows += [(f"{name} version", v) for name, v in (doc.get("versions") or {}).items()]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f'<section id="model"><h2>Model and data</h2><dl>{items}</dl></section>'


def _results(doc: dict) -> str:
    parts = ['<section id="results"><h2>Attacks per budget</h2><p class="sub">A cascade: each attack sees only the '
             "samples still robust after the attacks before it. Passes are forward and backward passes of the model "
             "per sample seen.</p>"]
    for i, r in enumerate(doc["results"]):
        if not r["attacks"]:
            parts.append(f'<div id="eps-{i}"><h3>eps = {r["eps"]:g}</h3><p>{_e(NO_ATTACK_AT_ZERO)}</p></div>')
            continue
        rows = [[_e(st["name"]), _e(st["kind"]), "skipped" if st.get("skipped") else str(st["seen"]),
                 _pct(st["success_rate"]), _pct(after), _pct(alone),
                 f"{_num(st['queries_mean'])} / {_num(st['queries_median'])}", _num(st.get("gradients_mean")),
                 f"{_count(st.get('forward_passes'))} / {_count(st.get('backward_passes'))}",
                 _num(st["max_norm"]), f"{st['seconds']:.1f} s"]
                for st, after, alone in zip(r["attacks"], r["accuracy_after"], r["accuracy_alone"])]
        total = ["worst case", "", "", "", _pct(r["robust_accuracy"]), "", "", "", "", "", ""]
        parts.append(f'<div id="eps-{i}"><h3>eps = {r["eps"]:g}</h3>' + _table(
            ["attack", "kind", "seen", "success rate", "accuracy after", "accuracy alone",
             "forward passes mean / median", "backward passes mean", "passes in all, forward / backward",
             "max norm", "time"],
            rows, text_columns=2, total=total) + "</div>")
    if doc.get("passes"):
        p = doc["passes"]
        parts.append("<h3>Cost in passes of the model, over all samples (forward / backward)</h3>" + _table(
            list(p), [[f"{_count(v['forward'])} / {_count(v['backward'])}" for v in p.values()]], text_columns=0))
    return "".join(parts) + "</section>"


def _count(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _other(doc: dict) -> str:
    rows = [[_e(st["name"]), _e(st["kind"]), _pct(st["accuracy_under_attack"]), _pct(st["success_rate"]),
             _num(st["median_norm"]), f"{_num(st['queries_mean'])} / {_num(st['queries_median'])}",
             f"{st['seconds']:.1f} s"] for st in doc["other_threat_models"]]
    body = _table(["attack", "kind", "accuracy under attack", "success rate", "median size",
                   "forward passes mean / median", "time"], rows, text_columns=2) if rows \
        else '<p class="sub">None in this report.</p>'
    return f'<section id="other"><h2>Other threat models (not bounded by eps)</h2>{body}</section>'


def _warnings(doc: dict) -> str:
    if doc["warnings"]:
        body = '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in doc["warnings"]) + "</ul>"
    else:
        body = '<p class="ok">No warning: no sign of gradient masking was found.</p>'
    return f'<section id="warnings"><h2>Sanity checks</h2>{body}</section>'


def render_html(doc: dict, out_dir: str | Path) -> str:
    """The self-contained HTML page of the report ``doc``, with the pictures found in ``out_dir`` embedded."""
    out_dir = Path(out_dir)
    title = f"Robustness report: {doc['request']['dataset']}"
    curve = _image(out_dir / "accuracy_vs_eps.png", "accuracy against eps")
    gallery = _image(out_dir / "gallery.png", "adversarial examples")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">', HTML_GENERATOR,
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body><main>",
        _summary(doc), _model(doc),
        f'<section id="curve"><h2>Accuracy against the budget</h2>{curve}</section>',
        _results(doc), _other(doc), _warnings(doc),
        '<section id="gallery"><h2>Adversarial examples at the smallest budget</h2><p class="sub">Rows: original, '
        f"adversarial (with the predicted class), perturbation amplified.</p>{gallery}</section>",
        f"<footer>robustcnn {_e((doc.get('versions') or {}).get('robustcnn', ''))}</footer>",
        "</main></body></html>\n",
    ])


def write_html(out_dir: str | Path, doc: dict) -> Path:
    """Write ``report.html`` into ``out_dir`` (atomically) and return its path."""
    page = render_html(doc, out_dir).encode()
    return atomic_write(Path(out_dir) / HTML_FILE, lambda f: f.write(page))
