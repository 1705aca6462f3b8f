"""Cascaded shot-boundary detection fed with already-decoded frames (no second decode).

The cascade, in the spirit of Stable Video Diffusion's curation, runs PySceneDetect detectors side by side on frames
downscaled to `analysis_width` (the decoder's Frame.analysis picture):
1. AdaptiveDetector on the HSV content score: clear hard cuts, robust to fast motion because the score must stand
   out against its neighbours (the cockatoo clip's motion blur is not a cut);
2. AdaptiveDetector on luma only with a low floor: cuts that are small in absolute terms but huge against a static
   context (slide changes, cuts between similar shots);
3. ThresholdDetector: fades to and from black;
4. a stride test for gradual transitions (dissolves, fades): frames `stride` apart differ a lot, yet the frame in
   the middle is their average, which fast motion and hard cuts never are.
Stages 1 and 2 score each frame from one HSV conversion shared between them (each ContentDetector would convert on
its own, which was a quarter of the analysis time). Boundaries become final `lag_frames` behind the newest frame,
so a consumer can stream clips out with bounded memory.

With `shots.learned=verify` (the default) cheap detectors propose and TransNetV2 (curation/transnet.py) decides:
a cut of stages 1-2 is taken as it is only where the frames either side are uncorrelated and differ in colour
(a cut between unlike shots); every other one (flashes, lighting changes, impact frames in animation, cuts between
like shots) and every dissolve of stage 4 (slow lighting ramps look like one) is kept only if the network, run on a
window around it, agrees. With `everywhere` the network scores every frame and its cuts are the cuts.

Verify also proposes dissolves into or out of a moving shot, which stage 4 misses (motion breaks its "middle frame is
the average" test): the colour distribution (a hue-saturation histogram, which motion within one scene hardly moves)
of frames half a second apart changes a lot, and it changes step by step rather than at one frame (which would be a
cut, a flash or a strobe), and the middle frame's colours are blends rather than a mixture of the two ends' colours
(motion only rearranges colours). A lighting ramp can pass those tests too, so the network's all-frames head, which
marks every frame of a gradual transition but only a frame or two of a whip pan, decides each one (_ColourDrift).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, ThresholdDetector

from curation.config import ShotsConfig
from curation.decode import analysis_size
from curation.transnet import CONTEXT, WINDOW, LearnedCuts, load_transnet


@dataclass
class Transition:
    start_frame: int
    end_frame: int  # inclusive
    kind: str  # "fade" | "dissolve"


@dataclass
class ShotBoundaries:
    cuts: list[int] = field(default_factory=list)  # first frame of each new shot
    transitions: list[Transition] = field(default_factory=list)


class _SharedScoreAdaptiveDetector(AdaptiveDetector):
    """PySceneDetect's AdaptiveDetector (rolling-average ratio, minimum content value, flash filter) scoring each
    frame with a content score the caller computed, so several detectors share one HSV conversion per frame."""

    def __init__(self, weights: ContentDetector.Components, **kwargs):
        super().__init__(weights=weights, **kwargs)
        self.weights = weights
        self.next_score = 0.0

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        return self.next_score


class _HsvDeltas:
    """ContentDetector's per-frame score components (mean absolute change of hue, saturation and value from the
    previous frame), computed once for every detector that weighs them."""

    def __init__(self):
        self._previous: tuple[np.ndarray, ...] | None = None
        self.hsv: np.ndarray | None = None  # the last frame's HSV picture

    def __call__(self, bgr: np.ndarray) -> tuple[float, float, float]:
        self.hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        channels = cv2.split(self.hsv)
        previous, self._previous = self._previous, channels
        if previous is None:
            return 0.0, 0.0, 0.0  # as ContentDetector: no score before there are two frames
        return tuple(cv2.mean(cv2.absdiff(now, before))[0] for now, before in zip(channels, previous, strict=True))

    @staticmethod
    def score(deltas: tuple[float, float, float], weights: ContentDetector.Components) -> float:
        """ContentDetector's weighted score (edges are weighted 0 in both of our detectors)."""
        if weights.delta_edges:
            raise ValueError("edge weights need ContentDetector's edge pass; the shared score has none")
        parts = (weights.delta_hue, weights.delta_sat, weights.delta_lum)
        return sum(d * w for d, w in zip(deltas, parts, strict=True)) / sum(abs(w) for w in weights)


