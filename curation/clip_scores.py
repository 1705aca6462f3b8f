"""CLIP scores of each clip: its image embedding, a LAION aesthetic score and the caption match.

As in the Stable Video Diffusion recipe, a clip is seen through its first, middle and last frames (the keyframes in
the clips table): the clip's embedding is the mean of the three L2-normalised keyframe embeddings, normalised again,
so one odd frame (a flash, a half-finished fade) moves it only a third of the way. Both scores read that embedding:
`aesthetic` = the LAION head on it, `caption_match` = its cosine similarity with the caption's CLIP text embedding
(null when the clip has no caption).
"""

from __future__ import annotations

import io

import pyarrow as pa

from curation.config import ClipScoreConfig
from curation.model_stage import per_video

PREPROCESS = ("tensor", "pil")  # keyframes batched on the model's device (models/image_batch.py), or PIL per image


class ClipScoreStage:
    """Ray Data stage on staged video records: fills `clip_embedding`, `aesthetic`, `caption_match`, `score_model`.

    Runs after CaptionStage, so caption_match sees the final captions. With `skip_dropped`, clips already dropped
    are left unscored (nulls). An error in one video's clips (a keyframe that is not a JPEG) quarantines that video.
    """

    def __init__(self, config: ClipScoreConfig):
        self.config = config

    def setup(self) -> None:
        import torch

        from models.aesthetic_head import AestheticHead
        from models.clip_scorer import ClipScorer

        c = self.config
        if c.preprocess not in PREPROCESS:
            raise ValueError(f"clip_scores.preprocess={c.preprocess!r} is not one of {', '.join(PREPROCESS)}")
        torch.set_num_threads(max(1, int(c.num_cpus)))
        self.scorer = ClipScorer(c.model_name, c.pretrained, c.device, c.precision, c.cache_dir, c.pretrained_sha256)
        self.head = AestheticHead.load(c.aesthetic_head, c.aesthetic_sha256, self.scorer.embed_dim, c.cache_dir)
        self.score_model = f"{self.scorer.name}; {self.head.name}"

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        return per_video(batch, self._fill, "clip_score_error")

    def _fill(self, videos: list[dict]) -> None:
        clips = [clip for video in videos for clip in video["clips"] or []]
        for clip in clips:
            clip.update(clip_embedding=None, aesthetic=None, caption_match=None, score_model=None)
        wanted = [c for c in clips if c["keyframes"] and not (self.config.skip_dropped and c["kept"] is False)]
        size = max(1, self.config.batch_size)
        for i in range(0, len(wanted), size):
            self._score(wanted[i : i + size])

    def _score(self, clips: list[dict]) -> None:
        import torch
        import torch.nn.functional as F

        jpegs = [k for clip in clips for k in clip["keyframes"]]
        if self.config.preprocess == "tensor":
            frames = self.scorer.embed_jpegs(jpegs)  # (sum of keyframes, D)
        else:
            from PIL import Image

            frames = self.scorer.embed_images([Image.open(io.BytesIO(k)).convert("RGB") for k in jpegs])
        counts = [len(clip["keyframes"]) for clip in clips]
        embeddings = torch.stack([f.mean(dim=0) for f in frames.split(counts)])  # (N, D)
        embeddings = F.normalize(embeddings, dim=-1)
        with torch.no_grad():
            aesthetic = self.head(embeddings).tolist()  # (N,)
        captioned = [i for i, clip in enumerate(clips) if clip.get("caption")]
        match = {}
        if captioned:
            texts = self.scorer.embed_texts([clips[i]["caption"] for i in captioned])  # (M, D)
            match = dict(zip(captioned, (texts * embeddings[captioned]).sum(dim=-1).tolist(), strict=True))
        for i, clip in enumerate(clips):
            clip.update(clip_embedding=embeddings[i].tolist(), aesthetic=aesthetic[i], caption_match=match.get(i),
                        score_model=self.score_model)
