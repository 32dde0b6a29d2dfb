#!/usr/bin/env bash
# Regenerate the lock files in scripts/locks/: every wheel each provisioning step installs, by
# version and sha256, resolved for this machine's Python and platform (the lock's first line
# names them). The scripts install with `pip --require-hashes`, so a fresh clone gets exactly
# the files CI tested, and a tampered or replaced file is refused with its name. Run it after
# changing a pinned version (or to provision another Python or platform), review the diff and
# commit it. Resolving reads only PyPI's metadata (about 30 s); nothing is installed.
#
#   venv.txt         .venv: torch 2.11.0 (libtorch for tch 0.24) and PEFT 0.21.2 (replay tests)
#   libtorch-2.1.txt .libtorch/2.1.2: the torch 2.1.2 wheel and the two CUDA runtime wheels
#                    its libtorch_cpu links against (taken apart, not installed)
#   cuda-toolkit.txt .cuda-toolkit: nvcc and the CUDA 13.0 libraries the candle CUDA build needs
#   peft-torch-2.1.2.txt .peft/torch-2.1.2: the Python environment of the PEFT builds on torch
#                    2.1.2 (torch with its CUDA 12.1 runtime wheels, which its import loads, and
#                    PEFT's dependencies as of spring 2024: numpy 1.x, transformers 4.40)
#   peft-X.Y.Z.txt   .peft/peft-X.Y.Z: one PEFT release, without dependencies (they come from
#                    the torch environment it runs in)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/scripts/locks"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# lock NAME DEPS(yes|no) REQUIREMENT...: resolve without installing, write NAME.txt.
lock() {
  local name="$1" deps="$2"
  shift 2
  local flags=()
  [ "$deps" = no ] && flags+=(--no-deps)
  python3 -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: \
    "${flags[@]}" --report "$tmp/$name.json" "$@"
  python3 - "$tmp/$name.json" "$out/$name.txt" "$*" <<'PY'
import json, platform, sys
report, dest, asked = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for item in json.load(open(report))["install"]:
    meta, info = item["metadata"], item["download_info"]
    sha = info["archive_info"]["hashes"]["sha256"]
    wheel = info["url"].rsplit("/", 1)[-1]
    rows.append((meta["name"].lower(), meta["version"], sha, wheel))
with open(dest, "w") as f:
    f.write(f"# python {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]} "
            f"{platform.system().lower()} {platform.machine()}: made by scripts/lock.sh from: {asked}\n")
    for name, version, sha, wheel in sorted(rows):
        f.write(f"{name}=={version} --hash=sha256:{sha}  # {wheel}\n")
PY
  echo "scripts/locks/$name.txt: $(grep -vc '^#' "$out/$name.txt") wheels" >&2
}

lock venv yes torch==2.11.0 peft==0.21.2
lock libtorch-2.1 no torch==2.1.2 nvidia-cuda-runtime-cu12==12.1.105 nvidia-cuda-cupti-cu12==12.1.105
lock cuda-toolkit no nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 \
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
lock peft-torch-2.1.2 yes torch==2.1.2 numpy==1.26.4 transformers==4.40.2 accelerate==0.30.1 \
  huggingface_hub==0.23.0 safetensors==0.4.3
lock peft-0.10.0 no peft==0.10.0
lock peft-0.11.0 no peft==0.11.0
# For the test of a release without DoRA (DoRA arrived in 0.9.0), provisioned on demand.
lock peft-0.8.2 no peft==0.8.2
