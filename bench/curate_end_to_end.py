"""A whole `reelforge curate` against the PyAV decode floor and the naive two-pass, on the same files and cores.

Usage:
    python bench/curate_end_to_end.py DIR [--cores 2] [--repeats 1] [--config YAML] [--set KEY=VALUE ...]
        [--variant KEY=VALUE[,KEY=VALUE]] [--json OUT]

Every measurement runs on the same `--cores` CPUs (the process and its children are pinned to them):
1. the decode floor: every frame of every file decoded on one thread and thrown away (no pixel conversion), by a
   pool of `--cores` processes;
2. the naive two-pass: `scenedetect.detect(path, ContentDetector())`, then a second PyAV decode feeding Farneback at
   256 px and 2 fps (bench/naive_two_pass.py), per file, by the same pool;
3. reelforge: the real CLI, `reelforge curate --input DIR --output <fresh dir> --set ray.address=local
   --set ray.num_cpus=CORES`, as a subprocess: a fresh local Ray, discovery, the video pass, the model stages,
   filters, the report and the MLflow run. Its wall time includes everything from the command's start to its exit.
`--variant` adds a curate row per override list (no target), e.g. the code's earlier behaviour. The log's "execution
finished in N seconds" of the plan gives a row without start-up and finish (info). The pools are started (and their
imports done) before the clock starts, which favours the baselines. Files that `probe` rejects are left out of the
baselines (curate quarantines them, at its own cost). Rounds are interleaved and the fastest of each measurement is
kept. Throughput is video-seconds (probed, accepted files) per wall-second.
Targets (issue 15): reelforge >= 1.5x the naive two-pass and >= 0.5x the decode floor. See bench/README.md.
"""

import os
import sys

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FFMPEG_THREADS"):
    os.environ[_name] = "1"  # before numpy, cv2 and PyAV load: one thread per pool process

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import cv2  # noqa: E402
from naive_two_pass import floor_pyav, naive_two_pass  # noqa: E402

from curation.config import VIDEO_EXTENSIONS, CurateConfig  # noqa: E402
from curation.decode import VideoRejected, probe  # noqa: E402

TARGET_VS_NAIVE = 1.5
TARGET_VS_FLOOR = 0.5
BASELINES = {"floor_pyav": floor_pyav, "naive": naive_two_pass}


def find_videos(root: str) -> tuple[list[tuple[str, float]], list[str]]:
    """(path, probed seconds) of every file under `root` that probe accepts, longest first; and the rejected."""
    extensions = tuple(e.lower() for e in VIDEO_EXTENSIONS)
    accepted, rejected = [], []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if not name.lower().endswith(extensions) or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                info = probe(path, CurateConfig().decode)
            except VideoRejected as err:
                rejected.append(f"{path}: {err.reason}")
                continue
            seconds = info.duration_s or (info.num_frames / info.fps if info.fps > 0 else 0.0)
            accepted.append((path, seconds))
    return sorted(accepted, key=lambda item: -item[1]), rejected


def _pool_init() -> None:
    cv2.setNumThreads(1)


def _run_one(key: str, path: str) -> tuple[str, float]:
    try:
        BASELINES[key](path)
    except Exception:  # noqa: BLE001 - a baseline that cannot read a file is reported, not fatal
        return path, -1.0
    return path, 0.0


def time_baseline(pool: ProcessPoolExecutor, key: str, paths: list[str]) -> tuple[float, list[str]]:
    """Wall seconds for the pool to run baseline `key` over every file (longest first); the files it failed on."""
    start = time.perf_counter()
    results = list(pool.map(_run_one, [key] * len(paths), paths))
    return time.perf_counter() - start, [p for p, status in results if status < 0]


def time_curate(root: str, cores: int, config: str | None, overrides: list[str],
                workdir: str) -> tuple[float, str, float | None]:
    """Wall seconds of a whole `reelforge curate` into a fresh output, the summary it printed and the seconds its
    plan ran."""
    output = tempfile.mkdtemp(prefix="curated-", dir=workdir)
    shutil.rmtree(output)
    command = [shutil.which("reelforge", path=os.path.dirname(sys.executable)) or "reelforge", "curate",
               "--input", root, "--output", output, "--set", "ray.address=local", "--set", f"ray.num_cpus={cores}"]
    if config:
        command += ["--config", config]
    for item in overrides:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"reelforge curate failed ({done.returncode}):\n{done.stderr[-4000:]}")
    shutil.rmtree(output, ignore_errors=True)
    return wall, done.stdout, processing_seconds(done.stderr)


def processing_seconds(log: str) -> float | None:
    """How long the curate plan itself ran (Ray Data's "execution finished in N seconds" of its last dataset): the
    wall time without start-up (imports, Ray, discovery, MLflow) and the finish (filters, report, MLflow logging)."""
    found = re.findall(r"execution finished in ([0-9.]+) seconds", log)
    return float(found[-1]) if found else None


