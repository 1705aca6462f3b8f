"""Precision, recall and F1 of every shot-cut detector on the constructed hard cases and on ../shared/videos.

Usage:
    python bench/cut_accuracy.py [--seeds 0 1 2] [--cases-dir DIR] [--shared DIR] [--json OUT]

Detectors, all fed the same decode (curation.decode at the sizes VideoStage sets; the network's 48x27 frames are
scaled from the analysis picture):
- cheap: the PySceneDetect-based cascade alone (shots.learned=off);
- transnetv2: TransNetV2 alone, upstream's whole-video scoring and threshold 0.5 (curation/transnet.py);
- verify: the cascade, cheap detectors proposing and TransNetV2 deciding what they are not sure of (the default);
- everywhere: the cascade with TransNetV2 scoring every frame and placing the cuts.
Scoring: a labelled hard cut is found by a prediction within +-1 frame (one to one); a dissolve by any prediction
inside it (+-1); predictions inside labelled fades and dissolves (+-1) are neutral; every other prediction is a
false cut, and is named after the event it falls on (flash, lighting, strobe, impact) when it does. The hard cases
come from bench/cut_cases.py (truth by construction, one seed per set); GROUND_TRUTH.json's hard_cuts and
slide_changes are the labels of ../shared/videos (skipped when absent). Figures are in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from curation.config import CurateConfig, ShotsConfig  # noqa: E402
from curation.decode import DecodeFailed, VideoRejected, decode_frames, probe  # noqa: E402
from curation.shots import ShotDetector  # noqa: E402
from curation.transnet import cuts_from_probabilities, load_transnet, score_video, small_frame  # noqa: E402
from curation.video_stage import set_frame_sizes  # noqa: E402

DETECTORS = ("cheap", "transnetv2", "verify", "everywhere")
SHARED = ROOT.parent / "shared" / "videos"


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    false_on: dict[str, int] = field(default_factory=dict)  # false cuts on an event, by its kind

    def add(self, other: Score) -> None:
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        for kind, n in other.false_on.items():
            self.false_on[kind] = self.false_on.get(kind, 0) + n

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4), "false_on": dict(self.false_on)}


def score_cuts(predicted: list[int], truth: dict) -> Score:
    """Score predicted cut frames against one video's truth (hard_cuts, slide_changes, dissolves, fades, events)."""
    hard = list(truth.get("hard_cuts") or []) + list(truth.get("slide_changes") or [])
    dissolves = [tuple(d) for d in truth.get("dissolves") or []]
    fades = [tuple(f) for f in truth.get("fades") or []]
    events = truth.get("events") or []
    score = Score()
    unmatched = sorted(hard)
    found_dissolves: set[tuple[int, int]] = set()
    for cut in sorted(predicted):
        match = next((x for x in unmatched if abs(x - cut) <= 1), None)
        if match is not None:
            unmatched.remove(match)
            score.tp += 1
            continue
        dissolve = next((d for d in dissolves if d[0] - 1 <= cut <= d[1] + 1), None)
        if dissolve is not None:
            if dissolve not in found_dissolves:
                found_dissolves.add(dissolve)
                score.tp += 1
            continue  # a second prediction inside one dissolve is neutral
        if any(a - 1 <= cut <= b + 1 for a, b in fades):
            continue
        score.fp += 1
        kind = next((e["kind"] for e in events if e["frames"][0] - 2 <= cut <= e["frames"][1] + 2), None)
        if kind is not None:
            score.false_on[kind] = score.false_on.get(kind, 0) + 1
    score.fn = len(unmatched) + len(dissolves) - len(found_dissolves)
    return score


def decode_once(path: str, config: CurateConfig) -> tuple[float, list[np.ndarray]]:
    """The analysis pictures of every frame, from one decode, as VideoStage makes them (PyAV, decord fallback)."""
    info = probe(path, config.decode)
    set_frame_sizes(info, config)
    failures = []
    for backend in config.decode.backends:
        try:
            return info.fps, [f.analysis for f in decode_frames(path, info, backend, config.decode)]
        except DecodeFailed as err:
            failures.append(f"{backend}: {err}")
    raise DecodeFailed("; ".join(failures))


def run_cascade(frames: list[np.ndarray], fps: float, mode: str, shots: dict | None = None) -> tuple[list[int], dict]:
    """The cascade in `mode` (off, verify, everywhere) with `shots` overriding ShotsConfig fields."""
    config = CurateConfig()
    config.shots.learned = mode
    for key, value in (shots or {}).items():
        setattr(config.shots, key, value)
    detector = ShotDetector(config.shots, fps)
    for index, picture in enumerate(frames):
        detector.push(index, picture)
    detector.finish()
    learned = detector._learned
    cost = {"network_frames": learned.frames_run if learned else 0, "frames": len(frames),
            "decisions": detector.decisions}
    return detector.boundaries().cuts, cost


def run_detector(name: str, frames: list[np.ndarray], fps: float, model,
                 shots: dict | None = None) -> tuple[list[int], dict]:
    if name == "cheap":
        return run_cascade(frames, fps, "off")
    if name == "transnetv2":
        probabilities = score_video(model, np.stack([small_frame(f) for f in frames]))
        return cuts_from_probabilities(probabilities, CurateConfig().shots.learned_threshold), {
            "network_frames": 2 * len(frames), "frames": len(frames)}
    return run_cascade(frames, fps, name, shots)


