"""Replay a peft-compat dump with torch and PEFT.

    .venv/bin/python scripts/replay.py dumps/tch__cpu__f16__dora__forward__native__small.safetensors

Builds a one-layer model (nn.Linear, nn.Embedding or nn.Conv2d, from the dump's `layer`), wraps it
with PEFT (LoRA, DoRA, PiSSA or OLoRA init; `autocast_adapter_dtype` from the dump's precision),
loads the dumped tensors under PEFT's names and reruns the case's op through PEFT's own code:
- forward, LoRA's init: PEFT's forward (`result`);
- backward: PEFT's forward and autograd with the dumped `grad_output` (`result`, `grad.*`);
- DoRA's init: PEFT's `dora_init` on the dumped A and B (`lora_magnitude_vector`);
- merge: `merge_adapter()` (`merged_weight`); unmerge and roundtrip: merge then
  `unmerge_adapter()` (`unmerged_weight`);
- init_noop: the adapted layer at init (`result`) and the original base layer (`base_result`);
  parity: the forward before and after merging (`result`, `merged_result`);
- PiSSA/OLoRA init: PEFT computes the residual weight, s * B @ A (and PiSSA-DoRA's magnitude)
  from the dumped weight (`base_layer.weight`, `delta_weight`, `lora_magnitude_vector`).
Prints one line per comparison, "WHAT: peft vs reference|output: MAX_ABS_DIFF", against the f64
reference and peft-compat's output. Exits 1 when PEFT refuses a dumped tensor, 2 when the dump
holds an output this script cannot replay (named), so a dump is never "replayed" unchecked.
"""
import copy, sys, torch
from safetensors import safe_open
from peft import LoraConfig, get_peft_model

path = sys.argv[1]
with safe_open(path, "pt") as f:
    meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
layer, adapter, op = meta["layer"], meta["adapter"], meta["op"]
w = t["base_layer.weight"]
bias = "base_layer.bias" in t
if layer == "Embedding":
    base = torch.nn.Embedding(w.shape[0], w.shape[1])
    x = t["input"].long()
elif layer == "Conv2d":
    base = torch.nn.Conv2d(w.shape[1], w.shape[0], int(meta["kernel"]), bias=bias)
    x = t["input"]
else:
    base = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    x = t["input"]
base = torch.nn.Sequential(base).to(w.dtype)
# The base layer as the dump has it (PiSSA/OLoRA then compute the adapter from it).
with torch.no_grad():
    base[0].weight.copy_(w)
    if bias:
        base[0].bias.copy_(t["base_layer.bias"])
original = copy.deepcopy(base)  # init_noop's base layer alone (PiSSA/OLoRA replace the weight)
init = {"pissa": "pissa", "pissa_dora": "pissa", "olora": "olora"}.get(adapter, False)
cfg = LoraConfig(r=int(meta["rank"]), lora_alpha=float(meta["alpha"]), use_rslora=meta["rslora"] == "true",
                 use_dora=adapter in ("dora", "pissa_dora"), target_modules=["0"], init_lora_weights=init)
model = get_peft_model(base, cfg, autocast_adapter_dtype=meta["precision"] == "autocast")
layer0 = model.base_model.model[0]

compared = set()

def compare(what, got, name):
    got = got.detach()
    for prefix in ("reference.", "output."):
        if prefix + name in t:
            ref = t[prefix + name]
            # PEFT's layout where ours differs only in shape (a Conv2d magnitude [1, out, 1, 1]).
            g = (got.reshape(ref.shape) if got.numel() == ref.numel() else got).double()
            ref = ref.double()
            # Non-finite values (DoRA's 0/0 on a zero row) agree where both are non-finite at
            # the same places; the difference is taken over the rest. Elsewhere it is inf.
            fin = torch.isfinite(g) & torch.isfinite(ref)
            same = torch.equal(torch.isfinite(g), torch.isfinite(ref))
            d = (g - ref)[fin].abs().max().item() if same and fin.any() else (0.0 if same else float("inf"))
            note = f" (non-finite at the same {int((~fin).sum())} places)" if same and not fin.all() else ""
            print(f"{what}: peft vs {prefix[:-1]}: {d:.3e}{note}")
    compared.add(name)

