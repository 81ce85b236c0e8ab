"""The `shardserve` console script as a user runs it: `generate --json` on the imported SmolLM2
gives the in-process engine's tokens (fp32) and runs in bf16; bad inputs exit non-zero with a
clear message and create nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardserve_server.engine.local import LocalEngine
from shardserve_server.engine.sampling import SamplingParams
from shardserve_server.engine.sequence import GenerationRequest
from shardserve_server.engine.stopping import StoppingParams

SHARDSERVE = Path(sys.executable).with_name("shardserve")
PROMPT = "The capital of France is"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert SHARDSERVE.is_file(), f"{SHARDSERVE}: console script not installed in this venv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([str(SHARDSERVE), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def generate_json(model_dir: Path, *extra: str) -> dict:
    p = cli("generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--temperature", "0", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # stdout is exactly one JSON object


@pytest.fixture(scope="module")
def fp32_out(smollm2_dir) -> dict:
    return generate_json(smollm2_dir)


def test_generate_json_equals_the_in_process_engine(fp32_out, smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode(PROMPT)
    ref = LocalEngine(smollm2.model, tok).generate(
        [GenerationRequest(tuple(ids), SamplingParams(temperature=0.0), StoppingParams(8))]
    )[0]
    out = fp32_out
    assert {"text", "token_ids", "finish_reason", "prompt_tokens"} <= set(out)
    assert out["token_ids"] == ref.token_ids and len(out["token_ids"]) == 8
    assert out["finish_reason"] == "max_tokens" == ref.finish_reason.value
    assert out["text"] == ref.text == tok.decode(out["token_ids"])
    assert out["prompt_tokens"] == len(ids)


def test_generate_bf16(smollm2_dir, fp32_out, smollm2):
    out = generate_json(smollm2_dir, "--dtype", "bf16")
    assert len(out["token_ids"]) == 8 and out["finish_reason"] == "max_tokens"
    assert out["text"] == smollm2.tokenizer.decode(out["token_ids"])
    assert out["token_ids"][:4] == fp32_out["token_ids"][:4]


def test_generate_n_samples_and_structured_output(smollm2_dir):
    """--n gives n samples seeded --seed + i (sample 0 is the n=1 output of the same seed);
    --regex and --choice constrain every sample; a bad --n is one line and exit 2."""
    kw = ("--temperature", "1.0", "--seed", "5")
    one = generate_json(smollm2_dir, *kw)
    many = generate_json(smollm2_dir, *kw, "--n", "3")
    assert [s["token_ids"] for s in many["samples"]][0] == one["token_ids"]
    assert len(many["samples"]) == 3 and many["prompt_tokens"] == one["prompt_tokens"]
    assert len({tuple(s["token_ids"]) for s in many["samples"]}) > 1
    pattern = "[a-z]{2,5}!"
    fmt = generate_json(smollm2_dir, *kw, "--n", "2", "--regex", pattern,
                        "--max-new-tokens", "12")
    assert all(re.fullmatch(pattern, s["text"]) for s in fmt["samples"]), fmt
    pick = generate_json(smollm2_dir, *kw, "--choice", "Paris", "--choice", "Lyon")
    assert pick["text"] in ("Paris", "Lyon")
    p = cli("generate", "--model", str(smollm2_dir), "--prompt", "hi", "--n", "17")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--n" in p.stderr


def test_import_of_a_missing_file_fails_clearly_and_creates_nothing(tmp_path):
    src, dst = tmp_path / "nope.gguf", tmp_path / "out"
    p = cli("import", str(src), str(dst), "--quiet", cwd=tmp_path)
    assert p.returncode != 0
    assert "shardserve import: error" in p.stderr and str(src) in p.stderr
    assert "no such file" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


def test_generate_from_a_missing_checkpoint_fails_clearly(tmp_path):
    p = cli("generate", "--model", str(tmp_path / "none"), "--prompt", "hi", "--json")
    assert p.returncode != 0 and p.stdout == ""
    assert "shardserve generate: error" in p.stderr and str(tmp_path / "none") in p.stderr
    assert "Traceback" not in p.stderr


def test_every_option_of_every_command_has_help_and_version_prints():
    import argparse

    from shardserve_server import __version__
    from shardserve_server.cli import build_parser

    ap = build_parser()
    [sub] = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help]
    assert not missing, missing
    assert set(sub.choices) >= {"import", "reshard", "generate", "serve", "train",
                                "export-onnx", "export-hf", "quickstart"}
    out = subprocess.run([sys.executable, "-m", "shardserve_server.cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"shardserve {__version__}"
    shown = " ".join(sub.choices["serve"].format_help().split())
    assert "KV-cache budget per worker group, in tokens (default: 16384)" in shown
    assert ap.parse_args(["serve", "--model", "m"]).worker_nice == 10
    for bad in ("-1", "20", "x"):  # workers only ever yield: argparse's usage error, exit 2
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["serve", "--model", "m", "--worker-nice", bad])
        assert e.value.code == 2


def test_every_command_is_in_the_docstring_and_every_default_is_shown():
    """Walks every subparser's actions: an option with a default shows it in --help (flags
    and options without a default excepted), and the module docstring names every command."""
    import argparse

    from shardserve_server import cli

    ap = cli.build_parser()
    [sub] = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {line.split()[1] for line in cli.__doc__.splitlines()
              if line.startswith("shardserve ")}
    assert listed == set(sub.choices), listed ^ set(sub.choices)
    hidden = []
    for name, p in sub.choices.items():
        shown = " ".join(p.format_help().split())
        for a in p._actions:
            if (a.default is None or a.default is argparse.SUPPRESS or not a.option_strings
                    or isinstance(a, (argparse._StoreTrueAction, argparse._HelpAction))):
                continue
            if f"(default: {a.default})" not in shown:
                hidden.append(f"{name} {a.option_strings[0]}")
    assert not hidden, hidden


def test_one_kv_budget_default():
    from shardserve_server.cli import build_parser
    from shardserve_server.engine import defaults
    from shardserve_server.engine.scheduler import SchedulerConfig
    from shardserve_server.workers.worker import WorkerConfig

    serve = build_parser().parse_args(["serve", "--model", "m"])
    for name in ("kv_cache_tokens", "block_size", "max_batch_size", "max_prefill_tokens"):
        want = getattr(defaults, name.upper())
        got = (getattr(SchedulerConfig(), name), getattr(WorkerConfig("m"), name),
               getattr(serve, name))
        assert got == (want, want, want), (name, got)


def test_damaged_checkpoint_is_one_line_and_exit_2(tiny_llama_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "manifest.json").write_text("[1, 2]")
    for argv in (["generate", "--model", str(bad), "--prompt", "hi"],
                 ["generate", "--model", str(bad), "--prompt", "hi", "--tp", "2"],
                 ["reshard", str(bad), str(tmp_path / "out"), "--tp", "2"],
                 ["export-onnx", str(bad), str(tmp_path / "onnx")]):
        r = subprocess.run([sys.executable, "-m", "shardserve_server.cli", *argv],
                           capture_output=True, text=True)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and "a JSON object is expected" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "onnx").exists()


def test_group_that_cannot_start_is_one_line_and_exit_2(tiny_llama_dir):
    r = subprocess.run([sys.executable, "-m", "shardserve_server.cli", "generate", "--model",
                        str(tiny_llama_dir), "--prompt", "hi", "--tp", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "valid tp values" in r.stderr, r.stderr


def test_multihost_usage_errors_are_one_line_and_exit_2(tiny_llama_dir, capsys, monkeypatch):
    import socket

    from shardserve_server.cli import main

    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(var, raising=False)
    model = str(tiny_llama_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        cases = [
            (["worker", "--model", model], "give --join HOST:PORT"),
            (["worker", "--join", "nowhere", "--model", model, "--ranks", "1"],
             "must be HOST:PORT"),
            (["worker", "--join", busy, "--model", model, "--ranks", "0"], "rank 0 is the leader"),
            (["worker", "--join", busy, "--model", model, "--ranks", "1,x"], "comma-separated"),
            (["serve", "--model", model, "--tp", "2", "--local-ranks", "1"],
             "--local-ranks needs --rendezvous"),
            (["serve", "--model", model, "--tp", "2", "--local-ranks", "3", "--rendezvous",
              busy], "--local-ranks must be in 1..2"),
            (["serve", "--model", model, "--tp", "2", "--local-ranks", "1", "--rendezvous", busy,
              "--port", "0", "--metrics-port", "-1"], "cannot serve the rendezvous"),
        ]
        for argv, why in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and why in err and "Traceback" not in err, (argv, err)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    monkeypatch.setenv("RANK", "2")
    from shardserve_server.cli import _join_args, build_parser

    assert _join_args(build_parser().parse_args(["worker", "--model", model])) == (
        "10.0.0.1:29400", [2])
