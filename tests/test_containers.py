"""The container recipes and HPC files in ``containers/``, checked without building an image
(no Docker or Apptainer here): the Dockerfile and the Apptainer definition parse, every path
they copy exists and reaches the build context, their install steps are scripts/setup.sh's and
the README's (torch pinned first, then ``pip install .``), the image runs the ``iqt-pipe``
console script as a non-root user with ``OMP_NUM_THREADS=1`` and the bundled model inside;
their shell steps pass ``sh -n``; the Nipype plugin files are ones ``--use-plugin`` accepts;
the SLURM scripts' ``#SBATCH`` lines are where sbatch reads them.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO

CONTAINERS = REPO / "containers"
DOCKERFILE = CONTAINERS / "Dockerfile"
DEFFILE = CONTAINERS / "iqt-pipe.def"
PLUGINS = sorted((CONTAINERS / "slurm").glob("*.yml"))
SBATCH_SCRIPTS = sorted((CONTAINERS / "slurm").glob("*.sbatch"))
INSTRUCTIONS = {
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "LABEL",
    "USER",
    "WORKDIR",
    "ENTRYPOINT",
    "CMD",
    "EXPOSE",
    "VOLUME",
    "SHELL",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
}
SOURCE = ("iqt_pipe", "interfaces", "workflows")


# -- a small Dockerfile reader ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags(self) -> tuple[dict[str, str], list[str]]:
        """``--name=value`` flags and the remaining words (COPY, ADD)."""
        words = shlex.split(self.args)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
        return flags, [w for w in words if not w.startswith("--")]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for i in self.all("ENV"):
            for word in shlex.split(i.args):
                name, _, value = word.partition("=")
                values[name] = value
        return values

    def index(self, predicate) -> int:
        return next(n for n, i in enumerate(self.instructions) if predicate(i))


def read_dockerfile(path: Path) -> tuple[list[Instruction], list[Stage]]:
    """Instructions (continuation lines joined, comments dropped, as Docker does) and the
    stages they form; instructions before the first FROM (global ARGs) come first."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
    return instructions, stages


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.exists():
        return []
    return [
        line.strip().rstrip("/")
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _matches(path: str, pattern: str) -> bool:
    """A .dockerignore pattern against a context-relative path: anchored at the context root,
    except after a leading ``**/`` (any depth). fnmatch's ``*`` also crosses ``/``, so this
    errs on the side of calling a path ignored."""
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatch.fnmatch(path, pattern)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` drops ``rel``: it or a parent folder matches the last pattern
    that concerns it (``!`` re-includes)."""
    parts = Path(rel).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(_matches(prefix, pattern.lstrip("!")) for prefix in prefixes):
            out = not negate
    return out


@pytest.fixture(scope="module")
def docker():
    return read_dockerfile(DOCKERFILE)


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    first = next(n for n, i in enumerate(instructions) if i.keyword == "FROM")
    return dict(
        i.args.split("=", 1) if "=" in i.args else (i.args, "") for i in instructions[:first] if i.keyword == "ARG"
    )


def _image(stage: Stage, instructions: list[Instruction]) -> str:
    """A stage's base image with the global ARGs' defaults filled in."""
    values = _global_args(instructions)
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], stage.image)


def _stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert len(found) == 1, f"no single stage named {name!r}: {[s.name for s in stages]}"
    return found[0]


def _setup_sh_torch_spec() -> str:
    text = (REPO / "scripts" / "setup.sh").read_text()
    return re.search(r"TORCH_SPEC=\$\{IQT_TORCH_SPEC:-([^}]+)\}", text).group(1)


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _test_extra(name: str) -> str:
    """The requirement for ``name`` in setup.cfg's ``test`` extra, spaces removed."""
    extra = _setup_cfg()["options.extras_require"]["test"]
    (spec,) = [line.replace(" ", "") for line in extra.splitlines() if line.strip().startswith(name)]
    return spec


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_parses_into_named_stages(docker):
    instructions, stages = docker
    assert {i.keyword for i in instructions} <= INSTRUCTIONS
    names = [s.name for s in stages]
    assert names == ["mrtrix3", "build", "runtime"], names  # multi-stage, the image is the last
    globals_ = _global_args(instructions)
    for stage in stages:  # base images come from declared build arguments or are literal
        for ref in re.findall(r"\$\{(\w+)\}", stage.image):
            assert globals_.get(ref), f"FROM {stage.image}: {ref} is not a global ARG with a default"
    for stage in stages:
        for copy in stage.all("COPY"):
            flags, _ = copy.flags()
            if "from" in flags:  # only from an earlier stage
                assert flags["from"] in names[: names.index(stage.name)], copy
        for form in stage.all("ENTRYPOINT") + stage.all("CMD"):
            assert isinstance(json.loads(form.args), list), f"{form.keyword} should use the exec (JSON) form"


def test_dockerfile_cpu_by_default_and_cuda_by_build_argument(docker):
    instructions, stages = docker
    assert any(i.keyword == "ARG" and i.args == "DEVICE=cpu" for i in instructions[:3])
    build = _stage(stages, "build")
    assert any(i.keyword == "ARG" and i.args == "DEVICE" for i in build.instructions)
    torch_run = build.instructions[build.index(lambda i: i.keyword == "RUN" and "TORCH_SPEC" in i.args)]
    assert re.search(
        r'cpu\) pip install --extra-index-url https://download.pytorch.org/whl/cpu "\$TORCH_SPEC"', torch_run.args
    )
    assert re.search(r'cuda\) pip install "\$TORCH_SPEC"', torch_run.args)
    assert "exit 2" in torch_run.args  # any other value stops the build


def test_dockerfile_copies_only_what_exists_and_reaches_the_context(docker):
    _, stages = docker
    patterns = dockerignore_patterns()
    copied = []
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            flags, words = ins.flags()
            if "from" in flags:
                continue
            for src in words[:-1]:
                assert (REPO / src).exists(), f"line {ins.line}: {src} does not exist in the repository"
                assert not ignored(src, patterns), f"line {ins.line}: .dockerignore drops {src}"
                copied.append(src)
    assert set(SOURCE) <= set(copied)
    # whatever the package needs at run time stays in the context
    for rel in ("iqt_pipe/data/models", "iqt_pipe/cli/run.py", "interfaces/sr.py", "workflows/base.py"):
        assert not ignored(rel, patterns), rel
    for rel in (".venv/bin/python", "demo/out", "work/iqt_wf", ".git/HEAD", "iqt_pipe/__pycache__/x.pyc"):
        assert ignored(rel, patterns), f".dockerignore should keep {rel} out of the build context"


def test_dockerfile_installs_dependencies_before_the_source(docker):
    _, stages = docker
    build = _stage(stages, "build")
    ins = build.instructions
    torch_at = build.index(lambda i: i.keyword == "RUN" and "TORCH_SPEC" in i.args)
    deps_at = build.index(lambda i: i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args)
    source_at = min(build.index(lambda i, s=s: i.keyword == "COPY" and i.flags()[1][0] == s) for s in SOURCE)
    install_at = build.index(lambda i: i.keyword == "RUN" and re.search(r"pip install \.(\s|$)", i.args))
    assert torch_at < deps_at < source_at < install_at
    # only the metadata files come before the dependencies
    early = [w for i in ins[:deps_at] if i.keyword == "COPY" for w in i.flags()[1][:-1]]
    assert set(early) <= {"setup.cfg", "pyproject.toml", "README.md"}, early
    assert ins[install_at - 1].keyword == "WORKDIR" and ins[install_at - 1].args == "/src"


def _requirements_one_liner(text: str) -> str:
    return re.search(r'python -c "(import configparser;[^"]+)"', text).group(1)


@pytest.mark.parametrize("recipe", [DOCKERFILE, DEFFILE], ids=["Dockerfile", "iqt-pipe.def"])
def test_install_steps_are_the_setup_scripts(recipe, tmp_path):
    """torch pinned as scripts/setup.sh pins it, from the index the README names for the CPU
    wheel; the other dependencies exactly setup.cfg's install_requires (the recipe's own
    one-liner, run here on the repository's setup.cfg, against setuptools' reading of it);
    the BIDS validator as the test extra pins it."""
    text = recipe.read_text()
    spec = _setup_sh_torch_spec()
    assert f"TORCH_SPEC={spec}" in text
    readme = (REPO / "README.md").read_text()
    assert spec in readme and "https://download.pytorch.org/whl/cpu" in readme
    assert '"bids-validator-deno>=2.0"' in text and _test_extra("bids-validator-deno") == "bids-validator-deno>=2.0"
    code = _requirements_one_liner(text).replace("/src/setup.cfg", str(REPO / "setup.cfg"))
    out = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout
    listed = [line.strip() for line in out.splitlines() if line.strip()]
    from setuptools.config.setupcfg import read_configuration

    expected = read_configuration(str(REPO / "setup.cfg"))["options"]["install_requires"]
    assert listed == expected
    assert re.search(r"pip install \.(\s|$)", text, re.M)


def test_runtime_stage_runs_iqt_pipe_as_a_non_root_user(docker):
    _, stages = docker
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users and users[-1].args not in ("root", "0", "0:0")
    useradd = next(i for i in runtime.all("RUN") if "useradd" in i.args)
    assert f"--home-dir /home/{users[-1].args}" in useradd.args and "g=u" in useradd.args
    env = runtime.env()
    assert env["OMP_NUM_THREADS"] == "1" and env["NIPYPE_NO_ET"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:") and "/opt/mrtrix3/bin" in env["PATH"]
    (entry,) = runtime.all("ENTRYPOINT")
    assert json.loads(entry.args) == ["iqt-pipe"]
    scripts = dict(
        line.split(" = ") for line in _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    assert scripts["iqt-pipe"] == "iqt_pipe.cli.run:main"
    copies = {i.flags()[0].get("from"): i.flags()[1] for i in runtime.all("COPY")}
    assert copies["build"] == ["/opt/venv", "/opt/venv"] and copies["mrtrix3"] == ["/opt/mrtrix3", "/opt/mrtrix3"]
    assert any("iqt-pipe --version" in i.args for i in runtime.all("RUN"))  # the image checks itself


def test_mrtrix3_comes_from_the_conda_channel(docker):
    instructions, stages = docker
    mrtrix = _stage(stages, "mrtrix3")
    assert _image(mrtrix, instructions).startswith("mambaorg/micromamba:")
    (run,) = mrtrix.all("RUN")
    assert re.search(r"micromamba create .*--channel mrtrix3 .* mrtrix3(\s|$)", run.args)
    text = DEFFILE.read_text()
    assert re.search(r"micromamba create .*--channel mrtrix3 .* mrtrix3\n", text)


def test_the_bundled_model_is_package_data():
    """`pip install .` in the image installs iqt_pipe/data/models/*.safetensors with its card,
    so the image needs no download; the build step that prints it fails otherwise."""
    models = sorted((REPO / "iqt_pipe" / "data" / "models").glob("*.safetensors"))
    assert models and all(m.with_suffix(".json").exists() for m in models)
    patterns = [p.strip() for p in _setup_cfg()["options.package_data"]["iqt_pipe.data"].split(",")]
    for m in models:
        rel = m.relative_to(REPO / "iqt_pipe" / "data").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
        assert any(fnmatch.fnmatch(rel.replace(".safetensors", ".json"), p) for p in patterns)
    assert "bundled_model(2)" in DOCKERFILE.read_text() and "bundled_model(2)" in DEFFILE.read_text()


def test_dockerfile_shell_steps_parse(docker):
    _, stages = docker
    for stage in stages:
        for run in stage.all("RUN"):
            proc = subprocess.run(["sh", "-n", "-c", run.args], capture_output=True, text=True)
            assert proc.returncode == 0, f"line {run.line}: {proc.stderr}"


# -- Apptainer definition -------------------------------------------------------------------


def read_def(path: Path) -> list[dict]:
    """Stages of an Apptainer definition: header keywords and sections (name → list of
    (argument, body)), the body's lines without their common indentation."""
    stages: list[dict] = []
    section = None
    for raw in path.read_text().splitlines():
        if not raw.strip() or (raw.lstrip().startswith("#") and section is None):
            continue
        if re.match(r"^Bootstrap:", raw):
            stages.append({"header": {}, "sections": {}})
            section = None
        if section is None and re.match(r"^\w+:", raw):
            key, _, value = raw.partition(":")
            stages[-1]["header"][key] = value.strip()
            continue
        if raw.startswith("%"):
            name, _, arg = raw[1:].partition(" ")
            section = [arg.strip(), []]
            stages[-1]["sections"].setdefault(name, []).append(section)
            continue
        assert section is not None, f"{path}: text outside any section: {raw!r}"
        section[1].append(raw)
    for stage in stages:
        for entries in stage["sections"].values():
            for entry in entries:
                lines = entry[1]
                indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
                entry[1] = "\n".join(line[indent:] for line in lines).strip("\n")
    return stages


SECTIONS = {"arguments", "setup", "files", "post", "environment", "runscript", "startscript", "test", "labels", "help"}


def test_apptainer_definition_parses_and_copies_what_exists():
    stages = read_def(DEFFILE)
    assert [s["header"].get("Stage") for s in stages] == ["mrtrix3", "final"]
    for stage in stages:
        assert list(stage["header"])[0] == "Bootstrap" and stage["header"]["Bootstrap"] == "docker"
        assert set(stage["sections"]) <= SECTIONS, set(stage["sections"]) - SECTIONS
    final = stages[-1]
    host_files = [body for arg, body in final["sections"]["files"] if not arg]
    from_stage = [(arg, body) for arg, body in final["sections"]["files"] if arg]
    assert from_stage == [("from mrtrix3", "/opt/mrtrix3 /opt/mrtrix3")]
    sources = [line.split()[0] for body in host_files for line in body.splitlines()]
    for src in sources:
        assert (REPO / src).exists(), f"%files: {src} does not exist in the repository"
    assert set(SOURCE) | {"setup.cfg", "pyproject.toml", "README.md"} == set(sources)
    # every {{ VAR }} has a default in %arguments
    (arguments,) = final["sections"]["arguments"]
    defaults = dict(line.split("=", 1) for line in arguments[1].splitlines())
    assert defaults == {"DEVICE": "cpu", "TORCH_SPEC": _setup_sh_torch_spec()}
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", DEFFILE.read_text()))
    assert used <= set(defaults), used - set(defaults)


def test_apptainer_definition_runs_iqt_pipe_with_the_image_environment():
    final = read_def(DEFFILE)[-1]["sections"]
    (runscript,) = final["runscript"]
    assert runscript[1] == 'exec iqt-pipe "$@"'
    (environment,) = final["environment"]
    exports = dict(line.removeprefix("export ").split("=", 1) for line in environment[1].splitlines())
    assert exports["OMP_NUM_THREADS"] == "1" and exports["NIPYPE_NO_ET"] == "1"
    assert exports["PATH"].startswith("/opt/venv/bin:") and "/opt/mrtrix3/bin" in exports["PATH"]
    (post,) = final["post"]
    body = post[1]
    order = [body.index(s) for s in ('"{{ TORCH_SPEC }}"', "-r /tmp/requirements.txt", "cd /src\npip install .")]
    assert order == sorted(order)  # torch, dependencies, then the package
    for name in ("post", "environment", "runscript", "test"):
        for _, text in final[name]:
            script = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", text)
            proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert proc.returncode == 0, f"%{name}: {proc.stderr}"
    assert "--nv" in DEFFILE.read_text()  # the GPU route is documented where the image is built


def test_docker_and_apptainer_recipes_agree(docker):
    instructions, stages = docker
    text = DEFFILE.read_text()
    defs = read_def(DEFFILE)
    assert defs[0]["header"]["From"] == _image(_stage(stages, "mrtrix3"), instructions)
    assert (
        defs[1]["header"]["From"] == _image(stages[-1], instructions) == _image(_stage(stages, "build"), instructions)
    )
    assert _requirements_one_liner(text) == _requirements_one_liner(DOCKERFILE.read_text())


# -- plugin files and SLURM scripts ------------------------------------------------------------


#: The plugin arguments Nipype 1.11 reads, per plugin (a misspelt key would be ignored silently).
_BATCH = {"template", "max_jobs", "retry_timeout", "max_tries"}
KNOWN_PLUGIN_ARGS = {
    "MultiProc": {
        "n_procs",
        "memory_gb",
        "n_gpu_procs",
        "raise_insufficient",
        "scheduler",
        "maxtasksperchild",
        "mp_context",
        "status_callback",
    },
    "SLURM": _BATCH | {"sbatch_args", "jobid_re"},
    "SGE": _BATCH | {"qsub_args", "qstatProgramPath", "qstatCachedProgramPath"},
    "PBS": _BATCH | {"qsub_args", "max_jobname_len"},
}


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin-check") / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    return root


@pytest.mark.parametrize("plugin_file", PLUGINS, ids=[p.stem for p in PLUGINS])
def test_plugin_files_are_accepted_by_use_plugin(plugin_file, bids_root, tmp_path):
    from nipype.pipeline import plugins

    from iqt_pipe.cli.parser import parse_args
    from iqt_pipe.config import RunConfig

    args = parse_args(
        [
            str(bids_root),
            str(tmp_path / "out"),
            "participant",
            "-w",
            str(tmp_path / "work"),
            "--use-plugin",
            str(plugin_file),
        ]
    )
    settings = RunConfig.from_args(args).plugin_settings()
    name = settings["plugin"]
    assert name.lower() == plugin_file.stem.lower()
    assert set(settings["plugin_args"]) <= KNOWN_PLUGIN_ARGS[name], (
        set(settings["plugin_args"]) - KNOWN_PLUGIN_ARGS[name]
    )
    if name == "SGE":
        return  # its constructor already polls qstat (with retries) to learn the queue's old jobs
    runner = getattr(plugins, f"{name}Plugin")(plugin_args=settings["plugin_args"])  # Nipype takes its arguments
    if name == "SLURM":
        assert runner._sbatch_args == settings["plugin_args"]["sbatch_args"]
        # Nipype adds its own -o/-e unless these substrings occur in the arguments
        assert "-o" not in runner._sbatch_args and "-e" not in runner._sbatch_args
    if name in ("SGE", "PBS"):
        assert "-V" in settings["plugin_args"]["qsub_args"].split()  # jobs see PATH and NIPYPE_NO_ET
    if name == "MultiProc":
        assert runner.processors == args.nprocs == settings["plugin_args"]["n_procs"]


def test_plugin_files_cover_the_engines():
    assert {p.stem for p in PLUGINS} >= {"multiproc", "slurm", "sge"}


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=[p.name for p in SBATCH_SCRIPTS])
def test_sbatch_scripts_parse_and_put_directives_where_sbatch_reads_them(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and script.stat().st_mode & 0o111
    first_command = next(n for n, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [n for n, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command  # sbatch stops at the first command
    assert all(re.match(r"#SBATCH --[a-z-]+=\S+$", lines[n]) for n in directives)