def score_set(label: str, videos: dict[str, dict], root: Path, detectors: tuple[str, ...], model,
              shots: dict | None = None) -> dict:
    """Every detector over one set of videos: per-detector totals and per-video predictions."""
    config = CurateConfig()
    totals = {d: Score() for d in detectors}
    network = {d: [0, 0] for d in detectors}
    per_video = {}
    for name, truth in videos.items():
        try:
            fps, frames = decode_once(str(root / name), config)
        except (VideoRejected, DecodeFailed) as err:
            print(f"  {label}: skipping {name}: {err}", file=sys.stderr)
            continue
        per_video[name] = {}
        for detector in detectors:
            start = time.perf_counter()
            cuts, cost = run_detector(detector, frames, fps, model, shots)
            score = score_cuts(cuts, truth)
            totals[detector].add(score)
            network[detector][0] += cost["network_frames"]
            network[detector][1] += cost["frames"]
            per_video[name][detector] = {"cuts": cuts, **score.as_dict(), "seconds": time.perf_counter() - start}
        print(f"  {label}: {name} done", file=sys.stderr)
    return {"totals": {d: {**s.as_dict(), "network_frames_per_frame": network[d][0] / max(1, network[d][1])}
                       for d, s in totals.items()},
            "videos": per_video}


def shared_truth(shared: Path) -> dict[str, dict]:
    labelled = {}
    for name, truth in json.loads((shared / "GROUND_TRUTH.json").read_text())["videos"].items():
        if truth.get("bad_input") or ("hard_cuts" not in truth and "slide_changes" not in truth):
            continue
        labelled[name] = truth
    return labelled


def print_table(label: str, result: dict) -> None:
    print(f"\n== {label}")
    print(f"{'detector':<12} {'tp':>4} {'fp':>4} {'fn':>4} {'precision':>10} {'recall':>7} {'F1':>6} "
          f"{'net frames/frame':>17}  false cuts on events")
    for detector, s in result["totals"].items():
        print(f"{detector:<12} {s['tp']:>4} {s['fp']:>4} {s['fn']:>4} {s['precision']:>10.3f} {s['recall']:>7.3f} "
              f"{s['f1']:>6.3f} {s['network_frames_per_frame']:>17.2f}  {s['false_on'] or '-'}")


def shots_overrides(pairs: list[str], parser: argparse.ArgumentParser) -> dict:
    """KEY=VALUE pairs as ShotsConfig fields, each value of its field's type; an unknown key is an error."""
    defaults = ShotsConfig()
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = type(getattr(defaults, key))(value)
        except (AttributeError, ValueError):
            parser.error(f"--shots {pair!r}: expected KEY=VALUE, KEY a ShotsConfig field and VALUE of its type")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="hard-case sets, one per seed (none: only the shared videos)")
    parser.add_argument("--cases-dir", help="keep (and reuse) the generated cases here instead of a temp dir")
    parser.add_argument("--shared", default=str(SHARED), help="the shared videos with GROUND_TRUTH.json")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument("--learned-context", type=int, default=0,
                        help="shots.learned_context for verify and everywhere (default: the config's)")
    parser.add_argument("--shots", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ShotsConfig fields for the cascade detectors, e.g. colour_min_change=2 (a threshold "
                             "above any histogram distance switches the colour drift off)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    args = parser.parse_args()
    shots = shots_overrides(args.shots, parser)
    if args.learned_context:
        shots["learned_context"] = args.learned_context
    from cut_cases import make_cut_cases

    model = load_transnet("cpu", threads=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.cases_dir or tmp)
        for seed in args.seeds:
            out = base / f"seed{seed}"
            truth_file = out / "cut_truth.json"
            if truth_file.is_file() and json.loads(truth_file.read_text())["seed"] == seed:
                truth = json.loads(truth_file.read_text())["videos"]
            else:
                truth = make_cut_cases(out, seed)
            results[f"hard cases, seed {seed}"] = score_set(f"seed {seed}", truth, out, tuple(args.detectors), model,
                                                            shots)
    shared = Path(args.shared)
    if (shared / "GROUND_TRUTH.json").is_file():
        results["shared/videos"] = score_set("shared", shared_truth(shared), shared, tuple(args.detectors), model,
                                             shots)
    else:
        print(f"{shared} is absent: the shared videos are skipped", file=sys.stderr)
    for label, result in results.items():
        print_table(label, result)
    if len(args.seeds) > 1:
        pooled = {}
        for detector in args.detectors:
            score = Score()
            for label, result in results.items():
                if label.startswith("hard cases"):
                    t = result["totals"][detector]
                    score.add(Score(t["tp"], t["fp"], t["fn"], dict(t["false_on"])))
            pooled[detector] = {**score.as_dict(), "network_frames_per_frame": float("nan")}
        print_table(f"hard cases, seeds {args.seeds} pooled", {"totals": pooled})
        results["hard cases pooled"] = {"totals": pooled}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
