# Sourced by scripts/peft-compat and scripts/test: makes libtorch available to the tch crate.
#
# - LIBTORCH already set (your own libtorch unpacked somewhere): used as is.
# - Otherwise the pinned PyPI torch wheel is installed once into .venv/ (about 4.7 GB with its
#   CUDA libraries, which libtorch_cpu needs to load) and reused afterwards; tch's build script
#   then finds libtorch through that Python (LIBTORCH_USE_PYTORCH=1). The binary embeds the
#   library path (rpath), so running it needs no LD_LIBRARY_PATH.
PEFT_COMPAT_TORCH_VERSION=2.11.0   # the libtorch that tch 0.24 is written against
PEFT_COMPAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${LIBTORCH:-}" ]; then
  echo "peft-compat: using LIBTORCH=$LIBTORCH" >&2
else
  venv="$PEFT_COMPAT_ROOT/.venv"
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$PEFT_COMPAT_TORCH_VERSION')" 2>/dev/null; then
    echo "peft-compat: installing torch==$PEFT_COMPAT_TORCH_VERSION (libtorch) into $venv (once; ~4.7 GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --progress-bar off "torch==$PEFT_COMPAT_TORCH_VERSION"
  fi
  export LIBTORCH_USE_PYTORCH=1
  export PATH="$venv/bin:$PATH"
fi
