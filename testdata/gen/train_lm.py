"""Trains the small MoE language model used for smoe-opt's quality table (developers only).

Corpus: CPython's `pydoc_data.topics` — the Python language reference topics (~465k characters
of English technical prose), shipped in every CPython install and in Debian's
`libpython3.X-stdlib` package, so it is available offline. Topics are split by index:
every 10th topic is held out (never seen in training, never used for calibration).

Model: Mixtral architecture (transformers 4.57, per-expert ModuleList experts, the expert loop
patched to visit every expert so the TorchScript export contains all of them), 2 layers,
8 experts, top-2, hidden 96, intermediate 192, BPE vocabulary 512 trained on the training
split with the `tokenizers` package. A few minutes of AdamW on 2 CPU cores.

Writes testdata/lm/:
  model.onnx       TorchScript export (input_ids, attention_mask, position_ids -> logits)
  tokenizer.json   the BPE tokenizer
  calib.txt        a slice of the training split (calibration text for --calib-text)
  eval.npz         held-out windows: input_ids, attention_mask, position_ids (right-padded)
  truth.json       configuration, training log, and torch's own held-out perplexity and
                   top-1 accuracy (the independent reference for `smoe-opt eval`)

With --upcycle (testdata/lm_upcycled/): the same architecture, but the experts are upcycled from
a dense FFN, as in sparse upcycling: a dense model (one expert, top-1) is trained first
(--dense-steps), its FFN is copied into all 8 experts (plus 1% noise so they can diverge), the
router starts fresh, and the MoE trains for the remaining steps. Its experts stay much more alike
than those of the from-scratch model, the regime where merging and shared bases work best.

Usage: PYTHONPATH=$VENV/tf4 $VENV/bin/python testdata/gen/train_lm.py --out testdata/lm
       PYTHONPATH=$VENV/tf4 $VENV/bin/python testdata/gen/train_lm.py --upcycle --out testdata/lm_upcycled
"""
import argparse, json, math, os, sys, time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import gen_models as gm  # noqa: E402  (patches: plain-ops causal mask, full expert loop)

SEQ = 128
VOCAB = 512


def corpus():
    from pydoc_data.topics import topics
    keys = sorted(topics)
    train = [topics[k] for i, k in enumerate(keys) if i % 10 != 9]
    held = [topics[k] for i, k in enumerate(keys) if i % 10 == 9]
    return "\n\n".join(train), "\n\n".join(held)


