"""The whole workflow as one command: (a sample dump when no input is given) -> curate -> train -> distill ->
evaluate, as one MLflow parent run with a nested run per step. The latent workflow adds two steps after curate:
train-vae (the causal video VAE on the curated clips) and encode (the clips through it into a latent cache, which
train and distill then read); `configs/quickstart-latent.yaml` runs it on the sample dump.

Each step is the function its own subcommand runs. The workflow records, per step, a hash of the step's resolved
config and of everything upstream of it (`WORKDIR/workflow.json`); a rerun skips a step whose outputs exist with the
same hash and resumes the first unfinished one (curation processes only new videos, training and distillation resume
from their last checkpoint). A step whose config changed starts afresh; its old outputs are moved aside, not deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from curation.config import CurateConfig
from curation.redact import redact_config, redact_uri
from models.codec import CodecConfig
from pipelines import lineage, tracking
from pipelines.config import ConfigError, flatten
from training.config import RayConfig, TrainConfig
from training.distill import DistillConfig
from training.evaluate import EvaluateConfig
from training.latent_encode import EncodeConfig
from training.vae.config import VAETrainConfig

log = logging.getLogger("reelforge.run")

STEPS = ("curate", "train-vae", "encode", "train", "distill", "evaluate")  # in the order they run
PIXEL_STEPS = ["curate", "train", "distill", "evaluate"]  # the default: the model diffuses pixels
STATE_FILE = "workflow.json"


@dataclass
class SampleDumpConfig:
    """The generated dumps used when `input` is empty: one to train on, one held out for evaluation."""

    num_videos: int = 60  # the quickstart uses 800: the demo needs many distinct clips to learn the direction word
    seed: int = 0
    heldout_videos: int = 12  # a second dump (another seed): its captions are the evaluation prompts
    heldout_seed: int = 1
    shape_size: float = 0.25  # the shapes' side as a fraction of the frame height


@dataclass
class WorkflowConfig:
    workdir: str = "runs/quickstart"  # every step writes under here (curated/, train/, distill/, evaluate/)
    input: str = ""  # a video dump; empty: generate the sample dump under workdir/sample-dump
    heldout_input: str = ""  # a held-out video dump for evaluation; empty with `input` empty: generated
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db for every step
    experiment: str = "reelforge"  # the parent run and every step's nested run (nesting needs one experiment)
    steps: list[str] = field(default_factory=lambda: list(PIXEL_STEPS))
    # The cluster every step runs on, handed down to each step (a step section's own `ray` is for its standalone
    # command); the tracking store and experiment above are handed down the same way.
    ray: RayConfig = field(default_factory=RayConfig)
    sample_dump: SampleDumpConfig = field(default_factory=SampleDumpConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    # step train-vae: its output's vae/ becomes train.codec (kind reelforge-vae) for encode, train and what follows
    train_vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    # step encode: its codec, text, curriculum and windows_per_clip are the train section's (set them there), so
    # the cache holds exactly what train reads; with encode, train and distill read the cache
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(max_videos=48))


def config_hash(section, upstream: list[str], extra: dict | None = None) -> str:
    """sha256 of a step's resolved config (where MLflow logs to is left out: it changes no output), the hashes of
    the steps it reads from and `extra` facts about its inputs."""
    params = {k: v for k, v in flatten(section).items() if not k.startswith("tracking.")}
    blob = json.dumps({"config": params, "upstream": upstream, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def input_fingerprint(root: str) -> dict:
    """Names, sizes and modification times of a dump's files: a grown dump changes the curate step's hash. A remote
    dump is listed through pyarrow.fs with the URI's endpoint and credentials; no URI is kept, so no secret."""
    if not root:
        return {}
    if "://" in root and not root.startswith("file://"):
        return _remote_fingerprint(root)
    path = Path(root.removeprefix("file://"))
    if not path.is_dir():
        return {"missing": str(path)}
    digest = hashlib.sha256()
    count = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):  # os.fsencode: names need not be UTF-8
        stat = file.stat()
        digest.update(os.fsencode(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
        count += 1
    return {"files": count, "listing_sha256": digest.hexdigest()}


def _remote_fingerprint(root: str) -> dict:
    import pyarrow.fs as pafs

    from curation.discover import filesystem_and_path

    fs, base = filesystem_and_path(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    digest = hashlib.sha256()
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    for info in files:
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        digest.update(f"{info.path[len(base):]}\0{info.size}\0{mtime}\n".encode())
    return {"files": len(files), "listing_sha256": digest.hexdigest()}


def data_fingerprint(data: str) -> str:
    """The rows a training step would read: the curated dataset version and its content (ClipTable's version,
    v<N>-lance<L>-<hash of its data files>), or a latent cache's (latents-v<N>-lance<L>-<hash>), not the dump's file
    times, so touching a video retrains nothing."""
    from curation.dataset import DatasetError
    from training.latent_dataset import open_training_data

    try:
        return open_training_data(data).version
    except (DatasetError, FileNotFoundError, OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__})"


def model_fingerprint(path: str) -> str:
    """The sha256 of a model's files: from the output's model.json for a published `OUTPUT/model` (or `OUTPUT`
    itself), else computed (a model exported before models/<sha16> existed, or a folder the user named)."""
    from training.publish import CURRENT, current_model, folder_digest

    folder = Path(path.removeprefix("file://"))
    published = current_model(str(folder.parent)) if folder.name == CURRENT else current_model(str(folder))
    if published:
        return published["sha256"]
    return folder_digest(folder) if folder.is_dir() else "missing"


class _State:
    """WORKDIR/workflow.json: the parent run and, per step, its hash, status, outputs and MLflow run."""

    def __init__(self, workdir: Path):
        self.path = workdir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def save(self) -> None:
        """Whole or not at all: a temporary file of this process's own, flushed to disk, then renamed over."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        # Step summaries carry URIs (tracking stores, inputs): the file gets them without their credentials.
        with open(tmp, "w") as f:
            f.write(json.dumps(redact_config(self.data), indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def step(self, name: str) -> dict:
        return self.data["steps"].get(name, {})

    def update(self, name: str, **values) -> None:
        self.data["steps"].setdefault(name, {}).update(values)
        self.save()


def has_finished_version(output: Path) -> bool:
    """The curate step's outputs are there once its dataset has a finished (tagged) version. The Lance tables alone
    are not enough: a run interrupted before its first version leaves them, with no version a reader can open."""
    from curation.dataset import CuratedDataset, DatasetError

    try:
        return CuratedDataset(str(output)).latest() is not None
    except DatasetError:
        return False


def _set_aside(directory: Path, old_hash: str, uri: str | None = None) -> None:
    """A step whose config or inputs changed starts in a clean folder; the old outputs stay beside it, and the MLflow
    run they kept, if a killed run left it RUNNING, is closed (nothing will continue it)."""
    if directory.exists():
        target = directory.with_name(f"{directory.name}.stale-{old_hash[:8]}")
        suffix = 1
        while target.exists():
            target = directory.with_name(f"{directory.name}.stale-{old_hash[:8]}-{suffix}")
            suffix += 1
        directory.rename(target)
        log.warning("the %s config or inputs changed since its last run: its old outputs moved to %s",
                    directory.name, target)
        run_file = target / tracking.RUN_ID_FILE
        if uri and run_file.is_file():
            tracking.close_dangling(uri, run_file.read_text().strip(),
                                    f"superseded: the step's config or inputs changed; its outputs are in {target}")


def _generated_dump(directory: Path, num_videos: int, seed: int, shape_size: float) -> str:
    from curation.sample_dump import make_sample_dump

    if not (directory / "sample_truth.json").exists():
        make_sample_dump(directory, num_videos=num_videos, seed=seed, shape_size=shape_size)
        log.info("generated a sample dump of %d videos in %s", num_videos, directory)
    return str(directory)


def run_workflow(config: WorkflowConfig) -> dict:
    unknown = [s for s in config.steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"steps: unknown step {unknown[0]!r} (known: {', '.join(STEPS)})")
    _validate_steps(config)
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(config.tracking_uri, workdir)
    state = _State(workdir)
    parent = tracking.open_run(uri, config.experiment, state.data.get("run_id"), run_name=workdir.name,
                               tags={"reelforge.step": "workflow", "reelforge.workdir": str(workdir)})
    if parent != state.data.get("run_id"):
        state.data["run_id"] = parent
        state.save()
    client = tracking.client_for(uri)
    tracking.log_params(client, parent, {"workdir": str(workdir), "input": config.input or "(sample dump)",
                                         "steps": ",".join(config.steps)})
    log.info("workflow MLflow run %s in %s", parent, redact_uri(uri))

    dump, heldout = config.input, config.heldout_input
    if not dump:
        sd = config.sample_dump
        dump = _generated_dump(workdir / "sample-dump", sd.num_videos, sd.seed, sd.shape_size)
        if not heldout and sd.heldout_videos:
            heldout = _generated_dump(workdir / "heldout-dump", max(6, sd.heldout_videos), sd.heldout_seed,
                                      sd.shape_size)
    paths = {"curate": workdir / "curated", "heldout": workdir / "heldout-curated", "train-vae": workdir / "vae",
             "encode": workdir / "latents", "train": workdir / "train", "distill": workdir / "distill",
             "evaluate": workdir / "evaluate"}
    for section in (config.curate, config.train_vae, config.train, config.distill, config.evaluate):
        section.tracking.uri = section.tracking.uri or uri
        section.tracking.experiment = config.experiment
        section.tracking.parent_run_id = parent
    for section in (config.curate, config.train_vae, config.encode, config.train, config.distill):
        section.ray.address = config.ray.address or section.ray.address
        section.ray.num_cpus = config.ray.num_cpus or section.ray.num_cpus
    _hand_down_codec(config, paths)

    results: dict = {"workdir": str(workdir), "tracking_uri": uri, "run_id": parent, "ran": [], "skipped": []}
    hashes: dict[str, str] = {}

    def run_step(name: str, section, upstream: list[str], done: Callable[[], bool], fn, extra: dict | None = None,
                 resumable: bool = True):
        """`done`: whether the step's outputs are there (a finished step whose outputs are gone runs again)."""
        digest = config_hash(section, [hashes[u] for u in upstream if u in hashes], extra)
        hashes[name] = digest
        recorded = state.step(name)
        if recorded.get("status") == "finished" and recorded.get("hash") == digest and done():
            log.info("step %s: up to date (config hash %s), skipped", name, digest[:12])
            results["skipped"].append(name)
            results[name] = recorded.get("summary")
            return
        if recorded.get("hash") and recorded["hash"] != digest and not resumable:
            _set_aside(paths[name], recorded["hash"], uri)
        state.update(name, hash=digest, status="running", started=time.time())
        client.set_tag(parent, f"reelforge.{name}.status", "running")
        log.info("step %s: running (config hash %s)", name, digest[:12])
        try:
            summary = fn()
        except BaseException:
            state.update(name, status="failed")
            client.set_tag(parent, f"reelforge.{name}.status", "failed")
            raise
        summary = json.loads(json.dumps(summary, default=str))
        status = "finished" if summary.get("finished", True) else "stopped"
        state.update(name, status=status, finished=time.time(), summary=summary)
        client.set_tag(parent, f"reelforge.{name}.status", status)
        client.set_tag(parent, f"reelforge.{name}.hash", digest)
        lineage.record_step(client, parent, name, summary)  # run ids, models:/ URIs, data, metrics
        results["ran"].append(name)
        results[name] = summary
        if status != "finished":
            raise _Stopped(name)

    try:
        if "curate" in config.steps:
            from pipelines.curate import run_curate

            config.curate.input, config.curate.output = config.curate.input or dump, str(paths["curate"])

            def curate():
                from pipelines.curate import summary_text as text

                record = run_curate(config.curate)
                return {"dataset_version": record["dataset_version"], "counts": record["counts"],
                        "output": config.curate.output, "text": text(record)}

            run_step("curate", config.curate, [], lambda: has_finished_version(paths["curate"]), curate,
                     extra=input_fingerprint(config.curate.input))
        if "train-vae" in config.steps:
            from pipelines.train_vae import run_train_vae

            config.train_vae.data = config.train_vae.data or str(paths["curate"])
            config.train_vae.output = str(paths["train-vae"])

            def train_vae():
                from pipelines.train_vae import summary_text as text

                summary = run_train_vae(config.train_vae)
                return {**summary, "text": text(summary), "finished": summary["step"] >= summary["total_steps"]}

            run_step("train-vae", config.train_vae, [], (paths["train-vae"] / VAE_INFO).exists, train_vae,
                     extra={"data": data_fingerprint(config.train_vae.data)}, resumable=False)
        if "encode" in config.steps:
            from pipelines.encode import run_encode

            config.encode.data = config.encode.data or str(paths["curate"])
            config.encode.output = str(paths["encode"])

            def encode():
                from pipelines.encode import summary_text as text

                record = run_encode(config.encode)
                return {**record, "output": config.encode.output, "text": text(record, config.encode.output)}

            # a cache holds one codec's latents: another codec (a retrained VAE) or other shapes start a new one
            run_step("encode", config.encode, [], lambda: _has_cache(paths["encode"]), encode, resumable=False,
                     extra={"data": data_fingerprint(config.encode.data),
                            "codec": codec_fingerprint(config.encode.codec)})
        if "train" in config.steps:
            from pipelines.train import run_train

            cached = str(paths["encode"]) if "encode" in config.steps else ""
            config.train.data = config.train.data or cached or str(paths["curate"])
            config.train.output = str(paths["train"])

            def train():
                from pipelines.train import summary_text as text

                summary = run_train(config.train)
                return {**summary, "text": text(summary), "finished": summary["model_version"] is not None
                        or summary["step"] >= summary["total_steps"]}

            run_step("train", config.train, [], (paths["train"] / "model" / "config.json").exists, train,
                     extra={"data": data_fingerprint(config.train.data)}, resumable=False)
        if "distill" in config.steps:
            from pipelines.distill import round_dir_name, run_distill

            cached_data = str(paths["encode"]) if "encode" in config.steps else ""
            config.distill.teacher = config.distill.teacher or str(paths["train"] / "model")
            # a latent teacher's rounds read the cache it was trained from: no decode and no VAE in the step
            config.distill.data = config.distill.data or cached_data or str(paths["curate"])
            config.distill.output = str(paths["distill"])
            rounds = config.distill.round_steps()
            last = paths["distill"] / round_dir_name(len(rounds), rounds[-1]) / "round.json"
            def distill():
                from pipelines.distill import summary_text as text

                summary = run_distill(config.distill)
                return {**summary, "text": text(summary)}

            run_step("distill", config.distill, [], last.exists, distill, resumable=False,
                     extra={"data": data_fingerprint(config.distill.data),
                            "teacher": model_fingerprint(config.distill.teacher)})
        if "evaluate" in config.steps:
            from pipelines.evaluate import run_evaluate

            _evaluation_models(config, paths)
            if not config.evaluate.data and heldout:
                config.evaluate.data = str(paths["heldout"])
            config.evaluate.output = str(paths["evaluate"])

            def evaluate():
                from pipelines.evaluate import summary_text as text

                if heldout and config.evaluate.data == str(paths["heldout"]):
                    _curate_heldout(config, heldout, paths["heldout"])
                summary = run_evaluate(config.evaluate)
                return {**summary, "text": text(summary)}

            run_step("evaluate", config.evaluate, [], (paths["evaluate"] / "comparison.csv").exists, evaluate,
                     extra=_evaluation_inputs(config, heldout, paths["heldout"]), resumable=False)
    except _Stopped as stopped:
        log.warning("step %s stopped before its end; rerun the same command to continue", stopped.step)
        tracking.finish_run(uri, parent, status="KILLED")
        results["stopped"] = stopped.step
        return results
    except BaseException:
        tracking.finish_run(uri, parent, status="FAILED")
        raise
    tracking.finish_run(uri, parent)
    return results


def _validate_steps(config: WorkflowConfig) -> None:
    """The training steps' config mistakes, before the first step starts rather than when that step begins."""
    checks = {"train-vae": config.train_vae.validate, "train": config.train.validate,
              "distill": config.distill.round_steps}
    for name in config.steps:
        if name in checks:
            try:
                checks[name]()
            except ConfigError as err:
                raise ConfigError(f"{name}.{err}") from None


VAE_INFO = "vae/reelforge-vae.json"  # under the train-vae step's output: written once its VAE is exported


def _hand_down_codec(config: WorkflowConfig, paths: dict[str, Path]) -> None:
    """train.codec is the one codec of a run: the VAE the train-vae step exports when it runs, else as configured;
    encode gets it with train's text tower and shapes, so the cache holds what train reads."""
    encode, train, defaults = config.encode, config.train, EncodeConfig()
    for key in ("codec", "text", "curriculum"):
        if getattr(encode, key) != getattr(defaults, key) and getattr(encode, key) != getattr(train, key):
            raise ConfigError(f"encode.{key}: the workflow takes it from train.{key} (one source for the cache and "
                              f"the model); set train.{key} instead")
    if "train-vae" in config.steps:
        folder = paths["train-vae"] / Path(VAE_INFO).parent
        train.codec = CodecConfig(**{**vars(train.codec), "kind": "reelforge-vae", "model": str(folder)})
    encode.codec, encode.text, encode.curriculum = train.codec, train.text, train.curriculum
    encode.windows_per_clip = train.data_loading.windows_per_clip


def codec_fingerprint(codec: CodecConfig) -> str:
    """What the codec's weights are: a local VAE folder's file digest (a retrained VAE at the same path differs)."""
    from training.publish import folder_digest

    if codec.kind == "pixels" or "://" in codec.model or not Path(codec.model).is_dir():
        return f"{codec.kind}:{codec.model}:{codec.revision}"
    return folder_digest(Path(codec.model))


def _has_cache(output: Path) -> bool:
    from training.latent_dataset import is_latent_cache

    return output.is_dir() and is_latent_cache(str(output))


class _Stopped(Exception):
    def __init__(self, step: str):
        super().__init__(step)
        self.step = step


def _evaluation_models(config: WorkflowConfig, paths: dict[str, Path]) -> None:
    """Unless configured, evaluate the teacher and every student of the distill step."""
    if config.evaluate.models:
        return
    from pipelines.distill import round_dir_name
    from training.evaluate import ModelSpec

    teacher = str(paths["train"] / "model")
    models = [ModelSpec(path=teacher)]
    if "distill" in config.steps:
        rounds = config.distill.round_steps()
        # the teacher sampled with the students' step count: the baseline distillation has to beat
        models.append(ModelSpec(path=teacher, name=f"teacher-{rounds[-1]}", num_steps=rounds[-1]))
        for index, steps in enumerate(rounds, start=1):
            models.append(ModelSpec(path=str(paths["distill"] / round_dir_name(index, steps) / "model")))
    config.evaluate.models = models


def _evaluation_inputs(config: WorkflowConfig, heldout: str, heldout_output: Path) -> dict:
    """What the evaluate step reads: the models' bytes, and the held-out dump it curates (or the dataset given)."""
    models = {spec.name or spec.path: model_fingerprint(spec.path) for spec in config.evaluate.models}
    if heldout and config.evaluate.data == str(heldout_output):
        return {"models": models, "heldout": input_fingerprint(heldout)}
    return {"models": models, "data": data_fingerprint(config.evaluate.data) if config.evaluate.data else ""}


def _curate_heldout(config: WorkflowConfig, heldout: str, output: Path) -> None:
    """The held-out dump is curated with the training data's curation settings (a nested MLflow run of its own)."""
    import copy

    from pipelines.curate import run_curate

    heldout_config = copy.deepcopy(config.curate)
    heldout_config.input, heldout_config.output = heldout, str(output)
    run_curate(heldout_config)


def summary_text(results: dict) -> str:
    lines = []
    for name in results.get("ran", []):  # each step's own summary, as its subcommand prints it
        if isinstance(results.get(name), dict) and results[name].get("text"):
            lines += [f"== {name}", results[name]["text"], ""]
    if results.get("ran") or results.get("skipped"):
        lines.append(f"steps run: {', '.join(results['ran']) or '-'}; skipped (up to date): "
                     f"{', '.join(results['skipped']) or '-'}")
    if results.get("stopped"):
        lines.append(f"stopped in step {results['stopped']}: rerun the same command to continue")
    lines.append(f"workdir: {results['workdir']}")
    lines.append(f"MLflow parent run: {results['run_id']}")
    uri = results["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {redact_uri(uri)}"
    lines.append(f"look at the runs: {ui}  (then http://127.0.0.1:5000, experiment of run {results['run_id']})")
    return "\n".join(lines)
