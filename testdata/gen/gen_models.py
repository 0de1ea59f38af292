"""Builds the committed test models with the real exporters (developers only; CI never runs this).

Every model goes to testdata/models/<name>/ with:
  model.onnx   (+ model.onnx.data for the external-data model)
  io.npz       inputs (keys = model input names) and onnxruntime reference outputs (keys = output names)
  truth.json   what the generator built: form, exporter, per-layer N, top-k, sizes, activation, ... —
               the ground truth detection tests compare against (never the detector's own output).

Seeded and deterministic. Run through run.sh, once with transformers v4 (--tf 4) and once with v5.
"""
import argparse, collections, inspect, json, os, shutil, sys, textwrap, warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

warnings.filterwarnings("ignore")
TF_MAJOR = int(transformers.__version__.split(".")[0])
VOCAB = 256


# ---------------------------------------------------------------------------------------------
# Patches that make TorchScript exports faithful (documented in testdata/README.md)
# ---------------------------------------------------------------------------------------------
def simple_causal_mask(config=None, input_embeds=None, attention_mask=None, *args, **kw):
    """Trace-friendly causal+padding mask. HF's vmap-based mask builder bakes the export
    shape into the graph (or fails to trace); this builds the same additive mask with plain ops."""
    if input_embeds is None:
        input_embeds = kw.get("inputs_embeds")
    s = input_embeds.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    m = causal[None, None] & attention_mask[:, None, None, :].bool()
    dt = input_embeds.dtype
    return torch.zeros(m.shape, dtype=dt).masked_fill(~m, torch.finfo(dt).min)


def patch_masks(module):
    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if hasattr(module, name):
            setattr(module, name, simple_causal_mask)


def patch_expert_loop(cls):
    """Make the expert loop visit every expert (as transformers <= 4.47 did) instead of only
    the experts the export input hits: the TorchScript tracer unrolls Python loops, so the
    unpatched loop silently drops experts and bakes the hit count into a Split."""
    module = sys.modules[cls.__module__]
    src = textwrap.dedent(inspect.getsource(cls.forward))
    new = (src.replace("for expert_idx in expert_hit:", "for expert_idx in range(self.num_experts):")
              .replace("expert_idx = expert_idx[0]", "pass")
              .replace("expert_mask[expert_idx].squeeze(0)", "expert_mask[expert_idx]")
              .replace("for idx in idx_mask:", "for idx in range(num_experts):"))
    if new == src:
        assert "for expert_idx in range(self.num_experts)" in src, f"{cls.__name__}: expert loop not found"
        return  # this version already visits every expert
    ns = {}
    exec(compile(new, f"<patched {cls.__name__}.forward>", "exec"), module.__dict__, ns)
    cls.forward = ns["forward"]


