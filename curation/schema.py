"""The curation tables (videos, clips, shards) as versioned Arrow schemas: the contract with training.

The tables are Lance datasets (curation/dataset.py); `kept` is null only on rows of a version still being made."""

from __future__ import annotations

import pyarrow as pa

# 2: captions and CLIP scores (caption ... score_model); 3: Lance tables, dataset_version; 4: clips.frame_hashes and
# frame_thumbs (dedup); 5: clips.text_area and ocr_text (OCR); tables of an older version gain the new columns as
# nulls when a run opens them (writer.create_tables)
SCHEMA_VERSION = 5

TRANSITION = pa.struct([("start_frame", pa.int64()), ("end_frame", pa.int64()), ("kind", pa.string())])

VIDEOS = pa.schema([
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("size_bytes", pa.int64()),
    ("status", pa.string()),  # "ok" | "quarantined"
    ("error_class", pa.string()),
    ("error_message", pa.string()),
    ("backend", pa.string()),
    ("duration_s", pa.float64()),
    ("fps", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("rotation", pa.int64()),
    ("start_time_s", pa.float64()),
    ("num_frames", pa.int64()),
    ("cut_frames", pa.list_(pa.int64())),
    ("transitions", pa.list_(TRANSITION)),
    ("motion_mean", pa.float64()),
    ("dataset_version", pa.int64()),  # the dataset version that added (or last reprocessed) the video
])

CLIP_FIELDS = [
    ("clip_id", pa.string()),
    ("video_id", pa.string()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),  # inclusive
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),  # presentation time of the frame after the clip's last one
    ("num_frames", pa.int64()),
    ("motion_mean", pa.float64()),
    ("motion_median", pa.float64()),
    ("motion_p90", pa.float64()),
    ("is_static", pa.bool_()),
    ("keyframes", pa.list_(pa.binary())),  # JPEG: first, middle, last frame
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
    ("caption", pa.string()),
    ("caption_source", pa.string()),  # "sidecar" | the captioner's name, e.g. "coca:tiny (untrained)" | null
    ("aesthetic", pa.float64()),  # LAION aesthetic predictor on clip_embedding; null when not scored
    ("caption_match", pa.float64()),  # cosine(CLIP text embedding of caption, clip_embedding); null: not scored
    ("clip_embedding", pa.list_(pa.float32())),  # mean of the L2-normalised keyframe embeddings, renormalised
    ("score_model", pa.string()),  # where the scores came from, e.g. "open_clip:tiny (untrained); aesthetic:..."
    ("dataset_version", pa.int64()),  # the dataset version that added the clip
]
# The clip's signature for deduplication (curation/phash.py), in the clips table only: a frame every
# filters.dedup.hash_interval_s from the clip's first, its 64-bit pHash and its 4x4 RGB thumbnail (48 bytes each,
# concatenated). Null when dedup was off.
SIGNATURE_FIELDS = [
    ("frame_hashes", pa.list_(pa.int64())),
    ("frame_thumbs", pa.binary()),
]
# On-screen text (curation/ocr.py), in the clips table only: the largest fraction of a keyframe in detected text
# boxes and the text read in that keyframe. Null when the OCR stage did not read the clip.
TEXT_FIELDS = [
    ("text_area", pa.float64()),
    ("ocr_text", pa.string()),
]
CLIPS = pa.schema(CLIP_FIELDS + SIGNATURE_FIELDS + TEXT_FIELDS)

# In a shard row num_frames and fps describe video_bytes: the frames encoded (every round(source fps /
# encode.fps)-th frame of the clip) and their rate; start_frame/end_frame still count source frames.
SHARDS = pa.schema(CLIP_FIELDS + [
    ("uri", pa.string()),
    ("fps", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("video_bytes", pa.binary()),  # H.264 in MP4 at the encode resolution
])

# What one video's pass produces: its videos row plus every clip, with the encoded bytes of kept clips and what they
# hold (encode_fps, encode_frames: every step-th frame of the clip, encode.fps), which become the shard row's fps and
# num_frames.
STAGED = pa.schema(list(VIDEOS) + [("clips", pa.list_(pa.struct(CLIP_FIELDS + SIGNATURE_FIELDS + TEXT_FIELDS + [
    ("video_bytes", pa.binary()), ("width", pa.int64()), ("height", pa.int64()), ("encode_fps", pa.float64()),
    ("encode_frames", pa.int64())])))])
