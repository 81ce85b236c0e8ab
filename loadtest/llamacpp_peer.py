"""llama.cpp as a peer in the benchmarks (optional: llama-cpp-python takes ~10 minutes to build,
so it is never part of CI).

    # once, in its own venv (the constraints keep torch out of it):
    python3 -m venv /tmp/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamacpp-venv/bin/pip install llama-cpp-python numpy

f32_gguf() writes an F32 GGUF of the bundled model's weights (the same values shardserve
imports: dequantized from Q4_1), copying every metadata field, so that llama.cpp and shardserve
run the same numbers. `python llamacpp_peer.py GGUF BATCH NEW THREADS` (run with the llama.cpp
venv's python) prints one JSON line: greedy decode tokens/s of BATCH sequences through the
batch API (llama_decode over one batch of BATCH sequences per step), prefill excluded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def f32_gguf(src: Path, dst: Path) -> Path:
    """Dequantize every tensor of src to F32 and write dst (temp file, then rename)."""
    import gguf
    import numpy as np

    if dst.is_file():
        return dst
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the file type is this file's own (all F32), set below
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]).decode("utf-8", "surrogateescape")
                       for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, val)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode())
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        writer.add_tensor(t.name, arr.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def extra_bufts() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types (the AMX one among
    them). Off unless LLAMACPP_EXTRA_BUFTS=1: on the AMX Xeon VMs here, a native build's AMX
    matmul dies with SIGILL at its first `tilezero` (seen 2026-12-06 with llama-cpp-python
    0.3.36, GGML_NATIVE=ON), so the peer runs ggml's AVX-512 kernels."""
    return os.environ.get("LLAMACPP_EXTRA_BUFTS", "0") == "1"


def decode_rate(model: str, batch: int, new: int, threads: int) -> dict:
    """Greedy decode of `batch` sequences with the low-level batch API; tokens/s of decode."""
    import llama_cpp as lc
    import llama_cpp.llama_cpp as low
    import numpy as np

    default_params = low.llama_model_default_params

    def model_params():  # Llama() exposes no use_extra_bufts argument
        p = default_params()
        p.use_extra_bufts = extra_bufts()
        return p

    low.llama_model_default_params = model_params  # what Llama() calls
    llm = lc.Llama(model_path=model, n_ctx=512, n_threads=threads, verbose=False)
    # a context of our own: Llama() does not expose n_seq_max (sequences decoded together)
    params = lc.llama_context_default_params()
    params.n_ctx = max(512, batch * 160)
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = max(1, batch)
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx, vocab = lc.llama_init_from_model(llm.model, params), llm.n_vocab()
    prompts = [llm.tokenize(f"Story number {i}: once upon a time".encode()) for i in range(batch)]
    cbatch = lc.llama_batch_init(max(512, batch * 32), 0, batch)

    def fill(entries):  # entries: (token, pos, seq, want_logits)
        cbatch.n_tokens = len(entries)
        for k, (tok, pos, seq, want) in enumerate(entries):
            cbatch.token[k], cbatch.pos[k] = tok, pos
            cbatch.n_seq_id[k], cbatch.seq_id[k][0] = 1, seq
            cbatch.logits[k] = want

    entries = []
    for s, p in enumerate(prompts):
        entries += [(tok, i, s, i == len(p) - 1) for i, tok in enumerate(p)]
    fill(entries)
    if lc.llama_decode(ctx, cbatch) != 0:
        raise RuntimeError("llama_decode failed on the prompts")
    last = [len(p) for p in prompts]
    out_idx = [sum(len(p) for p in prompts[: s + 1]) - 1 for s in range(batch)]
    t0 = None
    for step in range(new):
        toks = []
        for s in range(batch):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, out_idx[s]),
                                           shape=(vocab,))
            toks.append(int(logits.argmax()))
        if step == 0:
            t0 = time.perf_counter()  # prefill done, first tokens chosen
        fill([(toks[s], last[s], s, True) for s in range(batch)])
        out_idx = list(range(batch))
        last = [x + 1 for x in last]
        if lc.llama_decode(ctx, cbatch) != 0:
            raise RuntimeError("llama_decode failed")
    dt = time.perf_counter() - t0
    lc.llama_batch_free(cbatch)
    lc.llama_free(ctx)
    return {"batch": batch, "tok_s": batch * new / dt, "version": lc.__version__}


if __name__ == "__main__":
    gguf_path, b, n, th = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(decode_rate(gguf_path, b, n, th)))
