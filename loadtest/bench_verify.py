"""What the default sha256 check costs on SmolLM2, and what the stamp file saves.

    .venv/bin/python loadtest/bench_verify.py [--model models/smollm2-135m] [--repeats 5]

Times verify_checkpoint (checkpoint/verify.py) with no stamp (every file hashed) and with the
stamp of the previous run (a stat per file), and, for scale, the model load that follows it in
`serve` (load_model, fp32). Writes loadtest/results/verify.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from shardserve_sharding.checkpoint.io import load_model
from shardserve_sharding.checkpoint.manifest import read_manifest
from shardserve_sharding.checkpoint.verify import STAMP, verify_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import cpu_flags, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m", help="checkpoint directory")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each case")
    args = ap.parse_args()
    root = Path(args.model)
    m = read_manifest(root)
    size = sum(f.size for f in m.files.values())
    cold, warm, load = [], [], []
    for _ in range(args.repeats):
        (root / STAMP).unlink(missing_ok=True)
        t0 = time.perf_counter()
        rep = verify_checkpoint(root, m)
        cold.append(time.perf_counter() - t0)
        assert rep.hashed_bytes == size
        t0 = time.perf_counter()
        rep = verify_checkpoint(root, m)
        warm.append(time.perf_counter() - t0)
        assert rep.hashed_bytes == 0
        t0 = time.perf_counter()
        load_model(root, verify_hashes=False)
        load.append(time.perf_counter() - t0)
    med = statistics.median
    rows = [("sha256 of every file (no stamp)", cold), ("stamp hit (stat per file)", warm),
            ("load_model fp32 after the check", load)]
    text = "\n".join([
        "# Checkpoint verification cost (issue #12)", "",
        f"Command: `.venv/bin/python loadtest/bench_verify.py --model {args.model} "
        f"--repeats {args.repeats}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU flags: {cpu_flags()}; "
        f"{len(m.files)} files, {size / 1e6:.0f} MB (page cache warm).", "",
        "| case | median s | runs (s) |", "|---|---|---|",
        *[f"| {n} | {med(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |" for n, v in rows],
        "", f"Hashing rate: {size / med(cold) / 1e9:.2f} GB/s. The stamp makes a restart's check "
        f"{med(cold) / max(med(warm), 1e-9):.0f}x cheaper; the first check costs "
        f"{100 * med(cold) / med(load):.0f}% of a load.", ""])
    print(write_results("verify", [text]))


if __name__ == "__main__":
    main()
