"""The PEFT worker: PEFT's own code behind peft-compat's worker protocol.

    PYTHONPATH=.peft/peft-0.10.0 .peft/torch-2.1.2/bin/python workers/peft/worker.py peft@0.10.0+torch2.1.2

The second implementation of the protocol in workers/kit/src/protocol.rs (its doc is the
contract; this file follows it): frames are a `PCW1 ` header line of JSON, then the tensors'
little-endian bytes. peft-compat starts one per job slot, like its Rust workers, so the import of
torch and PEFT is paid once per slot.

Each case runs through the release's own code, via its public API where there is one: a one-layer
`nn.Sequential` (`nn.Linear`, `nn.Embedding` or `nn.Conv2d`) holding the case's base weights,
wrapped with `get_peft_model(LoraConfig(r, lora_alpha, use_dora, use_rslora, init_lora_weights,
target_modules=["0"]))` on the case's device and dtype; the case's A, B (and magnitude) are copied
into the adapter's parameters; forward through the model, backward through autograd,
merge/unmerge through `merge_adapter()`/`unmerge_adapter()`, PiSSA/OLoRA through
`init_lora_weights="pissa"`/`"olora"` on the case's weight; `step` is one `torch.optim.SGD` step
after the backward; `lora_bias` and a Conv2d's `groups` are LoraConfig's and nn.Conv2d's own.
The base layer is always torch's own module (`base: fused`, whatever the shape says). DoRA's magnitude for `init` and
`init_noop` (the case gives A and B, not the magnitude) comes from the release's own DoRA init,
which has no public entry, called on the case's A and B:
- PEFT >= 0.14 (a layer with `lora_variant`): `layer.lora_variant[name].init(layer, name, config=)`;
- PEFT 0.9 to 0.13: `LoraLayer.dora_init(name)`; before 0.11 (PR #1653) it multiplies
  `lora_B @ lora_A` in the adapter dtype, which is the `addmm_impl_cpu_` failure on CPU fp16.
`get_peft_model` itself runs that init on its own random A and B first, as it does for a user.

Precision paths: `native` = `autocast_adapter_dtype=False` (the release decides everything, its
fixes included); `autocast` = PEFT's default (`True`), refused as not applicable by releases
without the option; `fp32_init` = build and initialise in fp32 on the device, `model.to(dtype)`,
then the op. (`upcast` is peft-compat's model of the fix, never a PEFT case.)

Outcomes: an exception whose innermost frame is in a library (torch, PEFT, transformers) is the
library refusing the case: `refused`, with its message verbatim and the innermost PEFT frame
(`peft/tuners/lora/layer.py:191 in dora_init`). One raised in this file is our bug: `panicked`
(the case is `crashed`). A release that lacks the adapter, layer or option asked for answers
`not_applicable` with the reason (a skip, never a pass).

For tests of the protocol (both implementations honour it): PEFT_COMPAT_WORKER_TEST=stray prints a
non-protocol line before every reply, =panic makes every run fail in the worker's own code, and
=abort makes the process abort on a run.

scripts/replay.py imports `run_case` to replay dumps through the same code.
"""
import copy
import inspect
import json
import os
import sys
import time
import traceback

PROTOCOL = 3
MAGIC = b"PCW1 "
HERE = os.path.abspath(__file__)


class NotApplicable(Exception):
    """The release has no such adapter, layer or option: the case is skipped with this reason."""


def torch_dtypes():
    import torch

    return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


def release():
    import peft

    return peft.__version__


# ---------------------------------------------------------------------------------------------
# One case through PEFT.


def make_base(case, w, bias, dtype, device):
    """The one-layer model holding the case's (already rounded) base weights."""
    import torch

    layer, has_bias = case["layer"], bias is not None
    if layer == "embedding":
        base = torch.nn.Embedding(w.shape[0], w.shape[1])
    elif layer == "conv2d":
        groups = int(case.get("groups", 1))
        base = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], int(case["kernel"]), bias=has_bias, groups=groups)
    else:
        base = torch.nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    model = torch.nn.Sequential(base).to(device=device, dtype=dtype)
    with torch.no_grad():
        model[0].weight.copy_(w)
        if has_bias:
            model[0].bias.copy_(bias)
    return model


