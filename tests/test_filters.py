"""Clip filters on hand-built clips with known scores: absolute and percentile bounds, reasons, finalize, no Ray."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.config import CurateConfig, FilterConfig, ScoreFilter
from curation.filters import ClipFilter, apply_late_filters, merge_reasons, reason_filters
from curation.outputs import STAGING, OutputDir, commit_version, read_clips, shard_paths, write_version

TRAINED, UNTRAINED = "open_clip:ViT-L-14 laion2b", "open_clip:tiny (untrained)"


def _scores(n: int, **columns) -> list[dict]:
    base = {"duration": 5.0, "resolution": 144.0, "motion": 10.0, "aesthetic": None, "caption_match": None}
    return [{**base, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def _learned_only(**filters) -> FilterConfig:
    config = FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                          caption_match=ScoreFilter())
    for name, spec in filters.items():
        setattr(config, name, spec)
    return config


def test_min_percentile_drops_exactly_the_lowest_clips_with_their_reason():
    scores = _scores(10, aesthetic=[float(v) for v in range(1, 11)])
    outcome = apply_late_filters(_learned_only(aesthetic=ScoreFilter(min_percentile=30)), scores, [None] * 10,
                                 untrained=False)
    # numpy's linear percentile of 1..10 at 30 is 3.7: exactly 1, 2 and 3 are below it.
    assert outcome.reasons[:3] == ["aesthetic(1<p30=3.7)", "aesthetic(2<p30=3.7)", "aesthetic(3<p30=3.7)"]
    assert outcome.reasons[3:] == [None] * 7
    assert outcome.warnings == []


def test_max_percentile_and_absolute_bounds():
    scores = _scores(10, caption_match=[v / 10 for v in range(10)], motion=[float(v) for v in range(10)])
    config = _learned_only(caption_match=ScoreFilter(min=0.25), motion=ScoreFilter(max_percentile=80))
    outcome = apply_late_filters(config, scores, [None] * 10, untrained=False)
    dropped = {i: r for i, r in enumerate(outcome.reasons) if r}
    # caption_match 0.0, 0.1, 0.2 < 0.25; motion 8, 9 > p80 of 0..9 (7.2).
    assert dropped == {0: "caption_match(0<0.25)", 1: "caption_match(0.1<0.25)", 2: "caption_match(0.2<0.25)",
                       8: "motion(8>p80=7.2)", 9: "motion(9>p80=7.2)"}


def test_every_failed_filter_is_listed_and_early_drops_are_not_percentile_candidates():
    # Clip 0 was dropped in the video stage (too short): it keeps that reason, gains the aesthetic one, and its
    # aesthetic value (0.5) does not pull the run's percentile down.
    scores = _scores(5, aesthetic=[0.5, 1.0, 2.0, 3.0, 4.0], caption_match=[0.1, 0.3, 0.3, 0.3, 0.05])
    staged = ["duration(1.5<2)", None, None, None, None]
    config = _learned_only(aesthetic=ScoreFilter(min_percentile=50), caption_match=ScoreFilter(min=0.2))
    outcome = apply_late_filters(config, scores, staged, untrained=False)
    assert outcome.reasons == ["duration(1.5<2); aesthetic(0.5<p50=2.5); caption_match(0.1<0.2)",
                               "aesthetic(1<p50=2.5)", "aesthetic(2<p50=2.5)", None, "caption_match(0.05<0.2)"]
    assert reason_filters(outcome.reasons[0]) == ["duration", "aesthetic", "caption_match"]


def test_missing_scores_are_never_dropped():
    scores = _scores(4, aesthetic=[None, float("nan"), 1.0, 9.0])
    outcome = apply_late_filters(_learned_only(aesthetic=ScoreFilter(min=5.0, min_percentile=90)), scores,
                                 [None] * 4, untrained=False)
    assert outcome.reasons == [None, None, "aesthetic(1<5)", None]


def test_learned_filters_are_skipped_on_untrained_scores_unless_asked():
    scores = _scores(10, aesthetic=[float(v) for v in range(10)])
    config = _learned_only(aesthetic=ScoreFilter(min_percentile=30))
    skipped = apply_late_filters(config, scores, [None] * 10, untrained=True)
    assert skipped.reasons == [None] * 10
    assert [b.applied for b in skipped.bounds] == [False] and "skipped" in skipped.warnings[0]
    config.apply_on_untrained = True
    applied = apply_late_filters(config, scores, [None] * 10, untrained=True)
    assert sum(r is not None for r in applied.reasons) == 3 and "UNTRAINED" in applied.warnings[0]


def test_early_reason_uses_absolute_structural_bounds_only():
    config = FilterConfig(resolution=ScoreFilter(min=256, min_percentile=50), motion=ScoreFilter(min=0.5))
    f = ClipFilter(config)
    assert f.early_reason(1.5, 144, 3.0, 0.2) == "duration(1.5<2); resolution(144<256); motion(0.2<0.5)"
    assert f.early_reason(3.0, 720, 3.0, 0.7) is None
    config.motion_stat = "mean"
    assert ClipFilter(config).early_reason(3.0, 720, 0.3, 5.0) == "motion(0.3<0.5)"
    assert f.early_reason(3.0, 720, float("nan"), float("nan")) is None  # no flow samples: not judged


@pytest.mark.parametrize("change, message", [
    ({"motion_stat": "p90"}, "filters.motion_stat"),
    ({"aesthetic": ScoreFilter(min_percentile=120)}, "filters.aesthetic.min_percentile"),
])
def test_bad_filter_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ClipFilter(FilterConfig(**change))


def test_merge_reasons_lists_each_filter_once_in_a_fixed_order():
    assert merge_reasons("motion(0.1<0.5)", ["duration(1<2)", "motion(0.1<p20=0.3)"]) == \
        "duration(1<2); motion(0.1<0.5)"
    assert merge_reasons(None, []) is None


# --- finalize: write_version + commit_version on hand-built staging records -------------------------------------

# The model-stage columns, added by hand until (or in case) schema.CLIP_FIELDS has them.
_EXTRA = [("aesthetic", pa.float64()), ("caption_match", pa.float64()), ("score_model", pa.string())]
_CLIP = pa.struct(list(schema.CLIP_FIELDS) + [f for f in _EXTRA if f[0] not in dict(schema.CLIP_FIELDS)]
                  + [("video_bytes", pa.binary()), ("width", pa.int64()), ("height", pa.int64())])
_STAGED = pa.schema(list(schema.VIDEOS) + [("clips", pa.list_(_CLIP))])


def _stage(out: OutputDir, video_id: str, aesthetics: list[float], score_model: str = TRAINED,
           status: str = "ok", early: dict[int, str] | None = None) -> None:
    row = {name: None for name in schema.VIDEOS.names}
    row.update(video_id=video_id, uri=f"/dump/{video_id}.mp4", size_bytes=1, status=status, fps=24.0, width=192,
               height=144, duration_s=3.0 * len(aesthetics), cut_frames=[], transitions=[])
    if status != "ok":
        row["error_class"] = "decode_error"
    clips = []
    for i, value in enumerate(aesthetics):
        reason = (early or {}).get(i)
        clips.append({
            "clip_id": f"{video_id}-{i * 72:07d}", "video_id": video_id, "start_frame": i * 72,
            "end_frame": i * 72 + 71, "start_s": 3.0 * i, "end_s": 3.0 * (i + 1), "num_frames": 72,
            "motion_mean": 5.0, "motion_median": 5.0, "motion_p90": 6.0, "is_static": False,
            "keyframes": [b"\xff\xd8first", b"\xff\xd8middle", b"\xff\xd8last"], "kept": reason is None,
            "drop_reason": reason, "aesthetic": value, "caption_match": 0.3, "score_model": score_model,
            "video_bytes": None if reason else f"mp4 {video_id} {i}".encode(), "width": 192, "height": 144,
        })
    row["clips"] = clips
    out.makedirs(STAGING)
    pq.write_table(pa.Table.from_pylist([row], schema=_STAGED), out.path(STAGING, f"{video_id}.parquet"))


def _config(**aesthetic) -> CurateConfig:
    config = CurateConfig()
    config.filters.aesthetic = ScoreFilter(**aesthetic)
    config.filters.caption_match = ScoreFilter()
    config.output_files.shard_rows = 3
    return config


def test_finalize_writes_only_clips_kept_after_all_filters_into_shards(tmp_path):
    out = OutputDir(str(tmp_path))
    _stage(out, "a", [1.0, 2.0, 3.0, 4.0, 5.0], early={0: "duration(1.5<2)"})
    _stage(out, "b", [6.0, 7.0, 8.0, 9.0, 10.0])
    _stage(out, "c", [], status="quarantined")
    written = write_version(out, _config(min_percentile=30), "yaml", 1, known={})
    # Candidates are the 9 clips not dropped early (2..10): p30 = 4.4 drops 2, 3, 4; clip a-0 keeps its early reason
    # and also fails the percentile.
    assert written.counts["clips"] == 10 and written.counts["clips_kept"] == 6 and written.counts["clips_dropped"] == 4
    assert written.counts["drop_reasons"] == {"duration": 1, "aesthetic": 4}
    assert written.counts["quarantined"] == {"decode_error": 1}
    manifest = commit_version(out, written, {}, None, {}, run={"mlflow_run_id": "abc"})
    clips = {r["clip_id"]: r for r in read_clips(str(tmp_path)).to_pylist()}
    assert clips["a-0000000"]["drop_reason"] == "duration(1.5<2); aesthetic(1<p30=4.4)"
    assert clips["a-0000072"]["drop_reason"] == "aesthetic(2<p30=4.4)" and not clips["a-0000072"]["kept"]
    assert clips["a-0000288"]["kept"] and clips["a-0000288"]["drop_reason"] is None
    shards = [r for p in shard_paths(str(tmp_path)) for r in pq.read_table(tmp_path / p).to_pylist()]
    assert sorted(r["clip_id"] for r in shards) == sorted(i for i, c in clips.items() if c["kept"])
    assert all(r["video_bytes"] for r in shards) and len(shard_paths(str(tmp_path))) == 2  # 6 rows, 3 per file
    assert manifest["versions"][0]["run"]["mlflow_run_id"] == "abc"
    assert {b["label"] for b in manifest["versions"][0]["filters"] if b["score"] == "aesthetic"} == {"p30=4.4"}
    assert not list((tmp_path / STAGING).glob("*.parquet"))


def test_finalize_skips_untrained_learned_filters_and_says_so(tmp_path, caplog):
    out = OutputDir(str(tmp_path))
    _stage(out, "a", [1.0, 2.0, 3.0, 4.0], score_model=UNTRAINED)
    with caplog.at_level(logging.WARNING):
        written = write_version(out, _config(min_percentile=50), "yaml", 1, known={})
    assert written.untrained and written.counts["clips_kept"] == 4
    assert "untrained" in written.warnings[0]


def test_a_retried_video_supersedes_its_quarantined_row_and_latest_only_reads_it(tmp_path):
    out = OutputDir(str(tmp_path))
    _stage(out, "a", [5.0, 6.0])
    _stage(out, "q", [], status="quarantined")
    v1 = commit_version(out, write_version(out, _config(), "yaml", 1, known={}), {}, None, {})
    _stage(out, "q", [7.0, 8.0, 9.0])  # the retry now decodes
    v2 = commit_version(out, write_version(out, _config(), "yaml", 2, known={"a": "ok", "q": "quarantined"}),
                        {}, v1, {})
    assert v2["versions"][1]["superseded"] == ["q"] and v2["counts"]["superseded"] == 1
    from curation.outputs import read_table

    videos = read_table(str(tmp_path), "videos").to_pylist()
    assert sorted((v["video_id"], v["status"]) for v in videos) == [("a", "ok"), ("q", "ok")]
    assert len(read_table(str(tmp_path), "videos", latest_only=False)) == 3
    assert len(read_clips(str(tmp_path), kept_only=True)) == 5
    shards = [r for p in shard_paths(str(tmp_path)) for r in pq.read_table(tmp_path / p).to_pylist()]
    assert len(shards) == len({r["clip_id"] for r in shards}) == 5
    # A video that already has clips can never be finalized twice.
    _stage(out, "a", [5.0, 6.0])
    with pytest.raises(RuntimeError, match="already finalized"):
        write_version(out, _config(), "yaml", 3, known={"a": "ok", "q": "ok"})
