"""Clip filters on hand-built clips with known scores: absolute and percentile bounds, reasons, and finishing a
dataset version (batch commits, run-wide verdicts, tags) on a temporary Lance dataset, no Ray."""

import logging

import pytest

from curation import schema
from curation.config import CurateConfig, FilterConfig, ScoreFilter
from curation.dataset import CuratedDataset, DatasetError
from curation.filters import ClipFilter, apply_late_filters, merge_reasons, reason_filters
from curation.writer import FILTERS_KEY, BatchCommitter, create_tables, finish_filters, tag_version, video_status

TRAINED, UNTRAINED = "open_clip:ViT-L-14 laion2b", "open_clip:tiny (untrained)"


def _scores(n: int, **columns) -> list[dict]:
    base = {"duration": 5.0, "resolution": 144.0, "motion": 10.0, "aesthetic": None, "caption_match": None}
    return [{**base, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def _learned_only(**filters) -> FilterConfig:
    config = FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                          caption_match=ScoreFilter(), text=ScoreFilter())
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


# --- finishing a version: BatchCommitter + finish_filters + tag_version on hand-built staged records -------------


def _staged(video_id: str, aesthetics: list[float], score_model: str = TRAINED, status: str = "ok",
            early: dict[int, str] | None = None) -> dict:
    """One video's record as the Ray Data plan hands it to the driver (schema.STAGED): its videos row and clips."""
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
    return row


def _config(**aesthetic) -> CurateConfig:
    config = CurateConfig()
    config.filters.aesthetic = ScoreFilter(**aesthetic)
    config.filters.caption_match = ScoreFilter()
    config.output_files.commit_videos = 2
    return config


def _commit(dataset: CuratedDataset, version: int, config: CurateConfig, *records: dict) -> None:
    committer = BatchCommitter(dataset, version, config.output_files.commit_videos)
    for record in records:
        committer.add(record)
    committer.flush()


def _rows(dataset: CuratedDataset, kind: str, version: int | None = None) -> dict[str, dict]:
    key = "video_id" if kind == "videos" else "clip_id"
    return {r[key]: r for r in dataset.read(kind, version).to_pylist()}


def test_finishing_a_version_shards_only_clips_kept_after_all_filters(tmp_path):
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    config = _config(min_percentile=30)
    _commit(dataset, 1, config, _staged("a", [1.0, 2.0, 3.0, 4.0, 5.0], early={0: "duration(1.5<2)"}),
            _staged("b", [6.0, 7.0, 8.0, 9.0, 10.0]), _staged("c", [], status="quarantined"))
    written = finish_filters(dataset, config, 1, retried=[])
    # Candidates are the 9 clips not dropped early (2..10): p30 = 4.4 drops 2, 3, 4; clip a-0 keeps its early reason
    # and also fails the percentile.
    assert written.counts["clips"] == 10 and written.counts["clips_kept"] == 6 and written.counts["clips_dropped"] == 4
    assert written.counts["drop_reasons"] == {"duration": 1, "aesthetic": 4}
    assert written.counts["quarantined"] == {"decode_error": 1}
    assert {b["label"] for b in written.bounds if b["score"] == "aesthetic"} == {"p30=4.4"}
    # Committed and filtered, but not a version yet: readers see nothing until the tag.
    assert dataset.latest() is None
    with pytest.raises(DatasetError, match="no finished dataset version"):
        dataset.read("shards")
    record = tag_version(dataset, 1, {"dataset_version": 1, "counts": written.counts, "filters": written.bounds,
                                      "run": {"mlflow_run_id": "abc"}})
    assert dataset.latest() == 1 and dataset.record(1) == record
    assert record["run"]["mlflow_run_id"] == "abc" and set(record["lance_versions"]) == {"videos", "clips", "shards"}
    assert {b["label"] for b in dataset.record()["filters"] if b["score"] == "aesthetic"} == {"p30=4.4"}
    clips = _rows(dataset, "clips")
    assert len(clips) == 10 and all(c["kept"] is not None and c["dataset_version"] == 1 for c in clips.values())
    assert clips["a-0000000"]["drop_reason"] == "duration(1.5<2); aesthetic(1<p30=4.4)"
    assert clips["a-0000072"]["drop_reason"] == "aesthetic(2<p30=4.4)" and not clips["a-0000072"]["kept"]
    assert clips["a-0000288"]["kept"] and clips["a-0000288"]["drop_reason"] is None
    shards = _rows(dataset, "shards")
    assert sorted(shards) == sorted(i for i, c in clips.items() if c["kept"])
    assert all(r["video_bytes"] and r["kept"] for r in shards.values())
    assert shards["b-0000000"]["uri"] == "/dump/b.mp4" and shards["b-0000000"]["fps"] == 24.0
    assert sorted(_rows(dataset, "videos")) == ["a", "b", "c"]
    # The run-wide bounds kept while the version was unfinished are gone with it.
    assert FILTERS_KEY.format(tag="v0001") not in dataset.open("clips").config()


def test_a_killed_run_keeps_its_committed_batches_and_finishing_again_keeps_the_verdicts(tmp_path):
    """Videos are committed every `commit_videos` (a kill loses only the batch in flight); steps 1 and 2 repeated
    (a run killed after the verdicts, before the tag) give the same version."""
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    config = _config(min_percentile=30)
    committer = BatchCommitter(dataset, 1, config.output_files.commit_videos)
    committer.add(_staged("a", [1.0, 2.0, 3.0, 4.0, 5.0]))
    assert video_status(dataset) == {}
    committer.add(_staged("b", [6.0, 7.0, 8.0, 9.0, 10.0]))
    committer.add(_staged("c", [11.0]))  # in flight when the run is killed: never flushed
    assert video_status(dataset) == {"a": ("ok", 1), "b": ("ok", 1)} and committer.committed == 2
    assert dataset.latest() is None
    first = finish_filters(dataset, config, 1, retried=[])
    again = finish_filters(dataset, config, 1, retried=[])
    assert again.counts == first.counts and again.bounds == first.bounds
    tag_version(dataset, 1, {"dataset_version": 1})
    tag_version(dataset, 1, {"dataset_version": 1})  # repeating the tag step moves the tag, it does not fail
    assert [v.number for v in dataset.versions()] == [1]
    assert len(dataset.read("shards")) == first.counts["clips_kept"] == 7


def test_finish_skips_untrained_learned_filters_and_says_so(tmp_path, caplog):
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    config = _config(min_percentile=50)
    _commit(dataset, 1, config, _staged("a", [1.0, 2.0, 3.0, 4.0], score_model=UNTRAINED))
    with caplog.at_level(logging.WARNING):
        written = finish_filters(dataset, config, 1, retried=[])
    assert written.untrained and written.counts["clips_kept"] == 4
    assert "untrained" in written.warnings[0]


def test_a_retried_video_replaces_its_quarantined_row_and_the_old_version_still_shows_it(tmp_path):
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    config = _config()
    _commit(dataset, 1, config, _staged("a", [5.0, 6.0]), _staged("q", [], status="quarantined"))
    tag_version(dataset, 1, {"dataset_version": 1, "counts": finish_filters(dataset, config, 1, []).counts})
    _commit(dataset, 2, config, _staged("q", [7.0, 8.0, 9.0]))  # the retry now decodes
    written = finish_filters(dataset, config, 2, retried=["q"])
    assert written.retried == ["q"] and written.counts["superseded"] == 1
    assert written.counts["videos"] == 1 and written.counts["clips_kept"] == 3  # the version holds what it processed
    tag_version(dataset, 2, {"dataset_version": 2, "counts": written.counts, "retried": written.retried})
    assert dataset.record(2)["retried"] == ["q"] and dataset.record(1)["counts"]["videos"] == 2

    videos = _rows(dataset, "videos")
    assert sorted((v, r["status"], r["dataset_version"]) for v, r in videos.items()) == [("a", "ok", 1),
                                                                                        ("q", "ok", 2)]
    old = _rows(dataset, "videos", version=1)
    assert sorted((v, r["status"], r["error_class"]) for v, r in old.items()) == [
        ("a", "ok", None), ("q", "quarantined", "decode_error")]
    assert len(dataset.read("clips", filter="kept")) == 5
    shards = dataset.read("shards", columns=["clip_id"])["clip_id"].to_pylist()
    assert len(shards) == len(set(shards)) == 5
    assert len(dataset.read("shards", version=1)) == 2  # version 1 is read as it was
    # A video committed again (a rerun that processed it once more) replaces its rows: each kept clip is still in
    # the shards exactly once, and earlier versions read as they were.
    _commit(dataset, 3, config, _staged("a", [5.0, 6.0]))
    tag_version(dataset, 3, {"dataset_version": 3, "counts": finish_filters(dataset, config, 3, []).counts})
    shards = dataset.read("shards", columns=["clip_id"])["clip_id"].to_pylist()
    assert len(shards) == len(set(shards)) == 5
    assert len(dataset.read("clips")) == 5 and len(dataset.read("videos")) == 2
    assert len(dataset.read("shards", version=2)) == 5 and len(dataset.read("shards", version=1)) == 2


class _Killed(Exception):
    """The run dies here."""


def _killed(*args, **kwargs):
    raise _Killed


def test_a_version_resumed_after_its_verdicts_is_judged_as_one_run_over_its_clips(tmp_path, monkeypatch):
    """run_curate killed after the verdicts were committed and before the tag (MLflow down, a kill), rerun once the
    dump has grown. Whichever version the new video goes into, each version's verdicts must be those of one run of
    the filters over that version's clips, and the shards must hold exactly the kept clips. The Ray plan is replaced
    by committing hand-built records, so only the bookkeeping runs."""
    from pipelines import curate

    records = {"a": _staged("a", [1.0, 2.0, 3.0, 4.0, 5.0]), "b": _staged("b", [6.0, 7.0, 8.0, 9.0, 10.0]),
               "n": _staged("n", [0.1, 0.2, 0.3, 0.4])}
    dump: list[str] = []

    def process(plan, config, dataset, lock):
        committer = BatchCommitter(dataset, plan.version, config.output_files.commit_videos)
        for row in plan.pending:
            committer.add(records[row["video_id"]])
        committer.flush()
        return {"videos_processed": len(plan.pending), "video_seconds_processed": 0.0}

    monkeypatch.setattr(curate, "init_ray", lambda config: None)
    monkeypatch.setattr(curate, "_discover", lambda config: ({v: {"video_id": v, "uri": f"/dump/{v}.mp4"}
                                                              for v in dump}, {}))
    monkeypatch.setattr(curate, "_process", process)
    config = _config(min_percentile=30)
    config.input, config.output, config.tracking.enabled = "/dump", str(tmp_path / "out"), False

    dump[:] = ["a", "b"]
    with monkeypatch.context() as m:
        m.setattr(curate, "tag_version", _killed)
        with pytest.raises(_Killed):
            curate.run_curate(config)
    dump[:] = ["a", "b", "n"]  # the dump grew before the rerun
    curate.run_curate(config)

    def verdicts(dataset, version):
        clips = dataset.read("clips", version, filter=f"dataset_version = {version}").to_pylist()
        return sorted((c["clip_id"], c["kept"], c["drop_reason"]) for c in clips)

    dataset = CuratedDataset(config.output)
    assert sorted(dataset.read("videos", columns=["video_id"])["video_id"].to_pylist()) == ["a", "b", "n"]
    for version in [v.number for v in dataset.versions()]:
        videos = dataset.read("videos", version, filter=f"dataset_version = {version}")["video_id"].to_pylist()
        alone = CuratedDataset(str(tmp_path / f"alone-{version}"))
        create_tables(alone)
        _commit(alone, version, config, *(records[v] for v in videos))
        finish_filters(alone, config, version, retried=[])
        assert verdicts(dataset, version) == sorted((c["clip_id"], c["kept"], c["drop_reason"]) for c in
                                                    alone.open("clips").to_table().to_pylist()), version
    kept = dataset.read("clips", filter="kept", columns=["clip_id"])["clip_id"].to_pylist()
    assert sorted(dataset.read("shards", columns=["clip_id"])["clip_id"].to_pylist()) == sorted(kept)


def test_tables_are_compacted_only_once_they_hold_many_fragments(tmp_path, monkeypatch):
    """Compacting at every version would rewrite (and, through the tags, keep) the whole table each time."""
    from curation import writer

    monkeypatch.setattr(writer, "COMPACT_AT_FRAGMENTS", 3)
    dataset = CuratedDataset(str(tmp_path / "out"))
    create_tables(dataset)
    config = _config()
    counts = []
    for version in range(1, 5):
        _commit(dataset, version, config, *(_staged(f"v{version}{i}", [5.0]) for i in range(2)))
        written = finish_filters(dataset, config, version, retried=[])
        before = len(dataset.open("clips").get_fragments())
        tag_version(dataset, version, {"dataset_version": version, "counts": written.counts})
        counts.append((before, len(dataset.open("clips", version).get_fragments())))
    compacted = [after < before for before, after in counts]
    assert compacted[0] is False and any(compacted), counts  # small tables are left as they are; full ones compacted
    assert all(before < 3 for (before, _), done in zip(counts, compacted, strict=True) if not done)
    assert all(after == 1 for (_, after), done in zip(counts, compacted, strict=True) if done)
    assert len(dataset.read("clips")) == 8 and len(dataset.read("clips", 1)) == 2  # every version still reads
