"""Replay a peft-compat dump with torch and PEFT.

    .venv/bin/pip install peft            # once
    .venv/bin/python scripts/replay.py dumps/tch__cpu__f16__dora__forward__native__small.safetensors

Builds a one-Linear model, loads the dumped tensors under PEFT's names, runs the forward and
compares PEFT's result with the dumped reference (float64) and with peft-compat's own output.
"""
import sys, torch
from safetensors import safe_open
from peft import LoraConfig, get_peft_model

path = sys.argv[1]
with safe_open(path, "pt") as f:
    meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
w = t["base_layer.weight"]
base = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias="base_layer.bias" in t)).to(w.dtype)
cfg = LoraConfig(r=int(meta["rank"]), lora_alpha=float(meta["alpha"]), use_rslora=meta["rslora"] == "true",
                 use_dora=meta["adapter"] == "dora", target_modules=["0"], init_lora_weights=False)
model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
state = {f"base_model.model.0.{k}": v for k, v in t.items() if not k.startswith(("output.", "reference.", "input", "grad_output"))}
state = {k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight")
          .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight"): v for k, v in state.items()}
missing = model.load_state_dict(state, strict=False)
print("unexpected:", missing.unexpected_keys)
model.eval()
with torch.no_grad():
    y = model(t["input"])
print("peft vs reference:", (y.double() - t["reference.result"]).abs().max().item(), " peft vs peft-compat output:", (y.double() - t["output.result"].double()).abs().max().item())
