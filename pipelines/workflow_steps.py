"""The steps of `reelforge run`, one class each: what the step reads and writes under the workdir (`prepare`), the
config section its hash covers (`section`), the facts about its inputs the hash also covers (`inputs`), whether its
outputs are there (`done`) and the call of its own subcommand (`run`, returning the step's summary). The workflow
(pipelines/workflow.py) runs them in STEPS order under one parent MLflow run."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from pipelines.fingerprints import codec_fingerprint, data_fingerprint, input_fingerprint, model_fingerprint
from pipelines.workflow_config import WorkflowConfig

VAE_INFO = "vae/reelforge-vae.json"  # under the train-vae step's output: written once its VAE is exported


@dataclass
class Plan:
    """What every step of one workflow run reads: the config (steps fill in their sections' paths), each step's
    output folder, and the dumps to curate and to hold out."""

    config: WorkflowConfig
    paths: dict[str, Path]
    dump: str
    heldout: str


def step_paths(workdir: Path) -> dict[str, Path]:
    return {"curate": workdir / "curated", "heldout": workdir / "heldout-curated", "train-vae": workdir / "vae",
            "encode": workdir / "latents", "train": workdir / "train", "distill": workdir / "distill",
            "evaluate": workdir / "evaluate"}


class CurateStep:
    name, resumable = "curate", True  # curation resumes by itself: a new dump version processes only new videos

    def prepare(self, plan: Plan) -> None:
        curate = plan.config.curate
        curate.input, curate.output = curate.input or plan.dump, str(plan.paths["curate"])

    def section(self, plan: Plan):
        return plan.config.curate

    def inputs(self, plan: Plan) -> dict:
        return input_fingerprint(plan.config.curate.input)

    def done(self, plan: Plan) -> bool:
        return has_finished_version(plan.paths["curate"])

    def run(self, plan: Plan) -> dict:
        from pipelines.curate import run_curate, summary_text

        record = run_curate(plan.config.curate)
        return {"dataset_version": record["dataset_version"], "counts": record["counts"],
                "output": plan.config.curate.output, "text": summary_text(record)}


class TrainVAEStep:
    name, resumable = "train-vae", False

    def prepare(self, plan: Plan) -> None:
        vae = plan.config.train_vae
        vae.data, vae.output = vae.data or str(plan.paths["curate"]), str(plan.paths["train-vae"])

    def section(self, plan: Plan):
        return plan.config.train_vae

    def inputs(self, plan: Plan) -> dict:
        return {"data": data_fingerprint(plan.config.train_vae.data)}

    def done(self, plan: Plan) -> bool:
        return (plan.paths["train-vae"] / VAE_INFO).exists()

    def run(self, plan: Plan) -> dict:
        from pipelines.train_vae import run_train_vae, summary_text

        summary = run_train_vae(plan.config.train_vae)
        return {**summary, "text": summary_text(summary), "finished": summary["step"] >= summary["total_steps"]}


class EncodeStep:
    # a cache holds one codec's latents: another codec (a retrained VAE) or other shapes start a new one
    name, resumable = "encode", False

    def prepare(self, plan: Plan) -> None:
        encode = plan.config.encode
        encode.data, encode.output = encode.data or str(plan.paths["curate"]), str(plan.paths["encode"])

    def section(self, plan: Plan):
        return plan.config.encode

    def inputs(self, plan: Plan) -> dict:
        encode = plan.config.encode
        return {"data": data_fingerprint(encode.data), "codec": codec_fingerprint(encode.codec)}

    def done(self, plan: Plan) -> bool:
        from training.latent_dataset import is_latent_cache

        output = plan.paths["encode"]
        return output.is_dir() and is_latent_cache(str(output))

    def run(self, plan: Plan) -> dict:
        from pipelines.encode import run_encode, summary_text

        record = run_encode(plan.config.encode)
        return {**record, "output": plan.config.encode.output, "text": summary_text(record, plan.config.encode.output)}


class TrainStep:
    name, resumable = "train", False

    def prepare(self, plan: Plan) -> None:
        train = plan.config.train
        train.data = train.data or _latents(plan) or str(plan.paths["curate"])
        train.output = str(plan.paths["train"])

    def section(self, plan: Plan):
        return plan.config.train

    def inputs(self, plan: Plan) -> dict:
        return {"data": data_fingerprint(plan.config.train.data)}

    def done(self, plan: Plan) -> bool:
        return (plan.paths["train"] / "model" / "config.json").exists()

    def run(self, plan: Plan) -> dict:
        from pipelines.train import run_train, summary_text

        summary = run_train(plan.config.train)
        return {**summary, "text": summary_text(summary), "finished": summary["model_version"] is not None
                or summary["step"] >= summary["total_steps"]}


class DistillStep:
    name, resumable = "distill", False

    def prepare(self, plan: Plan) -> None:
        distill = plan.config.distill
        distill.teacher = distill.teacher or str(plan.paths["train"] / "model")
        # a latent teacher's rounds read the cache it was trained from: no decode and no VAE in the step
        distill.data = distill.data or _latents(plan) or str(plan.paths["curate"])
        distill.output = str(plan.paths["distill"])

    def section(self, plan: Plan):
        return plan.config.distill

    def inputs(self, plan: Plan) -> dict:
        distill = plan.config.distill
        return {"data": data_fingerprint(distill.data), "teacher": model_fingerprint(distill.teacher)}

    def done(self, plan: Plan) -> bool:
        from pipelines.distill import round_dir_name

        rounds = plan.config.distill.round_steps()
        return (plan.paths["distill"] / round_dir_name(len(rounds), rounds[-1]) / "round.json").exists()

    def run(self, plan: Plan) -> dict:
        from pipelines.distill import run_distill, summary_text

        summary = run_distill(plan.config.distill)
        return {**summary, "text": summary_text(summary)}


class EvaluateStep:
    name, resumable = "evaluate", False

    def prepare(self, plan: Plan) -> None:
        evaluate = plan.config.evaluate
        _evaluation_models(plan)
        if not evaluate.data and plan.heldout:
            evaluate.data = str(plan.paths["heldout"])
        evaluate.output = str(plan.paths["evaluate"])

    def section(self, plan: Plan):
        return plan.config.evaluate

    def inputs(self, plan: Plan) -> dict:
        """The models' bytes, and the held-out dump it curates (or the dataset given)."""
        evaluate = plan.config.evaluate
        models = {spec.name or spec.path: model_fingerprint(spec.path) for spec in evaluate.models}
        if _curates_heldout(plan):
            return {"models": models, "heldout": input_fingerprint(plan.heldout)}
        return {"models": models, "data": data_fingerprint(evaluate.data) if evaluate.data else ""}

    def done(self, plan: Plan) -> bool:
        return (plan.paths["evaluate"] / "comparison.csv").exists()

    def run(self, plan: Plan) -> dict:
        from pipelines.evaluate import run_evaluate, summary_text

        if _curates_heldout(plan):
            _curate_heldout(plan)
        summary = run_evaluate(plan.config.evaluate)
        return {**summary, "text": summary_text(summary)}


STEPS = (CurateStep(), TrainVAEStep(), EncodeStep(), TrainStep(), DistillStep(), EvaluateStep())  # in run order


def has_finished_version(output: Path) -> bool:
    """The curate step's outputs are there once its dataset has a finished (tagged) version. The Lance tables alone
    are not enough: a run interrupted before its first version leaves them, with no version a reader can open."""
    from curation.dataset import CuratedDataset, DatasetError

    try:
        return CuratedDataset(str(output)).latest() is not None
    except DatasetError:
        return False


def _latents(plan: Plan) -> str:
    """The encode step's cache when the workflow has that step (train and distill then read it), else ""."""
    return str(plan.paths["encode"]) if "encode" in plan.config.steps else ""


def _evaluation_models(plan: Plan) -> None:
    """Unless configured, evaluate the teacher and every student of the distill step."""
    config, paths = plan.config, plan.paths
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


def _curates_heldout(plan: Plan) -> bool:
    return bool(plan.heldout) and plan.config.evaluate.data == str(plan.paths["heldout"])


def _curate_heldout(plan: Plan) -> None:
    """The held-out dump is curated with the training data's curation settings (a nested MLflow run of its own)."""
    from pipelines.curate import run_curate

    heldout_config = copy.deepcopy(plan.config.curate)
    heldout_config.input, heldout_config.output = plan.heldout, str(plan.paths["heldout"])
    run_curate(heldout_config)
