"""Clip filters: a dropped clip keeps `kept = false` and a `drop_reason` naming each filter it failed, its value and
the threshold, e.g. `duration(1.5<2); aesthetic(3.91<p20=4.02)`.

Every score can be bounded by an absolute threshold or by a percentile of the current run (see FilterConfig). Two
passes apply them:

- early, in the video stage: absolute bounds on the scores known there (duration, resolution, motion), so clips that
  can never be kept are not encoded;
- late, at finalize, over every clip of the run: percentile bounds on any score and absolute bounds on the learned
  scores (aesthetic, caption_match).

Percentiles are taken over the run's *candidates*: the clips that passed the early filters and have a value for that
score, so the order of the late filters does not matter. A clip with no value for a score (not scored, NaN) is never
dropped by that score's filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curation.config import FilterConfig, ScoreFilter

SCORES = ("duration", "resolution", "motion", "aesthetic", "caption_match", "text")
STRUCTURAL = ("duration", "resolution", "motion")  # known in the video stage, from the decode itself
LEARNED = ("aesthetic", "caption_match")  # from the CLIP stage: meaningless when its weights are untrained
SEPARATOR = "; "


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Bound:
    """One threshold on one score: clips with a value below (`side="min"`) or above (`side="max"`) it are dropped."""

    score: str
    side: str  # "min" | "max"
    value: float  # the threshold in the score's units (a percentile bound is resolved on the run's clips)
    percentile: float | None = None
    applied: bool = True  # False: shown in the report, not used (a learned score from untrained weights)

    @property
    def label(self) -> str:
        return _fmt(self.value) if self.percentile is None else f"p{self.percentile:g}={_fmt(self.value)}"

    def reason(self, value: float | None) -> str | None:
        """'score(value<label)' when `value` fails this bound, else None."""
        if _missing(value):
            return None
        if self.side == "min" and value < self.value:
            return f"{self.score}({_fmt(value)}<{self.label})"
        if self.side == "max" and value > self.value:
            return f"{self.score}({_fmt(value)}>{self.label})"
        return None


def clip_scores(clip: dict, short_side: int | None, motion_stat: str) -> dict[str, float | None]:
    """The filtered scores of one clip row; `short_side` is the source video's min(width, height)."""
    duration = None
    if clip.get("end_s") is not None and clip.get("start_s") is not None:
        duration = clip["end_s"] - clip["start_s"]
    return {
        "duration": duration,
        "resolution": float(short_side) if short_side else None,
        "motion": clip.get(f"motion_{motion_stat}"),
        "aesthetic": clip.get("aesthetic"),
        "caption_match": clip.get("caption_match"),
        "text": clip.get("text_area"),
    }


def reason_filters(drop_reason: str | None) -> list[str]:
    """The filter names in a drop_reason: 'duration(1.5<2); motion(0.1<0.5)' -> ['duration', 'motion']."""
    if not drop_reason:
        return []
    return [part.split("(", 1)[0] for part in drop_reason.split(SEPARATOR)]


def merge_reasons(*reasons: str | list[str] | None) -> str | None:
    """One drop_reason from several lists of reasons, each filter listed once (the first reason given for it)."""
    seen: dict[str, str] = {}
    for group in reasons:
        parts = group.split(SEPARATOR) if isinstance(group, str) else (group or [])
        for part in parts:
            if part:
                seen.setdefault(part.split("(", 1)[0], part)
    ordered = sorted(seen.items(), key=lambda kv: SCORES.index(kv[0]) if kv[0] in SCORES else len(SCORES))
    return SEPARATOR.join(part for _, part in ordered) or None


