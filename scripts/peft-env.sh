#!/usr/bin/env bash
# Provision the Python environment of PEFT builds (once each), for the PEFT worker
# (workers/peft/worker.py). Called by scripts/peft-compat and scripts/test for the default
# matrix's builds, and by peft-compat itself for any other `peft@X+torchY` a matrix names.
#
#   scripts/peft-env.sh defaults          peft@0.10.0+torch2.1.2 and peft@0.11.0+torch2.1.2
#   scripts/peft-env.sh 0.10.0 2.1.2      one build: PEFT 0.10.0 on torch 2.1.2
#
# Layout (ignored by git), shared between builds wherever it can be:
#   .venv                 torch 2.11.0 and PEFT 0.21.2 (scripts/env.sh): the `peft` build, and the
#                         torch of every peft@X+torch2.11.0
#   .peft/torch-T/        one virtual environment per torch release: torch (with the CUDA
#                         runtime wheels its import loads, GPU or not), numpy and PEFT's
#                         dependencies; every PEFT release on that torch shares it
#   .peft/peft-P/         one PEFT release, installed without its dependencies (pip --target),
#                         put first on PYTHONPATH by the runner
# Pinned builds install from scripts/locks/peft-torch-T.txt and peft-P.txt (pip
# --require-hashes, made by scripts/lock.sh); any other version is fetched from PyPI by version
# alone, with a warning that it is not hash-pinned. A version pip cannot get fails here with
# pip's own words, and peft-compat skips that build's cases with them (never a pass).
#
# PEFT_COMPAT_SKIP_PEFT_BUILDS=1 skips all of it (`defaults` only); peft-compat then declares
# every PEFT build but `peft` not expected, as --skip-backend would.
set -euo pipefail
shopt -s inherit_errexit
export PIP_ROOT_USER_ACTION=ignore
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
locks="$root/scripts/locks"
source "$root/scripts/lock-check.sh"

say() { echo "peft-compat: $*" >&2; }

# torch_env T: the environment's python for torch T (made once).
torch_env() {
  local t="$1" dest="$root/.peft/torch-$1" lock="$locks/peft-torch-$1.txt" marker
  if [ "$t" = 2.11.0 ]; then
    echo "$root/.venv/bin/python"
    return
  fi
  if [ -f "$lock" ]; then marker="$lock"; else marker=/dev/null; fi
  if [ ! -f "$dest/.peft-compat-lock" ] || ! cmp -s "$marker" "$dest/.peft-compat-lock"; then
    rm -rf "$dest"
    python3 -m venv "$dest"
    if [ -f "$lock" ]; then
      check_lock "$lock"
      say "installing torch $t and PEFT's dependencies into $dest from $lock" \
        "(once; torch $t imports its CUDA runtime wheels, GPU or not: ~2.5 GB download)"
      "$dest/bin/pip" install --quiet --progress-bar off --no-deps --require-hashes -r "$lock" >&2
    else
      say "warning: torch $t has no lock in scripts/locks (not hash-pinned); installing it from PyPI by version"
      "$dest/bin/pip" install --quiet --progress-bar off "torch==$t" "numpy<2" \
        transformers==4.40.2 accelerate==0.30.1 huggingface_hub==0.23.0 safetensors==0.4.3 >&2
    fi
    cp "$marker" "$dest/.peft-compat-lock"
  fi
  echo "$dest/bin/python"
}

# peft_release P: the folder holding PEFT P (made once).
peft_release() {
  local p="$1" dest="$root/.peft/peft-$1" lock="$locks/peft-$1.txt" marker
  if [ -f "$lock" ]; then marker="$lock"; else marker=/dev/null; fi
  if [ ! -f "$dest/.peft-compat-lock" ] || ! cmp -s "$marker" "$dest/.peft-compat-lock"; then
    rm -rf "$dest"
    if [ -f "$lock" ]; then
      check_lock "$lock"
      say "installing PEFT $p into $dest from $lock (once)"
      python3 -m pip install --quiet --progress-bar off --no-deps --require-hashes \
        --target "$dest" -r "$lock" >&2
    else
      say "warning: PEFT $p has no lock in scripts/locks (not hash-pinned); installing it from PyPI by version"
      python3 -m pip install --quiet --progress-bar off --no-deps --target "$dest" "peft==$p" >&2
    fi
    cp "$marker" "$dest/.peft-compat-lock"
  fi
  echo "$dest"
}

# build P T: provision PEFT P on torch T; once made, check that it imports (an import error is
# the build's error, said here with Python's words).
build() {
  local py path stamp="$root/.peft/peft-$1+torch$2.ok"
  py="$(torch_env "$2")"
  path="$(peft_release "$1")"
  if [ ! -f "$stamp" ] || [ "$stamp" -ot "$path/.peft-compat-lock" ]; then
    PYTHONPATH="$path" PYTHONNOUSERSITE=1 "$py" -c \
      "import torch, peft; assert peft.__version__ == '$1', 'found PEFT ' + peft.__version__" >&2
    touch "$stamp"
  fi
}

case "${1:-}" in
  defaults)
    if [ -n "${PEFT_COMPAT_SKIP_PEFT_BUILDS:-}" ]; then
      exit 0
    fi
    build 0.10.0 2.1.2
    build 0.11.0 2.1.2
    ;;
  [0-9]*)
    [ $# = 2 ] || { echo "usage: $0 defaults | PEFT TORCH" >&2; exit 2; }
    build "$1" "$2"
    ;;
  *)
    echo "usage: $0 defaults | PEFT TORCH (e.g. $0 0.10.0 2.1.2)" >&2
    exit 2
    ;;
esac