def finish():
    """Every output the dump holds was compared, or say which were not."""
    left = sorted(k[len("output."):] for k in t if k.startswith("output.") and k[len("output."):] not in compared)
    if left:
        print(f"cannot replay {op} outputs: {', '.join(left)}")
        sys.exit(2)
    sys.exit(0)

if init:
    # PEFT ran the init on the dumped weight: its residual and s * B @ A.
    s = layer0.scaling["default"]
    residual = layer0.base_layer.weight.detach()
    delta = s * (layer0.lora_B["default"].weight.float() @ layer0.lora_A["default"].weight.float())
    model.eval()
    with torch.no_grad():
        if op == "init_noop":
            compare("forward at init", model(x), "result")
            compare("base layer", original(x), "base_result")
        else:
            compare("residual weight", residual, "base_layer.weight")
            compare("s * B @ A", delta, "delta_weight")
            if "output.lora_magnitude_vector" in t:
                compare("magnitude", layer0.lora_magnitude_vector["default"].weight, "lora_magnitude_vector")
    finish()

# Load the dumped adapter under PEFT's names.
names = {"lora_A.weight": "lora_A.default.weight", "lora_B.weight": "lora_B.default.weight",
         "lora_embedding_A": "lora_embedding_A.default", "lora_embedding_B": "lora_embedding_B.default",
         "lora_magnitude_vector": "lora_magnitude_vector.default.weight"}
own = dict(model.state_dict())
state = {}
for k, v in t.items():
    if k in names:
        key = f"base_model.model.0.{names[k]}"
        state[key] = v.reshape(own[key].shape).to(own[key].dtype)
result = model.load_state_dict(state, strict=False)
if result.unexpected_keys:
    print("PEFT does not know:", result.unexpected_keys)
    sys.exit(1)
print("loaded:", ", ".join(sorted(k.split("0.", 1)[1] for k in state)))

def params():
    """PEFT's trainable tensors under the names our gradients carry."""
    a = layer0.lora_embedding_A["default"] if layer == "Embedding" else layer0.lora_A["default"].weight
    b = layer0.lora_embedding_B["default"] if layer == "Embedding" else layer0.lora_B["default"].weight
    out = {"lora_A.weight": a, "lora_B.weight": b}
    if "default" in getattr(layer0, "lora_magnitude_vector", {}):
        out["lora_magnitude_vector"] = layer0.lora_magnitude_vector["default"].weight
    return out

if adapter == "dora" and "lora_magnitude_vector" not in t:
    # At init (init, init_noop) the dump has A and B but no magnitude: PEFT computes it, as
    # get_peft_model did from its own random A and B. PEFT 0.21 runs DoRA's init through the
    # layer's variant (`lora_variant[name].init`, the DoRA*Variant of peft/tuners/lora/variants.py).
    with torch.no_grad():
        layer0.lora_variant["default"].init(layer0, "default", config=cfg)
if op == "init" and adapter == "dora":
    compare("magnitude", layer0.lora_magnitude_vector["default"].weight, "lora_magnitude_vector")
elif op == "backward":
    model.train()
    xg = x.clone().requires_grad_(True) if x.is_floating_point() else x
    y = model(xg)
    y.backward(t["grad_output"].to(y.dtype))
    compare("forward", y, "result")
    for name, p in params().items():
        if p.grad is not None:
            compare(f"grad {name}", p.grad, f"grad.{name}")
    if x.is_floating_point():
        compare("grad input", xg.grad, "grad.input")
elif op in ("merge", "unmerge", "roundtrip"):
    model.merge_adapter()
    if op == "merge":
        compare("merged weight", layer0.base_layer.weight, "merged_weight")
    else:
        model.unmerge_adapter()
        compare("unmerged weight", layer0.base_layer.weight, "unmerged_weight")
else:
    model.eval()
    with torch.no_grad():
        compare("forward", model(x), "result")
        if op == "init_noop":
            compare("base layer", original(x), "base_result")
        if op == "parity":
            model.merge_adapter()
            compare("merged forward", model(x), "merged_result")
finish()
