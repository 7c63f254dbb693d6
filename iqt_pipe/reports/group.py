"""``group.html``: the QC table of ``group_qc.tsv`` with outliers highlighted, a colour-FA
thumbnail per run, links to the participants' reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from iqt_pipe import __version__
from iqt_pipe.io import InputError, read_tsv, save_text
from iqt_pipe.qc import (
    COLUMN_MEANINGS,
    CORRELATED_NOISE,
    DEFAULT_SD_THRESHOLD,
    ENTITIES,
    OUTLIER_METRICS,
    OUTLIER_Z,
)
from iqt_pipe.reports import figures as F
from iqt_pipe.reports.discover import figure_path, find_runs, run_label
from iqt_pipe.reports.markup import escape, relpath, style_sheet, to_float

#: Group-table columns shown: (metric, header, kind).
_GROUP_SHOWN = (
    ("sdtot_wm_median", "total sd, WM median (10⁻⁴ mm²/s)", "sd"),
    ("sdtot_wm_p95", "total sd, WM p95 (10⁻⁴ mm²/s)", "sd"),
    ("sdtot_frac_above", "brain voxels above threshold (%)", "pct"),
    ("fa_wm_median_ratio", "FA WM median, SR / native", "num"),
    ("md_wm_median_ratio", "MD WM median, SR / native", "num"),
    ("noise_corr_max", "noise correlation between neighbours, max", "corr"),
)


def _thumbnail(out: Path, entities: dict[str, Any]) -> Path | None:
    """The run's thumbnail, drawn from its derivatives when the subject report has not been built."""
    path = figure_path(out, entities, "thumbnail", ".png")
    if path.exists():
        return path
    run = next((r for r in find_runs(out, entities["subject"]) if r.name == run_label(entities)), None)
    if run is None or "sr_tensor" not in run.files or "mask" not in run.files:
        return None
    try:
        fig, _ = F.thumbnail(F.Volume.load(run.files["sr_tensor"]), F.Volume.load(run.files["mask"]))
        return F.save_figure(fig, path)
    except Exception:  # noqa: BLE001 - the table says "no image"
        return None


def build_group_report(output_dir: str | os.PathLike) -> Path:
    """``output_dir/group.html``: the QC table of ``group_qc.tsv`` (outlier runs and the
    cells that flag them highlighted), a colour-FA thumbnail per run, links to the subject
    reports. Raises :class:`InputError` without ``group_qc.tsv``."""
    out = Path(output_dir).absolute()
    tsv = out / "group_qc.tsv"
    if not tsv.exists():
        raise InputError(f"{out}: no group_qc.tsv to build group.html from; run the group level first")
    rows = read_tsv(tsv)
    body = []
    summary = out / "group_qc.txt"
    n_out = sum(r.get("outlier") == "true" for r in rows)
    assessed = len(rows) >= 3
    body.append(
        f'<p>{len(rows)} run(s) from <a href="group_qc.tsv">group_qc.tsv</a>'
        + (' (<a href="group_qc.txt">summary</a>)' if summary.exists() else "")
        + ". "
        + (
            f"<strong>{n_out}</strong> outlier run(s): robust |z| &gt; {OUTLIER_Z:g} on "
            + ", ".join(f"<code>{m}</code>" for m in OUTLIER_METRICS)
            + "."
            if assessed
            else "Outliers are not assessed: robust z-scores need at least 3 runs."
        )
        + f" Threshold of the fraction column: {F.sci(DEFAULT_SD_THRESHOLD)} mm²/s.</p>"
    )
    header = ["run", "colour FA (SR)", *(h for _, h, _ in _GROUP_SHOWN), "outlier"]
    trs = []
    for row in rows:
        entities = {k: (None if row.get(k) in (None, "", "n/a") else row[k]) for k in ENTITIES}
        name = run_label(entities)
        report = out / f"sub-{entities['subject']}.html"
        linked = (
            (lambda inner, report=report: f'<a href="{escape(report.name)}">{inner}</a>')
            if report.exists()
            else (lambda inner: inner)
        )
        thumb = _thumbnail(out, entities) if entities.get("subject") else None
        img = (
            f'<img class="iqt-thumb" src="{escape(relpath(thumb, out))}" alt="colour FA of {escape(name)}">'
            if thumb
            else "no image"
        )
        cells = [f"<td>{linked(escape(name))}</td>", f"<td>{linked(img)}</td>"]
        for metric, _, kind in _GROUP_SHOWN:
            value = to_float(row.get(metric))
            z = to_float(row.get(f"{metric}_z"))
            shown = (
                "n/a"
                if value is None
                else f"{value / 1e-4:.3g}"
                if kind == "sd"
                else f"{100 * value:.1f}"
                if kind == "pct"
                else f"{value:.3f}"
            )
            flag = (z is not None and abs(z) > OUTLIER_Z) or (
                kind == "corr" and value is not None and value > CORRELATED_NOISE
            )
            ztext = f' <span class="iqt-z">z {z:+.1f}</span>' if z is not None else ""
            cells.append(
                f'<td class="{"iqt-flag" if flag else "iqt-num"}" title="{escape(metric)}">{shown}{ztext}</td>'
            )
        outlier = row.get("outlier") == "true"
        cells.append(
            f"<td>{'yes: ' + escape(row.get('outlier_metrics', '').replace(',', ', ')) if outlier else 'no'}</td>"
        )
        trs.append(f'<tr class="{"iqt-outlier" if outlier else ""}">{"".join(cells)}</tr>')
    table_html = (
        '<table class="iqt-table iqt-group"><thead><tr>'
        + "".join(f"<th>{escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
        + "".join(trs)
        + "</tbody></table>"
    )
    legend = (
        '<p class="iqt-note">Rows in red are outlier runs; red cells are the metrics that flag them '
        f"(robust z = (x − median) / (1.4826·MAD) across runs, |z| &gt; {OUTLIER_Z:g}), and noise correlations "
        f"above {CORRELATED_NOISE:g}, where the scanner interpolated. Click a run or its "
        "image for its report. Column meanings: "
        + "; ".join(f"<code>{m}</code>: {escape(COLUMN_MEANINGS.get(m, ''))}" for m, _, _ in _GROUP_SHOWN)
        + ".</p>"
    )
    summary_html = f"<h2>Summary</h2><pre>{escape(summary.read_text())}</pre>" if summary.exists() else ""
    page = _GROUP_PAGE.format(
        version=escape(__version__),
        css=style_sheet(),
        body="\n".join(body),
        table=table_html,
        legend=legend,
        summary=summary_html,
    )
    return save_text(page, out / "group.html")


_GROUP_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="iqt-pipe {version}">
<link rel="icon" href="data:,">
<title>iqt-pipe: group report</title>
<style>{css}</style>
</head>
<body>
<main>
<h1>iqt-pipe group report</h1>
{body}
{table}
{legend}
{summary}
<footer>Generated by iqt-pipe {version} from the outputs in this folder.</footer>
</main>
</body>
</html>
"""
