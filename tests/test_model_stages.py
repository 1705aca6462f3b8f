"""The learned-model stages (captions, CLIP scores) and their models on hand-built batches, without Ray."""

import hashlib
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from curation import schema
from curation.captions import CaptionStage, parse_sidecar, read_sidecar
from curation.clip_scores import ClipScoreStage
from curation.config import CaptionConfig, ClipScoreConfig, CurateConfig
from models.aesthetic_head import AestheticHead, ChecksumError
from models.captioner import CocaCaptioner, build_captioner
from models.clip_scorer import ClipScorer, WeightsError

# --- hand-built staged records ---------------------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG")
    return out.getvalue()


def _clip(video_id: str, start_s: float, end_s: float, seed: int, kept: bool = True) -> dict:
    clip = {name: None for name in schema.STAGED.field("clips").type.value_type.names}
    clip.update(clip_id=f"{video_id}-{int(start_s * 100):07d}", video_id=video_id, start_s=start_s, end_s=end_s,
                keyframes=[_jpeg(seed), _jpeg(seed + 1), _jpeg(seed + 2)], kept=kept)
    return clip


def _video(uri: str, clips: list[dict]) -> dict:
    row = {name: None for name in schema.STAGED.names}
    row.update(video_id=clips[0]["video_id"] if clips else "v", uri=uri, status="ok", clips=clips)
    return row


def _batch(videos: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(videos, schema=schema.STAGED)


def _clips(table: pa.Table) -> list[dict]:
    return [clip for video in table.to_pylist() for clip in video["clips"]]


# --- sidecars --------------------------------------------------------------------------------------------------

SEGMENTS = {"caption": "the whole video", "segments": [
    {"start_s": 0.0, "end_s": 3.0, "caption": "first shot"},
    {"start_s": 3.0, "end_s": 5.0, "text": "second shot"},
]}


@pytest.mark.parametrize(("name", "content", "caption"), [
    ("a.txt", "  a dog on a beach\n", "a dog on a beach"),
    ("a.txt", "\n", None),
    ("a.json", json.dumps({"caption": "from caption"}), "from caption"),
    ("a.json", json.dumps({"text": "from text", "videoid": 7}), "from text"),
    ("a.json", json.dumps({"name": "webvid name column"}), "webvid name column"),
    ("a.json", json.dumps({"caption": "", "text": "empty caption skipped"}), "empty caption skipped"),
    ("a.json", json.dumps({"url": "http://x", "status": "success"}), None),
])
def test_sidecar_forms(name, content, caption):
    assert parse_sidecar(name, content.encode()).caption == caption


def test_segment_with_the_largest_overlap_wins_else_the_video_caption():
    sidecar = parse_sidecar("v.json", json.dumps(SEGMENTS).encode())
    assert sidecar.caption_for(0.5, 2.5) == "first shot"
    assert sidecar.caption_for(2.5, 4.5) == "second shot"  # 0.5 s in the first, 1.5 s in the second
    assert sidecar.caption_for(1.0, 4.0) == "first shot"  # 2 s against 1 s
    assert sidecar.caption_for(6.0, 8.0) == "the whole video"  # no segment overlaps
    assert sidecar.caption_for(3.0, 3.0 + 1e-9) == "second shot"  # touching the first is no overlap


def test_malformed_sidecars_are_errors_naming_the_file():
    with pytest.raises(ValueError, match="bad.json"):
        parse_sidecar("bad.json", b"{not json")
    with pytest.raises(ValueError, match=r"bad.json: segments\[0\]"):
        parse_sidecar("bad.json", json.dumps({"segments": [{"caption": "no times"}]}).encode())


def test_read_sidecar_prefers_json_and_falls_back_to_txt(tmp_path, caplog):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps(SEGMENTS))
    (tmp_path / "a.txt").write_text("txt caption")
    assert read_sidecar(str(tmp_path / "a.mp4")).segments[1].caption == "second shot"
    (tmp_path / "a.json").write_text(json.dumps({"url": "metadata only"}))
    assert read_sidecar(str(tmp_path / "a.mp4")).caption == "txt caption"
    (tmp_path / "a.json").write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert read_sidecar(str(tmp_path / "a.mp4")).caption == "txt caption"
    assert "a.json" in caplog.text
    (tmp_path / "a.txt").unlink()
    assert read_sidecar(str(tmp_path / "a.mp4")) is None
    assert read_sidecar(str(tmp_path / "none.mp4")) is None