def run(args: argparse.Namespace) -> dict:
    videos, rejected = find_videos(args.dir)
    if not videos:
        raise SystemExit(f"no video under {args.dir} passes probe()")
    cpus = sorted(os.sched_getaffinity(0))[-args.cores:]
    os.sched_setaffinity(0, set(cpus))  # the pools and the curate subprocess (and Ray under it) inherit this
    paths = [p for p, _ in videos]
    load_before = os.getloadavg()
    best: dict[str, float] = {}
    failed: set[str] = set()
    summary = ""
    workdir = tempfile.mkdtemp(prefix="curate-e2e-")
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(args.cores, mp_context=context, initializer=_pool_init) as pool:
        list(pool.map(_run_one, ["floor_pyav"] * args.cores, paths[-args.cores:]))  # start and warm the pool
        for round_no in range(args.repeats):
            for key in BASELINES:
                wall, bad = time_baseline(pool, key, paths)
                failed.update(bad)
                best[key] = min(best.get(key, wall), wall)
                print(f"  round {round_no + 1}/{args.repeats}: {key} {wall:.2f} s", file=sys.stderr)
            for variant in [""] + args.variant:
                key = f"curate {variant}".strip()
                extra = [item for item in variant.split(",") if item]
                wall, text, plan_s = time_curate(args.dir, args.cores, args.config, args.set + extra, workdir)
                if wall < best.get(key, math.inf):
                    best[key] = wall
                    summary = text if not variant else summary
                    if plan_s:
                        best[f"{key} (plan only)"] = plan_s
                print(f"  round {round_no + 1}/{args.repeats}: {key} {wall:.2f} s (plan {plan_s} s)", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        print(f"  note: a baseline failed on {sorted(failed)} (timed anyway)", file=sys.stderr)
    seconds = sum(s for _, s in videos)
    speed = {key: seconds / wall for key, wall in best.items()}
    ratios = {
        "curate_vs_naive": {"value": speed["curate"] / speed["naive"], "target_min": TARGET_VS_NAIVE},
        "curate_vs_floor_pyav": {"value": speed["curate"] / speed["floor_pyav"], "target_min": TARGET_VS_FLOOR},
        "naive_vs_floor_pyav": {"value": speed["naive"] / speed["floor_pyav"], "target_min": None},
    }
    for key in speed:  # no target: variants, and the plans without start-up and finish
        if key.startswith("curate") and key != "curate":
            ratios[f"{key} vs naive"] = {"value": speed[key] / speed["naive"], "target_min": None}
            ratios[f"{key} vs floor_pyav"] = {"value": speed[key] / speed["floor_pyav"], "target_min": None}
    for r in ratios.values():
        r["meets_target"] = None if r["target_min"] is None else r["value"] >= r["target_min"]
    return {
        "dir": args.dir, "cores": cpus, "repeats": args.repeats, "config": args.config,
        "overrides": args.set, "files": len(videos), "rejected_by_probe": rejected,
        "baseline_failures": sorted(failed), "video_seconds": seconds, "wall_s": best, "video_s_per_wall_s": speed,
        "ratios": ratios,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "curate_summary": summary,
    }


def report(result: dict) -> None:
    print(f"\n== a whole reelforge curate on {len(result['cores'])} cores (CPUs {result['cores']}): {result['dir']}")
    print(f"{result['files']} files accepted by probe, {result['video_seconds']:.1f} video-seconds; "
          f"{len(result['rejected_by_probe'])} rejected (curate quarantines them); fastest of {result['repeats']} "
          f"interleaved rounds")
    print(f"load average before {result['load_average_before'][0]:.2f}, after {result['load_average_after'][0]:.2f}")
    labels = {"floor_pyav": "decode floor, PyAV (every frame, no pixel conversion)",
              "naive": "naive two-pass (scenedetect.detect + PyAV/Farneback 2 fps)",
              "curate": "reelforge curate (fresh Ray, CLI start to exit)"}
    print(f"\n{'measurement':<72} {'wall s':>8} {'video-s/wall-s':>15}")
    for key in result["wall_s"]:
        label = labels.get(key, f"  info: {key}")
        print(f"{label:<72} {result['wall_s'][key]:>8.2f} {result['video_s_per_wall_s'][key]:>15.2f}")
    print("\nratios of throughput:")
    for key, r in result["ratios"].items():
        verdict = "" if r["target_min"] is None else (
            f"target >= {r['target_min']}: " + ("met" if r["meets_target"] else "MISSED"))
        print(f"  {key:<44} {r['value']:6.2f}   {verdict}")
    print("\ncurate's summary:\n" + result["curate_summary"].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="directory of videos (searched recursively)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs every measurement runs on (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the fastest of each is kept")
    parser.add_argument("--config", help="YAML config for reelforge curate (default: the embedded defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for curate")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also time curate with these overrides (a row each, no target), e.g. encode.fps=0")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    args = parser.parse_args()
    args.dir = os.path.abspath(args.dir)  # curate runs in a work directory of its own
    if args.cores < 1 or args.cores > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--cores must be between 1 and the {len(os.sched_getaffinity(0))} CPUs this process has")
    result = run(args)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
