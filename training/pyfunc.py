"""An exported model as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/NAME/VERSION")` and `mlflow models
serve` turn prompts into MP4 videos with it.

Input (one row per video): `prompt`, and optional `seed` (default 0), `steps` and `cfg` (default: how the model is
meant to be sampled, a student its distilled steps without guidance), `negative_prompt`, `sampler` ("ddim" or
"dpmpp-2m"). Output per row: `video_mp4_base64` (an H.264 MP4, base64), `num_frames`, `width`, `height`, `fps`, and
the `seed`, `steps`, `cfg_scale` and `sampler` used.

The code travels with the weights (MLflow `code_paths`): the `models` package and the few `training` modules that load
and sample a model are copied into each logged model. A version registered today then loads with the code that wrote
its weights, whatever reelforge version (or none) is installed where it is loaded later; what must be installed is its
pip requirements (torch, open_clip_torch, av, ...), which MLflow records beside it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

ARTIFACT = "model"  # the exported model folder inside the MLflow model's artifacts
ROOT = Path(__file__).resolve().parents[1]
# what load_context and predict import, copied as packages of the same names (see the module docstring)
CODE_PACKAGES = {"models": None, "training": ["__init__.py", "export.py", "generate.py", "pyfunc.py", "sample.py"]}
REQUIREMENTS = ("torch", "numpy", "pandas", "einops", "safetensors", "open_clip_torch", "av", "pillow", "mlflow")
EXAMPLE_PROMPT = "a red triangle moving right on a black background"


class ReelforgeVideoModel(mlflow.pyfunc.PythonModel):
    """Text to video with a reelforge VDiT (teacher or student) and its text tower, on CUDA when there is one."""

    def load_context(self, context) -> None:
        import torch

        from models.codec import CodecConfig, build_codec
        from training.export import load_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(context.artifacts[ARTIFACT], self.device)
        codec = self.loaded.config.get("codec", "pixels")
        self.codec = build_codec(CodecConfig(**codec) if isinstance(codec, dict) else CodecConfig(kind=codec))
        self.sampling = self.loaded.config.get("sampling") or {}
        self.stage = (self.loaded.config.get("curriculum") or [{}])[-1]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = [self._generate(row) for row in _records(model_input)]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def _generate(self, row: dict) -> dict:
        from training.generate import generate_videos
        from training.sample import write_mp4

        prompt = str(row.get("prompt") or "").strip()
        if not prompt:
            raise ValueError("every row needs a non-empty `prompt`")
        seed = _value(row, "seed", 0, _whole)
        steps = _value(row, "steps", self.sampling.get("num_steps"), _whole)
        cfg = _value(row, "cfg", self.sampling.get("cfg_scale"), float)
        sampler = _value(row, "sampler", "ddim", str)
        negative = _value(row, "negative_prompt", "", str)
        if steps is None or cfg is None:
            raise ValueError("the model's config.json says no sampling steps/cfg: give `steps` and `cfg`")
        if steps < 1:
            raise ValueError(f"`steps` must be at least 1, got {steps}")
        frames, size, fps = int(self.stage["num_frames"]), int(self.stage["size"]), float(self.stage["fps"])
        video = generate_videos(self.loaded, self.codec, [prompt], [seed], frames, size, size, steps, cfg,
                                self.device, negative, sampler)[0]
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "video.mp4"
            write_mp4(video, path, fps, min_side=0, metadata={"title": prompt, "comment": json.dumps(
                {"seed": seed, "steps": steps, "cfg_scale": cfg, "sampler": sampler}, sort_keys=True)})
            data = path.read_bytes()
        return {"video_mp4_base64": base64.b64encode(data).decode("ascii"), "num_frames": int(video.shape[0]),
                "width": int(video.shape[2]) // 2 * 2, "height": int(video.shape[1]) // 2 * 2, "fps": fps,
                "seed": seed, "steps": steps, "cfg_scale": cfg, "sampler": sampler}


OUTPUT_COLUMNS = {"video_mp4_base64": "string", "num_frames": "long", "width": "long", "height": "long",
                  "fps": "double", "seed": "long", "steps": "long", "cfg_scale": "double", "sampler": "string"}


def _records(model_input) -> list[dict]:
    """A DataFrame (what pyfunc hands over after the schema check), a dict of columns, or a list of rows."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input).to_dict(orient="records")
    return [dict(r) for r in model_input]


def _value(row: dict, key: str, default, cast):
    """row[key] cast, or default where the column is absent or the cell is empty (None or NaN)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return default
    return cast(value)


def _whole(value) -> int:
    if float(value) != int(float(value)):
        raise ValueError(f"`seed` and `steps` are whole numbers, got {value}")
    return int(float(value))


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # An optional column is given for every row of a request or for none: pandas holds a long column with a missing
    # value as float, which MLflow's schema check refuses (as it refuses int for a double column).
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("long", "steps", required=False), ColSpec("double", "cfg", required=False),
                     ColSpec("string", "negative_prompt", required=False),
                     ColSpec("string", "sampler", required=False)])
    outputs = Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example():
    import pandas as pd

    return pd.DataFrame({"prompt": [EXAMPLE_PROMPT], "seed": [0]})


def pip_requirements() -> list[str]:
    """The packages predict imports, pinned to the versions this model was logged with (torch without its local
    +cuXXX tag, so a CPU or another CUDA build of the same version satisfies it)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def _stage_code(directory: Path) -> list[str]:
    """The packages of CODE_PACKAGES copied under `directory` (no caches), as code_paths."""
    paths = []
    for package, files in CODE_PACKAGES.items():
        target = directory / package
        if files is None:
            shutil.copytree(ROOT / package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.mkdir(parents=True)
            for name in files:
                shutil.copy2(ROOT / package / name, target / name)
        paths.append(str(target))
    return paths


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_pyfunc(model_dir: str | Path, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the exported model at `model_dir` (config.json + weights) as an MLflow pyfunc model folder at `path`,
    with its signature, input example, pip requirements and code. `metadata` goes into the MLmodel file (the data
    version and run it came from)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: expected an exported model folder")
    with tempfile.TemporaryDirectory() as staging:
        # MLflow keeps an artifact folder under its own name: a folder named model/ makes it artifacts/model (what
        # training.evaluate.model_folder looks for) whatever the export is called (models/<sha16>). Hard links
        # where the disk allows (MLflow refuses symbolic links that leave the folder), else copies.
        named = Path(staging) / "artifact" / ARTIFACT
        shutil.copytree(model_dir, named, copy_function=_link_or_copy)
        mlflow.pyfunc.save_model(
            path=str(path), python_model=ReelforgeVideoModel(), artifacts={ARTIFACT: str(named)},
            code_paths=_stage_code(Path(staging) / "code"), signature=signature(), input_example=input_example(),
            pip_requirements=pip_requirements(), metadata=metadata or None)
