"""Keyframes to model input as one batch on the model's device: JPEG decode, then open_clip's eval transform.

open_clip's own transform works on one PIL image at a time on the CPU (decode, bicubic resize of the short side,
centre crop, to tensor, normalise). On a GPU that CPU work, not the model, sets the pace: a ViT-L-14 scorer waits for
the JPEG decode and resize of its keyframes. Here the JPEGs of a whole batch are decoded by one call
(torchvision.io.decode_jpeg on a list: nvJPEG on a GPU, libjpeg-turbo on the CPU), and the resize, crop and
normalisation run as tensor ops on the batch, grouped by frame size (the keyframes of one video share a size).

The numbers follow open_clip's transform: the short side goes to `size` and the long side to int(size * long /
short), as torchvision's Resize computes it; the centre crop rounds its offsets as torchvision's does; bicubic with
antialiasing is torch's port of PIL's filter (a = -0.5), and the resized picture is rounded to 8 bits as PIL's is.
On the CPU torch resizes uint8 with PIL's fixed-point arithmetic and libjpeg-turbo decodes as Pillow's libjpeg-turbo
does: within 1-2 levels (of 255) of open_clip's transform, 0.005 levels on average. On a GPU the resize runs in float32
(PIL's two 8-bit passes are not reproduced: up to ~4 levels at sharp edges, ~0.2 on average) and nvJPEG's inverse
DCT and chroma upsampling may differ from libjpeg-turbo's by a level or two. tests/test_device_preprocess.py holds
the CPU path within 2.5 levels at any pixel and 0.05 on average, and the float resize (run there on the CPU)
within 8.5 levels and 0.5 on average.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

INTERPOLATIONS = ("bicubic", "bilinear")
JPEG_START = b"\xff\xd8"  # the start-of-image marker


class JpegError(ValueError):
    """A keyframe that is not a decodable JPEG; the message says which of the batch."""


class PreprocessError(ValueError):
    """A model's preprocessing that this batched path does not reproduce; the message names the way out."""


@dataclass(frozen=True)
class TensorPreprocess:
    """open_clip's eval transform (resize_mode "shortest" to a square, or "squash") as batched tensor ops."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> TensorPreprocess:
        """The transform open_clip attached to `model` (model.visual.preprocess_cfg)."""
        cfg = getattr(getattr(model, "visual", model), "preprocess_cfg", None)
        if not cfg:
            raise PreprocessError("the model carries no open_clip preprocess_cfg; use preprocess: pil")
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        resize_mode = cfg.get("resize_mode") or "shortest"
        interpolation = cfg.get("interpolation") or "bicubic"
        if size[0] != size[1] or resize_mode not in ("shortest", "squash") or interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"preprocess_cfg {cfg} (size {size}, resize_mode {resize_mode}, interpolation "
                                  f"{interpolation}) is not reproduced by the batched path; use preprocess: pil")
        mean, std = _three(cfg["mean"]), _three(cfg["std"])
        return cls(int(size[0]), mean, std, interpolation, resize_mode)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, before the crop: torchvision's Resize(int) rule."""
        if self.resize_mode == "squash":
            return self.size, self.size
        short, long = min(height, width), max(height, width)
        long = int(self.size * long / short)
        return (self.size, long) if height <= width else (long, self.size)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) images, all on one device -> float32 (N, 3, size, size), normalised, on that device."""
        if not images:
            raise ValueError("no images to preprocess")
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32, device=images[0].device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"image {i}: expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
            groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
        for (height, width), indices in groups.items():
            out[indices] = self._transform(torch.stack([images[i] for i in indices]), height, width)
        mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
        return out.sub_(mean).div_(std)

    def _transform(self, batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """uint8 (n, 3, H, W) of one size -> float32 (n, 3, size, size) in 0..1."""
        new_h, new_w = self.output_size(height, width)
        pixels = batch
        if (new_h, new_w) != (height, width):
            pixels = _resize(batch, (new_h, new_w), self.interpolation)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return pixels[:, :, top : top + self.size, left : left + self.size].float() / 255.0


def _resize(batch: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> uint8 (n, 3, *size), antialiased, rounded to 8 bits as PIL's resize is. On the CPU torch
    resizes uint8 directly (its vectorised port of PIL's filter: ~10x faster than on floats, and within a level of
    PIL); on a GPU in float32."""
    if batch.device.type == "cpu":
        return F.interpolate(batch, size=size, mode=interpolation, align_corners=False, antialias=True)
    return resize_float(batch, size, interpolation)


def resize_float(batch: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The resize of _resize in float32, as on a GPU (torch has no uint8 antialiased resize there)."""
    pixels = F.interpolate(batch.float(), size=size, mode=interpolation, align_corners=False, antialias=True)
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def _three(value) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value) if isinstance(value, list | tuple) else (float(value),) * 3
    if len(values) != 3:
        raise PreprocessError(f"expected 3 channel values, got {value!r}")
    return values


class JpegDecoder:
    """Decodes a batch of JPEGs to uint8 (3, H, W) RGB tensors on `device`: nvJPEG in one batched call on a GPU,
    libjpeg-turbo on the CPU. Where torchvision cannot decode on the GPU (a CPU-only build), it decodes on the CPU
    and moves the pictures, with one warning."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.decode_on = self.device if self.device.type == "cuda" and _decodes_on(self.device) else None

    def __call__(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        for i, jpeg in enumerate(jpegs):
            if not jpeg.startswith(JPEG_START):  # before a GPU decoder sees it
                raise JpegError(f"keyframe {i} of {len(jpegs)} is not a JPEG (it starts {bytes(jpeg[:4])!r})")
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        try:
            if self.decode_on is not None:
                # nvJPEG writes on a stream of its own that does not wait for ours, into memory our queued kernels
                # may still read (pytorch/vision#9606): let them finish first (one sync a batch).
                torch.cuda.current_stream(self.decode_on).synchronize()
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.decode_on)
            images = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            if type(err).__name__ == "OutOfMemoryError":
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise JpegError(f"a keyframe of {len(jpegs)} is not a decodable JPEG: {message}") from err
        if self.device.type == "cpu":
            return images
        return [image.pin_memory().to(self.device, non_blocking=True) for image in images]


class JpegPixels:
    """JPEG bytes -> a model's preprocessed pixels (B, 3, H, W) on `device`, in one batch: JpegDecoder, then the
    model's open_clip transform as TensorPreprocess. Made on first use, so models that only see PIL images never
    build it."""

    def __init__(self, device: torch.device, model: torch.nn.Module):
        self.decode = JpegDecoder(device)
        self.preprocess = TensorPreprocess.of_model(model)

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        return self.preprocess(self.decode(jpegs))


def _decodes_on(device: torch.device) -> bool:
    """Whether torchvision decodes JPEGs on this GPU (nvJPEG is in CUDA builds of torchvision only)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    probe = encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8))
    try:
        decode_jpeg(probe, device=device)
        return True
    except Exception as err:  # noqa: BLE001 - any failure of the probe means: decode on the CPU
        log.warning("torchvision cannot decode JPEGs on %s (%s); decoding keyframes on the CPU", device, err)
        return False