# --- captions --------------------------------------------------------------------------------------------------


class CountingCaptioner:
    name = "counting"
    untrained = False

    def __init__(self):
        self.seen: list[bytes] = []

    def caption(self, images):
        self.seen.extend(image.tobytes() for image in images)
        return [f"generated {len(self.seen) - len(images) + i}" for i in range(len(images))]

    def caption_jpegs(self, jpegs):  # the stage's default path (preprocess: tensor) hands over the JPEG bytes
        return self.caption([Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs])


def _middle(clip: dict) -> bytes:
    return Image.open(io.BytesIO(clip["keyframes"][1])).convert("RGB").tobytes()


def test_sidecar_captions_win_and_the_captioner_never_sees_their_clips(tmp_path):
    (tmp_path / "with.json").write_text(json.dumps(SEGMENTS))
    (tmp_path / "plain.txt").write_text("plain caption")
    videos = [
        _video(str(tmp_path / "with.mp4"), [_clip("w", 0.0, 2.9, 0), _clip("w", 3.1, 4.9, 10),
                                            _clip("w", 5.2, 7.0, 20)]),
        _video(str(tmp_path / "plain.mp4"), [_clip("p", 0.0, 2.0, 30)]),
        _video(str(tmp_path / "bare.mp4"), [_clip("b", 0.0, 2.0, 40), _clip("b", 2.0, 4.0, 50, kept=False)]),
        _video(str(tmp_path / "quarantined.mp4"), []),
    ]
    stage = CaptionStage(CaptionConfig(batch_size=1, skip_dropped=False))  # the dropped clip is captioned too
    stage.captioner = CountingCaptioner()  # instead of setup(): no model
    out = stage(_batch(videos))
    assert out.schema.equals(schema.STAGED)
    clips = _clips(out)
    assert [(c["caption"], c["caption_source"]) for c in clips] == [
        ("first shot", "sidecar"), ("second shot", "sidecar"), ("the whole video", "sidecar"),
        ("plain caption", "sidecar"),
        ("generated 0", "counting"), ("generated 1", "counting"),
    ]
    bare = videos[2]["clips"]
    assert stage.captioner.seen == [_middle(bare[0]), _middle(bare[1])]  # middle keyframes, sidecar clips never

    stage = CaptionStage(CaptionConfig(skip_dropped=True))
    stage.captioner = CountingCaptioner()
    clips = _clips(stage(_batch(videos)))
    assert clips[-1]["caption"] is None and clips[-1]["caption_source"] is None
    assert stage.captioner.seen == [_middle(bare[0])]


def test_captions_disabled_leave_nulls_but_sidecars_still_apply(tmp_path):
    (tmp_path / "plain.txt").write_text("plain caption")
    videos = [_video(str(tmp_path / "plain.mp4"), [_clip("p", 0.0, 2.0, 0)]),
              _video(str(tmp_path / "bare.mp4"), [_clip("b", 0.0, 2.0, 1)])]
    stage = CaptionStage(CaptionConfig(enabled=False))
    stage.setup()
    assert stage.captioner is None
    clips = _clips(stage(_batch(videos)))
    assert [(c["caption"], c["caption_source"]) for c in clips] == [("plain caption", "sidecar"), (None, None)]
    stage = CaptionStage(CaptionConfig(enabled=False, sidecar=False))
    assert [c["caption"] for c in _clips(stage(_batch(videos)))] == [None, None]


@pytest.fixture(scope="module")
def coca():
    return build_captioner("coca", model_name="tiny", pretrained=None, max_tokens=12)


def test_tiny_coca_generates_the_same_strings_every_time(coca):
    images = [Image.open(io.BytesIO(_jpeg(seed))) for seed in range(3)]
    captions = coca.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert coca.untrained and coca.name == "coca:tiny (untrained)"
    assert CocaCaptioner(model_name="tiny", pretrained=None, max_tokens=12).caption(images) == captions  # new build
    assert coca.caption(images[:1]) == captions[:1]  # batching does not change the result
    tokens = coca.generate(images)
    assert tokens.shape[1] <= 1 + 12 and (tokens[:, 0] == coca.sot).all()