class _ColourDrift:
    """Proposes gradual transitions from the colour distribution: the hue-saturation histograms of the frames `half`
    before and after a centre are at least `min_change` apart (Bhattacharyya distance), and no step between
    consecutive frames in between is more than `max_step` of that change. Where a run of centres passes, the one of
    the largest change is proposed (at the latest after `max_run` centres, so boundaries stay `lag_frames` behind)
    if its middle frame's histogram is at least `min_blend` from every mixture of its ends' histograms.
    A dissolve moves the colours from one shot's to the next one's step by step whatever the motion in either; a
    cut, a flash or a strobe moves them at one frame; a pan within one scene keeps most of them. And a dissolve
    blends pixels, so its middle frame shows colours neither end has in those amounts, where motion (a pan, a whip
    pan, something entering the frame) only rearranges them: its middle frame's colours are a mixture of the ends'."""

    def __init__(self, half: int, min_change: float, max_step: float, min_blend: float, max_run: int):
        self.half, self.min_change, self.max_step, self.max_run = half, min_change, max_step, max_run
        self.min_blend = min_blend
        self._histograms: deque[tuple[int, np.ndarray]] = deque(maxlen=2 * half + 1)
        self._steps: deque[float] = deque(maxlen=2 * half)  # each frame's distance from the previous one
        self._run: list[tuple[float, int, float]] = []  # (change, centre, unmixed) of the run of passing centres

    def push(self, index: int, hsv: np.ndarray) -> list[int]:
        """Add the next frame's HSV picture; returns the centres proposed (none, or one when a run closes)."""
        histogram = _hue_sat_histogram(hsv)
        if self._histograms:
            self._steps.append(_distance(self._histograms[-1][1], histogram))
        self._histograms.append((index, histogram))
        if len(self._histograms) < self._histograms.maxlen:
            return []
        (centre, middle), first = self._histograms[self.half], self._histograms[0][1]
        change = _distance(first, histogram)
        if change < self.min_change or max(self._steps) > self.max_step * change:
            return self.close()
        self._run.append((change, centre, _unmixed(middle, first, histogram)))
        return self.close() if len(self._run) >= self.max_run else []

    def close(self) -> list[int]:
        """End the current run (at a failing centre, or at the end of the video): its centre of largest change, if
        the middle frame there is a blend of the ends (a motion-blurred frame of a whip pan is one too, but only
        where the change is not yet the largest)."""
        run, self._run = self._run, []
        if not run:
            return []
        _, centre, unmixed = max(run)
        return [centre] if unmixed >= self.min_blend else []


_STEP_FRAMES = 3  # frames either side of a cut that must stand still for a step between still pictures
_RETURN_FRAMES = 6  # a flash (or an impact frame) this many frames long or shorter is recognised by its end


