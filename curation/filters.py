"""Clip filters: a dropped clip keeps `kept = false` and a `drop_reason` naming the filter and the value."""

from __future__ import annotations

import math

from curation.config import FilterConfig


class ClipFilter:
    def __init__(self, config: FilterConfig):
        self.config = config

    def reason(self, duration_s: float, motion_median: float, is_static: bool) -> str | None:
        """The first filter the clip fails, as 'name(value<threshold)', or None when the clip is kept."""
        c = self.config
        if duration_s < c.min_seconds:
            return f"too_short({duration_s:.2f}s<{c.min_seconds:g}s)"
        if c.drop_static and is_static:
            value = "nan" if math.isnan(motion_median) else f"{motion_median:.3f}"
            return f"static(motion_median={value})"
        return None