def config(case):
    """The release's LoraConfig for the case, or NotApplicable when it cannot express it."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import LoraLayer

    adapter = case["adapter"]
    fields = getattr(LoraConfig, "__dataclass_fields__", {})
    dora = adapter in ("dora", "pissa_dora")
    if dora and "use_dora" not in fields:
        raise NotApplicable(f"PEFT {release()} has no DoRA (LoraConfig has no use_dora; DoRA arrived in 0.9.0)")
    init = {"pissa": "pissa", "pissa_dora": "pissa", "olora": "olora"}.get(adapter, True)
    if init != True and not hasattr(LoraLayer, f"{init}_init"):
        raise NotApplicable(f"PEFT {release()} has no {adapter} init (its LoraLayer has no {init}_init)")
    kw = dict(r=int(case["rank"]), lora_alpha=float(case["alpha"]), target_modules=["0"], init_lora_weights=init)
    if case["rslora"] in (True, "true"):
        kw["use_rslora"] = True
    if dora:
        kw["use_dora"] = True
    if case.get("lora_bias") in (True, "true"):
        if "lora_bias" not in fields:
            raise NotApplicable(f"PEFT {release()} has no lora_bias (added in 0.14.0)")
        kw["lora_bias"] = True
    return LoraConfig(**kw)


def wrap(base, cfg, autocast):
    """get_peft_model, with autocast_adapter_dtype where the release has the option."""
    from peft import get_peft_model

    has = "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters
    if autocast and not has:
        raise NotApplicable(
            f"PEFT {release()}'s get_peft_model has no autocast_adapter_dtype (the option arrived in 0.12.0)"
        )
    try:
        return get_peft_model(base, cfg, autocast_adapter_dtype=autocast) if has else get_peft_model(base, cfg)
    except ValueError as e:
        # A layer the release cannot adapt this way ("Embedding does not support DoRA yet").
        if "does not support" in str(e):
            raise NotApplicable(f"PEFT {release()}: {e}") from e
        raise


def params(layer, embedding):
    """The adapter's trainable tensors under the names our inputs and gradients carry."""
    if embedding:
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = {"lora_A.weight": a, "lora_B.weight": b}
    if not embedding and getattr(layer.lora_B["default"], "bias", None) is not None:
        out["lora_B.bias"] = layer.lora_B["default"].bias
    mags = getattr(layer, "lora_magnitude_vector", None)
    if mags is not None and "default" in mags:
        m = mags["default"]
        # PEFT >= 0.12 keeps it in a DoraLinearLayer (`.weight`); earlier, a bare Parameter.
        out["lora_magnitude_vector"] = getattr(m, "weight", m)
    return out


def dora_init(layer, cfg):
    """The release's DoRA init on the layer's current A and B (see the module doc)."""
    variants = getattr(layer, "lora_variant", None)
    if variants is not None and "default" in variants:
        variants["default"].init(layer, "default", config=cfg)
    else:
        layer.dora_init("default")


