"""The synthetic sample dump: determinism, and that the truth (cuts, transitions, motion, captions) holds in pixels."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from curation.sample_dump import BACKGROUND_COLORS, SHAPE_COLORS, make_sample_dump

COLOR_TOLERANCE = 60  # max per-channel distance of an encoded shape pixel from its nominal colour
POSITION_TOLERANCE_PX = 2.0


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dump")
    return out, make_sample_dump(out, seed=0)


@pytest.fixture(scope="module")
def decoded(dump) -> dict[str, np.ndarray]:
    out, truth = dump
    return {name: _decode(out / name) for name in truth["videos"]}


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _centroid(frame: np.ndarray, color: str) -> tuple[float, float] | None:
    rgb = np.array(SHAPE_COLORS[color], np.int16)
    mask = np.abs(frame.astype(np.int16) - rgb).max(axis=-1) < COLOR_TOLERANCE
    if mask.sum() < 50:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _ring(frame: np.ndarray, width: int = 4) -> np.ndarray:
    """The pixels of a border ring, as (N, 3): mostly background, since shapes are small and never at the edge."""
    parts = [frame[:width], frame[-width:], frame[:, :width], frame[:, -width:]]
    return np.concatenate([p.reshape(-1, 3) for p in parts])


def _mix_weight(frame: np.ndarray, bg_a: np.ndarray, bg_b: np.ndarray) -> float:
    """Where the frame's border colour lies on the line from bg_a (0) to bg_b (1)."""
    axis = bg_b - bg_a
    return float(np.dot(np.median(_ring(frame), axis=0) - bg_a, axis) / np.dot(axis, axis))


def _clear_frames(shot: dict, video: dict) -> tuple[int, int]:
    """First and last frame of the shot that no transition touches."""
    first, last = shot["start_frame"], shot["end_frame"]
    for tr in video["transitions"]:
        if tr["start_frame"] <= last and tr["end_frame"] >= first:
            if tr["start_frame"] <= first:
                first = tr["end_frame"] + 1
            else:
                last = tr["start_frame"] - 1
    assert last - first >= 24, f"shot {shot} has too few clear frames"
    return first, last


def _shots(truth: dict, kind: str):
    for name, video in truth["videos"].items():
        for shot in video["shots"]:
            if shot["kind"] == kind:
                yield name, video, shot


