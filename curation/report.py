"""The report of one curation run, for a person to read at a glance: score histograms with the thresholds drawn on
them, the drop reasons as a Markdown and a CSV table, and a contact sheet of sample kept and dropped clips.

Rendered on matplotlib's Agg canvas (no display, no pyplot state), so it runs on any worker or CI machine.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from curation.filters import SCORES, reason_filters
from curation.writer import VersionWrite

UNTRAINED_TITLE = "scores from UNTRAINED weights \u2014 not meaningful"
DPI = 100
# Contact sheet geometry in pixels: a header, then per section (kept, dropped) a label band and rows of tiles.
TILE_W, TILE_IMAGE_H, TILE_TEXT_H = 240, 135, 80
HEADER_H, SECTION_H = 70, 30
TILE_CHARS = 36  # monospace 7.5 pt characters that fit a tile's width
KEPT_COLOR, DROPPED_HERE_COLOR, DROPPED_ELSEWHERE_COLOR = "#2e7d32", "#c62828", "#9e9e9e"
HISTOGRAMS = [
    ("motion", "motion: optical flow, px/s at reference width ({stat})"),
    ("aesthetic", "aesthetic score"),
    ("caption_match", "caption match: CLIP cosine similarity"),
    ("duration", "clip duration, s"),
    ("text", "on-screen text: fraction of the frame in OCR text boxes (max over keyframes)"),
    ("dedup_hamming", "dedup: nearest kept copy, median hamming bits of 64 (frame hashes)"),
    ("dedup_cos", "dedup: nearest kept clip, CLIP cosine similarity"),
]
# Histograms whose clips are dropped under another filter name than the histogram's (both dedup distances drop a
# clip as `duplicate`); their bounds say which histogram they are drawn on.
REASONS = {"dedup_hamming": "duplicate", "dedup_cos": "duplicate"}
HIST_HEADER_IN, HIST_BOTTOM_IN, HIST_ROW_IN = 1.62, 0.54, 3.42  # histograms.png: title band, bottom margin, a row


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _title(written: VersionWrite) -> str:
    c = written.counts
    quarantined = sum(c["quarantined"].values())
    return (f"reelforge curate \u2014 dataset version {written.version}: {c['clips_kept']} of {c['clips']} clips kept "
            f"({c['videos']} videos, {quarantined} quarantined)")


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _bin_edges(values: np.ndarray, log: bool) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if log:
        return np.geomspace(lo, hi, 31)
    if hi - lo < 1e-9:
        return np.linspace(lo - 0.5, hi + 0.5, 11)
    edges = np.histogram_bin_edges(values, bins="auto")
    return edges if len(edges) <= 41 else np.linspace(lo, hi, 41)


def _histogram(ax, name: str, label: str, scores: list[dict], bounds: list[dict]) -> None:
    rows = [s for s in scores if not _missing(s.get(name))]
    ax.set_title(label, fontsize=11)
    if not rows:
        ax.text(0.5, 0.5, "not scored in this run", ha="center", va="center", transform=ax.transAxes, fontsize=12,
                color="#555555")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    values = np.array([s[name] for s in rows], dtype=np.float64)
    mine = [b for b in bounds if b.get("histogram", b["score"]) == name]
    reason = REASONS.get(name, name)
    positive = values[values > 0]
    log = name == "motion" and positive.size > 0 and positive.max() / positive.min() > 100
    if log:  # static clips near 0 and pans near 100 px/s only share an axis on a log scale
        floor = float(positive.min())
        values = np.maximum(values, floor)
    edges = _bin_edges(values, log)
    groups = {"kept": [], "here": [], "elsewhere": []}
    for value, s in zip(values, rows, strict=True):
        failed = reason_filters(s.get("drop_reason"))
        groups["kept" if not failed else "here" if reason in failed else "elsewhere"].append(value)
    ax.hist([groups["kept"], groups["here"], groups["elsewhere"]], bins=edges, stacked=True,
            color=[KEPT_COLOR, DROPPED_HERE_COLOR, DROPPED_ELSEWHERE_COLOR])
    ax.set_title(f"{label}\nkept {len(groups['kept'])}, dropped by this filter {len(groups['here'])}, "
                 f"by other filters {len(groups['elsewhere'])}", fontsize=10)
    if log:
        ax.set_xscale("log")
    lo, hi = edges[0], edges[-1]
    for b in mine:
        x = max(b["value"], lo * 0.5) if log else b["value"]
        lo, hi = min(lo, x), max(hi, x)
        style = dict(color="black", linewidth=1.8, linestyle="-" if b["percentile"] is None else "--")
        text = f"{b['side']} {b['label']}"
        if not b["applied"]:
            style.update(color="#777777", linestyle=":")
            text += " (not applied: untrained)"
        ax.axvline(x, **style)
        ax.text(x, 0.97, f" {text}", transform=ax.get_xaxis_transform(), rotation=90, va="top",
                ha="right" if b["side"] == "min" else "left", fontsize=9, color=style["color"],
                bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))
    span = (hi / lo) ** 0.05 if log else (hi - lo) * 0.05 or 1.0
    ax.set_xlim((lo / span, hi * span) if log else (lo - span, hi + span))
    ax.set_ylabel("clips")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # headroom for the threshold labels


def write_histograms(path: Path, written: VersionWrite, motion_stat: str = "median") -> Path:
    # Two histograms a row; the header and margins keep their size in inches whatever the number of rows.
    rows = math.ceil(len(HISTOGRAMS) / 2)
    height = HIST_HEADER_IN + HIST_BOTTOM_IN + HIST_ROW_IN * rows

    def below_top(inches: float) -> float:  # inches from the top -> figure fraction
        return 1 - inches / height

    fig = Figure(figsize=(14, height), dpi=DPI)
    axes = fig.subplots(rows, 2).ravel()
    for ax in axes[len(HISTOGRAMS):]:
        ax.set_axis_off()
    for ax, (name, label) in zip(axes, HISTOGRAMS, strict=False):
        _histogram(ax, name, label.format(stat=f"motion_{motion_stat}"), written.scores, written.bounds)
    fig.suptitle(_title(written), fontsize=14, y=below_top(0.135))
    if written.untrained:
        fig.text(0.5, below_top(0.585), UNTRAINED_TITLE, ha="center", va="center", fontsize=16, weight="bold",
                 color="#c62828")
    fig.text(0.5, below_top(0.855), "lines: thresholds (solid: absolute, dashed: percentile of this run, dotted: "
             "not applied)", ha="center", fontsize=9, color="#444444")
    handles = [Patch(color=c) for c in (KEPT_COLOR, DROPPED_HERE_COLOR, DROPPED_ELSEWHERE_COLOR)]
    fig.legend(handles, ["kept", "dropped by this filter", "dropped by other filters"], loc="center",
               bbox_to_anchor=(0.5, below_top(1.08)), ncol=3, fontsize=9, frameon=False)
    fig.subplots_adjust(top=below_top(HIST_HEADER_IN), bottom=HIST_BOTTOM_IN / height, left=0.06, right=0.98,
                        hspace=0.3, wspace=0.15)
    return _save(fig, path)


@dataclass
class SheetLayout:
    width: int
    height: int
    sections: list[tuple[str, int]]  # (label, top y in px) of each section band
    tiles: list[tuple[int, int]]  # (left, top) in px of each tile, kept tiles first


def contact_sheet_layout(kept: int, dropped: int, columns: int) -> SheetLayout:
    """Pixel geometry of a contact sheet with `kept` and `dropped` tiles, `columns` per row."""
    columns = max(1, columns)
    tile_h = TILE_IMAGE_H + TILE_TEXT_H
    y = HEADER_H
    sections, tiles = [], []
    for label, count in (("kept", kept), ("dropped", dropped)):
        sections.append((label, y))
        y += SECTION_H
        for i in range(count):
            tiles.append(((i % columns) * TILE_W, y + (i // columns) * tile_h))
        y += math.ceil(count / columns) * tile_h
    return SheetLayout(columns * TILE_W, y, sections, tiles)


def _fit(text: str, width: int = TILE_CHARS) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _tile_lines(sample: dict) -> list[tuple[str, str]]:
    """Up to five (text, colour) lines under a tile: id, scores, duration and caption, then the verdict."""
    scores = []
    for name, short, fmt in (("motion", "flow", "{:.3g}"), ("aesthetic", "aes", "{:.3g}"),
                             ("caption_match", "match", "{:.3f}"), ("text", "text", "{:.3f}")):
        if not _missing(sample.get(name)):
            scores.append(f"{short} {fmt.format(sample[name])}")
    duration = "" if _missing(sample.get("duration")) else f"{sample['duration']:.1f}s "
    lines = [(_fit(sample["clip_id"]), "#555555"), (_fit("  ".join(scores)), "#222222"),
             (_fit(f"{duration}{sample.get('caption') or ''}".strip()), "#222222")]
    if sample["kept"]:
        return lines + [("kept", KEPT_COLOR)]
    wrapped = textwrap.wrap(sample["drop_reason"], TILE_CHARS)
    if len(wrapped) > 2:
        wrapped = [wrapped[0], _fit(wrapped[1] + " " + " ".join(wrapped[2:]))]
    return lines + [(text, DROPPED_HERE_COLOR) for text in wrapped]


def write_contact_sheet(path: Path, written: VersionWrite, columns: int = 4) -> Path:
    kept = [s for s in written.samples if s["kept"]]
    dropped = [s for s in written.samples if not s["kept"]]
    layout = contact_sheet_layout(len(kept), len(dropped), columns)
    width, height = layout.width, layout.height
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")

    def at(x: float, y: float) -> tuple[float, float]:  # pixels from the top left -> figure fraction
        return x / width, 1 - y / height

    fig.text(*at(8, 8), _title(written), fontsize=10, va="top", weight="bold")
    if written.untrained:
        fig.text(*at(8, 30), UNTRAINED_TITLE, fontsize=12, va="top", weight="bold", color="#c62828")
    totals = {"kept": written.counts["clips_kept"], "dropped": written.counts["clips_dropped"]}
    shown = {"kept": len(kept), "dropped": len(dropped)}
    for label, top in layout.sections:
        color = KEPT_COLOR if label == "kept" else DROPPED_HERE_COLOR
        fig.text(*at(8, top + SECTION_H / 2), f"{label}: {shown[label]} of {totals[label]} clips "
                 "(middle keyframes)", fontsize=10, va="center", weight="bold", color=color)
    for sample, (left, top) in zip(kept + dropped, layout.tiles, strict=True):
        x0, y0 = at(left + 4, top + TILE_IMAGE_H)
        ax = fig.add_axes((x0, y0, (TILE_W - 8) / width, (TILE_IMAGE_H - 4) / height))
        ax.set_axis_off()
        if sample.get("keyframe"):
            ax.imshow(np.asarray(Image.open(io.BytesIO(sample["keyframe"])).convert("RGB")))
        else:
            ax.text(0.5, 0.5, "no keyframe", ha="center", va="center", transform=ax.transAxes)
        for i, (text, color) in enumerate(_tile_lines(sample)):
            fig.text(*at(left + 5, top + TILE_IMAGE_H + 3 + 15 * i), text, fontsize=7.5, va="top", color=color,
                     family="monospace")
    return _save(fig, path)


def drop_reason_rows(written: VersionWrite) -> list[dict]:
    """One row per filter that has a threshold or dropped a clip: how many clips it dropped, alone or not."""
    counts = written.counts
    only: dict[str, int] = {}
    for s in written.scores:
        failed = reason_filters(s.get("drop_reason"))
        if len(failed) == 1:
            only[failed[0]] = only.get(failed[0], 0) + 1
    names = [n for n in SCORES if any(b["score"] == n for b in written.bounds) or n in counts["drop_reasons"]]
    names += sorted(({b["score"] for b in written.bounds} | set(counts["drop_reasons"])) - set(names))
    rows = []
    for name in names:
        thresholds = [f"{b['side']} {b['label']}" + ("" if b["applied"] else " (not applied: untrained)")
                      for b in written.bounds if b["score"] == name]
        dropped = counts["drop_reasons"].get(name, 0)
        rows.append({"filter": name, "thresholds": "; ".join(thresholds) or "-", "clips_dropped": dropped,
                     "dropped_only_by_this_filter": only.get(name, 0),
                     "share_of_clips": f"{dropped / counts['clips']:.1%}" if counts["clips"] else "-"})
    return rows


def write_drop_reasons(directory: Path, written: VersionWrite) -> list[Path]:
    rows = drop_reason_rows(written)
    csv_path = directory / "drop_reasons.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filter", "thresholds", "clips_dropped", "dropped_only_by_this_filter",
                                               "share_of_clips"])
        writer.writeheader()
        writer.writerows(rows)
    c = written.counts
    lines = [f"# {_title(written)}", ""]
    if written.untrained:
        lines += [f"**{UNTRAINED_TITLE}**", ""]
    lines += [f"{c['clips']} clips found, {c['clips_kept']} kept, {c['clips_dropped']} dropped. A clip dropped by "
              "several filters counts under each; `only` counts the clips no other filter dropped.", "",
              "| filter | thresholds | clips dropped | only this filter | share of clips |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['filter']} | {r['thresholds']} | {r['clips_dropped']} | {r['dropped_only_by_this_filter']} | "
              f"{r['share_of_clips']} |" for r in rows]
    if c["quarantined"]:
        lines += ["", "## Quarantined videos", "", "| reason | videos |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(c["quarantined"].items())]
    if written.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in written.warnings]
    md_path = directory / "drop_reasons.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path]


def write_report(directory: str | Path, written: VersionWrite, motion_stat: str = "median",
                 columns: int = 4) -> list[Path]:
    """Write histograms.png, contact_sheet.png, drop_reasons.md and drop_reasons.csv into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [write_histograms(directory / "histograms.png", written, motion_stat),
            write_contact_sheet(directory / "contact_sheet.png", written, columns),
            *write_drop_reasons(directory, written)]
