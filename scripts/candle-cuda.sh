#!/usr/bin/env bash
# Build the candle worker with CUDA kernels from PyPI packages alone: no CUDA toolkit install,
# no driver needed to build. Used by scripts/peft-compat and scripts/test when
# PEFT_COMPAT_CANDLE_CUDA=1; CI runs it to check that the build compiles and links.
#
# - The toolkit: the PyPI packages torch 2.11.0's `cuda-toolkit==13.0.2` pins (by version and
#   sha256 in scripts/locks/cuda-toolkit.txt), installed once into
#   .cuda-toolkit/ (they land in nvidia/cu13/{bin,include,lib,nvvm}); a newer nvcc emits PTX a
#   CUDA 13.0 driver may refuse, hence the pins.
# - The linker wants unversioned names (libcublas.so, ...): symlinks beside the versioned ones.
# - candle-core 0.11 turns on cudarc's `dynamic-linking`, which links -lcuda, and no PyPI package
#   ships the driver stub: a stub libcuda.so (soname libcuda.so.1) is made at build time from the
#   driver functions cudarc references; the real driver is used at run time.
# - The binary carries an rpath to nvidia/cu13/lib, so it runs without LD_LIBRARY_PATH wherever
#   a driver is installed.
# - CUDA_COMPUTE_CAP (default 90, Hopper) picks the kernels' target.
#
# The build takes about 13 minutes on 2 cores (about 32 MB of sm_90a kernels). The worker lands
# in target/release/ (replacing the CPU-only candle worker) when this machine has a driver
# (libcuda.so.1); elsewhere it is built and linked only, in target/candle-cuda/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tk="$root/.cuda-toolkit"
cu="$tk/nvidia/cu13"
lock="$root/scripts/locks/cuda-toolkit.txt"
if ! cmp -s "$lock" "$tk/complete"; then
  source "$root/scripts/lock-check.sh"
  check_lock "$lock"
  echo "peft-compat: installing the CUDA 13.0 toolkit from PyPI into $tk (once; ~700 MB)" >&2
  rm -rf "$tk"
  python3 -m pip install --quiet --no-deps --require-hashes --target "$tk" -r "$lock"
  for f in "$cu"/lib/lib*.so.*; do
    base="${f%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
  done
  cp "$lock" "$tk/complete"
fi
export CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu" PATH="$cu/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$cu/lib -L native=$cu/lib/stubs"
target="$root/target/candle-cuda"
build() {
  cargo build --release --quiet -p peft-compat-worker-candle --features cuda \
    --manifest-path "$root/Cargo.toml" --target-dir "$target"
}
if [ ! -f "$cu/lib/stubs/libcuda.so" ]; then
  # Compile everything; the link fails for want of libcuda. The driver functions cudarc
  # references then become the stub's (empty) definitions, and the link is run again.
  build 2>/dev/null || true
  mkdir -p "$cu/lib/stubs"
  nm -u --format=just-symbols "$target"/release/deps/libcudarc-*.rlib 2>/dev/null \
    | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$cu/lib/stubs/libcuda-stub.c"
  [ -s "$cu/lib/stubs/libcuda-stub.c" ] || { echo "candle-cuda: no driver symbols found in cudarc" >&2; exit 1; }
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/libcuda-stub.c"
fi
build
bin="$target/release/peft-compat-worker-candle"
echo "peft-compat: candle CUDA worker built and linked: $bin" >&2
if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
  cp -f "$bin" "$root/target/release/peft-compat-worker-candle"
  echo "peft-compat: installed as target/release/peft-compat-worker-candle" >&2
else
  echo "peft-compat: no NVIDIA driver here (libcuda.so.1): the CPU candle worker stays in target/release" >&2
fi
