"""onnxruntime-genai builder models (what people ship to onnxruntime): tiny random `from_config`
checkpoints saved with transformers, converted by `python -m onnxruntime_genai.models.builder`.

Each output folder holds the builder's model.onnx (+ model.onnx.data), io.npz (inputs with
empty past key/value caches, and onnxruntime's outputs) and truth.json (what the checkpoint's
config says the MoE blocks are). fp32 outputs are also checked against the transformers model
run in torch, so the builder graph itself is known to be right.

Usage: gen_ortgenai.py --out DIR [--only NAME ...] [--precisions fp32 fp16 int4 int8 int4-rowscale] [--eps cpu cuda]
int4/int8 are com.microsoft.QMoE (scales per 32 inputs); int4-rowscale one scale per row.
Developers only (needs torch, transformers 5, onnxruntime-genai; see requirements.txt).
"""
import argparse, collections, json, os, shutil, subprocess, sys, tempfile

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "text", "tokenizer.json")
VOCAB = 256


def gptoss():
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=128, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"],
                       bos_token_id=0, eos_token_id=1, pad_token_id=0)
    layer = dict(experts=8, top_k=2, hidden=32, intermediate=32, activation="swiglu-clamped",
                 activation_params=dict(alpha=1.702, beta=1.0, limit=7.0), renormalize=True,
                 router_scoring="softmax", router_bias=True, expert_biases=True, shared_experts=0,
                 experts_present=list(range(8)))
    return GptOssForCausalLM(cfg), [dict(layer, layer=i) for i in range(2)]


def lfm2moe(hidden=32, inter=32):
    """LFM2-MoE: short-convolution and attention layers; experts chosen by sigmoid scores plus a
    per-expert bias (the builder scatters log σ of the chosen experts into the op's logits)."""
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM
    cfg = Lfm2MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, moe_intermediate_size=inter,
                        num_hidden_layers=2, num_dense_layers=0, num_experts=8, num_experts_per_tok=2,
                        num_attention_heads=2, num_key_value_heads=1, use_expert_bias=True, norm_topk_prob=True,
                        routed_scaling_factor=1.0, max_position_embeddings=128,
                        layer_types=["conv", "full_attention"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    layer = dict(experts=8, top_k=2, hidden=hidden, intermediate=inter, activation="swiglu", renormalize=True,
                 router_scoring="sigmoid", router_bias=False, selection_bias=True, expert_biases=True,
                 shared_experts=0, experts_present=list(range(8)))
    return Lfm2MoeForCausalLM(cfg), [dict(layer, layer=i) for i in range(2)]


def lfm2moe_wide():
    """LFM2-MoE with rows of several quantisation blocks, the last one partial (hidden 64,
    expert intermediate 48, blocks of 32)."""
    return lfm2moe(hidden=64, inter=48)


def qwen35moe():
    """Qwen3.5-MoE (the text decoder of Qwen3_5MoeForConditionalGeneration): linear-attention and
    full-attention layers; softmax top-k router with renormalisation, and a shared expert scaled
    by a sigmoid gate, both in every MoE layer. The builder's graph feeds RotaryEmbedding 3-row
    (MRoPE) position_ids, which onnxruntime 1.32 refuses, so this fails at the reference run and
    no fixture is committed (docs/forms.md)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                layer_types=["linear_attention", "full_attention"], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32)
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    layer = dict(experts=8, top_k=2, hidden=32, intermediate=32, activation="swiglu", renormalize=True,
                 router_scoring="softmax", router_bias=False, expert_biases=False, shared_experts=1,
                 experts_present=list(range(8)))
    return Qwen3_5MoeForConditionalGeneration(cfg), [dict(layer, layer=i) for i in range(2)]


# Precision variants: the builder's precision, its extra options, and the QMoE format they give
# ([fc1 bits, fc2 bits], inputs per scale block; 0 = one scale per row).
PRECISIONS = {
    "fp32": ("fp32", [], None),
    "fp16": ("fp16", [], None),
    "int4": ("int4", [], ([4, 4], 32)),
    "int8": ("int8", [], ([8, 8], 32)),
    "int4-rowscale": ("int4", ["qmoe_block_size=0"], ([4, 4], 0)),
}


def randomize_buffers(model):
    """LFM2's expert bias is a buffer (zeros at init): random, so that it changes the choice."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


ARCHS = {"gptoss": gptoss, "lfm2moe": lfm2moe, "lfm2moe_wide": lfm2moe_wide, "qwen35moe": qwen35moe}


def build(name, precision, ep, out):
    torch.manual_seed(7)
    model, layers = ARCHS[name]()
    for n, p in model.named_parameters():  # random but non-trivial weights, fixed by the seed
        torch.nn.init.normal_(p, std=0.08)
        if "norm" in n:  # norm gains near 1, as trained models have: blocks see unit-scale inputs
            with torch.no_grad():
                p.add_(1.0)
    randomize_buffers(model)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        model.save_pretrained(hf)
        shutil.copy(TOKENIZER, os.path.join(hf, "tokenizer.json"))
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, open(os.path.join(hf, "tokenizer_config.json"), "w"))
        # `-e cuda` writes another graph (GroupQueryAttention in fp16, no MultiHeadAttention
        # path) that onnxruntime's CPU provider also runs.
        dst = os.path.join(out, f"ortgenai_{name}_{precision}".replace("-", "_") + ("" if ep == "cpu" else f"_{ep}"))
        shutil.rmtree(dst, ignore_errors=True)
        builder_precision, extra, quant = PRECISIONS[precision]
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-m", hf, "-o", dst,
               "-p", builder_precision, "-e", ep, "-c", os.path.join(tmp, "cache")]
        if extra:
            cmd += ["--extra_options"] + extra
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for f in os.listdir(dst):  # keep the graph and its data only
        if f not in ("model.onnx", "model.onnx.data"):
            os.remove(os.path.join(dst, f))
    path = os.path.join(dst, "model.onnx")
    m = onnx.load(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    text_cfg = getattr(model.config, "text_config", model.config)  # multimodal: the text decoder's
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    feed = feeds(m, sess, batch=2, seq=7, seed=3, head_dim=head_dim)
    outs = sess.run(None, feed)
    names = [o.name for o in sess.get_outputs()]
    logits = outs[names.index("logits")].astype(np.float32)
    if precision == "fp32":
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(feed["input_ids"])).logits.numpy()
        err = float(np.abs(logits - ref).max() / np.abs(ref).max())
        assert err < 1e-4, f"{name}: builder graph disagrees with transformers ({err})"
    io = dict(feed)
    io.update(zip(names, outs))
    np.savez(os.path.join(dst, "io.npz"), **io)
    if quant is not None:
        layers = [dict(l, quantization=dict(bits=quant[0], block_size=quant[1])) for l in layers]
    truth = dict(name=os.path.basename(dst), form="ort-fused", exporter="onnxruntime-genai builder",
                 precision=precision, execution_provider=ep, family=name, layers=layers, patched_loop=True,
                 onnxruntime_genai=onnxruntime_genai.__version__, transformers=transformers.__version__,
                 ops=dict(collections.Counter(n.op_type for n in m.graph.node).most_common()))
    json.dump(truth, open(os.path.join(dst, "truth.json"), "w"), indent=1, sort_keys=True)
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(f"{os.path.basename(dst)}: {size} bytes, {len(m.graph.node)} nodes")


