#!/usr/bin/env python3
"""Convert sentence-transformers/all-MiniLM-L6-v2 into a GGUF embedding model.

Usage: python3 scripts/models/convert_minilm.py <model_dir> <out.gguf>

<model_dir> is the Hugging Face checkpoint (config.json, tokenizer.json,
special_tokens_map.json, model.safetensors, 1_Pooling/config.json). The output
loads in llama.cpp as architecture `bert` with mean pooling, and produces the
same 384-dim sentence embeddings as sentence-transformers (after L2 normalisation,
which the caller does).

Why a separate converter: llama.cpp's convert_hf_to_gguf.py needs torch and
transformers, which are far too heavy for this project's tooling. This script
needs only `gguf`, `numpy` and `safetensors`, and runs in about a second. It writes
what llama.cpp's BERT loader (src/models/bert.cpp) and WordPiece tokenizer
(llm_tokenizer_wpm in src/llama-vocab.cpp) read: 2-D matrices as Q8_0 (the upstream
converter writes F16; Q8_0 embeds a question ~1.5x faster on CPU and stays within
cosine 0.999 of sentence-transformers, see tests/local.rs and BENCHMARKS.md), and norms,
biases, position and token-type embeddings as F32.
The output is deterministic: the same input gives the same bytes.
"""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# Hugging Face BertModel module -> llama.cpp GGUF tensor name. ".weight"/".bias" are carried over.
EMBEDDING_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
LAYER_TENSORS = {  # under encoder.layer.N. -> blk.N.
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# Unused by an embedding model: the position_ids buffer and the next-sentence pooler head.
SKIPPED = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
# 2-D, but looked up row by row or added in F32 by llama.cpp, so kept F32 (as upstream does).
F32_MATRICES = {"position_embd.weight", "token_types.weight"}


def gguf_name(hf_name: str) -> str:
    module, _, param = hf_name.rpartition(".")
    if module.startswith("encoder.layer."):
        block, _, sub = module.removeprefix("encoder.layer.").partition(".")
        return f"blk.{block}.{LAYER_TENSORS[sub]}.{param}"
    return f"{EMBEDDING_TENSORS[module]}.{param}"


def phantom_space_vocab(tokenizer: dict) -> tuple[list[str], list[int]]:
    """Token texts and types as llama.cpp's WordPiece tokenizer expects them.

    llama.cpp does not use the "##" continuation convention. Its tokenizer puts
    "\u2581" (a "phantom space") in front of each word, then repeatedly takes the
    longest matching vocab entry. So word-initial pieces are stored as "\u2581piece"
    and continuation pieces ("##ing") without their "##" ("ing"). Special tokens
    ([CLS], [SEP], ...) are CONTROL and kept as they are.
    """
    vocab = tokenizer["model"]["vocab"]  # text -> id
    assert sorted(vocab.values()) == list(range(len(vocab))), "vocab ids must be dense"
    special = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens, types = [], []
    for text in sorted(vocab, key=vocab.get):
        if vocab[text] in special:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(text[2:] if text.startswith("##") else "\u2581" + text)
            types.append(gguf.TokenType.NORMAL)
    assert len(set(tokens)) == len(tokens), "phantom-space rewrite produced duplicate tokens"
    return tokens, types


def main(model_dir: Path, out_path: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = json.loads((model_dir / "special_tokens_map.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())

    # llama.cpp's WordPiece tokenizer lowercases and strips accents by default, and its
    # BERT graph uses plain GELU and absolute positions; refuse checkpoints that differ.
    assert tokenizer["normalizer"]["lowercase"], "only uncased BERT vocabularies are supported"
    assert config["hidden_act"] == "gelu" and config["position_embedding_type"] == "absolute"
    assert pooling["pooling_mode_mean_tokens"], "only mean pooling is supported"

    writer = gguf.GGUFWriter(out_path, "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    # Hyperparameters, written under the "bert." prefix.
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)

    # Tokenizer. "bert" selects llama.cpp's WordPiece tokenizer, which brackets each
    # input as bos ... separator, i.e. [CLS] ... [SEP]; llama.cpp has no separate cls id.
    # No eos id: an encoder never ends generation, and llama.cpp warns at every load when
    # the eos token (which would be [SEP]) is not an end-of-generation token.
    tokens, types = phantom_space_vocab(tokenizer)
    token_id = tokenizer["model"]["vocab"]
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_bos_token_id(token_id[specials["cls_token"]])
    writer.add_sep_token_id(token_id[specials["sep_token"]])
    writer.add_unk_token_id(token_id[specials["unk_token"]])
    writer.add_pad_token_id(token_id[specials["pad_token"]])
    writer.add_mask_token_id(token_id[specials["mask_token"]])
    writer.add_add_bos_token(True)

    # Tensors. The GGUF writer reverses the numpy shape, so a PyTorch Linear weight
    # [out, in] becomes ne = {in, out}, which is what llama.cpp expects; no transposes.
    for hf_name, array in load_file(model_dir / "model.safetensors").items():
        if hf_name in SKIPPED:
            continue
        name = gguf_name(hf_name)
        if array.ndim == 2 and name not in F32_MATRICES:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array.astype(np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} <model_dir> <out.gguf>")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
