"""The data a curriculum stage chooses (training/stage_data.py): the `where` expression over a real Lance clips table
with its percentile terms, the image-folder reader, one-frame batches and the config's checks of a stage's source."""

from __future__ import annotations

import json
import os

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from training.clip_subset import percentile, percentile_terms, resolve_subset, substitute
from training.config import ConfigError, CurriculumStage, TrainConfig, resume_hash
from training.dataset import StageSampler
from training.image_folder import read_image_folder, square_frame
from training.stage_data import FolderReader, FrameLoader, StageData, changed_images

STAGE = "curriculum[2] (finetune)"


@pytest.fixture
def clips(tmp_path) -> lance.LanceDataset:
    """20 kept clips with aesthetic 0..19, motion 0..9 twice, text_area alternating 0 and 0.05 (nulls on two), and
    3 dropped clips with extreme scores that must neither move a percentile nor be selected."""
    n = 20
    kept = [True] * n + [False] * 3
    aesthetic = [float(i) for i in range(n)] + [100.0, 100.0, -100.0]
    motion = [float(i % 10) for i in range(n)] + [50.0, 50.0, 50.0]
    text = [0.0 if i % 2 == 0 else 0.05 for i in range(n)] + [0.0, 0.0, 0.0]
    text[4] = text[5] = None
    table = pa.table({
        "clip_id": [f"c{i:02d}" for i in range(n + 3)], "kept": kept, "aesthetic": aesthetic,
        "motion_mean": motion, "text_area": pa.array(text, pa.float64()),
        "caption": ["a clip"] * (n + 3), "frame_thumbs": [b"x"] * (n + 3),
    })
    return lance.write_dataset(table, str(tmp_path / "clips.lance"))


def test_percentile_terms_are_found_and_replaced_by_their_values():
    terms = percentile_terms("aesthetic >= p90(aesthetic) and motion_mean < p 50(x) or m > p99.5( motion_p90 )")
    assert [(t.text, t.q, t.column) for t in terms] == [("p90(aesthetic)", 90.0, "aesthetic"),
                                                        ("p99.5( motion_p90 )", 99.5, "motion_p90")]
    assert substitute("a >= p90(a) and b < p10(b)", {"p90(a)": 4.5, "p10(b)": 1}) == "a >= 4.5 and b < 1.0"
    assert percentile([3.0, None, 1.0, float("nan"), 2.0], 50) == 2.0
    assert percentile([None, float("nan")], 50) is None
    with pytest.raises(ConfigError, match="between p0 and p100"):
        percentile_terms("a > p101(a)")


def test_a_percentile_subset_is_taken_over_the_kept_clips(clips):
    subset = resolve_subset(clips, "aesthetic >= p90(aesthetic)", STAGE)
    expected = float(np.percentile(np.arange(20.0), 90))  # the dropped clips' 100s and -100 are not in the population
    assert subset.percentiles == {"p90(aesthetic)": pytest.approx(expected)}
    assert subset.clip_ids == [f"c{i:02d}" for i in range(20) if i >= expected] == ["c18", "c19"]
    assert subset.population == 20
    assert subset.resolved == f"aesthetic >= {expected!r}"


def test_two_terms_and_nulls(clips):
    subset = resolve_subset(clips, "motion_mean >= p75(motion_mean) and text_area < 0.01", STAGE)
    p75 = np.percentile([float(i % 10) for i in range(20)], 75)
    text = [0.0 if i % 2 == 0 else 0.05 for i in range(20)]
    # a null text_area fails the comparison (SQL), so c04/c05 are out whatever their motion
    expected = [f"c{i:02d}" for i in range(20) if i % 10 >= p75 and text[i] < 0.01 and i not in (4, 5)]
    assert subset.clip_ids == expected and expected  # not vacuous
    assert subset.percentiles["p75(motion_mean)"] == pytest.approx(p75)