def run_case(case, t, device="cpu"):
    """Run one case through PEFT: `case` is the protocol's case (axes and geometry), `t` its
    inputs by name (torch tensors in the case dtype). Returns {output name: tensor}."""
    import torch

    dt = torch_dtypes()[case["dtype"]]
    precision, op, adapter = case["precision"], case["op"], case["adapter"]
    embedding = case["layer"] == "embedding"
    fp32_init = precision == "fp32_init"
    build = torch.float32 if fp32_init else dt
    dev = torch.device(device)
    # Fresh copies: a tensor read from a file may sit at any alignment, and a CPU GEMM may sum
    # in another order for it (a dump replayed 1 ulp apart from the worker that ran it).
    on = {k: v.to(dev).clone() for k, v in t.items()}
    # An Embedding's adapter travels as lora_embedding_A/B; its gradients as grad.lora_A.weight.
    for name, same in (("lora_embedding_A", "lora_A.weight"), ("lora_embedding_B", "lora_B.weight")):
        if name in on:
            on[same] = on.pop(name)
    x = on["input"].long() if embedding else on["input"]
    w = on["base_layer.weight"]
    # init_noop's yardstick: the base layer alone, as the case gives it (before PiSSA/OLoRA
    # rewrite the weight).
    original = make_base(case, w, on.get("base_layer.bias"), dt, dev) if op == "init_noop" else None
    base = make_base(case, w, on.get("base_layer.bias"), build, dev)
    cfg = config(case)
    model = wrap(base, cfg, precision == "autocast")
    layer = model.base_model.model[0]
    data_init = adapter in ("pissa", "pissa_dora", "olora")
    out = {}
    if data_init:
        # PEFT computed A, B, the residual (and PiSSA-DoRA's magnitude) from the case's weight.
        if fp32_init:
            model = model.to(dt)
        model.eval()
        with torch.no_grad():
            if op == "init_noop":
                out["result"] = model(x)
                out["base_result"] = original(x)
            else:
                p = params(layer, embedding)
                s = layer.scaling["default"]
                out["base_layer.weight"] = layer.base_layer.weight
                out["delta_weight"] = s * (p["lora_B.weight"].float() @ p["lora_A.weight"].float())
                if "lora_magnitude_vector" in p:
                    out["lora_magnitude_vector"] = p["lora_magnitude_vector"]
        return finish(out, case)
    # The case's adapter, copied into PEFT's parameters (each keeps PEFT's dtype and layout).
    p = params(layer, embedding)
    with torch.no_grad():
        for name, param in p.items():
            if name in on and on[name].numel() != param.numel():
                # PEFT < 0.16 gives a grouped Conv2d's lora_B no groups ([out, r] where the case,
                # in the layout of PEFT #2403/#2567, has [out, r / groups]): another adapter.
                raise NotApplicable(
                    f"PEFT {release()}'s {name} is {list(param.shape)}, the case's {list(on[name].shape)}: "
                    "this release lays the adapter out otherwise (a grouped Conv2d's lora_B takes the layer's groups from 0.16.0)"
                )
            if name in on:
                param.copy_(on[name].reshape(param.shape))
    if adapter == "dora" and "lora_magnitude_vector" not in on:
        # init, init_noop: the magnitude of the case's A and B, by the release's own init.
        with torch.no_grad():
            dora_init(layer, cfg)
    if fp32_init:
        model = model.to(dt)
    p = params(layer, embedding)
    if op == "init" and adapter == "dora":
        out["lora_magnitude_vector"] = p["lora_magnitude_vector"]
    elif op in ("backward", "step"):
        model.train()
        for param in p.values():
            param.requires_grad_(True)
        xg = x.clone().requires_grad_(True) if not embedding else x
        y = model(xg)
        y.backward(on["grad_output"].to(y.dtype))
        if op == "step":
            # One step of plain SGD on the adapter, in each parameter's own dtype.
            torch.optim.SGD(list(p.values()), lr=float(case.get("lr", 1e-4))).step()
            for name, param in p.items():
                out[name] = param
            return finish(out, case)
        out["result"] = y
        for name, param in p.items():
            out[f"grad.{name}"] = param.grad
        if not embedding:
            out["grad.input"] = xg.grad
    elif op in ("merge", "unmerge", "roundtrip"):
        lora_bias = "lora_B.bias" in p
        model.merge_adapter()
        if op == "merge":
            out["merged_weight"] = layer.base_layer.weight
            if lora_bias:
                out["merged_bias"] = layer.base_layer.bias.clone()
        else:
            model.unmerge_adapter()
            out["unmerged_weight"] = layer.base_layer.weight
            if lora_bias:
                out["unmerged_bias"] = layer.base_layer.bias
    else:  # forward, LoRA's init (its forward at init), init_noop, parity
        model.eval()
        with torch.no_grad():
            out["result"] = model(x)
            if op == "init_noop":
                out["base_result"] = original(x)
            if op == "parity":
                model.merge_adapter()
                out["merged_result"] = model(x)
    return finish(out, case)


def finish(out, case):
    """Outputs in peft-compat's layout: a magnitude as a vector (PEFT's Conv2d one is
    [1, out, 1, 1]), every tensor detached on the host."""
    done = {}
    for k, v in out.items():
        v = v.detach()
        if k in ("lora_magnitude_vector", "grad.lora_magnitude_vector"):
            v = v.reshape(-1)
        done[k] = v.cpu().contiguous()
    return done


# ---------------------------------------------------------------------------------------------
# Where an exception came from.


def frames(e):
    return traceback.extract_tb(e.__traceback__)


def peft_frame(e):
    """The innermost frame inside PEFT, as `peft/tuners/lora/layer.py:191 in dora_init`."""
    for f in reversed(frames(e)):
        parts = f.filename.replace("\\", "/").split("/")
        if "peft" in parts[:-1]:
            rel = "/".join(parts[len(parts) - 1 - parts[::-1].index("peft"):])
            return f"{rel}:{f.lineno} in {f.name}"
    return None


