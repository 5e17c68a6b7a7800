"""A 12-trial sweep of a zoo model with --workers 1 (in this process) and --workers 2 (on a
local Ray): wall time of each, the Ray start-up cost, and whether both give the same results.

    python bench/bench_sweep.py [--model lenet5] [--methods svd,sketch,prune,lsh]
                                [--ratios 0.75,0.5,0.25] [--latency-time 0.5]

Each sweep runs as the user runs it, ``compressor sweep ... -q`` in a fresh process and a fresh
folder, and is timed from start to exit. Compressions are compared trial by trial (MACs,
parameters, accuracy, agreement); speedups are timings and differ from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SECTIONS, atomic_write, write_section  # noqa: E402

CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"
COMPARED = ("macs", "params", "accuracy", "agreement")

RAY_START = """
import json, os, time
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
t0 = time.perf_counter()
import ray
ray.init(num_cpus={workers}, include_dashboard=False, _node_ip_address="127.0.0.1",
         log_to_driver=False, logging_level="ERROR")
t1 = time.perf_counter()

@ray.remote(num_cpus=1)
def ready():
    import compressor.pipeline  # what every trial imports first
    return os.getpid()

ray.get([ready.remote() for _ in range({workers})])
t2 = time.perf_counter()
ray.get([ready.remote() for _ in range({workers})])
t3 = time.perf_counter()
ray.shutdown()
print(json.dumps({{"init_s": t1 - t0, "first_tasks_s": t2 - t1, "warm_tasks_s": t3 - t2}}))
"""


def _compressor() -> str:
    return str(Path(sys.executable).with_name("compressor"))


def run_sweep(args, workers: int, folder: Path) -> dict:
    command = [
        _compressor(), "sweep", str(args.checkpoint), "--arch", args.model,
        "--methods", args.methods, "--ratios", args.ratios, "--data", str(CALIB),
        "--calib-samples", str(args.calib_samples), "--eval-data", str(EVAL),
        "--latency-time", str(args.latency_time), "--workers", str(workers), "-o", str(folder),
        "-q",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - started
    results = json.loads((folder / "results.json").read_text())
    return {"workers": workers, "wall_s": wall, "results": results}


def ray_start_cost(workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RAY_START.format(workers=workers)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.mean(values) if values else None


def summarise(runs: list[dict]) -> dict:
    by_key = [{t["key"]: t for t in run["results"]["trials"]} for run in runs]
    keys = list(by_key[0])
    differences = []
    for key in keys:
        a, b = by_key[0][key], by_key[1].get(key)
        if b is None:
            differences.append(f"{key}: missing from the second sweep")
            continue
        for name in COMPARED:
            if a.get(name) != b.get(name):
                differences.append(f"{key}: {name} {a.get(name)} vs {b.get(name)}")
    modes = []
    for run in runs:
        trials = run["results"]["trials"]
        info = run["results"]["run"]
        modes.append({
            "workers": run["workers"],
            "executor": info.get("executor"),
            "wall_s": run["wall_s"],
            "sweep_s": info.get("seconds"),
            "ray_start_s": info.get("ray_start_seconds"),
            "done": sum(t["status"] == "done" for t in trials),
            "failed": sum(t["status"] == "failed" for t in trials),
            "compress_s_mean": _mean(t.get("compress_seconds") for t in trials),
            "trial_s_mean": _mean(t.get("trial_seconds") for t in trials),
            "timing_s_mean": _mean(t.get("timing_seconds") for t in trials),
        })
    return {"keys": keys, "differences": differences, "modes": modes}


def _f(value, digits=1, suffix="") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(args, summary: dict, runs: list[dict], ray_start: dict) -> str:
    one, two = summary["modes"]
    n = len(summary["keys"])
    lines = [
        "## Sweeps: --workers 1 vs --workers 2",
        "",
        f"`compressor sweep` of the zoo's {args.model}: methods {args.methods} x ratios "
        f"{args.ratios} ({n} trials), calibration on {args.calib_samples} bundled training "
        f"images, accuracy on the bundled 2000-image evaluation subset, latency timed "
        f"{args.latency_time} s per model and batch size (1 and 64). Each sweep ran as a user "
        "runs it (a fresh process and folder, timed start to exit). The machine is shared with "
        "other work, so wall times are noisy: read them as one sample each.",
        "",
        "| workers | runs on | wall (s) | Ray start (s) | trials done / failed | compress + "
        "evaluate, mean per trial (s) | timing, mean per trial (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in (one, two):
        lines.append(
            f"| {mode['workers']} | {mode['executor']} | {_f(mode['wall_s'])} "
            f"| {_f(mode['ray_start_s'])} | {mode['done']} / {mode['failed']} "
            f"| {_f(mode['compress_s_mean'])} | {_f(mode['timing_s_mean'])} |"
        )
    ratio = one["wall_s"] / two["wall_s"]
    lines += [
        "",
        f"--workers 2 took {ratio:.2f}x less wall time than --workers 1"
        if ratio >= 1 else
        f"--workers 2 took {1 / ratio:.2f}x MORE wall time than --workers 1",
        "",
        f"Ray start-up alone, {ray_start['workers']} CPUs, in a fresh process: `ray.init` "
        f"{ray_start['init_s']:.1f} s, then {ray_start['first_tasks_s']:.1f} s until both "
        f"workers have imported the pipeline (a second round of tasks: "
        f"{1000 * ray_start['warm_tasks_s']:.0f} ms). That is why `--workers 1` runs in "
        "the sweep's own process: one worker gains nothing from Ray and would pay this.",
        "",
    ]
    if summary["differences"]:
        lines.append(f"**Results differ** in {len(summary['differences'])} places:")
        lines += [f"- {d}" for d in summary["differences"]]
    else:
        lines.append(
            f"**Same results**: all {n} trials have the same MACs, parameters, accuracy and "
            "agreement in both sweeps (logits differ in the last float digits: Ray's workers "
            "run numpy with one thread)."
        )
    lines += [
        "",
        "| trial | MACs kept | accuracy | speedup b1 (w1 / w2) | speedup b64 (w1 / w2) |",
        "|---|---|---|---|---|",
    ]
    second = {t["key"]: t for t in runs[1]["results"]["trials"]}
    for t in runs[0]["results"]["trials"]:
        u = second.get(t["key"], {})
        if t["status"] != "done":
            lines.append(f"| {t['key']} | failed: {t.get('error')} | | | |")
            continue

        def s(trial, b):
            return _f(trial.get("speedup", {}).get(b), 2, "x")

        lines.append(
            f"| {t['key']} | {t['macs_ratio']:.3f} | {100 * t['accuracy']:.2f} % "
            f"| {s(t, '1')} / {s(u, '1')} | {s(t, '64')} / {s(u, '64')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--methods", default="svd,sketch,prune,lsh")
    parser.add_argument("--ratios", default="0.75,0.5,0.25")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--latency-time", type=float, default=0.5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    from compressor.models import zoo

    args.checkpoint = zoo.get(args.model).checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for workers in (1, 2):
            run = run_sweep(args, workers, Path(tmp) / f"workers{workers}")
            print(f"--workers {workers}: {run['wall_s']:.1f} s", flush=True)
            runs.append(run)
    ray_start = {"workers": 2, **ray_start_cost(2)}
    summary = summarise(runs)
    text = markdown(args, summary, runs, ray_start)
    print(text)
    if not args.no_write:
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "ray_start": ray_start,
               **summary, "trials": [run["results"]["trials"] for run in runs]}
        atomic_write(SECTIONS / "sweep.json", json.dumps(raw, indent=1))
        print(f"wrote {write_section('sweep', text)}")


if __name__ == "__main__":
    main()
