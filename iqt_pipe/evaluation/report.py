"""``iqt-eval``'s outputs: the Markdown tables and the plots (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from iqt_pipe.io import MISSING, format_number


def _span(stat: dict | None) -> str:
    """``mean [min, max]`` of a summary statistic, or :data:`~iqt_pipe.io.MISSING` when absent."""
    return MISSING if stat is None else f"{stat['mean']:.3f} [{stat['min']:.3f}, {stat['max']:.3f}]"


def _row(*cells: Any) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: str) -> list[str]:
    """A Markdown table's header and separator lines, from ``"column | column | …"``."""
    columns = [c.strip() for c in header.split("|")]
    return [_row(*columns), "|" + "---|" * len(columns)]


def _mean(values: dict, key: str) -> str:
    return format_number(values.get(key, {}).get("mean"))


_INTRO = (
    "Tensor and MD RMSE in 1e-4 mm²/s over 6 components (tensor) or voxels (MD, FA); ratios are to cubic "
    "B-spline interpolation of the LR tensors on the same voxels. *Interior*: HR voxels whose parent LR "
    "voxel's 5³ neighbourhood lies in the LR brain mask; *exterior*: the rest of the HR brain mask. "
    "*Floor*: the RMS noise of the HR reference itself (WLS delta method from an MP-PCA σ); *corrected* "
    "= sqrt(max(RMSE² − floor², 0))."
)


def markdown(results: dict[str, Any]) -> str:
    """Tables: per mode, the mean over runs per method and the goals; the scans; every run; the
    uncertainty against the training domain; the noise correction against known truth."""
    lines = ["# iqt-eval results", ""]
    settings = {k: v for k, v in results.get("settings", {}).items() if not isinstance(v, list | dict)}
    if settings:
        lines += ["Settings: " + "; ".join(f"{k} = {v}" for k, v in settings.items()), ""]
    lines += [_INTRO, ""]
    for mode, methods in results["summary"].items():
        lines += _mode_section(mode, methods)
    lines += _scans_section(results["records"])
    lines += _runs_section(results["records"])
    lines += _domain_section(results)
    lines += _truth_section(results["records"])
    return "\n".join(lines) + "\n"


def _mode_section(mode: str, methods: dict[str, Any]) -> list[str]:
    """One mode: accuracy per method, the uncertainty of those that have one, the goals."""
    lines = [f"## Mode: {mode} (mean over runs; [min, max] of ratios)", ""]
    lines += _table(
        "method | runs | tensor int. | ratio int. | tensor ext. | ratio ext. | MD brain | FA brain | FA ratio"
    )
    for name, slot in methods.items():
        v = slot["values"]
        means = [
            _mean(v, k) for k in ("tensor_rmse.interior", "tensor_rmse.exterior", "md_rmse.brain", "fa_rmse.brain")
        ]
        spans = [_span(v.get(f"{k}_ratio.{region}")) for k, region in
                 (("tensor_rmse", "interior"), ("tensor_rmse", "exterior"), ("fa_rmse", "brain"))]  # fmt: skip
        lines.append(_row(name, slot["runs"], means[0], spans[0], means[1], spans[1], means[2], means[3], spans[2]))
    lines.append("")
    unc = {n: s["values"] for n, s in methods.items() if "spearman.brain" in s["values"]}
    if unc:
        lines += _table(
            "method | Spearman(sd, err) | cov. 50 % | cov. 80 % | cov. 95 % [min, max] | MD cov. 95 % [min, max] | "
            "RMS error / sd [min, max] | cov. 95 %, scale from other subjects [min, max] | risky AUC | "
            "risky precision | risky recall | risky F1 | lesion AUC (intrinsic / parameter sd)"
        )
        for name, v in unc.items():
            g = [_mean(v, k) for k in ("spearman.brain", "coverage0.5.brain", "coverage0.8.brain")]
            g += [_span(v.get(k)) for k in ("coverage0.95.brain", "md_coverage0.95.brain", "error_sd_ratio.brain")]
            g.append(_span(v.get("coverage0.95_loso.brain")))
            g += [_mean(v, k) for k in ("risky.auc", "risky.precision", "risky.recall", "risky.f1", "lesion.auc")]
            if "lesion.auc_parameter" in v:
                g[-1] += f" ({_mean(v, 'lesion.auc_intrinsic')} / {_mean(v, 'lesion.auc_parameter')})"
            lines.append(_row(name, *g))
        lines.append("")
    goals = {n: s["goals"] for n, s in methods.items() if s.get("goals") and n not in ("nearest", "trilinear", "cubic")}
    if goals:
        lines += ["Goals of issues [SR path] and [SR model] (runs that meet each):", ""]
        for name, g in goals.items():
            lines += [f"- {name}:", *(f"  - {k}: {_goal(v)}" for k, v in g.items())]
        lines.append("")
    return lines