class CausalLM(torch.nn.Module):
    """Fixes the exported signature to (input_ids, attention_mask, position_ids) -> logits."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, position_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).logits


class Encoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# ---------------------------------------------------------------------------------------------
def lm_inputs(batch, seq, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.int64)
    if pad and batch > 1:
        am[1, seq - 3:] = 0  # right padding on the second row: calibration must exclude it
    pos = torch.arange(seq).expand(batch, seq).contiguous()
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


def init_weights(model, seed):
    """Random weights with a realistic spread (HF's init is N(0, 0.02): too small to route)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))


def export(model, inputs, path, dynamo, dynamic):
    names = list(inputs)
    args = tuple(inputs.values())
    if dynamo:
        b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
        shapes = {k: {0: b, 1: s} for k in names}
        onnx_prog = torch.onnx.export(model, args, input_names=names, output_names=["logits" if "position_ids" in names else "last_hidden_state"],
                                      dynamic_shapes=tuple(shapes.values()), dynamo=True, opset_version=18)
        onnx_prog.save(path)
    else:
        out = "logits" if "position_ids" in names else "last_hidden_state"
        axes = {k: {0: "batch", 1: "seq"} for k in names + [out]} if dynamic else None
        torch.onnx.export(model, args, path, input_names=names, output_names=[out],
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def finish(name, outdir, model, inputs, truth, torch_ref=None, rtol=1e-4):
    """Checks the export against torch, writes io.npz (onnxruntime reference) and truth.json."""
    d = os.path.join(outdir, name)
    path = os.path.join(d, "model.onnx")
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    outs = sess.run(None, feed)
    if torch_ref is not None:
        with torch.no_grad():
            t = torch_ref(**inputs).numpy()
        err = np.abs(outs[0] - t).max() / (np.abs(t).max() + 1e-9)
        assert err < rtol, f"{name}: onnxruntime disagrees with torch ({err})"
    io = dict(feed)
    for o, v in zip(sess.get_outputs(), outs):
        io[o.name] = v
    np.savez(os.path.join(d, "io.npz"), **io)
    truth = dict(truth, name=name, transformers=transformers.__version__, torch=torch.__version__,
                 ops=dict(collections.Counter(n.op_type for n in m.graph.node).most_common()))
    with open(os.path.join(d, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
    print(f"{name}: {os.path.getsize(path)} bytes, {len(m.graph.node)} nodes")


def moe_layer_truth(n_layers, n, k, hidden, inter, act, renorm, present=None, shared=None, **extra):
    layers = []
    for l in range(n_layers):
        layers.append(dict(layer=l, experts=n, top_k=k, hidden=hidden, intermediate=inter, activation=act,
                           renormalize=renorm, router_scoring="softmax",
                           experts_present=list(range(n)) if present is None else present[l],
                           shared_experts=shared or 0))
        layers[-1].update(extra)
    return layers


def count_expert_chains(path, n_layers):
    """Which experts are present per layer. Ground truth from the exporter's module-path node names
    (the generator may use names; smoe-opt's detector never does)."""
    m = onnx.load(path)
    import re
    present = [set() for _ in range(n_layers)]
    for n in m.graph.node:
        mm = re.search(r"layers\.(\d+)/[^/]*/experts\.(\d+)/", n.name)
        if mm:
            present[int(mm.group(1))].add(int(mm.group(2)))
    return [sorted(p) for p in present]


# ---------------------------------------------------------------------------------------------
# transformers v4: per-expert 2-D weights (ModuleList experts), TorchScript exporter
# ---------------------------------------------------------------------------------------------
def gen_v4(out):
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                              OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, SwitchTransformersConfig,
                              SwitchTransformersEncoderModel)
    import transformers.models.mixtral.modeling_mixtral as mx
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qm
    import transformers.models.olmoe.modeling_olmoe as om
    import transformers.models.llama.modeling_llama as lm
    import transformers.models.switch_transformers.modeling_switch_transformers as sw
    for mod in (mx, qm, om, lm):
        patch_masks(mod)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, attn_implementation="eager", use_cache=False, tie_word_embeddings=False)

    def lm_case(name, cls, cfg, truth, seed, patched=True, export_inputs=None, inputs=None):
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        init_weights(model, seed)
        w = CausalLM(model).eval()
        inputs = inputs or lm_inputs(2, 16, seed)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        export(w, export_inputs or inputs, os.path.join(out, name, "model.onnx"), dynamo=False, dynamic=True)
        return w, inputs

    # Unpatched first: the real behaviour of transformers 4.57 + TorchScript.
    orig = {c: c.forward for c in (mx.MixtralSparseMoeBlock,)}
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **common)
    # (a) export input that hits every expert: graph complete but the hit count is baked into a Split,
    #     so inputs that miss an expert fail in onnxruntime.
    # 2x32 tokens hit every expert of both layers (checked below).
    w, inputs = lm_case("mixtral_v4_ts_raw", MixtralForCausalLM, cfg, None, 1, patched=False, inputs=lm_inputs(2, 32, 1))
    present = count_expert_chains(os.path.join(out, "mixtral_v4_ts_raw", "model.onnx"), 2)
    assert all(len(p) == 8 for p in present), present
    finish("mixtral_v4_ts_raw", out, w, inputs,
           dict(form="per-expert", exporter="torchscript", family="mixtral", patched_loop=False,
                notes="unpatched 4.57 loop: Split over hit experts baked in; breaks on inputs missing an expert",
                layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True, present=present)), torch_ref=w)
    # (b) export input of 2 tokens: only the experts those tokens hit are in the graph.
    small = lm_inputs(1, 2, 7, pad=False)
    w, _ = lm_case("mixtral_v4_ts_missing", MixtralForCausalLM, cfg, None, 1, patched=False, export_inputs=small)
    present = count_expert_chains(os.path.join(out, "mixtral_v4_ts_missing", "model.onnx"), 2)
    assert any(len(p) < 8 for p in present), present
    finish("mixtral_v4_ts_missing", out, w, small,
           dict(form="per-expert", exporter="torchscript", family="mixtral", patched_loop=False, broken_export=True,
                layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True, present=present)), torch_ref=w)

    for c in (mx.MixtralSparseMoeBlock, qm.Qwen2MoeSparseMoeBlock, om.OlmoeSparseMoeBlock, sw.SwitchTransformersSparseMLP):
        patch_expert_loop(c)

    w, inputs = lm_case("mixtral_v4_ts", MixtralForCausalLM, cfg, None, 1)
    finish("mixtral_v4_ts", out, w, inputs,
           dict(form="per-expert", exporter="torchscript", family="mixtral", patched_loop=True,
                layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True)), torch_ref=w)

    qcfg = Qwen2MoeConfig(hidden_size=32, intermediate_size=96, moe_intermediate_size=48,
                          shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                          norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], **common)
    w, inputs = lm_case("qwen2moe_v4_ts", Qwen2MoeForCausalLM, qcfg, None, 2)
    finish("qwen2moe_v4_ts", out, w, inputs,
           dict(form="per-expert", exporter="torchscript", family="qwen2_moe", patched_loop=True,
                layers=moe_layer_truth(2, 8, 2, 32, 48, "swiglu", False, shared=1, shared_intermediate=96,
                                       shared_gate="sigmoid")), torch_ref=w)

    ocfg = OlmoeConfig(hidden_size=32, intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                       norm_topk_prob=False, **common)
    w, inputs = lm_case("olmoe_v4_ts", OlmoeForCausalLM, ocfg, None, 3)
    finish("olmoe_v4_ts", out, w, inputs,
           dict(form="per-expert", exporter="torchscript", family="olmoe", patched_loop=True,
                layers=moe_layer_truth(2, 16, 4, 32, 32, "swiglu", False)), torch_ref=w)

    # Switch: top-1 with expert capacity (encoder only; every layer sparse).
    scfg = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    num_experts=8, expert_capacity=6, encoder_sparse_step=1, router_jitter_noise=0.0,
                                    num_decoder_layers=1, decoder_sparse_step=1)
    torch.manual_seed(4)
    enc = SwitchTransformersEncoderModel(scfg).eval()
    init_weights(enc, 4)
    e = Encoder(enc).eval()
    inputs = lm_inputs(2, 16, 4)
    inputs.pop("position_ids")
    os.makedirs(os.path.join(out, "switch_v4_ts"), exist_ok=True)
    export(e, inputs, os.path.join(out, "switch_v4_ts", "model.onnx"), dynamo=False, dynamic=True)
    finish("switch_v4_ts", out, e, inputs,
           dict(form="per-expert", exporter="torchscript", family="switch", patched_loop=True,
                layers=moe_layer_truth(2, 8, 1, 32, 64, "relu", False, capacity=6)),
           torch_ref=e)

    dcfg = LlamaConfig(hidden_size=32, intermediate_size=64, **common)
    w, inputs = lm_case("dense_llama_v4_ts", LlamaForCausalLM, dcfg, None, 5)
    finish("dense_llama_v4_ts", out, w, inputs, dict(form="dense", exporter="torchscript", family="llama", layers=[]),
           torch_ref=w)

    # External data: the patched Mixtral saved with every tensor in model.onnx.data.
    src = os.path.join(out, "mixtral_v4_ts")
    dst = os.path.join(out, "mixtral_v4_ts_ext")
    shutil.rmtree(dst, ignore_errors=True)  # onnx.save appends to an existing data file
    os.makedirs(dst)
    m = onnx.load(os.path.join(src, "model.onnx"))
    onnx.save(m, os.path.join(dst, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    shutil.copy(os.path.join(src, "io.npz"), os.path.join(dst, "io.npz"))
    t = json.load(open(os.path.join(src, "truth.json")))
    t.update(name="mixtral_v4_ts_ext", external_data=True)
    json.dump(t, open(os.path.join(dst, "truth.json"), "w"), indent=1, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Single-block variants (transformers v4 blocks and plain torch modules, TorchScript exporter)
# ---------------------------------------------------------------------------------------------
class Block(torch.nn.Module):
    """hidden_states [B, S, H] -> block output (drops HF's router_logits)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, hidden_states):
        out = self.m(hidden_states)
        return out[0] if isinstance(out, tuple) else out


class BiasedMoE(torch.nn.Module):
    """A MoE block with biases everywhere (router and experts), written the way HF writes
    its experts (loop over all experts, torch.where, index_add_). Gated (SwiGLU/GeGLU) or
    plain (fc1 -> act -> fc2); softmax or sigmoid scoring."""

    def __init__(self, h, i, n, k, gated, act, scoring="softmax", renorm=True):
        super().__init__()
        self.n, self.k, self.gated, self.scoring, self.renorm = n, k, gated, scoring, renorm
        self.router = torch.nn.Linear(h, n, bias=True)
        self.act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                    "relu": torch.nn.functional.relu,
                    "gelu-tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[act]
        self.up = torch.nn.ModuleList(torch.nn.Linear(h, i, bias=True) for _ in range(n))
        self.gate = torch.nn.ModuleList(torch.nn.Linear(h, i, bias=True) for _ in range(n)) if gated else None
        self.down = torch.nn.ModuleList(torch.nn.Linear(i, h, bias=True) for _ in range(n))

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        logits = self.router(x)
        p = torch.softmax(logits, dim=-1) if self.scoring == "softmax" else torch.sigmoid(logits)
        w, idx = torch.topk(p, self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(idx, num_classes=self.n).permute(2, 1, 0)
        for e in range(self.n):
            slot, tok = torch.where(mask[e])
            xe = x[tok]
            hdn = self.act(self.gate[e](xe)) * self.up[e](xe) if self.gated else self.act(self.up[e](xe))
            out.index_add_(0, tok, self.down[e](hdn) * w[tok, slot, None])
        return out.view(b, s, h)


class DenseMoE(torch.nn.Module):
    """Dense all-experts form ("dense fallback" graphs, as optimum writes gpt-oss): every
    expert runs on every token; outputs are weighted by a [T, N] matrix that is zero outside
    the top-k (ScatterElements of the top-k weights into zeros) and summed."""

    def __init__(self, h, i, n, k, gated):
        super().__init__()
        self.n, self.k, self.gated = n, k, gated
        self.router = torch.nn.Linear(h, n, bias=False)
        self.up = torch.nn.ModuleList(torch.nn.Linear(h, i, bias=False) for _ in range(n))
        self.gate = torch.nn.ModuleList(torch.nn.Linear(h, i, bias=False) for _ in range(n)) if gated else None
        self.down = torch.nn.ModuleList(torch.nn.Linear(i, h, bias=False) for _ in range(n))

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        p = torch.softmax(self.router(x), dim=-1)
        w, idx = torch.topk(p, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(p).scatter(1, idx, w)
        out = torch.zeros_like(x)
        for e in range(self.n):
            hdn = torch.nn.functional.silu(self.gate[e](x)) * self.up[e](x) if self.gated else torch.relu(self.up[e](x))
            out = out + dense[:, e:e + 1] * self.down[e](hdn)
        return out.view(b, s, h)


def gen_variants(out):
    from transformers import MixtralConfig, Qwen2MoeConfig
    import transformers.models.mixtral.modeling_mixtral as mx
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qm
    patch_expert_loop(mx.MixtralSparseMoeBlock)
    patch_expert_loop(qm.Qwen2MoeSparseMoeBlock)
    h, i = 16, 32
    cases = []
    for n in (4, 8, 16, 32):
        for k in (1, 2, 4):
            if k < n:
                cases.append((f"mixtral_n{n}_k{k}", "mixtral", dict(n=n, k=k, act="silu")))
    for act, name in (("gelu", "geglu"), ("gelu_pytorch_tanh", "geglu"), ("relu", "gated-relu")):
        cases.append((f"mixtral_act_{act}", "mixtral", dict(n=8, k=2, act=act, truth_act=name)))
    cases.append(("qwen2moe_n4_k1_shared", "qwen2", dict(n=4, k=1)))
    cases.append(("biased_swiglu_n8_k2", "biased", dict(n=8, k=2, gated=True, act="silu", truth_act="swiglu")))
    cases.append(("biased_gelu_plain_n8_k2", "biased", dict(n=8, k=2, gated=False, act="gelu", truth_act="gelu")))
    cases.append(("biased_relu_plain_n16_k4", "biased", dict(n=16, k=4, gated=False, act="relu", truth_act="relu")))
    cases.append(("biased_geglu_tanh_n4_k2", "biased", dict(n=4, k=2, gated=True, act="gelu-tanh", truth_act="geglu")))
    cases.append(("sigmoid_router_n8_k2", "biased", dict(n=8, k=2, gated=True, act="silu", truth_act="swiglu",
                                                          scoring="sigmoid")))
    cases.append(("dense_swiglu_n8_k2", "dense", dict(n=8, k=2, gated=True, truth_act="swiglu")))
    cases.append(("dense_relu_n4_k1", "dense", dict(n=4, k=1, gated=False, truth_act="relu")))
    for seed, (name, kind, c) in enumerate(cases, start=100):
        torch.manual_seed(seed)
        n, k = c["n"], c["k"]
        shared, renorm, scoring, biases = 0, True, c.get("scoring", "softmax"), False
        if kind == "mixtral":
            cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=n, num_experts_per_tok=k,
                                hidden_act=c["act"])
            mod = mx.MixtralSparseMoeBlock(cfg)
            act = c.get("truth_act", "swiglu")
        elif kind == "qwen2":
            cfg = Qwen2MoeConfig(hidden_size=h, moe_intermediate_size=i, shared_expert_intermediate_size=2 * i,
                                 num_experts=n, num_experts_per_tok=k, norm_topk_prob=False)
            mod = qm.Qwen2MoeSparseMoeBlock(cfg)
            act, shared, renorm = "swiglu", 1, False
        elif kind == "dense":
            mod = DenseMoE(h, i, n, k, c["gated"])
            act = c["truth_act"]
        else:
            mod = BiasedMoE(h, i, n, k, c["gated"], c["act"], scoring)
            act, biases = c["truth_act"], True
        mod = Block(mod).eval()
        init_weights(mod, seed)
        if biases:
            with torch.no_grad():
                for p_ in mod.parameters():
                    if p_.dim() == 1:
                        p_.copy_(torch.randn(p_.shape) * 0.1)
        x = torch.randn(2, 24, h)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        torch.onnx.export(mod, (x,), os.path.join(d, "model.onnx"), input_names=["hidden_states"], output_names=["out"],
                          dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}},
                          opset_version=17, dynamo=False)
        layer = dict(layer=0, experts=n, top_k=k, hidden=h, intermediate=i, activation=act, renormalize=renorm,
                     router_scoring=scoring, experts_present=list(range(n)), shared_experts=shared,
                     expert_biases=biases, router_bias=biases)
        finish(name, out, mod, {"hidden_states": x},
               dict(form="dense-all" if kind == "dense" else "per-expert", exporter="torchscript", family=kind,
                    patched_loop=True, layers=[layer]),
               torch_ref=lambda hidden_states: mod(hidden_states))


def gen_planted(out):
    """Planted MoE blocks for merging tests: N = 8 experts that are neuron-permuted (and, in
    the noisy cases, perturbed) copies of P = 4 prototypes, exported with TorchScript.
    Expert e is a copy of prototype e % 4; its router row is the prototype's row plus noise
    (so router logits of copies correlate), and the first copy of each prototype gets a
    router-bias advantage (so it is the most used, i.e. the dominant expert). Top-1 routing.
    truth.json: each expert's prototype, the permutations, the noise, and the noise floor:
    rel_l2 between the block and the same block with every expert replaced by its clean
    permuted prototype, on the held-out part of io.npz (the last 4 of 16 samples)."""
    h, i, n, p_, k = 32, 64, 8, 4, 1
    cases = [("planted_swiglu_exact", True, "silu", 0.0), ("planted_swiglu_noisy", True, "silu", 0.02),
             ("planted_relu_plain_noisy", False, "relu", 0.02)]
    for seed, (name, gated, act, noise) in enumerate(cases, start=300):
        g = torch.Generator().manual_seed(seed)
        mod = BiasedMoE(h, i, n, k, gated, act)
        protos = []
        for q in range(p_):
            protos.append(dict(up=torch.randn(i, h, generator=g) / h ** 0.5, up_b=torch.randn(i, generator=g) * 0.1,
                               gate=torch.randn(i, h, generator=g) / h ** 0.5, gate_b=torch.randn(i, generator=g) * 0.1,
                               down=torch.randn(h, i, generator=g) / i ** 0.5, down_b=torch.randn(h, generator=g) * 0.1))
        router = torch.linalg.qr(torch.randn(h, p_, generator=g))[0].T * 3.0  # orthogonal prototype rows
        perms, clean = [], []
        with torch.no_grad():
            for e in range(n):
                q = e % p_
                pi = torch.randperm(i, generator=g)
                perms.append(pi.tolist())
                pr = protos[q]
                w = dict(up=pr["up"][pi], up_b=pr["up_b"][pi], gate=pr["gate"][pi], gate_b=pr["gate_b"][pi],
                         down=pr["down"][:, pi], down_b=pr["down_b"])
                clean.append(w)
                nz = lambda t: t + noise * t.abs().mean() * torch.randn(t.shape, generator=g)
                mod.up[e].weight.copy_(nz(w["up"])); mod.up[e].bias.copy_(nz(w["up_b"]))
                if gated:
                    mod.gate[e].weight.copy_(nz(w["gate"])); mod.gate[e].bias.copy_(nz(w["gate_b"]))
                mod.down[e].weight.copy_(nz(w["down"])); mod.down[e].bias.copy_(nz(w["down_b"]))
                mod.router.weight[e].copy_(router[q] + 0.6 * torch.randn(h, generator=g) / h ** 0.5)
                mod.router.bias[e] = 0.5 if e < p_ else 0.0
        blk = Block(mod).eval()
        x = torch.randn(16, 32, h, generator=g)
        oracle = BiasedMoE(h, i, n, k, gated, act)
        oracle.load_state_dict(mod.state_dict())
        with torch.no_grad():
            for e in range(n):
                w = clean[e]
                oracle.up[e].weight.copy_(w["up"]); oracle.up[e].bias.copy_(w["up_b"])
                if gated:
                    oracle.gate[e].weight.copy_(w["gate"]); oracle.gate[e].bias.copy_(w["gate_b"])
                oracle.down[e].weight.copy_(w["down"]); oracle.down[e].bias.copy_(w["down_b"])
            y, yo = blk(x[-4:]), Block(oracle).eval()(x[-4:])
            floor = float((y - yo).norm() / y.norm())
            counts = torch.bincount(torch.topk(mod.router(x.view(-1, h)), 1).indices.view(-1), minlength=n).tolist()
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        torch.onnx.export(blk, (x[:2],), os.path.join(d, "model.onnx"), input_names=["hidden_states"],
                          output_names=["out"], opset_version=17, dynamo=False,
                          dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}})
        layer = dict(layer=0, experts=n, top_k=k, hidden=h, intermediate=i, activation="swiglu" if gated else act,
                     renormalize=True, router_scoring="softmax", experts_present=list(range(n)), shared_experts=0,
                     expert_biases=True, router_bias=True)
        finish(name, out, blk, {"hidden_states": x},
               dict(form="per-expert", exporter="torchscript", family="planted", layers=[layer],
                    prototype=[e % p_ for e in range(n)], dominant=list(range(p_)), permutations=perms, noise=noise,
                    noise_floor_rel_l2=floor, heldout="last 4 of 16 samples", top1_counts=counts),
               torch_ref=lambda hidden_states: blk(hidden_states))


def gen_bench(out):
    """Mid-size single MoE blocks for benchmarks (not committed): Mixtral-style SwiGLU,
    H=512, I=1408, N=8 and N=32, exported with TorchScript (loop over all experts)."""
    from transformers import MixtralConfig
    import transformers.models.mixtral.modeling_mixtral as mx
    patch_expert_loop(mx.MixtralSparseMoeBlock)
    for n, k in ((8, 2), (32, 4)):
        torch.manual_seed(n)
        cfg = MixtralConfig(hidden_size=512, intermediate_size=1408, num_local_experts=n, num_experts_per_tok=k)
        mod = Block(mx.MixtralSparseMoeBlock(cfg)).eval()
        init_weights(mod, n)
        name = f"bench_mixtral_n{n}_k{k}"
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        x = torch.randn(1, 256, 512)
        torch.onnx.export(mod, (x,), os.path.join(d, "model.onnx"), input_names=["hidden_states"], output_names=["out"],
                          dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}},
                          opset_version=17, dynamo=False)
        print(name, os.path.getsize(os.path.join(d, "model.onnx")))


# ---------------------------------------------------------------------------------------------
# transformers v5: stacked 3-D expert weights
# ---------------------------------------------------------------------------------------------
def gen_v5(out):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
    import transformers.models.mixtral.modeling_mixtral as mx
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qm
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, use_cache=False, tie_word_embeddings=False)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **common)

    # Dynamo exporter with the batched_mm experts implementation (Form B).
    for impl, name in (("batched_mm", "mixtral_v5_dynamo"),):
        torch.manual_seed(11)
        model = MixtralForCausalLM(cfg).eval()
        model.set_attn_implementation("sdpa") if hasattr(model, "set_attn_implementation") else None
        try:
            model.set_experts_implementation(impl)
        except Exception:
            model.config._experts_implementation = impl
        init_weights(model, 11)
        w = CausalLM(model).eval()
        inputs = lm_inputs(2, 16, 11)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        export(w, inputs, os.path.join(out, name, "model.onnx"), dynamo=True, dynamic=True)
        finish(name, out, w, inputs,
               dict(form="batched-3d", exporter="dynamo", family="mixtral", experts_implementation=impl,
                    layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True)), torch_ref=w)

    # TorchScript exporter of the eager 3-D experts, loop patched to visit every expert.
    patch_masks(mx)
    patch_masks(qm)
    patch_expert_loop(mx.MixtralExperts)
    torch.manual_seed(12)
    cfg5 = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                         attn_implementation="eager", **common)
    model = MixtralForCausalLM(cfg5).eval()
    init_weights(model, 12)
    w = CausalLM(model).eval()
    inputs = lm_inputs(2, 16, 12)
    os.makedirs(os.path.join(out, "mixtral_v5_ts"), exist_ok=True)
    export(w, inputs, os.path.join(out, "mixtral_v5_ts", "model.onnx"), dynamo=False, dynamic=True)
    finish("mixtral_v5_ts", out, w, inputs,
           dict(form="per-expert-3d", exporter="torchscript", family="mixtral", patched_loop=True,
                layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True)), torch_ref=w)


def hit_experts(model, inputs):
    """Per MoE layer, the experts the input routes at least one token to (torch, transformers 5)."""
    hits = []
    hooks = [layer.mlp.experts.register_forward_hook(
        lambda mod, args, out: hits.append(sorted(set(args[1].reshape(-1).tolist()))))
        for layer in model.model.layers]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return hits


def stock_model(cls, cfg, seed):
    """A transformers-5 model with the eager experts (the stock `expert_hit` loop), seeded."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.set_experts_implementation("eager")
    init_weights(model, seed)
    return model, CausalLM(model).eval()


def export_stock(out, name, model, w, inputs, family, layers, **extra):
    """Exports with TorchScript, unpatched, from an input that hits every expert of every layer."""
    hits = hit_experts(model, inputs)
    assert all(len(h) == 8 for h in hits), hits
    os.makedirs(os.path.join(out, name), exist_ok=True)
    export(w, inputs, os.path.join(out, name, "model.onnx"), dynamo=False, dynamic=True)
    finish(name, out, w, inputs,
           dict(form="per-expert-3d", exporter="torchscript", family=family, patched_loop=False,
                experts_implementation="eager", layers=layers, **extra), torch_ref=w)


def gen_v5_stock(out):
    """transformers 5 eager experts with the STOCK loop (`for expert_idx in expert_hit`), traced by
    TorchScript without any loop patch: each chain gathers its expert's slice of the 3-D weights
    with the i-th output of a Split over NonZero, sized at trace time."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, OlmoeConfig, OlmoeForCausalLM
    import transformers.models.mixtral.modeling_mixtral as mx
    import transformers.models.qwen3_moe.modeling_qwen3_moe as q3
    import transformers.models.olmoe.modeling_olmoe as ol
    for mod in (mx, q3, ol):
        patch_masks(mod)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, use_cache=False, tie_word_embeddings=False,
                  attn_implementation="eager")
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **common)
    model, w = stock_model(MixtralForCausalLM, cfg, 13)
    # (a) an export input that hits every expert of both layers: complete, but the hit count is
    #     baked into the Split (onnxruntime fails on inputs that miss an expert).
    export_stock(out, "mixtral_v5_ts_raw", model, w, lm_inputs(4, 32, 13), "mixtral",
                 moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True),
                 notes="stock transformers-5 loop: Split over hit experts baked in; breaks on inputs missing an expert")
    # Qwen3-MoE (top-k renormalised) and OLMoE (not renormalised): the same stock loop.
    fams = [("qwen3moe_v5_ts_raw", "qwen3_moe", Qwen3MoeForCausalLM,
             Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                            num_experts_per_tok=2, head_dim=8, norm_topk_prob=True, **common), True),
            ("olmoe_v5_ts_raw", "olmoe", OlmoeForCausalLM,
             OlmoeConfig(hidden_size=32, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         eos_token_id=1, pad_token_id=0, **common), False)]
    for name, fam, cls, c, renorm in fams:
        m, wm = stock_model(cls, c, 15)
        export_stock(out, name, m, wm, lm_inputs(4, 32, 15), fam, moe_layer_truth(2, 8, 2, 32, 32, "swiglu", renorm))
    # (b) an export input that misses experts: a broken export (chains for the hit experts only,
    #     bound by position), for diagnostics.
    small = lm_inputs(1, 2, 14, pad=False)
    hits = hit_experts(model, small)
    assert any(len(h) < 8 for h in hits), hits
    name = "mixtral_v5_ts_missing"
    os.makedirs(os.path.join(out, name), exist_ok=True)
    export(w, small, os.path.join(out, name, "model.onnx"), dynamo=False, dynamic=True)
    finish(name, out, w, small,
           dict(form="per-expert-3d", exporter="torchscript", family="mixtral", patched_loop=False,
                broken_export=True, experts_implementation="eager",
                notes="stock loop exported from a 2-token input: experts it did not hit are missing",
                layers=moe_layer_truth(2, 8, 2, 32, 64, "swiglu", True, present=hits)), torch_ref=w)


def gen_v5_deepseek(out):
    """DeepSeek-V3 (and Kimi-K2, same architecture): sigmoid scores, a selection-only bias
    (`e_score_correction_bias`), group-limited top-k, renormalised weights times a routed scaling
    factor, one shared expert. transformers 5, stock eager experts loop, TorchScript; and dynamo."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as ds
    patch_masks(ds)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5,
                           norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                           max_position_embeddings=512, use_cache=False, tie_word_embeddings=False,
                           attn_implementation="eager", rope_scaling=None)
    model, w = stock_model(DeepseekV3ForCausalLM, cfg, 17)
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for layer in model.model.layers:
            # A selection bias that changes the choice (the trained ones are O(0.1..1)).
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.1)
    layers = moe_layer_truth(2, 8, 2, 32, 32, "swiglu", True, shared=1, router_scoring="sigmoid",
                             selection_bias=True, groups=[2, 1], routed_scaling=2.5)
    export_stock(out, "deepseekv3_v5_ts_raw", model, w, lm_inputs(8, 64, 17), "deepseek_v3", layers)
    name = "deepseekv3_v5_dynamo"
    m, wd = stock_model(DeepseekV3ForCausalLM, cfg, 17)
    m.set_experts_implementation("batched_mm")
    with torch.no_grad():
        for a, b in zip(m.model.layers, model.model.layers):
            a.mlp.gate.e_score_correction_bias.copy_(b.mlp.gate.e_score_correction_bias)
    inputs = lm_inputs(2, 16, 17)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    export(wd, inputs, os.path.join(out, name, "model.onnx"), dynamo=True, dynamic=True)
    finish(name, out, wd, inputs, dict(form="batched-3d", exporter="dynamo", family="deepseek_v3",
                                       experts_implementation="batched_mm", layers=layers), torch_ref=wd)


def export_batched(out, name, cls, cfg, seed, family, layers):
    """The dynamo export of transformers-5 `batched_mm` experts (a fresh seeded model)."""
    m, wd = stock_model(cls, cfg, seed)
    m.set_experts_implementation("batched_mm")
    small = lm_inputs(2, 16, seed)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    export(wd, small, os.path.join(out, name, "model.onnx"), dynamo=True, dynamic=True)
    finish(name, out, wd, small, dict(form="batched-3d", exporter="dynamo", family=family,
                                      experts_implementation="batched_mm", layers=layers), torch_ref=wd)


def gen_v5_gptoss(out):
    """gpt-oss from transformers 5: router = Linear with bias, top-k on the logits, softmax over
    the k chosen; experts = x·W_gate_up + b with gate/up interleaved (`[..., ::2]`, `[..., 1::2]`),
    clamped SwiGLU (alpha 1.702, limit 7, +1 on up), down + bias. TorchScript of the stock loop
    (export input hits every expert) and dynamo."""
    from transformers import GptOssConfig, GptOssForCausalLM
    import transformers.models.gpt_oss.modeling_gpt_oss as go
    patch_masks(go)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, sliding_window=8, max_position_embeddings=131072, use_cache=False,
                       tie_word_embeddings=False, attn_implementation="eager",
                       layer_types=["sliding_attention", "full_attention"])
    model, w = stock_model(GptOssForCausalLM, cfg, 19)
    act = dict(alpha=1.702, beta=1.0, limit=7.0)
    layers = moe_layer_truth(2, 8, 2, 32, 32, "swiglu-clamped", True, router_scoring="softmax-after-topk",
                             router_bias=True, expert_biases=True, activation_params=act)
    export_stock(out, "gptoss_v5_ts_raw", model, w, lm_inputs(4, 32, 19), "gpt_oss", layers)
    export_batched(out, "gptoss_v5_dynamo", GptOssForCausalLM, cfg, 19, "gpt_oss", layers)


