"""Hybrid-parallel trainer: 2 x 2 x 2 equals 1 x 1 x 1, it learns, it resumes exactly, and a
killed rank stops the run cleanly with a loadable last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from shardserve_sharding.checkpoint.source import ShardserveSource
from shardserve_sharding.train.launch import TrainingFailed, train
from shardserve_sharding.train.trainer import TrainConfig

BIN = Path(sys.executable).parent


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def small(out: Path, family: str, **kw) -> TrainConfig:
    base = dict(out=str(out), family=family, steps=20, batch_size=8, seq_len=32,
                micro_batches=1, eval_interval=10, ckpt_interval=10, lr=3e-3, min_lr=3e-4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "convlm", "rnnlm"])
def test_2x2x2_matches_1x1x1(tmp_path, family):
    # the recurrence runs one Python step per token: shorter sequences keep the case short
    kw = {"seq_len": 16} if family == "rnnlm" else {}
    train(small(tmp_path / "one", family, **kw), progress=False)
    train(small(tmp_path / "eight", family, dp=2, tp=2, pp=2, micro_batches=2, **kw),
          progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert len(a) == len(b) == 20
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)
    assert a[-1] < a[0]  # it trained
    # the 2 x 2 x 2 checkpoint is a real shardserve checkpoint at tp=2, pp=2
    src = ShardserveSource(tmp_path / "eight" / "step_000020")
    assert (src.manifest.layout.tp, src.manifest.layout.pp) == (2, 2)


@pytest.mark.slow
def test_learns_the_task_and_serves_it_after_reshard(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), steps=800, eval_interval=400, ckpt_interval=800),
          progress=False)
    recs = records(out)
    untrained, final = recs[0]["val_loss"], recs[-1]["val_loss"]
    assert final < 0.25 * untrained, (untrained, final)
    tp1 = tmp_path / "tp1"
    subprocess.run([BIN / "shardserve", "reshard", str(out / "step_000800"), str(tp1),
                    "--tp", "1", "--verify", "--quiet"], check=True, timeout=120)
    right = 0
    for word in ("a b c d", "h g f a", "c a b h"):
        res = subprocess.run([BIN / "shardserve", "generate", "--model", str(tp1), "--prompt",
                              f"{word} =", "--max-new-tokens", "4", "--json"],
                             check=True, capture_output=True, text=True, timeout=120)
        right += json.loads(res.stdout)["text"].startswith(" " + word[:5])
    assert right >= 2


def test_resume_continues_exactly(tmp_path):
    full = small(tmp_path / "full", "llama", steps=10, ckpt_interval=5, eval_interval=5)
    train(full, progress=False)
    part = replace(full, out=str(tmp_path / "part"), steps=5)
    train(part, progress=False)
    train(replace(part, steps=10, resume=True), progress=False)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise, fp32 CPU


def test_bad_layouts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="tp 3 cannot split"):
        train(small(tmp_path / "x", "llama", tp=3), progress=False)
    with pytest.raises(ValueError, match="batch_size 8 must divide"):
        train(small(tmp_path / "y", "llama", dp=3), progress=False)


@pytest.mark.slow
def test_killed_rank_stops_run_and_resume_continues(tmp_path):
    # far more steps than run before the kill, however fast the machine (it stops at step ~5)
    cfg = small(tmp_path / "run", "llama", tp=2, steps=4000, ckpt_interval=5, eval_interval=400,
                pg_timeout_s=20)
    errors: list[BaseException] = []

    def run():
        try:
            train(cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    # Only the ranks this run spawned: earlier tests may leave other python children
    # (multiprocessing's resource tracker, inductor compile workers) that must not be hit.
    kids = [p for p in psutil.Process().children()
            if p.pid not in before and "spawn_main" in " ".join(p.cmdline())]
    assert len(kids) == 2, f"expected the 2 rank processes, found {kids}"
    os.kill(kids[-1].pid, signal.SIGKILL)
    t.join(timeout=90)
    assert not t.is_alive(), "training did not stop after a rank died"
    assert errors and isinstance(errors[0], TrainingFailed), errors
    assert "exited with code -9" in str(errors[0]) and "--resume" in str(errors[0])
    latest = (tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip())
    ShardserveSource(latest, verify_hashes=True)  # the last checkpoint is whole
    done = int(latest.name.split("_")[1])
    train(replace(cfg, steps=done + 5, resume=True), progress=False)
    assert records(tmp_path / "run")[-1]["step"] == done + 5
