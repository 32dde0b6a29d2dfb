#!/usr/bin/env bash
# Provision libtorch 2.1.2 (once) and build the `tch@2.1.2` worker beside peft-compat
# (target/release/peft-compat-worker-tch-2.1.2). Called by scripts/peft-compat and scripts/test.
#
# libtorch 2.1.2 is the last libtorch without a CPU fp16 matmul: the one that raised
# `"addmm_impl_cpu_" not implemented for 'Half'` in DoRA's init (PEFT #1597). It comes from the
# torch 2.1.2 wheel on PyPI, of which only what libtorch needs to load is kept in
# .libtorch/2.1.2/torch (about 500 MB): libtorch_cpu, libc10, libtorch, its libgomp, the
# headers, and the two CUDA runtime libraries libtorch_cpu links against (libcudart and
# libcupti, from their PyPI wheels; no GPU is needed), taken from the PEFT builds' torch 2.1.2
# environment when scripts/peft-env.sh made it (the same pinned wheels). The three wheels are pinned by version
# and sha256 in scripts/locks/libtorch-2.1.txt (pip --require-hashes). The wheels use the pre-C++11 ABI:
# tch 0.14 builds against them with LIBTORCH_CXX11_ABI=0 and LIBTORCH_BYPASS_VERSION_CHECK=1.
#
# PEFT_COMPAT_SKIP_LIBTORCH_2_1=1 skips all of it (tch@2.1.2 cases are then skipped, saying so).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PEFT_COMPAT_SKIP_LIBTORCH_2_1:-}" ]; then
  exit 0
fi
dest="$root/.libtorch/2.1.2"
lock="$root/scripts/locks/libtorch-2.1.txt"
if ! cmp -s "$lock" "$dest/complete"; then
  source "$root/scripts/lock-check.sh"
  check_lock "$lock"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # The PEFT builds' torch 2.1.2 environment (scripts/peft-env.sh) installed the very same
  # hash-pinned wheels: take the files from it when it is there, else download the wheels.
  site="$(ls -d "$root"/.peft/torch-2.1.2/lib/python3*/site-packages 2>/dev/null | head -1 || true)"
  if [ -n "$site" ] && [ -f "$root/.peft/torch-2.1.2/.peft-compat-lock" ] &&
    grep -qF -- "$(grep '^torch==' "$lock" | cut -d' ' -f2)" "$root/.peft/torch-2.1.2/.peft-compat-lock"; then
    echo "peft-compat: provisioning libtorch 2.1.2 into $dest from $site (once; ~500 MB kept)" >&2
    src="$site"
  else
    echo "peft-compat: provisioning libtorch 2.1.2 into $dest (once; ~700 MB download, ~500 MB kept)" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -d "$tmp" \
      -r "$lock"
    src="$tmp"
  fi
  rm -rf "$dest" && mkdir -p "$dest"
  python3 - "$src" "$dest" <<'PY'
import fnmatch, glob, os, shutil, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
keep = ["torch/lib/libtorch_cpu.so", "torch/lib/libtorch.so", "torch/lib/libc10.so",
        "torch/lib/libgomp-*.so.1", "torch/include/*", "torch/version.py"]
cuda = {"libcudart.so.12", "libcupti.so.12"}
def put(name, read):
    base = os.path.basename(name)
    if any(fnmatch.fnmatch(name, k) for k in keep):
        out = os.path.join(dest, name)
    elif base in cuda:
        out = os.path.join(dest, "torch/lib", base)
    else:
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with read() as f, open(out, "wb") as o:
        shutil.copyfileobj(f, o)
wheels = glob.glob(os.path.join(src, "*.whl"))
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if not name.endswith("/"):
                put(name, lambda name=name: z.open(name))
if not wheels:  # an installed environment: the same paths under site-packages
    for d, _, files in os.walk(src):
        for f in files:
            full = os.path.join(d, f)
            put(os.path.relpath(full, src), lambda full=full: open(full, "rb"))
PY
  cp "$lock" "$dest/complete"
fi
# Build with the old libtorch only: not the Python torch that env.sh points the 2.11 build at.
(cd "$root/workers/tch-2.1" &&
  env -u LIBTORCH_USE_PYTORCH LIBTORCH="$dest/torch" LIBTORCH_CXX11_ABI=0 \
    LIBTORCH_BYPASS_VERSION_CHECK=1 \
    cargo build --release --quiet --target-dir "$root/target/tch-2.1")
mkdir -p "$root/target/release"
cp -f "$root/target/tch-2.1/release/peft-compat-worker-tch-2-1" \
  "$root/target/release/peft-compat-worker-tch-2.1.2"
