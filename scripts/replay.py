"""Replay a peft-compat dump with torch and PEFT.

    .venv/bin/python scripts/replay.py dumps/tch__cpu__f16__dora__forward__native__small.safetensors

Reads the dump as any outsider would (its format is documented in the README, "Dumps"), reruns
the case through PEFT's own code with the PEFT worker's `run_case` (workers/peft/worker.py: a
one-layer model wrapped by `get_peft_model`, the dumped tensors copied into PEFT's parameters,
the op through PEFT's forward, autograd, `merge_adapter`/`unmerge_adapter`, DoRA/PiSSA/OLoRA
init), and compares every output the dump holds:
- forward, LoRA's init: `result`; backward: `result`, `grad.*`; DoRA's init: the magnitude;
- merge: `merged_weight`; unmerge and roundtrip: `unmerged_weight`;
- init_noop: `result` and `base_result`; parity: `result` and `merged_result`;
- PiSSA/OLoRA init: the residual weight, s * B @ A (and PiSSA-DoRA's magnitude).
A dump's `upcast` path is replayed as PEFT's own (PEFT's native path runs its fixes).
Prints one line per comparison, "WHAT: peft vs reference|output: MAX_ABS_DIFF". Exits 1 when
PEFT refuses the case (its words printed), 2 when the dump holds an output this script cannot
replay (named), so a dump is never "replayed" unchecked.
"""
import os
import sys

from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "workers", "peft"))
import worker  # noqa: E402

path = sys.argv[1]
with safe_open(path, "pt") as f:
    meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
case = dict(meta, layer=meta["layer"].lower())
inputs = {k: v for k, v in t.items() if not k.startswith(("output.", "reference."))}
try:
    got = worker.run_case(case, inputs, "cpu")
except worker.NotApplicable as e:
    print(f"PEFT cannot express this case: {e}")
    sys.exit(2)
except Exception as e:  # PEFT (or torch) refused it
    print(f"PEFT refuses this case: {worker.words(e)}")
    sys.exit(1)


def compare(name, g):
    import torch

    for prefix in ("reference.", "output."):
        if prefix + name not in t:
            continue
        ref = t[prefix + name].double()
        g = g.reshape(ref.shape).double() if g.numel() == ref.numel() else g.double()
        # Non-finite values (DoRA's 0/0 on a zero row) agree where both are non-finite at the
        # same places; the difference is taken over the rest. Elsewhere it is inf.
        fin = torch.isfinite(g) & torch.isfinite(ref)
        same = g.shape == ref.shape and torch.equal(torch.isfinite(g), torch.isfinite(ref))
        d = (g - ref)[fin].abs().max().item() if same and fin.any() else (0.0 if same else float("inf"))
        note = f" (non-finite at the same {int((~fin).sum())} places)" if same and not fin.all() else ""
        print(f"{name}: peft vs {prefix[:-1]}: {d:.3e}{note}")


for name, g in got.items():
    compare(name, g)
left = sorted(k[len("output."):] for k in t if k.startswith("output.") and k[len("output."):] not in got)
if left:
    print(f"cannot replay {meta['op']} outputs: {', '.join(left)}")
    sys.exit(2)