def _goal(g: dict) -> str:
    """A goal's outcome: runs that meet it (all: ✓), or met / NOT met for a pooled goal."""
    if "met" in g:
        return "met" if g["met"] else "NOT met"
    return f"{g['runs_met']}/{g['runs']}" + (" ✓" if g["runs_met"] == g["runs"] else "")


def _scans_section(records: list[dict]) -> list[str]:
    scans = {}
    for rec in records:
        scans.setdefault(rec["run"], rec.get("info", {}))
    lines = [
        "## The scans",
        "",
        "Noise correlation: of the MP-PCA residual between neighbouring voxels along each voxel axis; "
        "≈ 0 for independent noise, 0.5 or more where the scanner interpolated (less detail to recover "
        "than the voxel size suggests).",
        "",
        *_table("run | voxel size (mm) | volumes | b-values (s/mm²) | noise σ | noise correlation x / y / z"),
    ]
    for run, info in scans.items():
        size = " × ".join(f"{v:.2f}" for v in info.get("voxel_size_mm", [])) or MISSING
        corr = " / ".join(format_number(v, ".2f") for v in info.get("noise_neighbour_correlation", [])) or MISSING
        sigma = f"{info['noise_sigma']:.4g}" if "noise_sigma" in info else MISSING
        bvals = ", ".join(map(str, info.get("bvals", []))) or MISSING
        lines.append(_row(run, size, info.get("volumes", MISSING), bvals, sigma, corr))
    return lines


def _runs_section(records: list[dict]) -> list[str]:
    lines = ["", "## Every run", ""]
    lines += _table(
        "run | mode | floor int. | method | tensor int. | corrected int. | ratio int. | tensor ext. | ratio ext. | "
        "FA ratio"
    )
    for rec in records:
        floor = format_number(rec.get("noise_floor", {}).get("interior"))
        for name, s in rec["methods"].items():
            corr = s.get("tensor_rmse_corrected", s.get("tensor_rmse_vs_noisy_reference_corrected", {})).get("interior")
            rmse, ratio = s["tensor_rmse"], s.get("tensor_rmse_ratio", {})
            cells = (rmse.get("interior"), corr, ratio.get("interior"), rmse.get("exterior"), ratio.get("exterior"),
                     s.get("fa_rmse_ratio", {}).get("brain"))  # fmt: skip
            lines.append(_row(rec["run"], rec["mode"], floor, name, *map(format_number, cells)))
    return lines


def _truth_section(records: list[dict]) -> list[str]:
    truth = [r for r in records if r["mode"] == "known-truth"]
    if not truth:
        return []
    lines = [
        "",
        "## Noise correction against known truth",
        "",
        "Known-truth mode scores each method against the noise-free truth and against the noisy series' own "
        "HR fit (raw and noise-corrected), so the correction used in raw mode can be checked.",
        "",
        *_table("run | method | true RMSE int. | vs noisy ref. | corrected | corrected / true"),
    ]
    for rec in truth:
        for name, s in rec["methods"].items():
            t = s["tensor_rmse"].get("interior")
            noisy = s["tensor_rmse_vs_noisy_reference"].get("interior")
            corr = s["tensor_rmse_vs_noisy_reference_corrected"].get("interior")
            lines.append(_row(rec["run"], name, *map(format_number, (t, noisy, corr, corr / t if t else None))))
    return lines


