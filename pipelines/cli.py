"""The `reelforge` command: one subcommand per workflow step."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.config import ConfigError, load_config


def _curate(args: argparse.Namespace) -> int:
    from curation.config import CurateConfig
    from pipelines.curate import run_curate, summary_text

    base = {k: v for k, v in (("input", args.input), ("output", args.output)) if v}
    config = load_config(CurateConfig, args.config, args.set, base=base)
    manifest = run_curate(config)
    print(summary_text(manifest))
    print(f"outputs: {config.output} (manifest.json lists every file)")
    return 0


def _make_sample_dump(args: argparse.Namespace) -> int:
    from curation.sample_dump import make_sample_dump

    truth = make_sample_dump(args.dir, num_videos=args.num_videos, seed=args.seed)
    print(f"wrote {len(truth['videos'])} videos and {len(truth.get('bad_files', {}))} bad files to {args.dir}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """The whole workflow on embedded defaults. Today: generate the sample dump if needed, then curate it."""
    from curation.config import CurateConfig
    from curation.sample_dump import make_sample_dump
    from pipelines.curate import run_curate, summary_text

    workdir = Path(args.workdir)
    dump = workdir / "sample-dump"
    if not (dump / "sample_truth.json").exists():
        make_sample_dump(dump)
        print(f"generated the sample dump in {dump}")
    base = {"input": str(dump), "output": str(workdir / "curated")}
    config = load_config(CurateConfig, args.config, args.set, base=base)
    manifest = run_curate(config)
    print(summary_text(manifest))
    print(f"curated data: {config.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    curate = sub.add_parser("curate", help="split videos into clean clips, score motion, write Parquet tables")
    curate.add_argument("--input", help="directory or URI (s3://, gs://, file://) of the video dump")
    curate.add_argument("--output", help="directory or URI for the curated dataset")
    curate.add_argument("--config", help="YAML config (see configs/curate.yaml)")
    curate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    curate.set_defaults(func=_curate)

    dump = sub.add_parser("make-sample-dump", help="generate synthetic videos with known cuts, motion and captions")
    dump.add_argument("dir")
    dump.add_argument("--num-videos", type=int, default=12)
    dump.add_argument("--seed", type=int, default=0)
    dump.set_defaults(func=_make_sample_dump)

    run = sub.add_parser("run", help="the whole workflow on the embedded defaults (sample dump -> curated data)")
    run.add_argument("--workdir", default="runs/quickstart")
    run.add_argument("--config", help="YAML curate config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"reelforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