def test_greedy_decoding_takes_the_most_likely_token(coca):
    image = Image.open(io.BytesIO(_jpeg(5)))
    tokens = coca.generate([image])[0]
    pixels = coca.loaded.preprocess(image)[None]
    with torch.no_grad():
        for step in range(1, 4):  # before min_tokens, so only the start token is masked besides end-of-text
            logits = coca.model(pixels, tokens[None, :step], output_labels=False)["logits"][0, -1]
            logits[[coca.sot, coca.eot]] = -torch.inf
            assert int(logits.argmax()) == int(tokens[step])


def test_caption_stage_setup_loads_the_configured_captioner(tmp_path):
    stage = CaptionStage(CaptionConfig(max_tokens=6))
    stage.setup()
    clips = _clips(stage(_batch([_video(str(tmp_path / "bare.mp4"), [_clip("b", 0.0, 2.0, 1)])])))
    assert clips[0]["caption"] and clips[0]["caption_source"] == "coca:tiny (untrained)"


# --- CLIP scores -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def score_stage():
    stage = ClipScoreStage(ClipScoreConfig(batch_size=2, skip_dropped=False))  # every clip scored, dropped or not
    stage.setup()
    return stage


def test_clip_scores_match_an_independent_computation(score_stage, tmp_path):
    clips = [_clip("v", 0.0, 2.0, 0), _clip("v", 2.0, 4.0, 10), _clip("v", 4.0, 6.0, 20)]
    clips[0].update(caption="a red circle moving left", caption_source="sidecar")
    clips[2].update(caption="a blue square", caption_source="coca:tiny (untrained)")
    out = score_stage(_batch([_video(str(tmp_path / "v.mp4"), clips)]))
    assert out.schema.equals(schema.STAGED)
    scorer, head = score_stage.scorer, score_stage.head
    for source, clip in zip(clips, _clips(out), strict=True):
        embedding = torch.tensor(clip["clip_embedding"])
        assert embedding.shape == (scorer.embed_dim,) and abs(float(embedding.norm()) - 1.0) < 1e-5
        frames = scorer.embed_jpegs(source["keyframes"])  # the stage's default path (preprocess: tensor)
        expected = torch.nn.functional.normalize(frames.mean(dim=0), dim=0)
        pil = scorer.embed_images([Image.open(io.BytesIO(k)) for k in source["keyframes"]])  # open_clip's transform
        assert float(torch.nn.functional.normalize(pil.mean(dim=0), dim=0) @ expected) > 0.999
        assert torch.allclose(embedding, expected, atol=1e-5)
        with torch.no_grad():
            assert clip["aesthetic"] == pytest.approx(float(head(embedding[None])[0]), abs=1e-5)
        if source["caption"] is None:
            assert clip["caption_match"] is None
        else:
            text = scorer.embed_texts([source["caption"]])[0]
            cosine = float(text @ expected / (text.norm() * expected.norm()))
            assert clip["caption_match"] == pytest.approx(cosine, abs=1e-5)
        assert clip["score_model"] == "open_clip:tiny (untrained); aesthetic:random init (untrained)"
        assert clip["caption"] == source["caption"]  # other columns pass through


def test_skip_dropped_leaves_dropped_clips_unscored(tmp_path):
    stage = ClipScoreStage(ClipScoreConfig(skip_dropped=True))
    stage.setup()
    clips = _clips(stage(_batch([_video(str(tmp_path / "v.mp4"), [_clip("v", 0, 2, 0), _clip("v", 2, 4, 3, False)])])))
    assert clips[0]["aesthetic"] is not None
    assert {clips[1][k] for k in ("aesthetic", "caption_match", "clip_embedding", "score_model")} == {None}


def test_model_stages_on_a_decoded_sample_video_take_each_shots_caption(sample_dump, score_stage):
    from curation.discover import DiscoverStage
    from curation.video_stage import VideoStage

    root, truth = sample_dump
    name = next(n for n in truth["videos"] if "cuts_static" in n)
    listed = DiscoverStage(CurateConfig().discover)(pa.Table.from_pylist(
        [{"uri": str(root / name), "size_bytes": (root / name).stat().st_size}]))
    staged = VideoStage(CurateConfig())(listed)
    stage = CaptionStage(CaptionConfig())
    stage.captioner = CountingCaptioner()
    clips = _clips(score_stage(stage(staged)))
    assert [c["caption"] for c in clips] == [shot["caption"] for shot in truth["videos"][name]["shots"]]
    assert stage.captioner.seen == []
    assert all(c["caption_match"] is not None and len(c["clip_embedding"]) == 64 for c in clips)


