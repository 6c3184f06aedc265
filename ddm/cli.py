"""The `ddm` command. Each subcommand is a thin shell over a library function.

Errors raised as `DDMError` (bad input, refused operations) print one line `ddm: error: ...` and exit 2;
a failed verification exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ddm.errors import DDMError

DEFAULT_CONFIG = "configs/digits.yaml"


def _base_dir(config_path: str | None) -> Path | None:
    """The repo a config file lives in (`<repo>/configs/x.yaml`), for resolving its relative data paths."""
    return Path(config_path).resolve().parent.parent if config_path else None


def _load(args) -> "Config":  # noqa: F821
    from ddm.config import load_config

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, args.set), config_path


# ---------------------------------------------------------------------------------------------------------


def cmd_prepare(args) -> int:
    from data.prepare import prepare

    cfg, config_path = _load(args)
    prepare(cfg, args.run_dir or cfg.run_dir, overwrite=args.overwrite, base_dir=_base_dir(config_path))
    return 0


def cmd_info(args) -> int:
    from data.manifest import read_manifest
    from ddm.info import describe

    print(describe(read_manifest(args.run_dir), args.run_dir))
    return 0


def cmd_train_expert(args) -> int:
    from ddm.distributed import initialize

    initialize()
    from experts.train import train_expert

    train_expert(args.run_dir, args.cluster, args.set, progress=not args.no_progress)
    return 0


def cmd_train_monolith(args) -> int:
    from ddm.distributed import initialize

    initialize()
    from experts.train import train_monolith

    train_monolith(args.run_dir, args.set, progress=not args.no_progress)
    return 0


def cmd_train_islands(args) -> int:
    from experts import islands

    if args.launcher == "slurm":
        path = islands.write_slurm_script(args.run_dir, args.set, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                          parallel=args.parallel, partition=args.partition)
        print(f"wrote {path}\nsubmit it with: sbatch {path}")
        return 0
    results = islands.launch_local(args.run_dir, args.set, parallel=args.parallel or 1)
    failed = [i.cluster for i in results if i.status == "failed"]
    if failed:
        print(f"ddm: error: islands {failed} failed; see their train.log; rerun to retry only them", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, config: bool = False, run_dir_required: bool = True) -> None:
    if config:
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--run-dir", required=run_dir_required, help="the run directory")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set expert.train.steps=500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddm", description="Decentralized diffusion models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="load, embed and cluster a dataset into K shards + manifest")
    _add_common(p, config=True, run_dir_required=False)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory prepared differently")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("info", help="summarise a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-expert", help="train (or resume) one island's expert")
    _add_common(p)
    p.add_argument("--cluster", type=int, required=True)
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    p.set_defaults(func=cmd_train_expert)

    p = sub.add_parser("train-islands", help="train every unfinished expert, each in its own process")
    _add_common(p)
    p.add_argument("--parallel", type=int, default=None, help="islands at a time (local: default 1)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per island")
    p.add_argument("--gpus-per-node", type=int, default=0, help="slurm: GPUs per node")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.set_defaults(func=cmd_train_islands)

    p = sub.add_parser("train-monolith", help="train the single-model baseline on all data")
    _add_common(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_monolith)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DDMError as err:
        print(f"ddm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
