# Sourced by scripts/peft-compat and scripts/test: makes libtorch available to the tch crate.
#
# - LIBTORCH already set (your own libtorch unpacked somewhere): used as is.
# - Otherwise the wheels of scripts/locks/venv.txt (torch 2.11.0, the libtorch tch 0.24 is
#   written against, with its CUDA libraries, which libtorch_cpu needs to load; PEFT 0.21.2 for
#   the replay tests; about 4.8 GB) are installed once into .venv/, each checked against its
#   sha256 (pip --require-hashes), and reinstalled when the lock changes; tch's build script
#   then finds libtorch through that Python (LIBTORCH_USE_PYTORCH=1). The binary embeds the
#   library path (rpath), so running it needs no LD_LIBRARY_PATH.
PEFT_COMPAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$PEFT_COMPAT_ROOT/scripts/lock-check.sh"

if [ -n "${LIBTORCH:-}" ]; then
  echo "peft-compat: using LIBTORCH=$LIBTORCH" >&2
else
  venv="$PEFT_COMPAT_ROOT/.venv"
  lock="$PEFT_COMPAT_ROOT/scripts/locks/venv.txt"
  if ! cmp -s "$lock" "$venv/.peft-compat-lock"; then
    check_lock "$lock"
    echo "peft-compat: installing torch 2.11.0 (libtorch) and PEFT into $venv from $lock" \
      "(once; ~4.8 GB; every wheel checked against its sha256)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --progress-bar off --no-deps --require-hashes -r "$lock"
    cp "$lock" "$venv/.peft-compat-lock"
  fi
  export LIBTORCH_USE_PYTORCH=1
  export PATH="$venv/bin:$PATH"
fi
