"""Maintainers: make a trained model the bundled default (``iqt_pipe/data/models``).

    .venv/bin/python scripts/bundle_model.py runs/all/model.safetensors \
        --evaluation runs/eval-foldA/results.json foldA --evaluation runs/eval-foldB/results.json foldB \
        --evaluation-command "iqt-train … && iqt-eval …"

Copies the weights and rewrites the card: the training data's absolute paths become paths
relative to each dataset (a card travels with the package), with each dataset's ``Name`` from its
``dataset_description.json`` (``training.dataset_names``), and the held-out evaluation of the
same recipe is summarised under ``evaluation``: one ``iqt-eval`` results.json and method per fold
(a model trained without that fold's scored subjects), the runs of all folds pooled by
:func:`iqt_pipe.evaluation.protocol.summarise` as if one cross-validated ``iqt-eval`` had scored them.
The weights are not changed, so the card's sha256 still holds; the result is loaded once to
check it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from iqt_pipe.evaluation.protocol import summarise
from iqt_pipe.io import atomic_path, save_json
from iqt_pipe.models import load_model, read_card
from iqt_pipe.models.files import BUNDLED, bundled_dir, model_paths

#: The card keeps these metrics of the pooled summary …
_KEEP = (
    "tensor_rmse_ratio",
    "tensor_rmse_corrected_ratio",
    "fa_rmse_ratio",
    "md_rmse_ratio",
    "spearman",
    "coverage0.5",
    "coverage0.8",
    "coverage0.95",
    "md_coverage0.95",
    "error_sd_ratio",
    "predicted_fraction",
    "risky",
    "lesion",
)  # metric names: the key before its last dot (coverage0.95.brain → coverage0.95)
#: … in these regions and scores.
_SUFFIXES = (
    ".interior",
    ".exterior",
    ".brain",
    ".auc",
    ".auc_intrinsic",
    ".auc_parameter",
    ".f1",
    ".precision",
    ".recall",
)


def _relative(card: dict) -> dict:
    training = card.get("training", {})
    datasets = [Path(d) for d in training.get("datasets", [])]

    def rel(path: str) -> str:
        for d in datasets:
            if Path(path).is_relative_to(d):
                return f"{d.name}/{Path(path).relative_to(d)}"
        return Path(path).name

    for run in training.get("dwi_runs", []):
        for key in ("dwi", "bval", "bvec"):
            run[key] = rel(run[key])
        run["dataset"] = Path(run["dataset"]).name if run.get("dataset") else None
    training["datasets"] = [d.name for d in datasets]
    # What each folder held (e.g. "iqt-phantom synthetic DWI (preset demo, seed 7)"): its name alone travels.
    training["dataset_names"] = {
        d.name: json.loads((d / "dataset_description.json").read_text()).get("Name")
        for d in datasets
        if (d / "dataset_description.json").is_file()
    }
    return card


#: What the evaluation's fold models are, unless ``--evaluation-protocol`` says otherwise.
PROTOCOL = "iqt-eval on held-out subjects, each fold with a model of the same recipe trained without them"


def _evaluation(folds: list[tuple[Path, str]], command: str | None, protocol: str = PROTOCOL) -> dict:
    records, info = [], []
    for k, (results, method) in enumerate(folds, 1):
        res = json.loads(results.read_text())
        mine = [rec for rec in res["records"] if method in rec["methods"]]
        if not mine:
            raise SystemExit(f"{results}: no method {method!r}; it has {', '.join(res['summary'].get('raw', {}))}")
        for rec in mine:
            rec["methods"] = {"model": rec["methods"][method]}
            rec["fold"] = k
        records += mine
        info.append(
            {
                "fold": k,
                "method": method,
                "runs": sorted({r["run"] for r in mine}),
                "risky_threshold_md_sd": res.get("thresholds", {}).get(method),
            }
        )
    summary = {}
    for mode, methods in summarise(records).items():
        values = methods["model"]["values"]
        summary[mode] = {k: v for k, v in values.items() if k.rsplit(".", 1)[0] in _KEEP and k.endswith(_SUFFIXES)}
    return {
        "protocol": protocol,
        "runs": sorted({r["run"] for r in records}),
        "folds": info,
        "summary": summary,
        "command": command,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument(
        "--evaluation",
        nargs=2,
        action="append",
        metavar=("RESULTS", "METHOD"),
        default=[],
        help="one fold: iqt-eval results.json of the same recipe on held-out subjects and the "
        "method name of that recipe's model in it (repeatable)",
    )
    p.add_argument("--evaluation-command", help="the commands that reproduce the evaluation")
    p.add_argument(
        "--evaluation-protocol",
        default=PROTOCOL,
        help=f"how the fold models relate to the bundled one, where it is not the same recipe (default: {PROTOCOL!r})",
    )
    args = p.parse_args()
    card = _relative(read_card(args.model))
    if args.evaluation:
        card["evaluation"] = _evaluation(
            [(Path(f), m) for f, m in args.evaluation], args.evaluation_command, args.evaluation_protocol
        )
    weights, _ = model_paths(args.model)
    r = card["upsample"]
    out = bundled_dir() / f"{BUNDLED[r]}.safetensors"
    with atomic_path(out) as tmp:
        shutil.copyfile(weights, tmp)
    card["weights"]["file"] = out.name
    save_json(card, out.with_suffix(".json"))
    load_model(out)
    print(f"bundled {weights} as {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