class ClipFilter:
    """The filters of one run. `early_reason` runs in the video stage; `late_bounds` at finalize."""

    def __init__(self, config: FilterConfig):
        if config.motion_stat not in ("median", "mean"):
            raise ValueError(f"filters.motion_stat must be 'median' or 'mean', got {config.motion_stat!r}")
        for name in SCORES:
            spec = self.spec(name, config)
            for key in ("min_percentile", "max_percentile"):
                p = getattr(spec, key)
                if p is not None and not 0 <= p <= 100:
                    raise ValueError(f"filters.{name}.{key} must be within [0, 100], got {p}")
        self.config = config

    @staticmethod
    def spec(name: str, config: FilterConfig) -> ScoreFilter:
        return getattr(config, name)

    def early_bounds(self) -> list[Bound]:
        bounds = []
        for name in STRUCTURAL:
            spec = self.spec(name, self.config)
            bounds += [Bound(name, side, v) for side in ("min", "max") if (v := getattr(spec, side)) is not None]
        return bounds

    def early_reason(self, duration_s: float, short_side: int | None, motion_mean: float,
                     motion_median: float) -> str | None:
        """Every early filter the clip fails, or None: the absolute bounds that need no run statistics."""
        clip = {"start_s": 0.0, "end_s": duration_s, "motion_mean": motion_mean, "motion_median": motion_median}
        return self.reason(clip_scores(clip, short_side, self.config.motion_stat), self.early_bounds())

    def late_bounds(self, candidates: dict[str, list[float]], untrained: bool) -> list[Bound]:
        """Percentile bounds resolved on `candidates` (score -> values of the run's candidate clips) and absolute
        bounds on the model stages' scores (learned ones and text). With `untrained` scores, learned-score bounds
        are returned with applied=False unless filters.apply_on_untrained is set."""
        bounds = []
        for name in SCORES:
            spec = self.spec(name, self.config)
            applied = not (untrained and name in LEARNED and not self.config.apply_on_untrained)
            if name not in STRUCTURAL:
                bounds += [Bound(name, side, getattr(spec, side), applied=applied)
                           for side in ("min", "max") if getattr(spec, side) is not None]
            values = np.asarray([v for v in candidates.get(name, []) if not _missing(v)], dtype=np.float64)
            for side in ("min", "max"):
                p = getattr(spec, f"{side}_percentile")
                if p is None or values.size == 0:
                    continue
                bounds.append(Bound(name, side, float(np.percentile(values, p)), percentile=p, applied=applied))
        return bounds

    @staticmethod
    def reason(scores: dict[str, float | None], bounds: list[Bound]) -> str | None:
        """The applied bounds `scores` fails, one reason per filter, as a drop_reason (None: kept)."""
        return merge_reasons([r for b in bounds if b.applied and (r := b.reason(scores.get(b.score)))])

    def learned_filters_set(self) -> list[str]:
        """Learned scores that have at least one bound configured."""
        out = []
        for name in LEARNED:
            spec = self.spec(name, self.config)
            if any(getattr(spec, k) is not None for k in ("min", "max", "min_percentile", "max_percentile")):
                out.append(name)
        return out


@dataclass
class FilterOutcome:
    """What the late filters did to one run: per-clip reasons plus the bounds used, for the manifest and report."""

    reasons: list[str | None]  # final drop_reason per clip, in input order
    bounds: list[Bound]
    untrained: bool
    warnings: list[str]


def apply_late_filters(config: FilterConfig, scores: list[dict[str, float | None]], staged_reasons: list[str | None],
                       untrained: bool) -> FilterOutcome:
    """Final drop reasons for one run's clips: the early reasons they were staged with plus the late filters.

    `scores` holds clip_scores() per clip; a clip with a staged reason is not a candidate for percentiles."""
    clip_filter = ClipFilter(config)
    candidates: dict[str, list[float]] = {name: [] for name in SCORES}
    for values, staged in zip(scores, staged_reasons, strict=True):
        if staged:
            continue
        for name in SCORES:
            candidates[name].append(values.get(name))
    bounds = clip_filter.late_bounds(candidates, untrained)
    warnings = []
    learned = clip_filter.learned_filters_set()
    if untrained and learned:
        if config.apply_on_untrained:
            warnings.append(f"filters on {', '.join(learned)} APPLIED to scores from UNTRAINED weights "
                            "(filters.apply_on_untrained=true): the clips they drop are dropped at random")
        else:
            warnings.append(f"filters on {', '.join(learned)} skipped: the scores come from untrained weights "
                            "(set filters.apply_on_untrained=true to apply them anyway)")
    reasons = [merge_reasons(staged, clip_filter.reason(values, bounds))
               for values, staged in zip(scores, staged_reasons, strict=True)]
    return FilterOutcome(reasons, bounds, untrained, warnings)