@pytest.mark.parametrize("expression, message", [
    ("aesthetic >= p90(nope)", "'nope' is not a column of the clips table; numeric columns: aesthetic, motion_mean"),
    ("caption >= p90(caption)", "'caption' is string, not a number"),
    ("nope > 3", "is not a filter over the clips table: .*No field named nope"),
    ("aesthetic >>= 3", "is not a filter over the clips table: .*sql parser error"),
    ("aesthetic > 3; drop table clips", "holds a ';'"),
    ("  ", "where is empty"),
])
def test_a_bad_expression_is_one_line_naming_the_stage(clips, expression, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_subset(clips, expression, STAGE)
    text = str(info.value)
    assert text.startswith(STAGE) and "\n" not in text and ".rs:" not in text


def test_a_percentile_of_a_column_without_values_says_so(tmp_path):
    ds = lance.write_dataset(pa.table({"clip_id": ["a"], "kept": [True], "aesthetic": pa.array([None], pa.float64())}),
                             str(tmp_path / "c.lance"))
    with pytest.raises(ConfigError, match="no kept clip has a aesthetic value"):
        resolve_subset(ds, "aesthetic >= p50(aesthetic)", STAGE)


def _image(path, size=(40, 20), colour=(255, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def test_image_folder_reads_images_and_captions_from_jsonl_then_sidecars(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.jpg")
    _image(root / "sub" / "b.PNG", fmt="PNG")
    _image(root / "c.webp", fmt="WEBP")
    _image(root / "d.jpeg")
    (root / "a.txt").write_text("sidecar of a\n")
    (root / "sub" / "b.txt").write_text("the jsonl wins")
    (root / "notes.md").write_text("not an image")
    (root / "captions.jsonl").write_text(json.dumps({"file": "sub/b.PNG", "caption": "a blue square"}) + "\n\n" +
                                         json.dumps({"file": "c.webp", "caption": " a green circle "}) + "\n")
    folder = read_image_folder(str(root), STAGE)
    names = [os.path.relpath(i.path, folder.root) for i in folder.images]
    assert names == ["a.jpg", "c.webp", "d.jpeg", "sub/b.PNG"]  # sorted relative paths
    assert [i.caption for i in folder.images] == ["sidecar of a", "a green circle", "", "a blue square"]
    assert folder.uncaptioned == 1
    before = folder.content_id
    (root / "a.txt").write_text("another caption")
    assert read_image_folder(str(root), STAGE).content_id != before


def test_image_folder_refuses_paths_outside_it(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.jpg")
    outside = _image(tmp_path / "secret.jpg")
    (root / "captions.jsonl").write_text(json.dumps({"file": "../secret.jpg", "caption": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"'../secret.jpg' leads outside the image folder"):
        read_image_folder(str(root), STAGE)
    (root / "captions.jsonl").write_text(json.dumps({"file": str(outside), "caption": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: file must be a path relative to the folder"):
        read_image_folder(str(root), STAGE)
    (root / "captions.jsonl").unlink()
    (root / "link.jpg").symlink_to(outside)
    with pytest.raises(ConfigError, match="'link.jpg' leads outside the image folder"):
        read_image_folder(str(root), STAGE)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "holds no jpg/jpeg/png/webp images"),
    (lambda root: (root / "captions.jsonl").write_text("{not json\n"), "captions.jsonl line 1: expected"),
    (lambda root: (root / "captions.jsonl").write_text('{"file": "gone.jpg", "caption": "x"}\n'),
     "names 1 file\\(s\\) that are not images"),
])
def test_image_folder_errors_are_one_line(tmp_path, setup, message):
    root = tmp_path / "images"
    root.mkdir()
    setup(root)
    with pytest.raises(ConfigError, match=message) as info:
        read_image_folder(str(root), STAGE)
    assert str(info.value).startswith(STAGE) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is not a local folder"):
        read_image_folder(str(tmp_path / "missing"), STAGE)


def test_square_frame_resizes_the_short_side_and_crops_the_centre(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))  # red | green | blue thirds: the centre crop is all green
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.paste((0, 0, 255), (40, 0, 60, 20))
    path = tmp_path / "thirds.png"
    image.save(path)
    frame = square_frame(str(path), 8)
    assert frame.shape == (1, 8, 8, 3) and frame.dtype == np.uint8
    assert (frame[0, :, :, 1] > 200).all() and (frame[0, :, :, 0] < 50).all()
    assert np.array_equal(square_frame(path.read_bytes(), 8), frame)
    with pytest.raises(ValueError, match="not a readable image"):
        square_frame(b"not an image", 8)


def test_frame_loader_gives_replayable_one_frame_batches_and_stands_in_for_bad_images(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        _image(root / f"{i}.png", colour=(40 * i, 0, 0), fmt="PNG")
        (root / f"{i}.txt").write_text(f"image {i}")
    (root / "3.png").write_bytes(b"broken")
    folder = read_image_folder(str(root), STAGE)
    stage = CurriculumStage(name="images", steps=4, num_frames=1, size=8, source="images", images=str(root))

    def batches(rank: int) -> list[tuple[np.ndarray, list[str]]]:
        sampler = StageSampler.over_items([(i, 0) for i in range(6)], stage, 7, rank, 2, 2, "6 images")
        with FrameLoader(FolderReader(folder.images, 8), sampler, stage, prefetch_batches=2) as loader:
            return [loader.batch(k) for k in range(3)]

    first, again = batches(0), batches(0)
    seen = set()
    for (frames, captions), (frames2, captions2) in zip(first, again, strict=True):
        assert frames.shape == (2, 1, 8, 8, 3) and np.array_equal(frames, frames2) and captions == captions2
        for frame, caption in zip(frames, captions, strict=True):  # each frame comes with its own caption
            assert frame[0, 0, 0, 0] == 40 * int(caption.split()[1]), caption
        seen.update(captions)
    assert "image 3" not in seen  # the broken file is never in a batch: a later image of the epoch stands in
    assert len(seen) >= 3


def test_a_stage_source_is_checked_with_the_config():
    def config(**stage) -> TrainConfig:
        return TrainConfig(data="d", output="o", curriculum=[CurriculumStage(**{"num_frames": 1, **stage})])

    config(source="keyframes", where="aesthetic > 1").validate()
    config(source="images", images="/data/images").validate()
    for stage, message in [({"source": "frames"}, "source 'frames' is not one of video, keyframes, images"),
                           ({"source": "images"}, "source images needs images: FOLDER"),
                           ({"images": "/x"}, "images is read by source images only"),
                           ({"source": "images", "images": "/x", "where": "a > 1"}, "an image folder has no clips"),
                           ({"source": "keyframes", "num_frames": 2}, "gives one frame per sample; set num_frames"),
                           ({"source": "keyframes", "bucket_frames": [1]}, "bucket_frames apply to video stages")]:
        with pytest.raises(ConfigError, match=message):
            config(**stage).validate()
    # choosing a stage's data changes what a run computes: a checkpoint of the other cannot be resumed
    plain = config(num_frames=8)
    assert resume_hash(plain) != resume_hash(config(num_frames=8, where="aesthetic > 1"))


def test_a_changed_image_folder_is_named_for_the_resume_check():
    previous = [{"source": "images", "images_id": "aaa"}, {}, {"source": "video", "clips": 3}]
    same = [StageData("images", summary={"images_id": "aaa"}), StageData(), StageData(summary={"clips": 3})]
    assert changed_images(previous, same) == []
    moved = [StageData("images", summary={"images_id": "bbb"}), StageData(), StageData()]
    assert changed_images(previous, moved) == [
        "curriculum[0]'s image folder changed since the checkpoint (aaa -> bbb)"]


def test_an_encode_refuses_stages_that_train_from_the_curated_dataset():
    from pipelines.encode import identity
    from training.latent_encode import EncodeConfig

    for stage, what in [(CurriculumStage(name="image", num_frames=1, source="keyframes"), "not source keyframes"),
                        (CurriculumStage(name="hq", where="aesthetic > 1"), "not source video with where")]:
        with pytest.raises(ConfigError, match=f"curriculum stage '{stage.name}': .*{what}: leave the stage out"):
            identity(EncodeConfig(data="d", output="o", curriculum=[CurriculumStage(name="video"), stage]))
    assert identity(EncodeConfig(data="d", output="o", curriculum=[CurriculumStage(name="video")]))["stages"]


def test_one_frame_stage_items():
    from training.stage_data import stage_items

    table = [None] * 4  # a table of 4 kept clips (only its length is read)
    assert stage_items(table, StageData("keyframes")) == [(r, k) for r in range(4) for k in range(3)]
    assert stage_items(table, StageData("keyframes", rows=[1, 3])) == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)]
    assert stage_items(table, StageData("images", images=["a", "b"])) == [(0, 0), (1, 0)]
