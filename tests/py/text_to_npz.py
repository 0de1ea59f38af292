"""Cuts a text into token windows with the Python `tokenizers` package (independent of the
Rust crate): input_ids / attention_mask / position_ids [n, L], last window padded with the
[PAD] id. Usage: text_to_npz.py TEXT TOKENIZER.json SEQ_LEN OUT.npz"""
import sys

import numpy as np
from tokenizers import Tokenizer

text, tok_path, L, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = Tokenizer.from_file(tok_path)
ids = tok.encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
n = -(-len(ids) // L)
pad = tok.token_to_id("[PAD]") or 0
input_ids = np.full((n, L), pad, np.int64)
mask = np.zeros((n, L), np.int64)
input_ids.reshape(-1)[: len(ids)] = ids
mask.reshape(-1)[: len(ids)] = 1
pos = np.broadcast_to(np.arange(L, dtype=np.int64), (n, L)).copy()
np.savez(out, input_ids=input_ids, attention_mask=mask, position_ids=pos)
print(len(ids), n)