def _domain_section(results: dict[str, Any]) -> list[str]:
    """Does the uncertainty rise with the error, and outside the training domain? Per model:
    the summary over runs, then each run's vendor, domain problems, error and sd."""
    found = {
        (mode, name): slot["domain"]
        for mode, methods in results["summary"].items()
        for name, slot in methods.items()
        if slot.get("domain")
    }
    if not found:
        return []
    lines = [
        "",
        "## Uncertainty and the training domain",
        "",
        "Per run: the RMS over the brain of the parameter and total Frobenius sd (1e-4 mm²/s) beside the "
        "tensor RMSE; *outside*: the run lies outside the model's training domain (scanner vendor, LR voxel "
        "size, b-value, directions; the model card's `training.domain`). Spearman over runs: does the sd rise "
        "with the error from run to run?",
        "",
        *_table(
            "mode | method | runs outside | Spearman(parameter sd, error) | Spearman(total sd, error) | "
            "error ratio inside / outside | parameter sd inside / outside | total sd inside / outside"
        ),
    ]
    for (mode, name), d in found.items():
        pairs = [f"{format_number(d[f'{k}_inside'])} / {format_number(d[f'{k}_outside'])}"
                 for k in ("error_ratio", "parameter_sd", "total_sd")]  # fmt: skip
        spearman = [format_number(d[f"spearman_{k}_sd_error"]) for k in ("parameter", "total")]
        lines.append(_row(mode, name, d["runs_outside"], *spearman, *pairs))
    lines += [
        "",
        *_table(
            "run | mode | method | vendor | outside the training domain | tensor RMSE | ratio | parameter sd | total sd"
        ),
    ]
    for rec in results["records"]:
        for name, s in rec["methods"].items():
            dom, sd = s.get("domain"), s.get("uncertainty", {}).get("sd_rms", {})
            if dom is None:
                continue
            numbers = (s["tensor_rmse"].get("brain"), s.get("tensor_rmse_ratio", {}).get("brain"),
                       sd.get("parameter"), sd.get("total"))  # fmt: skip
            lines.append(_row(rec["run"], rec["mode"], name, dom.get("manufacturer") or MISSING,
                              "; ".join(dom["problems"]) or "no", *map(format_number, numbers)))  # fmt: skip
    return lines


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from iqt_pipe.reports.figures import save_figure

    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_all(figures, out_dir: str | os.PathLike) -> list[Path]:
    """Calibration curves, error-vs-uncertainty scatter plots and slice maps as PNGs, written as the
    reports' figures are (:func:`iqt_pipe.reports.figures.save_figure`: atomic, the same bytes for the
    same figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if figures.calibration:
        fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        for (run, mode, method), (nominal, empirical) in figures.calibration.items():
            ax.plot(nominal, empirical, lw=1, label=f"{run} {mode} {method}")
        ax.set(
            xlabel="nominal coverage of the central interval",
            ylabel="empirical coverage",
            title="Calibration of the predictive intervals",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        if len(figures.calibration) <= 12:
            ax.legend(fontsize=6)
        written.append(_save_figure(fig, out / "calibration.png"))
    for (run, mode, method), (sd, err) in figures.scatter.items():
        fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
        hb = ax.hexbin(sd * 1e4, err * 1e4, gridsize=60, bins="log", mincnt=1, cmap="viridis")
        top = float(np.quantile(np.r_[sd, err] * 1e4, 0.995))
        ax.plot([0, top], [0, top], "r--", lw=1, label="|error| = sd")
        ax.set(
            xlim=(0, top),
            ylim=(0, top),
            xlabel="predicted sd (Frobenius, 1e-4 mm²/s)",
            ylabel="|error| (Frobenius, 1e-4 mm²/s)",
            title=f"{run} ({mode}): {method}",
        )
        ax.legend(fontsize=7)
        fig.colorbar(hb, ax=ax, label="voxels")
        written.append(_save_figure(fig, out / f"{run}_mode-{mode}_{method}_error-vs-sd.png"))
    for (run, mode), maps in figures.slices.items():
        panels = {k: v for k, v in maps.items() if k not in ("axis", "mask")}
        fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), layout="constrained")
        axes = np.atleast_1d(axes)
        errors = [v for k, v in panels.items() if k.endswith("|error|") or k.endswith(" sd")]
        vmax = float(np.quantile(np.concatenate([e[maps["mask"]] for e in errors]), 0.99)) * 1e4 if errors else None
        for ax, (title, img) in zip(axes, panels.items()):
            scale = 1e4 if title != "reference MD" else 1e3
            im = ax.imshow(
                np.rot90(img * scale),
                cmap="gray" if title == "reference MD" else "inferno",
                vmin=0,
                vmax=None if title == "reference MD" else vmax,
            )
            ax.set_title(title, fontsize=8)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, label="1e-3 mm²/s" if title == "reference MD" else "1e-4 mm²/s")
        fig.suptitle(f"{run} ({mode})", fontsize=9)
        written.append(_save_figure(fig, out / f"{run}_mode-{mode}_maps.png"))
    return written
