#!/usr/bin/env python3
"""Reference sentence embeddings for all-MiniLM-L6-v2, computed without torch.

Usage: python3 scripts/models/reference_embeddings.py <model_dir> [out.json]
       (default out: tests/fixtures/minilm_reference.json)

This is a separate numpy implementation of what sentence-transformers does for this
model. Inputs are tokenized by Hugging Face `tokenizers` from tokenizer.json. The BERT
encoder runs in float64 from the original F32 safetensors: embeddings, then 6
post-norm layers with exact erf GELU. The result is mean-pooled over the attention
mask and L2-normalised. It shares no code with convert_minilm.py or llama.cpp, so
the GGUF model loaded through llama.cpp can be checked against it (cosine >= 0.999;
the remaining difference comes from F16 weights and ggml's tanh GELU).

The first three sentences are the sentence-transformers documentation example; their
published cosine matrix (0.6660 / 0.1046 / 0.1411) is checked before anything is written.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "How do I get a refund?",
    "How can I get my money back?",
    "北京是中国的首都。",  # CJK is split per character; 2 of them are [UNK] in this vocab
    "Crème brûlée is a French dessert.",  # accents are stripped by the normaliser
]
# Published by sentence-transformers for the first three sentences with this model.
PUBLISHED = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}

erf = np.vectorize(math.erf)


def layer_norm(x, w, module, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f"{module}.weight"] + w[f"{module}.bias"]


def linear(x, w, module):
    return x @ w[f"{module}.weight"].T + w[f"{module}.bias"]


def encode(ids, mask, w, cfg):
    """One sequence (1-D token ids and attention mask) -> pooled, L2-normalised vector."""
    eps, n_head, n = cfg["layer_norm_eps"], cfg["num_attention_heads"], len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])  # single segment: type 0
    x = layer_norm(x, w, "embeddings.LayerNorm", eps)
    key_bias = np.where(mask > 0, 0.0, -1e9)  # padded keys get no attention

    def heads(t):  # (token, hidden) -> (head, token, head_dim)
        return t.reshape(n, n_head, -1).transpose(1, 0, 2)

    for i in range(cfg["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        q = heads(linear(x, w, f"{layer}.attention.self.query"))
        k = heads(linear(x, w, f"{layer}.attention.self.key"))
        v = heads(linear(x, w, f"{layer}.attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        x = layer_norm(x + linear(ctx, w, f"{layer}.attention.output.dense"),
                       w, f"{layer}.attention.output.LayerNorm", eps)
        h = linear(x, w, f"{layer}.intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact erf GELU, as BERT uses
        x = layer_norm(x + linear(h, w, f"{layer}.output.dense"), w, f"{layer}.output.LayerNorm", eps)
    pooled = (x * mask[:, None]).sum(0) / mask.sum()  # mean over real tokens, [CLS]/[SEP] included
    return pooled / np.linalg.norm(pooled)


def main(model_dir: Path, out_path: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    w = {k: v.astype(np.float64) for k, v in load_file(model_dir / "model.safetensors").items()}

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads to 128; padding must not reach mean pooling
    tok.enable_truncation(max_len)  # what sentence-transformers applies

    vectors = []
    for s in SENTENCES:
        enc = tok.encode(s)  # adds [CLS] ... [SEP]
        vectors.append(encode(np.array(enc.ids), np.array(enc.attention_mask, dtype=np.float64), w, cfg))
    cos = np.array(vectors) @ np.array(vectors).T

    for (i, j), want in PUBLISHED.items():
        assert abs(cos[i, j] - want) < 5e-4, f"cos({i},{j}) = {cos[i, j]:.4f}, published {want}"
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print("cosine matrix:\n", cos)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fixture = {
        "model": "all-MiniLM-L6-v2",
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 6) for x in v] for v in vectors],
    }
    out_path.write_text(json.dumps(fixture, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} <model_dir> [out.json]")
    default_out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "minilm_reference.json"
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else default_out)