def test_deterministic_for_a_seed(tmp_path, dump):
    out, truth = dump
    again = make_sample_dump(tmp_path / "again", seed=0)
    assert again == truth
    assert (tmp_path / "again" / "sample_truth.json").read_bytes() == (out / "sample_truth.json").read_bytes()
    for name in truth["videos"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    other = make_sample_dump(tmp_path / "other", num_videos=6, seed=truth["seed"] + 1, include_bad_files=False)
    assert [v["shots"] for v in other["videos"].values()] != [v["shots"] for v in truth["videos"].values()][:6]
    assert other["bad_files"] == {}
    assert not list((tmp_path / "other").glob("bad_*"))


def test_rejects_too_few_videos(tmp_path):
    with pytest.raises(ValueError, match="num_videos"):
        make_sample_dump(tmp_path, num_videos=5)


def test_truth_covers_every_kind_and_is_consistent(dump):
    out, truth = dump
    assert json.loads((out / "sample_truth.json").read_text()) == truth
    assert truth["generator"] == "reelforge.sample_dump" and truth["version"] == 1
    assert len(truth["videos"]) == 12
    kinds = {s["kind"] for v in truth["videos"].values() for s in v["shots"]}
    assert kinds == {"moving", "static", "pan"}
    assert {t["kind"] for v in truth["videos"].values() for t in v["transitions"]} == {"fade", "dissolve"}
    assert any(v["hard_cuts"] for v in truth["videos"].values())
    assert any(name.startswith("more/") for name in truth["videos"])
    assert sum(len(v["shots"]) == 1 for v in truth["videos"].values()) >= 6
    for name, video in truth["videos"].items():
        shots = video["shots"]
        assert shots[0]["start_frame"] == 0 and shots[-1]["end_frame"] == video["num_frames"] - 1, name
        assert video["cuts"] == [s["start_frame"] for s in shots[1:]], name
        assert set(video["hard_cuts"]) <= set(video["cuts"]), name
        assert video["caption"] == ", then ".join(s["caption"] for s in shots)
        for prev, shot in zip(shots, shots[1:], strict=False):
            assert prev["end_frame"] + 1 == shot["start_frame"]
            assert prev["color"] != shot["color"] and prev["background"] != shot["background"], name
        for shot in shots:
            assert f"a {shot['color']} {shot['shape']}" in shot["caption"]
            if shot["kind"] == "static":
                assert shot["direction"] is None and shot["speed_px_per_frame"] == 0
            else:
                assert shot["direction"] in shot["caption"] and shot["speed_px_per_frame"] > 0
        for tr in video["transitions"]:
            cut = next(c for c in video["cuts"] if tr["start_frame"] < c <= tr["end_frame"])
            assert cut not in video["hard_cuts"]
            if tr["kind"] == "dissolve":
                assert cut == (tr["start_frame"] + tr["end_frame"]) // 2


def test_frame_counts_and_size(dump, decoded):
    _, truth = dump
    for name, video in truth["videos"].items():
        frames = decoded[name]
        assert frames.shape == (video["num_frames"], truth["height"], truth["width"], 3), name


def test_hard_cuts_jump(dump, decoded):
    _, truth = dump
    checked = 0
    for name, video in truth["videos"].items():
        frames = decoded[name]
        within = max(_mad(frames[i], frames[i + 1]) for s in video["shots"] for i in range(*_clear_frames(s, video)))
        for cut in video["hard_cuts"]:
            jump = _mad(frames[cut - 1], frames[cut])
            assert jump > 20 and jump > 4 * within, (name, cut, jump, within)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("kind", ["moving", "pan"])
def test_shape_moves_as_captioned(dump, decoded, kind):
    _, truth = dump
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    checked = 0
    for name, video, shot in _shots(truth, kind):
        first, last = _clear_frames(shot, video)
        start = _centroid(decoded[name][first], shot["color"])
        end = _centroid(decoded[name][last], shot["color"])
        assert start is not None and end is not None, (name, shot)
        dx, dy = steps[shot["direction"]]
        if kind == "pan":
            # The camera pans one way, so the scene (and the shape fixed to it) moves the other way on screen.
            dx, dy = -dx, -dy
        expected = shot["speed_px_per_frame"] * (last - first)
        assert expected > 20, (name, shot)
        assert end[0] - start[0] == pytest.approx(dx * expected, abs=POSITION_TOLERANCE_PX), (name, shot)
        assert end[1] - start[1] == pytest.approx(dy * expected, abs=POSITION_TOLERANCE_PX), (name, shot)
        checked += 1
    assert checked >= (10 if kind == "moving" else 1)


def test_static_shape_stands_still(dump, decoded):
    _, truth = dump
    checked = 0
    for name, video, shot in _shots(truth, "static"):
        first, last = _clear_frames(shot, video)
        points = [_centroid(decoded[name][i], shot["color"]) for i in range(first, last + 1, 6)]
        assert all(p is not None for p in points)
        xs, ys = zip(*points, strict=True)
        assert max(xs) - min(xs) < 0.5 and max(ys) - min(ys) < 0.5, (name, shot)
        checked += 1
    assert checked >= 1


def test_border_shows_the_background(dump, decoded):
    _, truth = dump
    checked = 0
    for name, video in truth["videos"].items():
        for shot in video["shots"]:
            first, last = _clear_frames(shot, video)
            frame = decoded[name][(first + last) // 2]
            ring = _ring(frame)
            if shot["background"] == "tiled":
                # Random tiles: many distinct colours, none of them the shape's.
                assert len(np.unique(ring // 8, axis=0)) > 10, (name, shot)
                continue
            median = np.median(ring, axis=0)
            expected = np.array(BACKGROUND_COLORS[shot["background"]])
            assert np.abs(median - expected).max() <= 12, (name, shot, median)
            checked += 1
    assert checked >= 15


def test_fade_goes_through_black(dump, decoded):
    _, truth = dump
    fades = [(n, t) for n, v in truth["videos"].items() for t in v["transitions"] if t["kind"] == "fade"]
    assert fades
    for name, tr in fades:
        frames = decoded[name].astype(np.float32)
        start, end = tr["start_frame"], tr["end_frame"]
        shot_level = min(frames[start - 1].mean(), frames[end + 1].mean())
        middle = frames[(start + end) // 2].mean()
        assert shot_level > 40 and middle < 0.1 * shot_level, (name, shot_level, middle)
        # Brightness falls monotonically into the fade and rises out of it (small codec noise allowed).
        levels = frames[start - 1 : end + 2].mean(axis=(1, 2, 3))
        darkest = int(levels.argmin())
        assert np.all(np.diff(levels[: darkest + 1]) <= 1.0) and np.all(np.diff(levels[darkest:]) >= -1.0)
        # The span is exact: it starts at the first dimmed frame, ends at the last one, and the cut is the first
        # frame of the fade-in, right after the black.
        all_levels = frames.mean(axis=(1, 2, 3))
        assert all_levels[start] < 0.98 * all_levels[start - 1] and all_levels[end] < 0.98 * all_levels[end + 1]
        cut = next(c for c in truth["videos"][name]["cuts"] if start < c <= end)
        assert all_levels[cut - 1] < 0.01 * all_levels[end + 1] < all_levels[cut], (name, cut)


def test_dissolve_mixes_the_two_shots(dump, decoded):
    _, truth = dump
    dissolves = [(n, t) for n, v in truth["videos"].items() for t in v["transitions"] if t["kind"] == "dissolve"]
    assert dissolves
    for name, tr in dissolves:
        frames = decoded[name].astype(np.float32)
        before, after = frames[tr["start_frame"] - 1], frames[tr["end_frame"] + 1]
        middle = frames[(tr["start_frame"] + tr["end_frame"]) // 2]
        assert _mad(before, after) > 20
        assert _mad(middle, (before + after) / 2) < 0.2 * _mad(before, after), name
        # Neither pure shot: the middle frame is far from both ends.
        assert min(_mad(middle, before), _mad(middle, after)) > 0.3 * _mad(before, after)
        # The span is exact: the background moves from shot A's to shot B's in equal steps over exactly the recorded
        # frames, and is steady just outside them. Weights are measured along the A->B colour axis of the border.
        start, end = tr["start_frame"], tr["end_frame"]
        bg_a, bg_b = np.median(_ring(before), axis=0), np.median(_ring(after), axis=0)
        assert np.abs(bg_b - bg_a).max() > 40, name
        weights = [_mix_weight(frames[i], bg_a, bg_b) for i in range(start - 2, end + 3)]
        step = 1.0 / (end - start + 2)
        assert abs(weights[0]) < 0.5 * step and abs(weights[-1] - 1.0) < 0.5 * step, name
        for k, w in enumerate(weights[2:-2], start=1):
            assert w == pytest.approx(k * step, abs=0.75 * step), (name, start + k - 1)


def test_sidecars_in_both_forms(dump):
    out, truth = dump
    forms = set()
    for name, video in truth["videos"].items():
        json_path, txt_path = (out / name).with_suffix(".json"), (out / name).with_suffix(".txt")
        assert json_path.exists() != txt_path.exists(), name
        if txt_path.exists():
            assert txt_path.read_text().strip() == video["caption"]
            assert len(video["shots"]) == 1
            forms.add("txt")
            continue
        sidecar = json.loads(json_path.read_text())
        assert sidecar["caption"] == video["caption"]
        assert [(s["start_frame"], s["end_frame"], s["caption"]) for s in sidecar["segments"]] == [
            (s["start_frame"], s["end_frame"], s["caption"]) for s in video["shots"]
        ]
        for seg in sidecar["segments"]:
            assert seg["start_s"] == pytest.approx(seg["start_frame"] / truth["fps"])
            assert seg["end_s"] == pytest.approx((seg["end_frame"] + 1) / truth["fps"])
        forms.add("json")
    assert forms == {"json", "txt"}
    assert (out / "README.txt").stat().st_size > 0
    assert "README.txt" not in truth["videos"] and "README.txt" in truth["ignored_files"]


def test_bad_files(dump):
    out, truth = dump
    bad = truth["bad_files"]
    assert set(bad) == {"bad_zero_bytes.mp4", "bad_truncated.mp4", "bad_not_a_video.mp4", "bad_tiny_2x2.mp4"}
    assert all(isinstance(reasons, list) and reasons for reasons in bad.values())
    assert (out / "bad_zero_bytes.mp4").stat().st_size == 0
    assert (out / "bad_not_a_video.mp4").read_text().startswith("This is a text file")
    truncated = (out / "bad_truncated.mp4").read_bytes()
    assert 0 < len(truncated) and truncated[4:8] == b"ftyp" and b"moov" not in truncated
    for name in ("bad_truncated.mp4", "bad_not_a_video.mp4"):
        with pytest.raises(av.error.FFmpegError):
            av.open(str(out / name)).close()
    tiny = _decode(out / "bad_tiny_2x2.mp4")
    assert tiny.shape[1:3] == (2, 2) and len(tiny) > 0


def test_decode_rejects_bad_files_with_a_truthful_reason(dump):
    from curation.config import DecodeConfig
    from curation.decode import VideoRejected, local_path, probe

    out, truth = dump
    config = DecodeConfig()
    for name, reasons in truth["bad_files"].items():
        with pytest.raises(VideoRejected) as rejected:
            with local_path(str(out / name), config.max_file_bytes) as path:
                probe(path, config)
        assert rejected.value.reason in reasons, (name, rejected.value.reason)
    for name in truth["videos"]:
        with local_path(str(out / name), config.max_file_bytes) as path:
            assert probe(path, config).width == truth["width"]


@pytest.mark.parametrize("shape_size", [0.25, 0.4])
def test_shape_size_sets_the_drawn_size_and_shapes_still_cross_inside_the_frame(tmp_path, shape_size):
    """The demo draws bigger shapes (shape_size 0.4): each shape spans about shape_size of the frame height, and a
    moving one still travels as captioned without touching the border."""
    truth = make_sample_dump(tmp_path, num_videos=6, seed=3, include_bad_files=False, shape_size=shape_size)
    assert truth["shape_radius"] == round(truth["height"] * shape_size / 2)
    checked = 0
    for name, video in truth["videos"].items():
        if not name.endswith("_single.mp4"):
            continue
        shot = video["shots"][0]
        frames = _decode(tmp_path / name)
        for frame in (frames[0], frames[-1]):
            mask = np.abs(frame.astype(int) - SHAPE_COLORS[shot["color"]]).max(axis=-1) < 40
            rows, cols = np.nonzero(mask)
            extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert extent == pytest.approx(shape_size * truth["height"], abs=3), (name, shot["shape"])
            assert rows.min() > 0 and cols.min() > 0
            assert rows.max() < truth["height"] - 1 and cols.max() < truth["width"] - 1
        checked += 1
    assert checked == 2
