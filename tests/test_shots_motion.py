"""Shot cuts and motion against known answers: the generator's truth and ../shared/videos' GROUND_TRUTH.json."""

import numpy as np
import pytest

from curation.config import DecodeConfig, MotionConfig, ShotsConfig
from curation.decode import decode_frames, probe, work_size
from curation.motion import MotionScorer
from curation.shots import ShotDetector


def _frames(path, short_side=256, backend="decord", limit=None):
    config = DecodeConfig()
    info = probe(str(path), config)
    info.work_width, info.work_height = work_size(info.width, info.height, short_side)
    try:
        frames = decode_frames(str(path), info, backend, config)
        out = []
        for frame in frames:
            if limit is not None and frame.index >= limit:
                break
            out.append(frame)
    except Exception:
        out = list(decode_frames(str(path), info, "pyav", config))
    return info, out


def _detect(path):
    info, frames = _frames(path)
    detector = ShotDetector(ShotsConfig(), info.fps)
    for frame in frames:
        detector.push(frame.index, frame.rgb)
    detector.finish()
    return detector.boundaries()


def test_generated_cuts_and_transitions_are_found(sample_dump):
    root, truth = sample_dump
    for name, video in truth["videos"].items():
        found = _detect(root / name)
        assert len(found.cuts) == len(video["cuts"]), (name, found.cuts, video["cuts"])
        for cut in video["hard_cuts"]:
            assert min(abs(cut - c) for c in found.cuts) <= 1, (name, cut, found.cuts)
        for t in video["transitions"]:
            # A gradual transition's boundary lies inside it, and the transition itself is reported overlapping.
            assert any(t["start_frame"] <= c <= t["end_frame"] for c in found.cuts), (name, t, found.cuts)
            assert any(f.start_frame <= t["end_frame"] and f.end_frame >= t["start_frame"]
                       for f in found.transitions), (name, t, found.transitions)
            assert found.transitions[0].kind == t["kind"]


def test_shared_cuts_f1_beats_pyscenedetect_defaults(shared_videos, ground_truth):
    """Within one frame of GROUND_TRUTH.json, predictions inside labelled fades neutral; F1 >= 0.97."""
    tp = fp = fn = 0
    for name, truth in ground_truth.items():
        labelled = (truth.get("hard_cuts") or []) + (truth.get("slide_changes") or [])
        if truth.get("bad_input") or ("hard_cuts" not in truth and "slide_changes" not in truth):
            continue
        found = _detect(shared_videos / name).cuts
        fades = truth.get("fades") or []
        found = [c for c in found if not any(a - 1 <= c <= b + 1 for a, b in fades)]
        unmatched = list(labelled)
        for cut in found:
            match = next((x for x in unmatched if abs(x - cut) <= 1), None)
            if match is None:
                fp += 1
            else:
                unmatched.remove(match)
                tp += 1
        fn += len(unmatched)
        if name == "imageio/cockatoo.mp4":
            assert found == [], "fast motion must not be a cut"
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    assert tp >= 12 and f1 >= 0.97, (tp, fp, fn, f1)


def _motion(path, config, short_side=256, limit=None):
    info, frames = _frames(path, short_side=short_side, limit=limit)
    scorer = MotionScorer(config, info.fps)
    for frame in frames:
        scorer.push(frame.index, frame.time_s, frame.rgb)
    return scorer


@pytest.mark.parametrize("fps, args, key", [
    (1, None, "fps1_default_args_0.5_3_15_3_5_1.2_0"),
    (2, None, "fps2_default_args"),
    (1, (0.25, 2, 10, 3, 5, 1.0), "fps1_args_0.25_2_10_3_5_1_0"),
])
def test_video2dataset_farneback_reference_values(shared_videos, ground_truth, fps, args, key):
    expected = ground_truth["video2dataset/test_video.mp4"]["farneback_upstream"][key]
    config = MotionConfig(mode="video2dataset", fps=fps)
    if args:
        config.pyr_scale, config.levels, config.winsize, config.iterations, config.poly_n, config.poly_sigma = args
    scorer = _motion(shared_videos / "video2dataset" / "test_video.mp4", config, short_side=0, limit=100)
    assert scorer.mean_magnitude() == pytest.approx(expected, rel=1e-3)


def test_motion_ranks_shared_videos_like_the_reference(shared_videos, ground_truth):
    names = [n for n, t in ground_truth.items() if "farneback_mean_256w" in t]
    ours = [np.nanmedian([s.magnitude for s in _motion(shared_videos / n, MotionConfig()).samples]) for n in names]
    ref = [ground_truth[n]["farneback_mean_256w"] for n in names]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(ours), rank(ref))[0, 1]
    assert rho >= 0.8, dict(zip(names, ours, strict=True))
    static = _motion(shared_videos / "moviepy" / "smpte-2997.mp4", MotionConfig()).stats(0, 10**9)
    fast = _motion(shared_videos / "imageio" / "cockatoo.mp4", MotionConfig()).stats(0, 10**9)
    assert static.is_static and not fast.is_static and fast.median > 20 * static.median


def test_generated_static_and_moving_shots(sample_dump):
    root, truth = sample_dump
    for name, video in truth["videos"].items():
        scorer = _motion(root / name, MotionConfig())
        for shot in video["shots"]:
            stats = scorer.stats(shot["start_frame"] + 2, shot["end_frame"] - 2)
            if stats.num_pairs == 0:
                continue
            assert stats.is_static == (shot["kind"] == "static"), (name, shot, stats)


def test_shared_hsv_score_gives_pyscenedetects_own_adaptive_cuts(sample_dump):
    """The cascade scores each frame once for both adaptive detectors; on the same frames each must cut exactly where
    PySceneDetect's AdaptiveDetector, converting the frame itself, cuts."""
    import cv2
    from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode

    from curation.shots import _HsvDeltas, _SharedScoreAdaptiveDetector

    root, truth = sample_dump
    settings = dict(adaptive_threshold=2.0, min_content_val=3.0, window_width=2, min_scene_len=4)  # sensitive
    total = 0
    for name in truth["videos"]:
        info, frames = _frames(root / name, backend="pyav")
        for weights in (ContentDetector.DEFAULT_COMPONENT_WEIGHTS, ContentDetector.LUMA_ONLY_WEIGHTS):
            deltas, ours = _HsvDeltas(), _SharedScoreAdaptiveDetector(weights, **settings)
            theirs = AdaptiveDetector(weights=weights, **settings)
            got, expected = [], []
            for frame in frames:
                timecode = FrameTimecode(frame.index, info.fps)
                bgr = cv2.cvtColor(frame.analysis, cv2.COLOR_RGB2BGR)
                ours.next_score = _HsvDeltas.score(deltas(bgr), weights)
                got += [tc.frame_num for tc in ours.process_frame(timecode, bgr)]
                expected += [tc.frame_num for tc in theirs.process_frame(timecode, bgr)]
            assert got == expected, (name, weights)
            total += len(expected)
    assert total >= 8  # the generator's hard cuts were there to be found
