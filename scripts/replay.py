"""Replay a peft-compat dump with torch and PEFT.

    .venv/bin/pip install peft==0.21.2    # once (scripts/test does it)
    .venv/bin/python scripts/replay.py dumps/tch__cpu__f16__dora__forward__native__small.safetensors

Builds a one-layer model (nn.Linear, nn.Embedding or nn.Conv2d, from the dump's `layer`), wraps it
with PEFT (LoRA, DoRA, PiSSA or OLoRA init; `autocast_adapter_dtype` from the dump's precision),
loads the dumped tensors under PEFT's names and reruns the case:
- forward-like ops (forward, backward's result, LoRA's init, init_noop, parity): PEFT's forward
  against the f64 reference and peft-compat's own output;
- PiSSA/OLoRA init: PEFT computes the residual weight from the dumped weight; it is compared
  with the reference and peft-compat's (`base_layer.weight`), and so is PEFT's s * B @ A.
Prints one line per comparison (max abs difference); exits 1 when PEFT refuses to load a tensor.
"""
import sys, torch
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
init = {"pissa": "pissa", "pissa_dora": "pissa", "olora": "olora"}.get(adapter, False)
cfg = LoraConfig(r=int(meta["rank"]), lora_alpha=float(meta["alpha"]), use_rslora=meta["rslora"] == "true",
                 use_dora=adapter in ("dora", "pissa_dora"), target_modules=["0"], init_lora_weights=init)
model = get_peft_model(base, cfg, autocast_adapter_dtype=meta["precision"] == "autocast")
layer0 = model.base_model.model[0]

def compare(what, got, name):
    for prefix in ("reference.", "output."):
        if prefix + name in t:
            d = (got.double() - t[prefix + name].double()).abs().max().item()
            print(f"{what}: peft vs {prefix[:-1]}: {d:.3e}")

if init:
    # PEFT ran the init on the dumped weight: its residual and s * B @ A.
    s = layer0.scaling["default"]
    residual = layer0.base_layer.weight.detach()
    delta = s * (layer0.lora_B["default"].weight.float() @ layer0.lora_A["default"].weight.float())
    compare("residual weight", residual, "base_layer.weight")
    compare("s * B @ A", delta, "delta_weight")
    model.eval()
    with torch.no_grad():
        compare("forward at init", model(x), "result")
    sys.exit(0)

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
model.eval()
with torch.no_grad():
    y = model(x)
compare("forward", y, "result")
if op == "parity":
    model.merge_adapter()
    with torch.no_grad():
        compare("merged forward", model(x), "merged_result")
