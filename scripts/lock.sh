#!/usr/bin/env bash
# Regenerate the lock files in scripts/locks/: every wheel each provisioning step installs, by
# version and sha256, resolved for this machine's Python and platform (the lock's first line
# names them). The scripts install with `pip --require-hashes`, so a fresh clone gets exactly
# the files CI tested, and a tampered or replaced file is refused with its name. Run it after
# changing a pinned version (or to provision another Python or platform), review the diff and
# commit it. Resolving reads only PyPI's metadata (about 30 s); nothing is installed.
#
#   venv.txt         .venv: torch 2.11.0 (libtorch for tch 0.24) and PEFT 0.21.2 (replay tests)
#   libtorch-X.Y.Z.txt .libtorch/X.Y.Z: the torch X.Y.Z wheel and the two CUDA runtime wheels
#                    its libtorch_cpu links against, at the versions that torch requires (taken
#                    apart by scripts/libtorch.sh, not installed); one per build of
#                    workers/tch/libtorch-builds.txt but 2.11.0 (.venv's)
#
#   scripts/lock.sh libtorch X.Y.Z   only that one
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

# lock_libtorch VERSION: torch==VERSION and the CUDA runtime and CUPTI wheels it requires (its
# libtorch_cpu links libcudart and libcupti), found by resolving torch with its dependencies.
lock_libtorch() {
  local v="$1" pins
  pins="$(python3 -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: \
    --report - "torch==$v" | python3 -c '
import json, sys
want = ("nvidia-cuda-runtime-cu12", "nvidia-cuda-cupti-cu12")
metas = [i["metadata"] for i in json.load(sys.stdin)["install"]]
print(" ".join(m["name"] + "==" + m["version"] for m in metas if m["name"].lower() in want))')"
  lock "libtorch-$v" no "torch==$v" $pins
}

if [ "${1:-}" = libtorch ] && [ $# = 2 ]; then
  lock_libtorch "$2"
  exit 0
fi
lock venv yes torch==2.11.0 peft==0.21.2
for v in $(grep -v '^#' "$root/workers/tch/libtorch-builds.txt" | awk 'NF == 3 && $1 != "2.11.0" {print $1}'); do
  lock_libtorch "$v"
done
lock cuda-toolkit no nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 \
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
lock peft-torch-2.1.2 yes torch==2.1.2 numpy==1.26.4 transformers==4.40.2 accelerate==0.30.1 \
  huggingface_hub==0.23.0 safetensors==0.4.3
lock peft-0.10.0 no peft==0.10.0
lock peft-0.11.0 no peft==0.11.0
# For the test of a release without DoRA (DoRA arrived in 0.9.0), provisioned on demand.
lock peft-0.8.2 no peft==0.8.2
# The releases on each side of the lora_bias and grouped-Conv2d fixes (PEFT #2486, #2716,
# #2549), on torch 2.11 (.venv): the second failure sweep in matrices/failures.yaml. 0.16 and
# 0.17 do not import with .venv's transformers (HybridCache is gone); 0.15.2 and 0.18.0 do.
lock peft-0.15.2 no peft==0.15.2
lock peft-0.18.0 no peft==0.18.0