# --- models: weights, checksums, untrained flags ---------------------------------------------------------------

LAION_LAYOUT = [("layers.0.weight", (1024, 768)), ("layers.0.bias", (1024,)), ("layers.2.weight", (128, 1024)),
                ("layers.2.bias", (128,)), ("layers.4.weight", (64, 128)), ("layers.4.bias", (64,)),
                ("layers.6.weight", (16, 64)), ("layers.6.bias", (16,)), ("layers.7.weight", (1, 16)),
                ("layers.7.bias", (1,))]


def test_aesthetic_head_has_laions_state_dict_layout():
    state = AestheticHead().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == LAION_LAYOUT


@pytest.fixture()
def head_file(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        state = AestheticHead(768).state_dict()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def test_aesthetic_head_with_a_wrong_checksum_fails_naming_file_and_digests(head_file):
    path, actual, _ = head_file
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        AestheticHead.load(str(path), wrong, 768)
    message = str(err.value)
    assert message == f"{path}: sha256 mismatch: expected {wrong}, got {actual}" and "\n" not in message
    with pytest.raises(ChecksumError, match="needs its sha256"):
        AestheticHead.load(str(path), None, 768)


def test_aesthetic_head_with_the_right_checksum_loads_its_weights(head_file):
    path, digest, state = head_file
    head = AestheticHead.load(str(path), digest.upper(), 768)
    assert not head.untrained and head.name == "aesthetic:sac+logos+ava1-l14-linearMSE.pth"
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    reference = x
    for i in (0, 2, 4, 6, 7):  # LAION's MLP has no activations; dropout is off in eval
        reference = reference @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(head(x), reference[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="takes 768-dim CLIP embeddings but the CLIP model gives 64-dim"):
        AestheticHead.load(str(path), digest, 64)


def test_untrained_models_say_so_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        head = AestheticHead.load(None, None, 64)
    assert head.untrained and "untrained" in caplog.text
    assert torch.equal(head.layers[0].weight, AestheticHead.load(None, None, 64).layers[0].weight)  # seeded


def test_clip_scorer_loads_a_local_checkpoint(tmp_path):
    scorer = ClipScorer("tiny")
    assert scorer.untrained and scorer.name == "open_clip:tiny (untrained)"
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(2)
        for p in scorer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so the checkpoint differs from the seeded random init
    path = tmp_path / "tiny.pt"
    torch.save(scorer.model.state_dict(), path)
    images = [Image.open(io.BytesIO(_jpeg(seed))) for seed in range(2)]
    reloaded = ClipScorer("tiny", pretrained=str(path))
    assert not reloaded.untrained and reloaded.name == f"open_clip:tiny/{path}"
    assert torch.allclose(reloaded.embed_images(images), scorer.embed_images(images), atol=1e-6)
    assert torch.allclose(reloaded.embed_texts(["a cat"]), scorer.embed_texts(["a cat"]), atol=1e-6)
    assert not torch.allclose(ClipScorer("tiny").embed_images(images), scorer.embed_images(images), atol=1e-3)


def test_unknown_weights_fail_with_a_message_naming_them():
    with pytest.raises(WeightsError, match="pretrained='laion9000' is neither a file nor an open_clip tag"):
        ClipScorer("ViT-B-32", pretrained="laion9000")
    with pytest.raises(WeightsError, match="no model config named 'ViT-Q-99'"):
        ClipScorer("ViT-Q-99", pretrained="openai")
    with pytest.raises(ValueError, match="unknown captioner 'blip'"):
        build_captioner("blip")


def test_reduced_precision_runs_under_autocast():
    images = [Image.open(io.BytesIO(_jpeg(seed))) for seed in range(2)]
    reference = ClipScorer("tiny").embed_images(images)
    embeddings = ClipScorer("tiny", precision="bf16").embed_images(images)
    assert embeddings.dtype == torch.float32 and (reference * embeddings).sum(dim=1).min() > 0.999
    assert CocaCaptioner("tiny", None, max_tokens=4, precision="bf16").caption(images[:1])[0]
    with pytest.raises(WeightsError, match="precision 'fp8'"):
        ClipScorer("tiny", precision="fp8")