def tokenizer(train_text, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([train_text], trainer)
    tok.save(path)
    return tok


def windows(ids, seq, pad_id):
    n = math.ceil(len(ids) / seq)
    x = np.full((n, seq), pad_id, dtype=np.int64)
    m = np.zeros((n, seq), dtype=np.int64)
    for i in range(n):
        chunk = ids[i * seq:(i + 1) * seq]
        x[i, :len(chunk)] = chunk
        m[i, :len(chunk)] = 1
    pos = np.tile(np.arange(seq, dtype=np.int64), (n, 1))
    return x, m, pos


def lm_metrics(logits, ids, mask):
    """Next-token cross-entropy and top-1 accuracy over positions whose target is a real token."""
    lg = torch.as_tensor(logits[:, :-1]).double()
    tgt = torch.as_tensor(ids[:, 1:])
    keep = torch.as_tensor((mask[:, 1:] != 0) & (mask[:, :-1] != 0))
    lp = torch.log_softmax(lg, -1)
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    acc = (lg.argmax(-1) == tgt).double()
    n = keep.sum().item()
    return float(nll[keep].sum() / n), float(acc[keep].sum() / n), int(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--upcycle", action="store_true")
    ap.add_argument("--dense-steps", type=int, default=1500)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train_text, held_text = corpus()
    tok = tokenizer(train_text, os.path.join(a.out, "tokenizer.json"))
    pad = tok.token_to_id("[PAD]")
    train_ids = tok.encode(train_text).ids
    held_ids = tok.encode(held_text).ids
    with open(os.path.join(a.out, "calib.txt"), "w", encoding="utf-8") as f:
        f.write(train_text[:40000])

    from transformers import MixtralConfig, MixtralForCausalLM
    import transformers.models.mixtral.modeling_mixtral as mx
    gm.patch_masks(mx)
    gm.patch_expert_loop(mx.MixtralSparseMoeBlock)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, attn_implementation="eager",
                        use_cache=False, tie_word_embeddings=False, output_router_logits=True,
                        router_aux_loss_coef=0.02)
    data = torch.tensor(train_ids)
    g = torch.Generator().manual_seed(0)
    log = []
    t0 = time.time()

    def train(model, steps, phase):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        for step in range(steps):
            lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for pg in opt.param_groups:
                pg["lr"] = lr
            starts = torch.randint(0, len(data) - SEQ - 1, (16,), generator=g)
            x = torch.stack([data[s:s + SEQ] for s in starts])
            out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log.append(dict(phase=phase, step=step, loss=round(out.loss.item(), 4),
                                seconds=round(time.time() - t0, 1)))
                print(log[-1], flush=True)

    model = MixtralForCausalLM(cfg)
    moe_steps = a.steps
    if a.upcycle:
        import copy
        dense_cfg = copy.deepcopy(cfg)
        dense_cfg.num_local_experts, dense_cfg.num_experts_per_tok = 1, 1
        dense_cfg.router_aux_loss_coef = 0.0
        dense = MixtralForCausalLM(dense_cfg)
        train(dense, a.dense_steps, "dense")
        sd = dense.state_dict()
        own = model.state_dict()
        for k, v in sd.items():
            if ".experts.0." in k:
                for j in range(cfg.num_local_experts):
                    kj = k.replace(".experts.0.", f".experts.{j}.")
                    own[kj] = v + (0.01 * v.std() * torch.randn(v.shape, generator=g) if j else 0)
            elif ".gate." not in k or "experts" in k:
                own[k] = v
        model.load_state_dict(own)
        moe_steps = a.steps - a.dense_steps
    train(model, moe_steps, "moe")
    model.eval()
    cfg.output_router_logits = False

    ids, mask, pos = windows(held_ids, SEQ, pad)
    np.savez(os.path.join(a.out, "eval.npz"), input_ids=ids, attention_mask=mask, position_ids=pos)
    wrapped = gm.CausalLM(model)
    with torch.no_grad():
        logits = wrapped(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(pos)).numpy()
    nll, acc, n = lm_metrics(logits, ids, mask)
    print(f"held-out: {n} predictions, ppl {math.exp(nll):.3f}, top-1 {acc:.4f}")

    path = os.path.join(a.out, "model.onnx")
    ex = {k: torch.as_tensor(v[:2, :32]) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos).items()}
    gm.export(wrapped, ex, path, dynamo=False, dynamic=True)
    present = gm.count_expert_chains(path, 2)
    assert all(len(p) == 8 for p in present), present
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    o = sess.run(None, dict(input_ids=ids, attention_mask=mask, position_ids=pos))[0]
    err = float(np.abs(o - logits).max() / np.abs(logits).max())
    assert err < 1e-4, err
    onll, oacc, _ = lm_metrics(o, ids, mask)
    truth = dict(corpus="CPython pydoc_data.topics (every 10th topic held out)", seq_len=SEQ, vocab=VOCAB,
                 upcycled=a.upcycle, dense_steps=a.dense_steps if a.upcycle else 0,
                 layers=2, experts=8, top_k=2, hidden=96, intermediate=192, steps=a.steps, batch=16,
                 train_tokens=len(train_ids), heldout_tokens=len(held_ids), log=log,
                 torch_heldout=dict(predictions=n, ppl=math.exp(nll), top1=acc),
                 ort_heldout=dict(ppl=math.exp(onll), top1=oacc), ort_vs_torch_rel=err,
                 torch=torch.__version__, transformers=__import__("transformers").__version__)
    json.dump(truth, open(os.path.join(a.out, "truth.json"), "w"), indent=1, sort_keys=True)
    print(f"model.onnx: {os.path.getsize(path)} bytes; ort vs torch {err:.1e}")


if __name__ == "__main__":
    main()
