"""The ``iqt-pipe`` command line (cli/parser.py) and its run configuration (config.py): every flag
parses, every refusal is one line with exit code 2, the configuration round-trips through TOML."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from iqt_pipe import __version__
from iqt_pipe.cli.parser import _build_parser, default_nprocs, parse_args
from iqt_pipe.config import CONFIG_NAME, RunConfig
from iqt_pipe.io import InputError
from iqt_pipe.models import IQTNet, save_model
from iqt_pipe.sims.dataset import write_bids_dataset


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A tiny BIDS dataset and an espcn r=2 model, in one folder; tests run from it."""
    root = tmp_path_factory.mktemp("cli")
    write_bids_dataset(root / "ds", preset="tiny")
    save_model(IQTNet("espcn", 2), root / "m" / "model.safetensors")
    return root


@pytest.fixture
def here(place, monkeypatch):
    monkeypatch.chdir(place)
    return place


def base(*extra, level="participant", model=True):
    return ["ds", "out", level, *(["--model", "m"] if model else []), *extra]


def refused(argv, capsys) -> str:
    """The one stderr line of a refused command line (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("iqt-pipe: error: ")
    return err


def test_preprocessing_follows_the_model_card(here, tmp_path):
    """--denoise/--degibbs left out: the card's training.preprocessing; set otherwise: kept, and
    a difference from the card is one warning line (and the summary says so)."""
    card = json.loads((here / "m" / "model.json").read_text())
    card["training"] = {"preprocessing": {"denoise": "dipy", "degibbs": True}}
    save_model(IQTNet("espcn", 2), tmp_path / "pre" / "model.safetensors", card)

    def config(*flags):
        return RunConfig.from_args(parse_args(["ds", "out", "participant", "--model", str(tmp_path / "pre"), *flags]))

    assert (config().denoise, config().degibbs) == ("dipy", True)
    assert config().preprocessing_warning() is None and "(as the model was trained)" in config().summary()
    for flags in (["--denoise", "none"], ["--no-degibbs"]):
        warning = config(*flags).preprocessing_warning()
        assert warning and "\n" not in warning and "leave out --denoise and --degibbs" in warning
        assert "NOT as the model was trained" in config(*flags).summary()
    assert config("--denoise", "mrtrix").preprocessing_warning() is None  # MP-PCA by either tool
    # A card without the field (the test model): series as acquired, so --degibbs differs.
    assert RunConfig.from_args(parse_args(base("--degibbs"))).preprocessing_warning()
    assert RunConfig.from_args(parse_args(base())).preprocessing_warning() is None


def test_defaults(here):
    args = parse_args(base())
    assert args.bids_dir == here / "ds" and args.output_dir == here / "out" and args.work_dir == here / "work"
    assert all(p.is_absolute() for p in (args.bids_dir, args.output_dir, args.work_dir, args.model))
    assert args.model == here / "m" / "model.safetensors" and args.model_card["upsample"] == 2
    # A card without training.preprocessing: trained on series as acquired, so nothing before the fit.
    assert (args.device, args.mc_samples, args.seed, args.tractography, args.denoise) == ("auto", 8, 0, "none", "none")
    assert not args.degibbs and args.nprocs == default_nprocs() and args.omp_nthreads == min(args.nprocs, 8)
    assert args.mem_mb is None and args.participant_label is None and args.session_label is None
    assert (args.plugin, args.plugin_args, args.bids_filters) == ("MultiProc", {}, None)
    assert not (args.skip_bids_validation or args.stop_on_first_crash or args.write_graph or args.boilerplate_only)
    assert args.verbose == 0 and (args.symmetries, args.precision) == ("mirrors", "auto") and args.ensemble_models == []


def test_several_models_are_an_ensemble(here, tmp_path):
    """``--model A B``: the first is the model (its card sets r and the preprocessing), the rest
    join it in the ensemble; the configuration keeps them, the summary names them."""
    save_model(IQTNet("hetero", 2), here / "m2" / "model.safetensors")
    args = parse_args(base("--model", "m", "m2/model.json"))
    assert args.model == here / "m" / "model.safetensors"
    assert args.ensemble_models == [here / "m2" / "model.safetensors"]
    config = RunConfig.from_args(args)
    assert config.ensemble_models == (here / "m2" / "model.safetensors",)
    assert RunConfig.from_toml(config.to_toml(tmp_path / "run.toml")) == config
    assert f"averaged with {here / 'm2' / 'model.safetensors'}" in config.summary()


def test_default_model_is_the_bundled_one(here):
    from iqt_pipe.models.files import bundled_model

    args = parse_args(base(model=False))
    assert args.model == bundled_model(2)
    assert args.model_card["upsample"] == 2 and args.model_card["variant"] == "hetero-var2"
    assert args.model_card["training"]["subjects"]  # trained on real subjects, recorded in its card


def test_every_flag(here):
    (here / "plugin.yml").write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 2\n  memory_gb: 3\n")
    (here / "filter.json").write_text(json.dumps({"dwi": {"acquisition": "hr", "run": [1, 2]}}))
    args = parse_args(
        [
            "ds",
            "ds/derivatives/iqt",
            "participant",
            "--participant-label",
            "sub-01",
            "02",
            "01",
            "--session-label",
            "ses-1",
            "pre",
            "--bids-filter-file",
            "filter.json",
            "-w",
            "scratch",
            "--nprocs",
            "2",
            "--omp-nthreads",
            "1",
            "--mem-mb",
            "3072",
            "--use-plugin",
            "plugin.yml",
            "--device",
            "cpu",
            "--model",
            "m/model.json",
            "--mc-samples",
            "3",
            "--seed",
            "7",
            "--symmetries",
            "cube",
            "--precision",
            "bfloat16",
            "--tractography",
            "both",
            "--denoise",
            "dipy",
            "--no-degibbs",
            "--skip-bids-validation",
            "--stop-on-first-crash",
            "--write-graph",
            "--boilerplate-only",
            "-vv",
        ]
    )
    assert args.output_dir == here / "ds" / "derivatives" / "iqt" and args.work_dir == here / "scratch"
    assert args.participant_label == ["01", "02"] and args.session_label == ["1", "pre"]
    assert args.bids_filters == {"dwi": {"acquisition": "hr", "run": [1, 2]}}
    assert args.bids_filter_file == here / "filter.json" and args.use_plugin == here / "plugin.yml"
    assert (args.plugin, args.plugin_args) == ("MultiProc", {"n_procs": 2, "memory_gb": 3})
    assert (args.nprocs, args.omp_nthreads, args.mem_mb) == (2, 1, 3072)
    assert args.model == here / "m" / "model.safetensors"
    assert (args.device, args.mc_samples, args.seed, args.tractography, args.denoise) == ("cpu", 3, 7, "both", "dipy")
    assert not args.degibbs and args.verbose == 2 and (args.symmetries, args.precision) == ("cube", "bfloat16")
    assert args.skip_bids_validation and args.stop_on_first_crash and args.write_graph and args.boilerplate_only


@pytest.mark.parametrize("given, label", [("01", "01"), ("sub-01", "01"), ("subA", "subA"), ("sub-sub01", "sub01")])
def test_participant_label_prefix(here, given, label):
    assert parse_args(base("--participant-label", given)).participant_label == [label]


@pytest.mark.parametrize("given, label", [("1", "1"), ("ses-pre", "pre")])
def test_session_label_prefix(here, given, label):
    assert parse_args(base("--session-label", given)).session_label == [label]


def test_group_level_needs_no_model_and_plugin_fills_resources(here):
    (here / "p.yml").write_text("plugin: Linear\n")
    args = parse_args(base("--use-plugin", "p.yml", level="group", model=False))
    assert args.model is None and args.model_card is None and args.plugin == "Linear" and args.plugin_args == {}
    (here / "p.yml").write_text("plugin: MultiProc\nplugin_args: {n_procs: 1, memory_gb: 0.5}\n")
    args = parse_args(base("--use-plugin", "p.yml"))
    assert (args.nprocs, args.omp_nthreads, args.mem_mb) == (1, 1, 512)


def test_help_and_version_exit_0(capsys):
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as info:
            _build_parser().parse_args([flag])
        assert info.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"iqt-pipe {__version__}")


def _setup_files(root: Path):
    (root / "bad_ds").mkdir(exist_ok=True)
    (root / "bad_json_ds").mkdir(exist_ok=True)
    (root / "bad_json_ds" / "dataset_description.json").write_text("{'Name': 1")
    (root / "list_ds").mkdir(exist_ok=True)
    (root / "list_ds" / "dataset_description.json").write_text("[]")
    (root / "afile").write_text("x")
    if not (root / "ds_link").is_symlink():
        (root / "ds_link").symlink_to(root / "ds")
    files = {
        "badjson.json": "{",
        "list.json": "[]",
        "query.json": '{"anat": {}}',
        "notobj.json": '{"dwi": 3}',
        "suffix.json": '{"dwi": {"suffix": "T1w"}}',
        "nested.json": '{"dwi": {"acquisition": {"a": 1}}}',
        "bad.yml": "plugin: [MultiProc\n",
        "noplugin.yml": "plugin_args: {}\n",
        "extra.yml": "plugin: Linear\nqueue: x\n",
        "unknown.yml": "plugin: Nonsense\n",
        "args.yml": "plugin: MultiProc\nplugin_args: [1, 2]\n",
        "nprocs.yml": "plugin: MultiProc\nplugin_args: {n_procs: 0}\n",
        "conflict.yml": "plugin: MultiProc\nplugin_args: {n_procs: 2}\n",
        "memory.yml": "plugin: MultiProc\nplugin_args: {memory_gb: 1}\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    broken = root / "broken_model"
    broken.mkdir(exist_ok=True)
    (broken / "model.json").write_text("{not json")
    lonely = root / "lonely_model"
    lonely.mkdir(exist_ok=True)
    card = json.loads((root / "m" / "model.json").read_text())
    (lonely / "model.json").write_text(json.dumps(card))
    if not (root / "m3").exists():  # ensemble members that do not fit the first model
        save_model(IQTNet("espcn", 3), root / "m3" / "model.safetensors")
        save_model(
            IQTNet("espcn", 2),
            root / "mgibbs" / "model.safetensors",
            {"training": {"preprocessing": {"denoise": "none", "degibbs": True}}},
        )


REFUSALS = [
    # (command line, a piece of the message)
    (["nowhere", "out", "participant", "--model", "m"], "bids_dir "),
    (["bad_ds", "out", "participant", "--model", "m"], "no dataset_description.json); point to the dataset's root"),
    (["bad_json_ds", "out", "participant", "--model", "m"], "dataset_description.json: not valid JSON"),
    (["list_ds", "out", "participant", "--model", "m"], "must hold a JSON object"),
    (["ds", "ds", "participant", "--model", "m"], "output_dir is the BIDS folder itself"),
    (["ds", "ds/", "participant", "--model", "m"], "suggestion: "),
    (["ds", "ds/out", "participant", "--model", "m"], "lies inside the BIDS folder; use a folder outside it"),
    (["ds", "ds/derivatives", "participant", "--model", "m"], "derivatives/ itself; use a folder below it"),
    (["ds", "ds/derivatives/../code", "participant", "--model", "m"], "lies inside the BIDS folder"),
    (["ds", "ds_link/out", "participant", "--model", "m"], "lies inside the BIDS folder"),  # via a symlink
    (["ds", "afile", "participant", "--model", "m"], "exists and is not a folder"),
    (base("-w", "ds/work"), "the work folder"),
    (base("-w", "ds"), "lies inside the BIDS folder"),
    (base("-w", "out"), "the work folder is the output folder"),
    (base("-w", "afile"), "exists and is not a folder"),
    (base("--bids-filter-file", "nope.json"), "--bids-filter-file"),
    (base("--bids-filter-file", "badjson.json"), "not valid JSON"),
    (base("--bids-filter-file", "list.json"), "must hold a JSON object"),
    (base("--bids-filter-file", "query.json"), "unknown query 'anat'; known: dwi"),
    (base("--bids-filter-file", "notobj.json"), "must be an object of BIDS entities"),
    (base("--bids-filter-file", "suffix.json"), "dwi.suffix cannot be changed"),
    (base("--bids-filter-file", "nested.json"), "dwi.acquisition must be a string"),
    (base("--use-plugin", "nope.yml"), "--use-plugin"),
    (base("--use-plugin", "bad.yml"), "not valid YAML"),
    (base("--use-plugin", "noplugin.yml"), "needs a 'plugin' name"),
    (base("--use-plugin", "extra.yml"), "unknown key 'queue'"),
    (base("--use-plugin", "unknown.yml"), "unknown Nipype plugin 'Nonsense'; known: "),
    (base("--use-plugin", "args.yml"), "'plugin_args' must be a mapping"),
    (base("--use-plugin", "nprocs.yml"), "plugin_args.n_procs must be an integer ≥ 1"),
    (base("--use-plugin", "conflict.yml", "--nprocs", "1"), "--nprocs 1 disagrees with n_procs: 2"),
    (base("--use-plugin", "memory.yml", "--mem-mb", "100"), "--mem-mb 100 disagrees with memory_gb: 1"),
    (base("--participant-label", ".."), "participant label '..' is not a BIDS label"),
    (base("--participant-label", "sub-../x"), "is not a BIDS label"),
    (base("--participant-label", "01", "a/b"), "'a/b' is not a BIDS label"),
    (base("--participant-label", "0 1"), "is not a BIDS label"),
    (base("--participant-label", "sub-"), "is not a BIDS label"),
    (base("--participant-label", "01_x"), "is not a BIDS label"),
    (base("--participant-label", "é1"), "is not a BIDS label"),
    (base("--session-label", "ses-.."), "session label 'ses-..' is not a BIDS label"),
    (base("--model", "nothing/here"), "no such file or folder"),
    (base("--model", "broken_model"), "--model: "),
    (base("--model", "lonely_model"), "weights file not found"),
    (base("--model", "m", "m/model.json"), "named twice; give each ensemble member once"),
    (base("--model", "m", "m3"), "upsamples by 3, "),
    (base("--model", "m", "mgibbs"), "an ensemble's models must share their preprocessing"),
    (base("--model", "m", "nothing/here"), "nothing/here: no such file or folder"),
    (base("--symmetries", "all"), "invalid choice: 'all'"),
    (base("--precision", "half"), "invalid choice: 'half'"),
    (base("--nprocs", "2", "--omp-nthreads", "3"), "--omp-nthreads 3 exceeds --nprocs 2"),
    (base("--omp-nthreads", str(default_nprocs() + 1)), "CPUs available"),
    (base("--mc-samples", "0"), "the number of MC samples must be an integer ≥ 1"),
    (base("--seed", "-1"), "the seed must be an integer ≥ 0"),
    (base("--nprocs", "two"), "argument --nprocs: the number of processes must be an integer ≥ 1"),
    (base("--omp-nthreads", "0"), "the number of threads must be an integer ≥ 1"),
    (base("--mem-mb", "0"), "the memory in MB must be an integer ≥ 1"),
    (base("--tractography", "fancy"), "invalid choice: 'fancy'"),
    (base("--denoise", "gaussian"), "invalid choice: 'gaussian'"),
    (base("--device", "tpu"), "invalid choice: 'tpu'"),
    (base("--upsample", "2"), "unrecognized arguments: --upsample"),
    (["ds", "out"], "the following arguments are required: analysis_level"),
    (["ds", "out", "subject"], "invalid choice: 'subject'"),
]


@pytest.mark.parametrize("argv, message", REFUSALS, ids=[f"{i:02d}" for i in range(len(REFUSALS))])
def test_refusals_are_one_line(here, capsys, argv, message):
    _setup_files(here)
    assert message in refused(argv, capsys)


def test_model_refusal_carries_the_card_message(here, capsys):
    _setup_files(here)
    err = refused(base("--model", "broken_model"), capsys)
    assert "model.json: the model card is not valid JSON" in err and "re-download" in err


def test_cuda_without_gpu_is_refused(here, capsys):
    import torch

    if torch.cuda.is_available():
        assert parse_args(base("--device", "cuda")).device == "cuda"
        return
    assert "--device cuda: no CUDA GPU is visible" in refused(base("--device", "cuda"), capsys)


def test_refusal_in_a_real_process_has_no_traceback(here):
    """Through a fresh interpreter, as a user sees it (one subprocess: startup costs ~1 s)."""
    code = "import sys; from iqt_pipe.cli.parser import parse_args; parse_args(sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, "ds", "ds", "participant", "--model", "m"],
        capture_output=True,
        text=True,
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "output_dir is the BIDS folder itself" in out.stderr
    assert f"suggestion: {here / 'ds' / 'derivatives' / 'iqt-pipe'}" in out.stderr


# -- RunConfig ---------------------------------------------------------------------------------


def _full_config(here) -> RunConfig:
    (here / "plugin.yml").write_text("plugin: MultiProc\nplugin_args: {n_procs: 2, maxtasksperchild: 1}\n")
    (here / "filter.json").write_text(json.dumps({"dwi": {"acquisition": "hr", "run": None, "echo": [1, 2.5]}}))
    return RunConfig.from_args(
        parse_args(
            base(
                "--participant-label",
                "01",
                "sub-02",
                "--session-label",
                "ses-1",
                "--bids-filter-file",
                "filter.json",
                "--use-plugin",
                "plugin.yml",
                "--mem-mb",
                "2048",
                "--mc-samples",
                "4",
                "--seed",
                "3",
                "--tractography",
                "dipy",
                "--no-degibbs",
                "--write-graph",
                "-v",
            )
        )
    )


def test_config_toml_round_trip(here, tmp_path):
    minimal = RunConfig.from_args(parse_args(base(level="group", model=False)))
    full = _full_config(here)
    assert full.participant_label == ("01", "02") and full.model_upsample == 2 and full.model_variant == "espcn"
    assert full.plugin_args == {"n_procs": 2, "maxtasksperchild": 1} and full.nprocs == 2
    for config in (minimal, full):
        path = config.to_toml(tmp_path / "run.toml")
        assert RunConfig.from_toml(path) == config
    assert not list(tmp_path.glob(".*"))  # atomic write: no temporary left behind
    text = (tmp_path / "run.toml").read_text()
    assert 'participant_label = ["01", "02"]' in text and "mem_mb = 2048" in text and "degibbs = false" in text


def test_config_strings_escape(tmp_path):
    odd = Path('/data/a "quoted"\\dir/tab\there/ünï\x7f\nline')
    config = RunConfig(
        bids_dir=odd,
        output_dir=Path("/o"),
        analysis_level="participant",
        work_dir=Path("/w"),
        participant_label=("01",),
        plugin_args={"qsub_args": '-q "long"\n', "x": 1.5},
    )
    assert RunConfig.from_toml(config.to_toml(tmp_path / "c.toml")) == config


def test_config_archive_with_subject_logs(here):
    config = _full_config(here)
    path = config.archive("01")
    assert path == here / "out" / "sub-01" / "log" / config.run_uuid / CONFIG_NAME
    assert RunConfig.from_toml(path) == config


@pytest.mark.parametrize(
    "line, message",
    [
        ('colour = "red"', "unknown setting 'colour'"),
        ('mc_samples = "8"', "mc_samples must be an integer"),
        ('device = "tpu"', "device must be one of auto, cpu, cuda"),
        ('plugin_args = "[1]"', "plugin_args must be a JSON object"),
        ("degibbs = 1", "degibbs must be true or false"),
    ],
)
def test_config_from_toml_refuses_bad_files(tmp_path, line, message):
    good = RunConfig(bids_dir=Path("/b"), output_dir=Path("/o"), analysis_level="group", work_dir=Path("/w"))
    text = good.to_toml(tmp_path / "c.toml").read_text()
    key = line.split(" = ")[0]
    kept = [row for row in text.splitlines() if not row.startswith(f"{key} = ")]
    (tmp_path / "c.toml").write_text("\n".join(kept + [line]) + "\n")
    with pytest.raises(InputError, match=message):
        RunConfig.from_toml(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text("bids_dir = \n")
    with pytest.raises(InputError, match="not a readable TOML"):
        RunConfig.from_toml(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text('output_dir = "/o"\n')
    with pytest.raises(InputError, match="'bids_dir' is missing"):
        RunConfig.from_toml(tmp_path / "c.toml")


def test_plugin_settings_complete_multiproc(here):
    config = _full_config(here)
    assert config.plugin_settings() == {
        "plugin": "MultiProc",
        "plugin_args": {"n_procs": 2, "maxtasksperchild": 1, "memory_gb": 2.0, "raise_insufficient": False},
    }


def test_summary_mentions_key_settings(here):
    config = _full_config(here)
    text = config.summary(device="cpu")
    for piece in (
        f"{here / 'ds'}",
        "sub-01, sub-02",
        "ses-1",
        f"{here / 'm' / 'model.safetensors'}",
        "variant espcn, r = 2",
        "device cpu (auto)",
        "auto precision",
        "4 MC sample(s), test-time mirrors (8)",
        "seed 3",
        "Gibbs removal off",
        f"Nipype MultiProc (from {here / 'plugin.yml'}): 2 process(es)",
        "memory 2048 MB",
        f"{here / 'work'} (new)",
        '"acquisition": "hr"',
        "write workflow graphs",
        "participant level",
    ):
        assert piece in text, piece
    assert re.search(r"^  tractography +dipy$", text, re.M)
    assert "sessions" in text and "all" in RunConfig.from_args(parse_args(base())).summary()


def test_reports_only(here, tmp_path, capsys):
    args = parse_args(base("--reports-only", model=False))
    assert args.reports_only and args.model is None  # rebuilding reports needs no model
    assert not parse_args(base()).reports_only
    config = RunConfig.from_args(args)
    assert config.reports_only and "reports only: rebuild the visual reports" in config.summary()
    assert RunConfig.from_toml(config.to_toml(tmp_path / "c.toml")) == config
    err = refused(base("--reports-only", "--boilerplate-only"), capsys)
    assert "--reports-only and --boilerplate-only exclude each other" in err
    assert parse_args(base("--reports-only", level="group", model=False)).reports_only


def test_an_empty_templateflow_home_unless_the_user_set_one():
    """iqt-pipe writes nothing in template space: the data sink's import (TemplateFlow's index of
    every template, ~12 s on 2 busy cores) is skipped with the empty home shipped in the package,
    which works offline; a TemplateFlow home the user chose is kept."""
    from iqt_pipe.cli.run import templateflow_without_templates

    env = {}
    templateflow_without_templates(env)
    home = Path(env["TEMPLATEFLOW_HOME"])
    assert (home / "dataset_description.json").is_file() and env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    mine = {"TEMPLATEFLOW_HOME": "/opt/tf"}
    templateflow_without_templates(mine)
    assert mine == {"TEMPLATEFLOW_HOME": "/opt/tf"}
    code = "from niworkflows.interfaces.bids import DerivativesDataSink, STANDARD_SPACES; print(STANDARD_SPACES)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
