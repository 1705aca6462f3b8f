"""The `reelforge` command: one subcommand per workflow step."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from curation.redact import redact_uri
from pipelines.config import ConfigError, load_config


def _curate(args: argparse.Namespace) -> int:
    from curation.config import CurateConfig
    from pipelines.curate import run_curate, summary_text

    base = {k: v for k, v in (("input", args.input), ("output", args.output)) if v}
    config = load_config(CurateConfig, args.config, args.set, base=base)
    record = run_curate(config, retry_quarantined=args.retry_quarantined)
    print(summary_text(record))
    print(f"outputs: {redact_uri(config.output)} (Lance datasets videos.lance, clips.lance, shards.lance; "
          f"version {record['dataset_version']} is tag v{record['dataset_version']:04d})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipelines.train import run_train, summary_text
    from training.config import TrainConfig

    base = {k: v for k, v in (("data", args.data), ("output", args.output)) if v}
    if args.accept_data_change:
        base["accept_data_change"] = True
    config = load_config(TrainConfig, args.config, args.set, base=base)
    summary = run_train(config)
    print(summary_text(summary))
    return 0 if summary["step"] >= summary["total_steps"] else 3  # 3: stopped early; rerun to continue


def _encode(args: argparse.Namespace) -> int:
    from pipelines.encode import codec_section, run_encode, summary_text
    from training.latent_encode import EncodeConfig

    base: dict = {k: v for k, v in (("data", args.data), ("output", args.output)) if v}
    if args.codec:
        base["codec"] = codec_section(args.codec)
    config = load_config(EncodeConfig, args.config, args.set, base=base)
    print(summary_text(run_encode(config), config.output))
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from pipelines.train_vae import run_train_vae, summary_text
    from training.vae.config import VAETrainConfig

    base = {k: v for k, v in (("data", args.data), ("output", args.output)) if v}
    if args.accept_data_change:
        base["accept_data_change"] = True
    config = load_config(VAETrainConfig, args.config, args.set, base=base)
    summary = run_train_vae(config)
    print(summary_text(summary))
    return 0 if summary["step"] >= summary["total_steps"] else 3  # 3: stopped early; rerun to continue


def _make_sample_dump(args: argparse.Namespace) -> int:
    from curation.sample_dump import make_sample_dump

    truth = make_sample_dump(args.dir, num_videos=args.num_videos, seed=args.seed, shape_size=args.shape_size)
    print(f"wrote {len(truth['videos'])} videos and {len(truth.get('bad_files', {}))} bad files to {args.dir}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from pipelines.distill import run_distill, summary_text
    from training.distill import DistillConfig

    base = {k: v for k, v in (("teacher", args.teacher), ("data", args.data), ("output", args.output)) if v}
    config = load_config(DistillConfig, args.config, args.set, base=base)
    summary = run_distill(config)
    print(summary_text(summary))
    return 0 if summary["finished"] else 3


def _evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import run_evaluate, summary_text
    from training.evaluate import EvaluateConfig

    base: dict = {k: v for k, v in (("data", args.data), ("output", args.output)) if v}
    if args.model:
        base["models"] = [{"path": m} for m in args.model]
    config = load_config(EvaluateConfig, args.config, args.set, base=base)
    print(summary_text(run_evaluate(config)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pipelines.generate import GenerateConfig, run_generate, summary_text

    config = GenerateConfig(
        model=args.model, out=args.out, prompt=args.prompt, prompts_file=args.prompts_file,
        negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg, seed=args.seed,
        num_frames=args.num_frames, size=args.size, fps=args.fps, batch=args.batch, gif=args.gif, device=args.device,
        min_side=args.min_side, overwrite=args.overwrite, tracking_uri=args.tracking_uri, cache_dir=args.cache_dir,
        backend=args.backend, sampler=args.sampler, ray=args.ray, ray_address=args.ray_address,
        ray_workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    print(summary_text(run_generate(config)))
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from pipelines.export_onnx import ExportOnnxConfig, run_export_onnx, summary_text

    config = ExportOnnxConfig(model=args.model, out=args.out, opset=args.opset, check_steps=args.check_steps,
                              int8=args.int8, tracking_uri=args.tracking_uri, cache_dir=args.cache_dir)
    print(summary_text(run_export_onnx(config)))
    return 0


def _migrate_dataset(args: argparse.Namespace) -> int:
    from pipelines.migrate_dataset import run_migrate, summary_text

    print(summary_text(run_migrate(args.data)))
    return 0


def _export_dataset(args: argparse.Namespace) -> int:
    from pipelines.export_dataset import ExportConfig, run_export, summary_text

    config = ExportConfig(data=args.data, format=args.format, output=args.output, rows_per_file=args.rows_per_file,
                          overwrite=args.overwrite)
    print(summary_text(run_export(config), config.output))
    return 0


def _dataset_versions(args: argparse.Namespace) -> int:
    from pipelines.dataset_versions import versions_text

    print(versions_text(args.data))
    return 0


QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _run(args: argparse.Namespace) -> int:
    """The whole workflow; with no --config, the quickstart (sample dump -> curate -> train -> distill -> evaluate
    on this machine's CPUs)."""
    from pipelines.workflow import WorkflowConfig, run_workflow, summary_text

    if not args.config and not QUICKSTART.is_file():
        raise ConfigError(f"no --config given and {QUICKSTART} is missing: pass --config (see configs/ in the "
                          "reelforge repository)")
    base = {"workdir": args.workdir} if args.workdir else {}
    config = load_config(WorkflowConfig, args.config or QUICKSTART, args.set, base=base)
    results = run_workflow(config)
    print(summary_text(results))
    return 3 if results.get("stopped") else 0


def _config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", help=f"YAML config (see {example})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    curate = sub.add_parser("curate", help="split videos into clean clips, score and caption them, write Lance tables")
    curate.add_argument("--input", help="directory or URI (s3://, gs://, file://) of the video dump")
    curate.add_argument("--output", help="directory or URI for the curated dataset")
    _config_arguments(curate, "configs/curate.yaml")
    curate.add_argument("--retry-quarantined", action="store_true",
                        help="also reprocess videos quarantined by earlier versions; their new rows supersede the old")
    curate.set_defaults(func=_curate)

    train = sub.add_parser("train", help="train a text-to-video diffusion model on curated shards (resumes on rerun)")
    train.add_argument("--data", help="a curated dataset (the --output of `reelforge curate`) or a latent cache (the "
                       "--output of `reelforge encode`: no decode or text tower in the step); DIR@vN for its "
                       "version N (default: the newest)")
    train.add_argument("--output", help="directory or URI for checkpoints, the exported model and the MLflow store")
    _config_arguments(train, "configs/train/")
    train.add_argument("--accept-data-change", action="store_true",
                       help="resume even though the curated dataset changed since the checkpoint (e.g. it grew)")
    train.set_defaults(func=_train)

    train_vae = sub.add_parser("train-vae", help="train reelforge's causal 3D video VAE on curated clips (same engine "
                               "as train; resumes on rerun; held-out PSNR/SSIM in MLflow)")
    train_vae.add_argument("--data", help="a curated dataset; DIR@vN for its version N (default: the newest)")
    train_vae.add_argument("--output", help="directory or URI for checkpoints, the exported vae/ and the MLflow store")
    _config_arguments(train_vae, "configs/train-vae.yaml")
    train_vae.add_argument("--accept-data-change", action="store_true",
                           help="resume even though the curated dataset changed since the checkpoint")
    train_vae.set_defaults(func=_train_vae)

    encode = sub.add_parser("encode", help="a curated dataset's clips and captions through the codec and the text "
                            "encoder into a latent cache that `reelforge train --data` reads (incremental)")
    encode.add_argument("--data", help="a curated dataset; DIR@vN for its version N (default: the newest)")
    encode.add_argument("--codec", help="the codec: a YAML file (a codec section, or a config with one), an inline "
                        "YAML mapping such as '{kind: pixels}', or a kind")
    encode.add_argument("--output", help="directory or URI of the latent cache (a rerun adds what it lacks)")
    _config_arguments(encode, "configs/encode.yaml")
    encode.set_defaults(func=_encode)

    distill = sub.add_parser("distill", help="progressive distillation of a trained model into fewer-step students")
    distill.add_argument("--teacher", help="the exported model to distil (the model/ folder of a training run)")
    distill.add_argument("--data", help="a curated dataset whose clips the rounds noise; DIR@vN for its version N "
                         "(default: the newest)")
    distill.add_argument("--output", help="directory for the rounds (checkpoints, students, MLflow store)")
    _config_arguments(distill, "configs/distill.yaml")
    distill.set_defaults(func=_distill)

    evaluate = sub.add_parser("evaluate", help="generate for held-out prompts with each model and compare them")
    evaluate.add_argument("--model", action="append", default=[], help="an exported model folder (repeat)")
    evaluate.add_argument("--data", help="a curated dataset of held-out clips (their captions are the prompts); "
                          "DIR@vN for its version N (default: the newest)")
    evaluate.add_argument("--output", help="directory for the comparison table, GIFs and the MLflow store")
    _config_arguments(evaluate, "configs/evaluate.yaml")
    evaluate.set_defaults(func=_evaluate)

    gen = sub.add_parser("generate", help="videos from prompts with an exported model (MP4/GIF + JSON sidecars)")
    gen.add_argument("--model", required=True,
                     help="an exported model folder (the model/ of train or distill), models:/NAME/VERSION or "
                     "runs:/RUN_ID/model")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text of one video")
    prompts.add_argument("--prompts-file", help="one prompt per line; prompt i uses seed + i")
    gen.add_argument("--out", required=True, help="a directory, or FILE.mp4 / FILE.gif for a single prompt")
    gen.add_argument("--negative-prompt", default="", help="guide away from this (replaces the empty prompt in CFG)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's; a student: its distilled steps)")
    gen.add_argument("--cfg", type=float, help="guidance scale (default: the model's; 1 = no guidance)")
    gen.add_argument("--sampler", choices=["ddim", "dpmpp-2m"], default="ddim",
                     help="DDIM, or DPM-Solver++ (2M): a teacher sampled well in about half DDIM's steps")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-frames", type=int, help="default: the model's last training stage")
    gen.add_argument("--size", help="WxH or N pixels (default: the model's last training stage)")
    gen.add_argument("--fps", type=float, help="default: the model's last training stage")
    gen.add_argument("--batch", type=int, default=4, help="videos generated together")
    gen.add_argument("--gif", action="store_true", help="also write a GIF beside each MP4")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    gen.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                     help="run the denoiser in PyTorch, or in ONNX Runtime from the folder of `reelforge export-onnx`")
    gen.add_argument("--min-side", type=int, default=0, help="upscale (nearest) so the short side is at least this")
    gen.add_argument("--overwrite", action="store_true", help="replace outputs made with other settings")
    gen.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default MLFLOW_TRACKING_URI)")
    gen.add_argument("--cache-dir", help="where downloaded models are kept (default $REELFORGE_CACHE or "
                     "~/.cache/reelforge)")
    gen.add_argument("--ray", action="store_true", help="run as a Ray Data job: --workers actors, each loading the "
                     "model once (--out must be a folder every worker sees)")
    gen.add_argument("--ray-address", help="with --ray: the cluster (default RAY_ADDRESS, else one on this machine or "
                     "a new local one)")
    gen.add_argument("--workers", type=int, default=1, help="with --ray: generating actors")
    gen.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --ray: GPUs each actor takes (0: CPU)")
    gen.set_defaults(func=_generate)

    onnx = sub.add_parser("export-onnx", help="the denoiser of an exported model as ONNX, checked under ONNX Runtime")
    onnx.add_argument("--model", required=True,
                      help="an exported model folder (the model/ of train or distill), models:/NAME/VERSION or "
                      "runs:/RUN_ID/model")
    onnx.add_argument("--out", required=True, help="directory for denoiser.onnx, onnx.json and the text tower")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or later)")
    onnx.add_argument("--check-steps", type=int, default=4,
                      help="DDIM steps of the trajectory compared with PyTorch after the export (0: none)")
    onnx.add_argument("--int8", action="store_true",
                      help="int8 weights (ONNX Runtime dynamic quantisation); its errors are reported, not checked")
    onnx.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default MLFLOW_TRACKING_URI)")
    onnx.add_argument("--cache-dir", help="where downloaded models are kept (default $REELFORGE_CACHE or "
                      "~/.cache/reelforge)")
    onnx.set_defaults(func=_export_onnx)

    migrate = sub.add_parser("migrate-dataset",
                             help="convert a curated output of reelforge 0.1 (Parquet + manifest.json) into Lance "
                             "tables in place, one tagged version per manifest version")
    migrate.add_argument("--data", required=True, help="the curated output (directory or URI) to convert")
    migrate.set_defaults(func=_migrate_dataset)

    export = sub.add_parser("export-dataset", help="the kept clips of a dataset version as Parquet files or "
                            "WebDataset tar shards, for other trainers")
    export.add_argument("--data", required=True, help="a curated dataset, DIR or DIR@vN (default: newest version)")
    export.add_argument("--format", required=True, choices=["parquet", "webdataset"])
    export.add_argument("--output", required=True, help="an empty folder (directory or URI) for the files")
    export.add_argument("--rows-per-file", type=int, default=1000, help="clips per Parquet file or tar shard")
    export.add_argument("--overwrite", action="store_true", help="replace a previous export in --output")
    export.set_defaults(func=_export_dataset)

    versions = sub.add_parser("dataset-versions", help="list the finished versions of a curated dataset with their "
                              "counts, config hash and MLflow run")
    versions.add_argument("--data", required=True, help="a curated dataset (directory or URI)")
    versions.set_defaults(func=_dataset_versions)

    dump = sub.add_parser("make-sample-dump", help="generate synthetic videos with known cuts, motion and captions")
    dump.add_argument("dir")
    dump.add_argument("--num-videos", type=int, default=12)
    dump.add_argument("--seed", type=int, default=0)
    dump.add_argument("--shape-size", type=float, default=0.25, help="the shapes' side as a fraction of the height")
    dump.set_defaults(func=_make_sample_dump)

    run = sub.add_parser("run", help="the whole workflow: (sample dump) -> curate -> train -> distill -> evaluate")
    run.add_argument("--workdir", help="where every step writes (default runs/quickstart)")
    _config_arguments(run, "configs/quickstart.yaml, the default")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from curation.lock import OutputBusy

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, OutputBusy) as err:
        print(f"reelforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