class ShotDetector:
    """Push frames in order with `push`, call `finish` at the end; read `cuts` and `transitions`."""

    def __init__(self, config: ShotsConfig, fps: float):
        self.config = config
        self.fps = fps if fps > 0 else 25.0
        min_frames = max(1, round(config.min_shot_seconds * self.fps))
        self._min_shot_frames = min_frames
        self._deltas = _HsvDeltas()
        self._content = _SharedScoreAdaptiveDetector(
            ContentDetector.DEFAULT_COMPONENT_WEIGHTS, adaptive_threshold=config.adaptive_threshold,
            min_content_val=config.content_threshold, window_width=config.adaptive_window, min_scene_len=min_frames)
        self._luma = _SharedScoreAdaptiveDetector(
            ContentDetector.LUMA_ONLY_WEIGHTS, adaptive_threshold=config.luma_adaptive_threshold,
            min_content_val=config.adaptive_min_content, window_width=config.adaptive_window,
            min_scene_len=min_frames)
        self._fade = ThresholdDetector(threshold=config.fade_threshold, fade_bias=1.0, min_scene_len=min_frames)
        self._stride = max(1, config.gradual_stride)
        self._grey: deque[tuple[int, np.ndarray]] = deque(maxlen=2 * self._stride + 1)
        self._gradual_run: list[int] = []  # centres of the current run of gradual-looking frames
        self._brightness: deque[tuple[int, float]] = deque(maxlen=self.lag_frames + 4 * self._stride + 8)
        self._raw_cuts: list[int] = []
        self._raw_fade_cuts: list[int] = []
        self._raw_transitions: list[Transition] = []
        self._size: tuple[int, int] | None = None
        self._last_index = -1
        self._finished = False
        # The learned detector (verify, everywhere): the network's frames, and the candidates waiting for it.
        self._learned = None if config.learned == "off" else LearnedCuts(
            _ModelLoader(config), config.learned_context if config.learned == "verify" else CONTEXT,
            history=self.lag_frames + 4 * CONTEXT + 64,
            batch_windows=config.learned_batch_windows)
        self._recent: deque[tuple[int, np.ndarray, np.ndarray]] = deque(
            maxlen=config.learned_context + config.adaptive_window + 2 * _STEP_FRAMES + 8)
        self._candidates: list[tuple[int, float, float]] = []  # (frame, correlation, histogram distance)
        self._proposed: set[int] = set()
        self._content_scores: deque[tuple[int, float]] = deque(maxlen=2 * config.adaptive_window + 1)
        # Dissolves waiting for the network: with their ends' correlation and who proposed them ("stride", "colour").
        self._pending_dissolves: list[tuple[Transition, float, str]] = []
        self._colour_half = max(1, round(config.colour_span_seconds * self.fps / 2))
        self._colour = _ColourDrift(self._colour_half, config.colour_min_change, config.colour_max_step,
                                    config.colour_min_blend, max(1, round(config.max_transition_seconds * self.fps)))
        self._grey_history: deque[tuple[int, np.ndarray]] = deque(
            maxlen=round(config.max_transition_seconds * self.fps) + 4 * max(self._stride, self._colour_half) + 8)
        self._verified_cuts: list[int] = []
        self._rejected_dissolves: list[Transition] = []
        self.decisions: list[dict] = []  # verify: what was decided on each candidate and how (for reports, tests)

    @property
    def lag_frames(self) -> int:
        """How far behind the newest frame boundaries are final: detector windows plus the longest transition."""
        window = self.config.adaptive_window + 1
        # The gradual tests look this far either side of a centre (the colour drift's half span: verify only).
        half = max(1, round(self.config.colour_span_seconds * self.fps / 2)) if self.config.learned == "verify" else 0
        reach = max(1, self.config.gradual_stride, half)
        lag = window + 2 * reach + round(self.config.max_transition_seconds * self.fps)
        if self.config.learned == "verify":  # a candidate is decided once the network's context after it is decoded
            lag += self.config.learned_context + 2
        elif self.config.learned == "everywhere":  # frames are scored in whole windows, learned_batch_windows at once
            lag += CONTEXT + 2 + (WINDOW - 2 * CONTEXT) * self.config.learned_batch_windows
        return lag

    @property
    def finalized_until(self) -> int:
        """Frames with index below this have their boundary status settled."""
        if self._finished:
            return self._last_index + 1
        return max(0, self._last_index + 1 - self.lag_frames)

    def push(self, index: int, rgb: np.ndarray) -> None:
        """Add the next frame; best at the analysis size (Frame.analysis), larger frames are scaled down first."""
        if self._size is None:
            self._size = analysis_size(rgb.shape[1], rgb.shape[0], self.config.analysis_width)
        if (rgb.shape[1], rgb.shape[0]) == self._size:
            small = rgb
        else:
            # Working-size frames are under 2x the analysis size, where bilinear is enough and several times
            # cheaper than INTER_AREA; full-resolution frames (motion.mode=video2dataset) need the area filter.
            interpolation = cv2.INTER_LINEAR if rgb.shape[1] <= 2 * self._size[0] else cv2.INTER_AREA
            small = cv2.resize(rgb, self._size, interpolation=interpolation)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        timecode = FrameTimecode(index, self.fps)
        deltas = self._deltas(bgr)
        for detector in (self._content, self._luma):
            detector.next_score = _HsvDeltas.score(deltas, detector.weights)
        new_cuts = [tc.frame_num for tc in self._content.process_frame(timecode, bgr)]
        new_cuts += [tc.frame_num for tc in self._luma.process_frame(timecode, bgr)]
        self._raw_cuts += new_cuts
        for tc in self._fade.process_frame(timecode, bgr):
            self._raw_fade_cuts.append(tc.frame_num)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
        self._brightness.append((index, cv2.mean(grey)[0]))  # OpenCV's reductions: a third of numpy's cost here
        self._push_gradual(index, grey)
        self._last_index = index
        if self._learned is not None:
            self._learned.push(small)
            self._recent.append((index, grey, self._deltas.hsv))
            if self.config.learned == "verify":
                for cut in new_cuts + self._near_misses(index, self._content.next_score):
                    self._propose(cut)
                for centre in self._colour.push(index, self._deltas.hsv):
                    self._propose_dissolve(centre)
            self._decide(finished=False)

    def _near_misses(self, index: int, score: float) -> list[int]:
        """Where the cheap signals disagree: a content score far above the absolute threshold that stands out
        against its neighbours, but not by the adaptive ratio (a cut inside fast action). The network decides."""
        self._content_scores.append((index, score))
        if len(self._content_scores) < self._content_scores.maxlen:
            return []
        w = self.config.adaptive_window
        centre, value = self._content_scores[w]
        others = [v for k, (_, v) in enumerate(self._content_scores) if k != w]
        if value < self.config.propose_min_content or value < max(others):
            return []
        return [centre] if value >= self.config.propose_ratio * (sum(others) / len(others)) else []

    def _propose(self, cut: int) -> None:
        """Queue a cheap detector's cut for the verify step, with the features that say whether it is clear."""
        if cut in self._proposed:
            return
        self._proposed.add(cut)
        frames = {i: (grey, hsv) for i, grey, hsv in self._recent}
        if cut - 1 in frames and cut in frames:
            (grey_a, hsv_a), (grey_b, hsv_b) = frames[cut - 1], frames[cut]
            correlation = float(cv2.matchTemplate(grey_b, grey_a, cv2.TM_CCOEFF_NORMED)[0, 0])
            distance = cv2.compareHist(_hue_sat_histogram(hsv_a), _hue_sat_histogram(hsv_b),
                                       cv2.HISTCMP_BHATTACHARYYA)
        else:
            correlation, distance = 1.0, 0.0  # features unknown: never a clear cut
        self._candidates.append((cut, correlation, distance))

    def _propose_dissolve(self, centre: int) -> None:
        """Queue a colour-drift dissolve for the verify step, unless stage 4 has one there or it is a fade (a frame
        of it black: ThresholdDetector places the fade's cut)."""
        start, end = centre - self._colour_half, centre + self._colour_half
        if any(t.start_frame <= end and t.end_frame >= start for t in self._raw_transitions):
            return
        brightness = dict(self._brightness)
        if min(brightness.get(i, 255.0) for i in range(start, end + 1)) <= self.config.fade_threshold:
            return
        self._raw_transitions.append(Transition(start, end, "dissolve"))
        self._pending_dissolves.append((self._raw_transitions[-1], self._ends_correlation(start, end), "colour"))

    def _ends_correlation(self, start: int, end: int) -> float:
        """How alike the pictures just before and just after a transition are (normalised grey correlation)."""
        grey = dict(self._grey_history)
        before, after = grey.get(start - 1, grey.get(start)), grey.get(end + 1, grey.get(end))
        if before is None or after is None:
            return 0.0
        return float(cv2.matchTemplate(after, before, cv2.TM_CCOEFF_NORMED)[0, 0])

    def _still_around(self, cut: int) -> bool:
        """Whether the picture stands still for _STEP_FRAMES frames before the cut and after it: a step between
        two still pictures (a slide change) is a cut; a flash returns, a pan or an action scene never stands still."""
        grey = {i: g for i, g, _ in self._recent}
        spans = (range(cut - _STEP_FRAMES, cut - 1), range(cut, cut + _STEP_FRAMES))
        pairs = [(i, i + 1) for span in spans for i in span]
        if any(i not in grey or j not in grey for i, j in pairs):
            return False
        return max(cv2.mean(cv2.absdiff(grey[i], grey[j]))[0] for i, j in pairs) <= self.config.step_still_max_diff

    def _comeback(self, cut: int) -> float:
        """How close the colours of a frame before the cut come to those of one after it, within _RETURN_FRAMES
        frames of each other (the least hue-saturation histogram distance, leaving out the pair either side of the
        cut; colours, unlike pixels, survive motion). As far as across the cut for a cut, whose new picture never
        gives way to the old one again; near 0 for a flash."""
        hsv = {i: h for i, _, h in self._recent if cut - _RETURN_FRAMES <= i < cut + _RETURN_FRAMES}
        histograms = {i: _hue_sat_histogram(h) for i, h in hsv.items()}
        pairs = [(cut - j, cut + k) for j in range(1, _RETURN_FRAMES + 1) for k in range(_RETURN_FRAMES + 1 - j)
                 if (j, k) != (1, 0) and cut - j in histograms and cut + k in histograms]
        return min((cv2.compareHist(histograms[a], histograms[b], cv2.HISTCMP_BHATTACHARYYA) for a, b in pairs),
                   default=1.0)

    def _brightness_change(self, cut: int) -> float:
        """Mean grey level after the cut minus before it, in absolute value (a light switched on or off moves it)."""
        brightness = dict(self._brightness)
        before, after = brightness.get(cut - 1), brightness.get(cut)
        return abs(after - before) if before is not None and after is not None else float("inf")

    def _decide(self, finished: bool) -> None:
        """Settle the candidates whose context the network has (all of them at the end of the video)."""
        learned, config = self._learned, self.config
        if config.learned == "everywhere":
            learned.score_through(finished)
        waiting = []
        for cut, correlation, distance in self._candidates:
            if not learned.ready(cut, finished):
                waiting.append((cut, correlation, distance))
                continue
            comeback = self._comeback(cut)
            if distance - comeback >= config.return_min_drop:
                # The colours from before the change are back within a few frames: a flash, an impact frame.
                self.decisions.append({"frame": cut, "kind": "cut", "by": "cheap", "correlation": correlation,
                                       "histogram": distance, "comeback": comeback, "kept": False})
                continue
            unlike = correlation <= config.confident_max_correlation
            step = self._still_around(cut) and (correlation <= config.step_max_correlation or (
                correlation <= config.step_small_max_correlation
                and self._brightness_change(cut) <= config.step_small_max_brightness))
            if unlike or step:
                self._verified_cuts.append(cut)
                self.decisions.append({"frame": cut, "kind": "cut", "by": "cheap", "correlation": correlation,
                                       "histogram": distance, "step": step, "kept": True})
            else:
                # The network scores a shot's last frame: the frame before the cut, give or take one.
                probability = float(learned.scores(cut - 2, cut).max(initial=0.0))
                kept = probability >= config.learned_threshold
                if kept:
                    self._verified_cuts.append(cut)
                self.decisions.append({"frame": cut, "kind": "cut", "by": "learned", "correlation": correlation,
                                       "histogram": distance, "probability": probability, "kept": kept})
        self._candidates = waiting
        pending = []
        for t, ends, source in self._pending_dissolves:
            if not learned.ready(t.end_frame, finished):
                pending.append((t, ends, source))
                continue
            decision = self._decide_dissolve(t, ends, source)
            if not decision["kept"]:
                self._rejected_dissolves.append(t)
            self.decisions.append(decision)
        self._pending_dissolves = pending

    def _decide_dissolve(self, t: Transition, ends: float, source: str) -> dict:
        """Whether a proposed dissolve is one. The same picture at both ends is a lighting change (either source).
        Stage 4's: two unlike pictures are a dissolve, the network's single-frame head decides in between. The colour
        drift's: only the all-frames head decides (a pan or a whip pan also ends on an unlike picture)."""
        config, learned = self.config, self._learned
        decision = {"frame": t.start_frame, "end_frame": t.end_frame, "kind": "dissolve", "source": source,
                    "ends": ends}
        if ends >= config.dissolve_same_correlation or (
                source == "stride" and ends <= config.dissolve_other_correlation):
            decision.update(by="cheap", kept=ends <= config.dissolve_other_correlation)
        elif source == "stride":
            probability = float(learned.scores(t.start_frame, t.end_frame).max(initial=0.0))
            decision.update(by="learned", probability=probability, kept=probability >= config.learned_threshold)
        else:
            inside = float(np.median(learned.transition_scores(t.start_frame, t.end_frame)))
            decision.update(by="learned", transition=inside, kept=inside >= config.colour_min_transition)
        return decision

    def _push_gradual(self, index: int, grey: np.ndarray) -> None:
        self._grey.append((index, grey))
        if self._learned is not None:
            self._grey_history.append((index, grey))
        if len(self._grey) < self._grey.maxlen:
            return
        (_, before), (centre, middle), (_, after) = self._grey[0], self._grey[self._stride], self._grey[-1]
        span = cv2.mean(cv2.absdiff(after, before))[0]
        linearity = cv2.mean(cv2.absdiff(middle, cv2.addWeighted(before, 0.5, after, 0.5, 0.0)))[0]
        gradual = span >= self.config.gradual_threshold and linearity <= self.config.gradual_linearity * span
        if gradual:
            self._gradual_run.append(centre)
        elif self._gradual_run:
            self._close_gradual_run()

    def _close_gradual_run(self) -> None:
        run = self._gradual_run
        self._gradual_run = []
        if len(run) < self.config.gradual_min_run:
            return
        start, end = run[0] - self._stride, run[-1] + self._stride
        # A ramp from or to black is a fade; ThresholdDetector places its cut. Anything else is a dissolve.
        brightness = dict(self._brightness)
        dark = [brightness.get(i) for i in (start, end)]
        kind = "fade" if any(b is not None and b <= self.config.fade_threshold for b in dark) else "dissolve"
        self._raw_transitions.append(Transition(start, end, kind))
        if kind == "dissolve" and self._learned is not None:
            self._pending_dissolves.append((self._raw_transitions[-1], self._ends_correlation(start, end), "stride"))

    def finish(self) -> None:
        end = FrameTimecode(max(0, self._last_index), self.fps)
        for detector, sink in ((self._content, self._raw_cuts), (self._luma, self._raw_cuts),
                               (self._fade, self._raw_fade_cuts)):
            for tc in detector.post_process(end):
                sink.append(tc.frame_num)
                if self.config.learned == "verify" and sink is self._raw_cuts:
                    self._propose(tc.frame_num)
        if self._gradual_run:
            self._close_gradual_run()
        if self.config.learned == "verify":
            for centre in self._colour.close():
                self._propose_dissolve(centre)
        self._finished = True
        if self._learned is not None:
            self._decide(finished=True)

    def boundaries(self) -> ShotBoundaries:
        """The boundaries found so far, merged: transitions unioned, one cut per shot change, flashes dropped."""
        last = self._last_index
        transitions: list[Transition] = []
        raw = self._raw_transitions
        if self._learned is not None:  # dissolves the network turned down, or has yet to see, are not transitions
            unsettled = self._rejected_dissolves + [t for t, _, _ in self._pending_dissolves]
            raw = [t for t in raw if not any(t is u for u in unsettled)]
        for t in sorted(raw, key=lambda t: t.start_frame):
            start, end = max(0, t.start_frame), min(last, t.end_frame)
            if transitions and start <= transitions[-1].end_frame + 2:
                prev = transitions[-1]
                prev.end_frame = max(prev.end_frame, end)
                prev.kind = "fade" if "fade" in (prev.kind, t.kind) else prev.kind
            else:
                transitions.append(Transition(start, end, t.kind))
        fade_cuts = set(self._raw_fade_cuts)
        cuts = set(self._cut_proposals()) | fade_cuts
        for t in transitions:
            if any(t.start_frame - 2 * self._stride <= c <= t.end_frame + 2 * self._stride for c in fade_cuts):
                t.kind = "fade"
            if t.kind == "fade":
                continue
            inside = sorted(c for c in cuts if t.start_frame <= c <= t.end_frame)
            if inside:
                # Several detector hits inside one dissolve are one shot change.
                cuts -= set(inside[1:])
            elif t.start_frame > self._stride and t.end_frame < last - self._stride:
                # A dissolve between two shots; one that touches either end of the video has only one shot.
                cuts.add((t.start_frame + t.end_frame + 1) // 2)
        merged: list[int] = []
        for cut in sorted(cuts):
            if cut <= 0:
                continue
            if merged and cut - merged[-1] < self._min_shot_frames:
                continue
            merged.append(cut)
        return ShotBoundaries(cuts=merged, transitions=transitions)

    def _cut_proposals(self) -> list[int]:
        """The cuts before transitions and flashes are merged: the cheap detectors' (off), those the verify step
        kept (verify), or the network's own (everywhere)."""
        if self.config.learned == "off":
            return self._raw_cuts
        if self.config.learned == "verify":
            return self._verified_cuts
        return self._learned.cuts(self.config.learned_threshold)


def _hue_sat_histogram(hsv: np.ndarray) -> np.ndarray:
    histogram = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(histogram, histogram, 1.0, 0.0, cv2.NORM_L1)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance of two normalised histograms: 0 for the same colours, 1 for none in common."""
    return cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA)


_MIX_WEIGHTS = np.linspace(0.0, 1.0, 11, dtype=np.float32)


def _unmixed(middle: np.ndarray, first: np.ndarray, last: np.ndarray) -> float:
    """How far a histogram is from the nearest mixture w * first + (1 - w) * last (w in steps of 0.1): near 0 when
    the middle picture's pixels come from either end's picture (motion), large when they are blends (a dissolve)."""
    return min(_distance(middle, w * first + (1 - w) * last) for w in _MIX_WEIGHTS)


class _ModelLoader:
    """Loads the network on first use: a video whose every cut is clear never imports torch."""

    def __init__(self, config: ShotsConfig):
        self.config = config

    def __call__(self):
        c = self.config
        return load_transnet(c.learned_device, c.learned_weights, c.learned_threads)
