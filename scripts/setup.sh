#!/usr/bin/env bash
# Set up iqt-pipe in ./.venv: Python virtual environment, CPU torch, the package with its
# test extras, and the optional system tools (MRtrix3, Graphviz, Chromium, SLURM) from Debian when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IQT_VENV:-.venv}
TORCH_SPEC=${IQT_TORCH_SPEC:-torch==2.13.0}
say() { printf 'iqt-pipe setup: %s\n' "$*" >&2; }

# --- System tools, all optional at run time: MRtrix3 (steps and tests that use it), Graphviz
# (--write-graph), and, for the test suite only, Chromium with ChromeDriver (the HTML reports
# are opened in a real browser) and SLURM with munge (a one-machine cluster for job arrays
# and Nipype's SLURM plugin). Tests whose tool is missing are skipped with the reason.
missing=()
command -v dwi2tensor >/dev/null 2>&1 || missing+=(mrtrix3)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)
PATH="$PATH:/usr/sbin" command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld slurmd slurm-client munge)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} from Debian (apt-get install)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
      say "warning: apt-get could not install ${missing[*]}; the steps and tests that need them are skipped"
    fi
  else
    say "${missing[*]} not found and cannot be installed here (needs root and apt-get)."
    say "  MRtrix3: 'conda install -c mrtrix3 mrtrix3' or 'apt-get install mrtrix3'; Graphviz: 'apt-get install graphviz'."
    say "  Until then MRtrix3 steps and --write-graph's drawings are unavailable, and their tests are skipped."
    say "  Chromium and SLURM only serve tests (reports in a browser, a one-machine cluster); those tests are skipped."
  fi
fi

# --- Python ≥ 3.11 and its venv module ----------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python3.12 python3.13; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then 
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  say "error: Python >= 3.11 not found; install it (Debian: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      say "error: $PY has no venv module; install it (Debian: apt-get install python3-venv)"
      exit 2
    fi
  fi
  say "creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# --- Packages: skipped when nothing that decides them changed since the last run ---------
stamp="$VENV/.iqt-setup-stamp"
want=$(cat setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/iqt-pipe" --version >/dev/null 2>&1; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q --upgrade pip "setuptools>=68" wheel
# CPU torch first: otherwise pip resolves torch to a multi-GB CUDA build.
if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
  say "installing $TORCH_SPEC"
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
say "installing iqt-pipe (editable) with its test extras"
"$VPY" -m pip install -q -e ".[test]"
"$VENV/bin/iqt-pipe" --version >/dev/null
echo "$want" > "$stamp"
say "ready: $("$VENV/bin/iqt-pipe" --version)"