def ours(e):
    """Whether the innermost frame is this file: our bug, not the library's refusal."""
    fs = frames(e)
    return not fs or os.path.abspath(fs[-1].filename) == HERE


def words(e):
    msg = str(e).strip() or type(e).__name__
    where = peft_frame(e)
    return f"{msg} (at {where})" if where else msg


# ---------------------------------------------------------------------------------------------
# The protocol.


def read_frame(inp):
    line = inp.readline()
    while line and not line.startswith(MAGIC):
        line = inp.readline()
    if not line:
        return None, None
    msg = json.loads(line[len(MAGIC):])
    payload = {}
    for h in msg.get("tensors") or []:
        payload[h["name"]] = (h, inp.read(h["bytes"]))
    return msg, payload


def decode(h, data):
    import torch

    dt = torch_dtypes()[h["dtype"]]
    if len(data) == 0:
        return torch.empty(h["shape"], dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(h["shape"]).clone()


def encode(name, v):
    import torch

    names = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
    if v.dtype not in names:
        v = v.double()
    raw = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    data = raw.numpy().tobytes()
    return {"name": name, "dtype": names[v.dtype], "shape": list(v.shape), "bytes": len(data)}, data


def write_frame(out, msg, tensors=()):
    if os.environ.get("PEFT_COMPAT_WORKER_TEST") == "stray":
        out.write(b"a stray line on stdout (PEFT_COMPAT_WORKER_TEST=stray)\n")
    heads = [h for h, _ in tensors]
    if heads:
        msg = dict(msg, tensors=heads)
    out.write(MAGIC + json.dumps(msg).encode() + b"\n")
    for _, data in tensors:
        out.write(data)
    out.flush()


def probe(device):
    import torch

    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device here"
    n = int(device.split(":")[1]) if ":" in device else 0
    if n >= torch.cuda.device_count():
        return f"{device}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def answer(build, msg, payload):
    import torch

    kind = msg.get("type")
    if kind == "hello":
        if msg.get("protocol") == PROTOCOL:
            torch.set_num_threads(max(1, int(msg.get("threads", 1))))
        # libtorch is the one inside torch: matrix rules' `when: {libtorch: ...}` hold for it.
        libs = {"peft": release(), "torch": torch.__version__, "libtorch": torch.__version__,
                "python": sys.version.split()[0]}
        return {"type": "hello", "protocol": PROTOCOL, "backend": build, "libraries": libs,
                "cuda": torch.version.cuda}, ()
    if kind == "probe":
        return {"type": "probe", "unavailable": probe(msg["device"])}, ()
    if kind != "run":
        return {"type": "error", "message": f"unknown request type {kind!r}"}, ()
    test = os.environ.get("PEFT_COMPAT_WORKER_TEST")
    if test == "abort":
        os.abort()
    case = msg["case"]
    try:
        if test == "panic":
            raise RuntimeError("planted failure in the worker's own code (PEFT_COMPAT_WORKER_TEST=panic)")
        inputs = {n: decode(h, data) for n, (h, data) in payload.items()}
        # compute_ms: PEFT's own work (building the model, the op), not the framing.
        t0 = time.perf_counter()
        outs = run_case(case, inputs, case["device"])
        ms = (time.perf_counter() - t0) * 1e3
    except NotApplicable as e:
        return {"type": "not_applicable", "message": str(e)}, ()
    except Exception as e:  # every exception answers; the worker stays usable
        if ours(e):
            return {"type": "panicked", "message": f"{type(e).__name__}: {e} ({traceback.format_exc(limit=-1).strip()})"}, ()
        return {"type": "refused", "message": words(e)}, ()
    return {"type": "outputs", "compute_ms": ms}, [encode(k, v) for k, v in outs.items()]


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "peft"
    # Frames go to the real stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    import torch  # noqa: F401  (paid once, before the hello)
    import peft  # noqa: F401

    while True:
        try:
            msg, payload = read_frame(inp)
        except (ValueError, KeyError) as e:
            write_frame(out, {"type": "error", "message": f"unreadable request: {e}"})
            return 2
        if msg is None:
            return 0
        reply, tensors = answer(build, msg, payload)
        write_frame(out, reply, tensors)


if __name__ == "__main__":
    sys.exit(main())