def feeds(m, sess, batch, seq, seed, head_dim):
    """Token ids, a full attention mask and empty past caches (a prefill), as smoe-opt makes them:
    batch dims = batch, past length 0, a sliding-window cache as large as the window (GroupQueryAttention)
    and the checkpoint's head size."""
    rng = np.random.default_rng(seed)
    attn = {}
    for n in m.graph.node:
        for i in n.input:
            if i.startswith("past_key_values"):
                attn[i] = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    f = {}
    for i in sess.get_inputs():
        dt = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16}[i.type]
        if i.name == "input_ids":
            f[i.name] = rng.integers(0, VOCAB, size=(batch, seq)).astype(dt)
        elif i.name == "attention_mask":
            f[i.name] = np.ones((batch, seq), dt)
        elif i.name == "position_ids":
            # [batch, seq], or Qwen3.5's multimodal rotary positions [3, batch, seq] (text: 3 equal rows).
            lead = [d for d in i.shape[:-2] if isinstance(d, int)]
            f[i.name] = np.tile(np.arange(seq, dtype=dt), tuple(lead) + (batch, 1))
        elif i.name.startswith("past.") and i.name.endswith((".conv", ".recurrent")):
            # Convolution states [batch, channels, kernel - 1] (LFM2, Qwen3.5) and linear-attention
            # recurrent states [batch, heads, key, value] (Qwen3.5): zeros before the first token.
            f[i.name] = np.zeros([batch] + list(i.shape[1:]), dt)
        elif i.name.startswith("past_key_values"):
            a = attn[i.name]
            dims = []
            for k, d in enumerate(i.shape):
                if k == 0:
                    dims.append(batch)
                elif isinstance(d, int):
                    dims.append(d)
                elif "sliding" in d:  # GroupQueryAttention's fixed-capacity window (else empty)
                    dims.append(max(a.get("local_window_size", 0), 0))
                elif k == 2:
                    dims.append(0)
                else:
                    dims.append(head_dim)
            f[i.name] = np.zeros(dims, dt)
        else:
            raise ValueError(f"unexpected input {i.name}")
    return f


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=list(ARCHS))
    ap.add_argument("--precisions", nargs="*", default=["fp32"])
    ap.add_argument("--eps", nargs="*", default=["cpu"])
    a = ap.parse_args()
    for name in a.only:
        for p in a.precisions:
            for ep in a.eps:
                build(name, p, ep, a.out)
