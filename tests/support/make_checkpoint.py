"""Build the checkpoints the checkpoint tests run on (tests/checkpoint.rs), no download.

    python make_checkpoint.py OUT_DIR            # the small model, its shards and adapters
    python make_checkpoint.py OUT_DIR --big GB   # only a checkpoint of at least GB gigabytes

The small model is a two-layer BERT-like stack (embeddings, attention, MLP, a conv stem) with
the weights users meet: a word embedding whose padding row is all zeros, a position
embedding with one dead (all-zero) dimension, an attention output projection whose every
fourth row is zero (PEFT #2049), an MLP projection with a few huge rows (their fp16 sum of
squares overflows), one int8 tensor (quantized: no backend takes it). It is written

- as one file: OUT/model.safetensors;
- as two shards with an index: OUT/sharded/model-0000{1,2}-of-00002.safetensors and
  OUT/sharded/model.safetensors.index.json (Hugging Face's layout);

and two adapters are trained-like (B nonzero, DoRA magnitudes perturbed) and saved with PEFT's
own save_pretrained: OUT/lora (r=4, alpha=8) and OUT/dora (r=4, alpha=16, use_dora).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

H, FF, VOCAB, POS = 32, 64, 64, 16


def tensors(gen):
    """The small model's state dict, by Hugging Face-style names."""
    def lin(o, i):
        bound = 1 / i**0.5
        return (torch.rand(o, i, generator=gen) * 2 - 1) * bound, (torch.rand(o, generator=gen) * 2 - 1) * bound

    t = {}
    word = torch.randn(VOCAB, H, generator=gen)
    word[0] = 0.0  # the padding row
    t["embeddings.word_embeddings.weight"] = word
    pos = torch.randn(POS, H, generator=gen)
    pos[:, 3] = 0.0  # a dead embedding dimension
    t["embeddings.position_embeddings.weight"] = pos
    for layer in range(2):
        p = f"encoder.layer.{layer}."
        for name in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
            w, b = lin(H, H)
            t[p + name + ".weight"], t[p + name + ".bias"] = w, b
        w, b = lin(FF, H)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w, b
        w, b = lin(H, FF)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w, b
    # Layer 1's attention output: every fourth row zero (Llama-3.1-8B o_proj has 511 of them).
    t["encoder.layer.1.attention.output.dense.weight"][::4] = 0.0
    # Layer 1's MLP: three rows of entries ~300, whose fp16 sum of squares (32 x 9e4) overflows.
    big = t["encoder.layer.1.intermediate.dense.weight"]
    big[:3] = (torch.rand(3, H, generator=gen) * 2 - 1) * 300
    w = torch.empty(8, 4, 3, 3)
    torch.nn.init.kaiming_uniform_(w, a=5**0.5, generator=gen)
    t["stem.conv.weight"], t["stem.conv.bias"] = w, torch.zeros(8)
    t["quantized.dense.weight"] = torch.randint(-127, 127, (H, H), dtype=torch.int8, generator=gen)
    return {k: v.contiguous() for k, v in t.items()}


class Model(torch.nn.Module):
    """A module tree with the state dict's names, for PEFT to adapt."""

    def __init__(self, t):
        super().__init__()
        for name, w in t.items():
            if not name.endswith(".weight") or w.dtype == torch.int8:
                continue
            path = name[: -len(".weight")].split(".")
            if w.dim() == 4:
                m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2])
            elif "embeddings" in name:
                m = torch.nn.Embedding(*w.shape)
            else:
                m = torch.nn.Linear(w.shape[1], w.shape[0])
            parent = self
            for part in path[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(path[-1], m)
        self.load_state_dict({k: v for k, v in t.items() if v.dtype != torch.int8})


def save_adapter(t, out, r, alpha, dora, seed):
    import peft

    torch.manual_seed(seed)
    model = Model(t)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_dora=dora,
        init_lora_weights=False,  # B drawn too: a trained adapter's B is not zero
        target_modules=["query", "value", "dense", "word_embeddings", "position_embeddings", "conv"],
    )
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    pm.save_pretrained(out)


def small(out):
    gen = torch.Generator().manual_seed(20261203)
    t = tensors(gen)
    os.makedirs(out, exist_ok=True)
    save_file(t, os.path.join(out, "model.safetensors"))
    shard_dir = os.path.join(out, "sharded")
    os.makedirs(shard_dir, exist_ok=True)
    names = sorted(t)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        f = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: t[k] for k in part}, os.path.join(shard_dir, f))
        weight_map.update({k: f for k in part})
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in t.values())}, "weight_map": weight_map}, f, indent=2)
    save_adapter(t, os.path.join(out, "lora"), 4, 8, False, 1)
    save_adapter(t, os.path.join(out, "dora"), 4, 16, True, 2)


def big(out, gb):
    """Square f32 projections of 4096 x 4096 (64 MiB each) until the file holds `gb` GB."""
    gen = torch.Generator().manual_seed(7)
    n = int(gb * 1e9 / (4096 * 4096 * 4)) + 1
    t = {}
    for i in range(n):
        t[f"model.layers.{i}.mlp.proj.weight"] = torch.randn(4096, 4096, generator=gen) * 0.02
    os.makedirs(out, exist_ok=True)
    save_file(t, os.path.join(out, "model.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--big":
        big(sys.argv[1], float(sys.argv[3]))
    else:
        small(sys.argv[1])
