"""The run report on a hand-built version: valid images of the promised geometry, thresholds drawn, tables."""

import colorsys
import csv
import io
import math

import numpy as np
import pytest
from PIL import Image

from curation.report import (
    HEADER_H,
    HISTOGRAMS,
    SECTION_H,
    TILE_IMAGE_H,
    TILE_TEXT_H,
    TILE_W,
    UNTRAINED_TITLE,
    contact_sheet_layout,
    write_contact_sheet,
    write_histograms,
    write_report,
)
from curation.writer import VersionWrite

# One distinct solid colour per sample tile (hues 22.5 degrees apart).
COLORS = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / 16, 0.9, 0.9)) for i in range(16)]


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 54), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bound(score, side, value, percentile=None, applied=True):
    label = f"{value:.3g}" if percentile is None else f"p{percentile:g}={value:.3g}"
    return {"score": score, "side": side, "value": value, "percentile": percentile, "applied": applied,
            "label": label}


def _version(aesthetic_threshold=6.7, untrained=False, kept_samples=3, dropped_samples=5) -> VersionWrite:
    scores = []
    for i in range(20):
        reasons = []
        if i < 2:
            reasons.append(f"duration({1.0 + i * 0.3:.3g}<2)")
        if i % 5 == 0:
            reasons.append(f"motion({0.02 * (i + 1):.3g}<0.5)")
        if i + 1 < aesthetic_threshold:
            reasons.append(f"aesthetic({i + 1}<p30={aesthetic_threshold:.3g})")
        scores.append({"clip_id": f"video{i:02d}-0000000", "video_id": f"video{i:02d}",
                       "duration": 1.0 + i * 0.3 if i < 2 else 3.0 + i % 4,
                       "resolution": 144.0, "motion": 0.02 * (i + 1) if i % 5 == 0 else 2.0 + i * 3.0,
                       "aesthetic": float(i + 1), "caption_match": 0.1 + 0.01 * i,
                       "drop_reason": "; ".join(reasons) or None, "kept": not reasons})
    kept = [s for s in scores if s["kept"]][:kept_samples]
    dropped = [s for s in scores if not s["kept"]][:dropped_samples]
    samples = [{**s, "caption": "a red circle", "keyframe": _jpeg(COLORS[i])} for i, s in enumerate(kept + dropped)]
    drop_reasons: dict[str, int] = {}
    for s in scores:
        for part in (s["drop_reason"] or "").split("; "):
            if part:
                drop_reasons[part.split("(")[0]] = drop_reasons.get(part.split("(")[0], 0) + 1
    n_kept = sum(s["kept"] for s in scores)
    counts = {"videos": 21, "videos_ok": 20, "quarantined": {"decode_error": 1}, "clips": 20, "clips_kept": n_kept,
              "clips_dropped": 20 - n_kept, "drop_reasons": drop_reasons, "video_seconds": 100.0, "superseded": 0}
    bounds = [_bound("duration", "min", 2.0), _bound("motion", "min", 0.5),
              _bound("aesthetic", "min", aesthetic_threshold, 30, applied=not untrained),
              _bound("caption_match", "min", 0.15, 25, applied=not untrained)]
    return VersionWrite(version=3, counts=counts, bounds=bounds, untrained=untrained,
                        warnings=["filters on aesthetic skipped"] if untrained else [], retried=[], scores=scores,
                        samples=samples)


def test_report_files_are_valid_images_and_tables(tmp_path):
    written = _version()
    paths = write_report(tmp_path, written)
    assert sorted(p.name for p in paths) == ["contact_sheet.png", "drop_reasons.csv", "drop_reasons.md",
                                             "histograms.png"]
    for name in ("histograms.png", "contact_sheet.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
    with Image.open(tmp_path / "histograms.png") as image:
        assert image.size == (1400, round(216 + 342 * math.ceil(len(HISTOGRAMS) / 2)))  # two histograms a row
    rows = {r["filter"]: r for r in csv.DictReader((tmp_path / "drop_reasons.csv").open())}
    assert list(rows) == ["duration", "motion", "aesthetic", "caption_match"]
    assert rows["aesthetic"]["clips_dropped"] == str(written.counts["drop_reasons"]["aesthetic"]) == "6"
    assert rows["aesthetic"]["thresholds"] == "min p30=6.7" and rows["caption_match"]["clips_dropped"] == "0"
    # Clips 0, 1 and 5 also fail duration or motion: aesthetic alone drops clips 2, 3 and 4.
    assert rows["aesthetic"]["dropped_only_by_this_filter"] == "3"
    markdown = (tmp_path / "drop_reasons.md").read_text()
    assert "| aesthetic | min p30=6.7 | 6 | 3 | 30.0% |" in markdown and "| decode_error | 1 |" in markdown
    assert UNTRAINED_TITLE not in markdown


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_histogram_changes_when_a_threshold_moves_or_scores_are_untrained(tmp_path):
    base = _pixels(write_histograms(tmp_path / "a.png", _version(6.7)))
    assert not np.array_equal(base, _pixels(write_histograms(tmp_path / "b.png", _version(9.2))))
    assert np.array_equal(base, _pixels(write_histograms(tmp_path / "c.png", _version(6.7))))  # deterministic
    untrained = _pixels(write_histograms(tmp_path / "d.png", _version(6.7, untrained=True)))
    # The untrained banner is red text under the title: the top band gains strongly red pixels.
    red = lambda img: int(((img[:, :, 0] > 150) & (img[:, :, 1] < 80) & (img[:, :, 2] < 80))[30:75].sum())  # noqa: E731
    assert red(untrained) > 500 and red(base) == 0


@pytest.mark.parametrize("kept, dropped, columns", [(3, 5, 4), (8, 8, 4), (0, 2, 3)])
def test_contact_sheet_has_one_tile_per_sample_in_a_grid(tmp_path, kept, dropped, columns):
    written = _version(kept_samples=kept, dropped_samples=dropped)
    image = _pixels(write_contact_sheet(tmp_path / "sheet.png", written, columns))
    tile_h = TILE_IMAGE_H + TILE_TEXT_H
    rows = -(-kept // columns) + -(-dropped // columns)
    assert image.shape[:2] == (HEADER_H + 2 * SECTION_H + rows * tile_h, columns * TILE_W)
    layout = contact_sheet_layout(kept, dropped, columns)
    assert len(layout.tiles) == kept + dropped
    # Each tile shows its own keyframe: the centre of its picture has the sample's solid colour.
    for i, (left, top) in enumerate(layout.tiles):
        centre = image[top + TILE_IMAGE_H // 2, left + TILE_W // 2]
        assert np.abs(centre - np.array(COLORS[i])).max() < 25, (i, centre)
