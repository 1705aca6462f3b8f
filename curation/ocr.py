"""On-screen text in each clip, for the `text` filter (the SVD recipe drops clips with much written text): the
PP-OCRv4 text detector and recogniser that the rapidocr-onnxruntime wheel bundles (Apache-2.0, no download), run by
onnxruntime on the clip's keyframes.

- `text_area`: the fraction of a keyframe covered by the detected text boxes, the union of their polygons (boxes
  that overlap count once), the largest over the clip's keyframes: a title card or a subtitle in any of the first,
  middle and last frames counts. The detector's boxes are its text regions grown by its unclip ratio (1.6), so they
  are a little larger than the ink (x1.3-1.7 on rendered text): subtitles measure 1.7-12.5 % of the frame, title
  cards and credits 4-25 %, corner watermarks 1-2.4 % (bench/README.md, "ocr.py").
- `ocr_text`: what the recogniser reads in that keyframe (the one with the most text), lines top to bottom joined by
  newlines, lines read with less than ocr.text_score confidence left out, cut to ocr.max_text_chars. Empty when
  nothing legible was found; null when the clip was not read (recognition off, no keyframes, skip_dropped).

Keyframes are read at their stored size (the decode's working size, 256 px short side by default): the detector
needs no upscaling for text of 11 px and more there (tests/test_ocr.py), and upscaling costs its square in time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.config import OcrConfig
from curation.model_stage import per_video

log = logging.getLogger(__name__)

DETECTOR, RECOGNISER = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"  # in the wheel
MIN_SIDE = 32  # the detector works on multiples of 32 px: smaller keyframes are upscaled to this short side
LINE_SEPARATOR = "\n"


@dataclass
class FrameText:
    """The text the detector found in one keyframe: its boxes as (4, 2) polygons in pixels, and their area."""

    area: float
    boxes: np.ndarray  # (N, 4, 2) float32


def union_area(boxes: np.ndarray, width: int, height: int) -> float:
    """The fraction of a width x height frame that the union of the (N, 4, 2) polygons covers."""
    import shapely

    if len(boxes) == 0:
        return 0.0
    polygons = shapely.make_valid(shapely.polygons(np.asarray(boxes, dtype=np.float64)))
    frame = shapely.box(0, 0, width, height)
    return float(shapely.intersection(shapely.union_all(polygons), frame).area) / float(width * height)


def decode_keyframe(data: bytes) -> np.ndarray:
    """A keyframe's JPEG as a BGR array (the channel order PaddleOCR's models were trained on)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"a keyframe of {len(data)} bytes is not a decodable image")
    return image


def ort_session(path: str, threads: int, cuda: bool):
    """An onnxruntime session on `threads` threads that do not spin while idle: onnxruntime's spinning pool doubled
    the CPU time of 2 threads (bench/README.md, "ocr.py"), time that other actors on the node could use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, sess_options=options, providers=providers)


class TextReader:
    """The bundled PP-OCRv4 detector and recogniser in one onnxruntime session each, `threads` threads per call."""

    def __init__(self, config: OcrConfig):
        import onnxruntime

        try:
            import rapidocr_onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:  # its wheels stop at Python 3.12: the rest of reelforge installs without it
            raise RuntimeError(f"the OCR stage needs rapidocr-onnxruntime ({err}); install it (Python 3.12 or older) "
                               "or set ocr.enabled: false and remove filters.text") from None

        self.config = config
        cuda = config.device == "cuda"
        if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            log.warning("ocr.device is cuda but this onnxruntime has no CUDA provider (install onnxruntime-gpu in "
                        "place of onnxruntime): OCR runs on the CPU")
        # detect() sizes each frame itself; rapidocr's limit_type "max" then leaves frames of up to 2000 px as
        # they are (its limit_side_len only applies to limit_type "min").
        self.engine = RapidOCR(det_limit_type="max", det_box_thresh=config.box_threshold, use_cls=False,
                               intra_op_num_threads=1, inter_op_num_threads=1)
        # rapidocr's own sessions spin (see ort_session): each model gets a session of ours
        threads, models = max(1, int(config.num_cpus)), Path(rapidocr_onnxruntime.__file__).parent / "models"
        self.engine.text_det.infer.session = ort_session(str(models / DETECTOR), threads, cuda)
        self.engine.text_rec.session.session = ort_session(str(models / RECOGNISER), threads, cuda)

    def detect(self, image: np.ndarray) -> FrameText:
        """The text boxes of one BGR frame, in its pixels."""
        import cv2

        height, width = image.shape[:2]
        scale = max(min(1.0, self.config.max_side / max(height, width)), MIN_SIDE / min(height, width))
        if scale != 1:
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=interpolation)
        boxes, _ = self.engine.text_det(image)
        if boxes is None or len(boxes) == 0:
            return FrameText(0.0, np.zeros((0, 4, 2), np.float32))
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2) / scale
        return FrameText(union_area(boxes, width, height), boxes)

    def read(self, image: np.ndarray, boxes: np.ndarray) -> str:
        """The text in `boxes` of one BGR frame: the max_lines largest boxes, read top to bottom."""
        if len(boxes) == 0:
            return ""
        areas = [float(np.linalg.norm(b[1] - b[0]) * np.linalg.norm(b[3] - b[0])) for b in boxes]  # rectangles
        largest = sorted(np.argsort(areas)[::-1][: self.config.max_lines])
        ordered = self.engine.sorted_boxes(np.asarray(boxes[largest], dtype=np.float32))
        crops = self.engine.get_crop_img_list(image, ordered)
        results, _ = self.engine.text_rec(crops)
        lines = [r[0].strip() for r in results if float(r[1]) >= self.config.text_score and r[0].strip()]
        return LINE_SEPARATOR.join(lines)[: self.config.max_text_chars]

    def clip_text(self, keyframes: list[bytes]) -> dict:
        """`text_area` (max over the keyframes) and `ocr_text` (of the keyframe with the most text) of one clip."""
        images = [decode_keyframe(k) for k in keyframes]
        found = [self.detect(image) for image in images]
        best = max(range(len(found)), key=lambda i: found[i].area)
        text = self.read(images[best], found[best].boxes) if self.config.recognize else None
        return {"text_area": found[best].area, "ocr_text": text}


class OcrStage:
    """Ray Data stage on staged video records: fills each clip's `text_area` and `ocr_text`.

    With `skip_dropped`, clips already dropped (too short, static) are not read (nulls). An error in one video's
    clips (a keyframe that is not an image) quarantines that video only (curation/model_stage.py)."""

    def __init__(self, config: OcrConfig):
        self.config = config
        self.reader: TextReader | None = None

    def setup(self) -> None:
        if self.config.enabled:
            self.reader = TextReader(self.config)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        return per_video(batch, self._fill, "ocr_error")

    def _fill(self, videos: list[dict]) -> None:
        for video in videos:
            for clip in video["clips"] or []:
                clip.update(text_area=None, ocr_text=None)
                skipped = self.config.skip_dropped and clip["kept"] is False
                if self.reader is not None and clip["keyframes"] and not skipped:
                    clip.update(self.reader.clip_text(clip["keyframes"]))