def gen_v5_phimoe(out):
    """PhiMoE (Phi-3.5-MoE): sparsemixer routing, top-2 chosen one after the other, each weighted
    by a softmax over the logits within a relative 2·jitter_eps of its own max (no
    renormalisation). jitter_eps 0.1 (the checkpoint's 0.01 gives weights of almost exactly 1 on
    random routers). transformers 5, stock eager loop, TorchScript; and dynamo."""
    from transformers import PhimoeConfig, PhimoeForCausalLM
    import transformers.models.phimoe.modeling_phimoe as pm
    patch_masks(pm)
    cfg = PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, use_cache=False, tie_word_embeddings=False,
                       attn_implementation="eager", router_jitter_noise=0.1, input_jitter_noise=0.0,
                       rope_scaling=None)
    model, w = stock_model(PhimoeForCausalLM, cfg, 23)
    layers = moe_layer_truth(2, 8, 2, 32, 32, "swiglu", False, router_scoring="sparsemixer",
                             sparsemixer_eps=0.1)
    export_stock(out, "phimoe_v5_ts_raw", model, w, lm_inputs(4, 32, 23), "phimoe", layers)
    export_batched(out, "phimoe_v5_dynamo", PhimoeForCausalLM, cfg, 23, "phimoe", layers)


# ---------------------------------------------------------------------------------------------
# onnxruntime's fused com.microsoft.MoE, built with onnx.helper (as onnxruntime-genai writes it)
# ---------------------------------------------------------------------------------------------
def gen_ort_fused(out):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(21)
    n, k, h, i = 8, 2, 32, 64
    wr = (rng.standard_normal((h, n)) / h ** 0.5).astype(np.float32)
    gate = (rng.standard_normal((n, i, h)) / h ** 0.5).astype(np.float32)
    up = (rng.standard_normal((n, i, h)) / h ** 0.5).astype(np.float32)
    down = (rng.standard_normal((n, h, i)) / i ** 0.5).astype(np.float32)
    fc1 = np.empty((n, 2 * i, h), np.float32)  # swiglu_fusion=1: rows interleaved g0,u0,g1,u1,...
    fc1[:, 0::2], fc1[:, 1::2] = gate, up
    nodes = [
        helper.make_node("MatMul", ["x", "router_w"], ["logits"], name="router"),
        helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe", domain="com.microsoft",
                         k=k, activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=1,
                         activation_alpha=1.0, activation_beta=0.0),
    ]
    g = helper.make_graph(nodes, "ort_moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", h])],
                          [numpy_helper.from_array(wr, "router_w"), numpy_helper.from_array(fc1, "fc1"),
                           numpy_helper.from_array(down, "fc2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                          producer_name="gen_models.py (onnx.helper, as onnxruntime-genai)")
    m.ir_version = 9
    d = os.path.join(out, "ort_moe_swiglu")
    os.makedirs(d, exist_ok=True)
    onnx.save(m, os.path.join(d, "model.onnx"))
    x = rng.standard_normal((24, h)).astype(np.float32)
    # numpy reference of the op's semantics (softmax over all N, top-k, renormalise, SwiGLU).
    logits = x @ wr
    p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    ref = np.zeros_like(x)
    for t in range(x.shape[0]):
        wts = p[t, top[t]] / p[t, top[t]].sum()
        for e, wt in zip(top[t], wts):
            g_, u_ = gate[e] @ x[t], up[e] @ x[t]
            ref[t] += wt * (down[e] @ (g_ / (1 + np.exp(-g_)) * u_))
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"fused MoE disagrees with numpy: {err}"
    np.savez(os.path.join(d, "io.npz"), x=x, y=y)
    json.dump(dict(name="ort_moe_swiglu", form="ort-fused", exporter="onnx.helper", weight_layout="[N,out,in] (ort>=1.23)",
                   layers=moe_layer_truth(1, n, k, h, i, "swiglu", True, swiglu_fusion=1)),
              open(os.path.join(d, "truth.json"), "w"), indent=1, sort_keys=True)
    print(f"ort_moe_swiglu: numpy vs onnxruntime rel err {err:.2e}")


def gen_tokenizer(out):
    """A small BPE tokenizer (vocab 256, matching the test models) trained with the
    `tokenizers` package on CPython's LICENSE text (shipped with every CPython), plus that
    text as a calibration file. For `smoe-opt calibrate --calib-text` tests."""
    import sysconfig
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8").read()
    d = os.path.join(out, "text")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "calib.txt"), "w", encoding="utf-8") as f:
        f.write(text[:12000])
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator([text], trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    print("tokenizer:", tok.get_vocab_size(), "tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    assert TF_MAJOR == a.tf, f"expected transformers v{a.tf}, found {transformers.__version__}"
    os.makedirs(a.out, exist_ok=True)
    if a.tf == 4 and a.only == "variants":
        gen_variants(a.out)
    elif a.tf == 4 and a.only == "bench":
        gen_bench(a.out)
    elif a.only == "planted":
        gen_planted(a.out)
    elif a.tf == 4:
        gen_v4(a.out)
    elif a.only == "tokenizer":
        gen_tokenizer(a.out)
    elif a.only == "v5-stock":
        gen_v5_stock(a.out)
    elif a.only == "deepseek":
        gen_v5_deepseek(a.out)
    elif a.only == "gptoss":
        gen_v5_gptoss(a.out)
    elif a.only == "phimoe":
        gen_v5_phimoe(a.out)
    else:
        gen_v5(a.out)
        gen_ort_fused(a.out)
