"""The `ddm` command. Each subcommand is a thin shell over a library function.

Exit codes mean one thing each:

    0  done            1  `ddm verify`: the claim is not honest; `ddm audit`: the island was caught (nothing
                          else)
    2  bad input or a refused operation: one line `ddm: error: ...`; nothing was written half-way
    3  a bug: one line naming the exception and the log file that holds its traceback
    4  `ddm train-islands` (and `ddm run`): some islands failed (named in one line); the others are assembled, a
       rerun trains only the failed ones
    75 training was preempted (SIGTERM/SIGINT): a checkpoint was written; the same command resumes
    130 interrupted (Ctrl-C)

Every option is parsed by a checking type (integers in range, seeds in 0..2^32-1, finite numbers), so a bad
value is a one-line error before anything is loaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import ddm
from ddm.app import logs
from ddm.core.cache import enable_compilation_cache
from ddm.core.config import SEED_MAX, Config, load_config, to_yaml
from ddm.core.errors import DDMError
from ddm.data.components import SINGLE_NAMES
from ddm.train.preemption import PREEMPTED_EXIT, Preempted
from ddm.verify.limits import LABEL_MAX, MODES, VerifyLimits

# Only modules that load without jax are imported above: `ddm --help`, `--version` and a refused argument answer
# at once. Each command imports the library it runs inside its handler.
if TYPE_CHECKING:
    from ddm.data.run import Run
    from ddm.sampling.request import Request

DEFAULT_CONFIG = "configs/digits.yaml"
COUNT_MAX = 2**31 - 1  # counts on the command line (images, steps, processes): int32 is far beyond any use


class BadArguments(Exception):
    """A command line argparse refused (`main` prints it as one `ddm: error:` line and returns 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with ddm's error line: `ddm: error: ...` (and a pointer to --help) instead of a usage dump, and
    returned by `main` as exit code 2 rather than raised as SystemExit (callers of `main` get a code)."""

    def error(self, message: str):
        raise BadArguments(f"{message} (see `{self.prog} --help`)")


def int_arg(lo: int, hi: int = COUNT_MAX, what: str = "an integer"):
    """An argparse type: an integer in lo..hi (decimal digits; no floats, no overflow)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} in {lo}..{hi}")
        return value

    parse.__name__ = what  # what argparse names in its messages
    return parse


def float_arg(lo: float | None = None, hi: float | None = None):
    """An argparse type: a finite number within [lo, hi]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else (
                f" >= {lo:g}" if lo is not None else "")
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number{bounds}")
        return value

    parse.__name__ = "number"
    return parse


SEED = int_arg(0, SEED_MAX, "a seed")
COUNT = int_arg(1)


def _base_dir(config_path: str | None) -> Path | None:
    """The repo a config file lives in (`<repo>/configs/x.yaml`), for resolving its relative data paths."""
    return Path(config_path).resolve().parent.parent if config_path else None


def _load(args) -> tuple[Config, str | None]:
    """The command's config: --config (default configs/digits.yaml when present) with its --set overrides."""
    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, args.set), config_path


def _run(args) -> Run:
    from ddm.data.run import Run

    """The run directory of the command, opened once with its --set overrides."""
    return Run.open(args.run_dir, args.set)


# ---------------------------------------------------------------------------------------------------------


def cmd_prepare(args) -> int:
    from ddm.data.islands import publish_bundles
    from ddm.data.prepare import check_islands_to, prepare
    from ddm.experts.assemble import pin_island_keys, read_island_keys

    cfg, config_path = _load(args)
    run_dir = args.run_dir or cfg.run_dir
    if args.islands_to:  # before the minutes of preparing, not after them
        check_islands_to(args.islands_to)
    read_island_keys(args.island_key, cfg.data.k)  # key files checked before preparing too
    manifest = prepare(cfg, run_dir, overwrite=args.overwrite, base_dir=_base_dir(config_path))
    if args.island_key:
        pin_island_keys(run_dir, args.island_key)
    if args.islands_to:
        targets = publish_bundles(run_dir, args.islands_to, [c["id"] for c in manifest["clusters"]])
        print(f"{len(targets)} island bundles copied to {args.islands_to}/<k>")
    return 0


def cmd_info(args) -> int:
    from ddm.app.info import describe
    from ddm.data.run import Run

    run_dir = args.run_dir or args.run_dir_positional
    if run_dir is None:
        raise DDMError("ddm info needs a run directory: ddm info --run-dir RUN")
    both = (args.run_dir, args.run_dir_positional)
    if all(both) and Path(both[0]).resolve() != Path(both[1]).resolve():
        raise DDMError(f"ddm info got two run directories, {args.run_dir_positional} and --run-dir {args.run_dir}: "
                       "give one")
    print(describe(Run.open(run_dir)))
    return 0


def cmd_train_expert(args) -> int:
    from ddm.core.distributed import initialize
    from ddm.experts.train import train_expert, train_island

    if (args.island is None) == (args.run_dir is None):
        raise DDMError("ddm train-expert takes --island BUNDLE --out OUT, or --run-dir RUN --cluster K")
    if args.island is not None:
        if args.out is None or args.cluster is not None:
            raise DDMError("ddm train-expert --island BUNDLE needs --out OUT (and no --cluster: the bundle has it)")
        initialize()
        train_island(args.island, args.out, args.set, progress=not args.no_progress, key=args.key)
        return 0
    if args.cluster is None or args.out is not None:
        raise DDMError("ddm train-expert --run-dir RUN needs --cluster K (and no --out: it trains into RUN/experts/K)")
    initialize()
    train_expert(args.run_dir, args.cluster, args.set, progress=not args.no_progress, assemble=not args.no_assemble,
                 key=args.key)
    return 0


def cmd_assemble(args) -> int:
    from ddm.experts.assemble import assemble_experts, pin_island_keys

    if not args.outs and not args.island_key:
        raise DDMError("ddm assemble needs expert folders (OUT...), or --island-key K=KEY.pub to list island keys")
    if args.island_key:
        pin_island_keys(args.run_dir, args.island_key)
    if args.outs:
        run = assemble_experts(args.run_dir, args.outs, args.set, replace=args.replace)
        print(f"{len(run.finished_experts())} of {run.num_clusters} experts assembled in {run.root}")
    return 0


def cmd_add_island(args) -> int:
    from ddm.data.join import add_island

    entry = add_island(args.run_dir, args.set, island_key=args.island_key)
    print(f"cluster {entry['id']} joined {args.run_dir} ({entry['count']} images); train it with ddm train-expert "
          f"--run-dir {args.run_dir} --cluster {entry['id']}, then ddm assemble")
    return 0


def cmd_remove_island(args) -> int:
    from ddm.data.join import remove_island

    run = remove_island(args.run_dir, args.cluster, delete=args.delete)
    print(f"cluster {args.cluster} removed from {run.root}: membership {run.membership_id[:16]}, clusters "
          f"{','.join(map(str, run.cluster_ids))}" + (" (its files deleted)" if args.delete else ""))
    return 0


def cmd_train_monolith(args) -> int:
    from ddm.core.distributed import initialize
    from ddm.experts.train import train_monolith

    initialize()
    train_monolith(args.run_dir, args.set, progress=not args.no_progress)
    return 0


def cmd_distill(args) -> int:
    from ddm.core.distributed import initialize
    from ddm.data.run import Run
    from ddm.experts.distill import train_student
    from ddm.sampling.teacher import build_teacher

    initialize()
    overrides = list(args.set) + ([f"distill.teacher={args.teacher}"] if args.teacher else [])
    run = Run.open(args.run_dir, overrides)
    teacher = run.config.distill.teacher
    train_student(run.root, build_teacher(run, teacher), teacher, overrides, progress=not args.no_progress)
    return 0


def cmd_train_islands(args) -> int:
    from ddm.experts import islands

    if args.launcher == "k8s":
        if not args.image:
            raise DDMError("--launcher k8s needs --image (a container image with ddm installed)")
        path = islands.write_k8s_job(args.run_dir, args.set, image=args.image, bundles=args.bundles,
                                     experts=args.experts, parallel=args.parallel, accelerator=args.accelerator,
                                     accelerators=args.accelerators, tpu_type=args.tpu_type,
                                     tpu_topology=args.tpu_topology, grace_seconds=args.grace_seconds)
        print(f"wrote {path}\napply it with: kubectl apply -f {path}")
        return 0
    if args.launcher == "slurm":
        path = islands.write_slurm_script(args.run_dir, args.set, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                          parallel=args.parallel, partition=args.partition,
                                          grace_seconds=args.grace_seconds)
        print(f"wrote {path}\nsubmit it with: sbatch {path}")
        return 0
    results = islands.launch_local(args.run_dir, args.set, parallel=args.parallel or 1)
    return _islands_outcome([i.cluster for i in results if i.status == "failed"])


def _islands_outcome(failed: list[int], what: str = "failed") -> int:
    """Exit code of a command that trained islands: 0, or one error line naming the failed ones and 4."""
    from ddm.experts import islands

    if not failed:
        return 0
    print(f"ddm: error: islands {failed} {what}; see their train.log; rerun to retry only them", file=sys.stderr)
    return islands.ISLANDS_FAILED_EXIT


def cmd_train_router(args) -> int:
    from ddm.app.router import train_router_command
    from ddm.core.distributed import initialize

    initialize()
    # --source is `--set router.source=...` (last, so it wins): the config checks it, as any other value
    overrides = [*args.set, *([f"router.source={args.source}"] if args.source is not None else [])]
    train_router_command(args.run_dir, overrides, progress=not args.no_progress)
    return 0


def cmd_eval_router(args) -> int:
    from ddm.router.evaluate import evaluate_router

    evaluate_router(args.run_dir, args.set, seed=args.seed)
    return 0


def cmd_evaluate(args) -> int:
    from ddm.eval.evaluate import DEFAULT_CFG_SCALES, DEFAULT_CLASS_N, evaluate_run
    from ddm.eval.featurenet import FeatureNetConfig

    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None
    feature_cfg = FeatureNetConfig() if args.feature_steps is None else FeatureNetConfig(steps=args.feature_steps)
    scales = DEFAULT_CFG_SCALES if args.cfg_scales is None else _numbers(args.cfg_scales, "--cfg-scales")
    evaluate_run(args.run_dir, args.set, n=args.n, steps=args.steps, solver=args.solver, seed=args.seed,
                 strategies=strategies, monolith=not args.no_monolith, student=not args.no_student,
                 cache_dir=args.cache_dir,
                 feature_cfg=feature_cfg, features=_user_features(args.features), cfg_scales=scales,
                 class_n=DEFAULT_CLASS_N if args.class_n is None else args.class_n)
    return 0


def _numbers(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated numbers ("none": no number at all)."""
    if text.strip().lower() == "none":
        return ()
    parse = float_arg(0)
    try:
        return tuple(parse(v) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError:
        raise DDMError(f"{option} must be comma-separated finite numbers >= 0 or none, got {text!r}") from None


def _class_labels(args, n: int | None) -> tuple[int, ...] | None:
    """The request's class labels: --class C (n times) or --labels a,b,c; None for neither."""
    if args.class_ is not None and args.labels is not None:
        raise DDMError("give --class or --labels, not both")
    if args.class_ is not None:
        if args.class_ < 0:
            raise DDMError(f"--class {args.class_} must be a class index >= 0")
        return (args.class_,) * n
    if args.labels is None:
        return None
    labels = _index_list(args.labels, "--labels", "class")
    if args.n is not None and len(labels) != args.n:
        raise DDMError(f"--labels gives {len(labels)} labels for --n {args.n} images")
    return labels


def _index_list(text: str, flag: str, what: str) -> tuple[int, ...]:
    """'a,b,c' -> (a, b, c), each an index in [0, LABEL_MAX]; DDMError naming `flag` otherwise."""
    parse = int_arg(0, LABEL_MAX, f"a {what} index")
    try:
        return tuple(parse(v) for v in text.split(","))
    except argparse.ArgumentTypeError as err:
        raise DDMError(f"{flag} must be comma-separated {what} indices: {err}") from None


def _request(args, cfg: Config, conditions=None) -> Request:
    """The request of `ddm sample`'s flags; conditions: the embeddings float32 [n, *condition_shape] of
    --conditions / --prompt (`_sample_conditions`), named in the request by their digest."""
    from ddm.sampling.request import Request, check_image_count, conditions_sha256

    n = cfg.sample.n if args.n is None else args.n
    if conditions is not None:
        n = len(conditions)
    check_image_count(n, cfg.sample.max_n)  # before n labels are made
    labels = _class_labels(args, n)
    if labels is not None:
        n = len(labels)  # --labels without --n: one image per label
    clusters = _clusters(args, n, labels)
    if clusters is not None:
        n = len(clusters)  # --clusters without --n: one image per cluster id
    guided = labels is not None or conditions is not None
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (cfg.sample.cfg_scale if guided else None)
    return Request(seed=cfg.sample.seed if args.seed is None else args.seed, n=n,
                   strategy=args.strategy or ("oracle" if clusters is not None else "top1"),
                   steps=cfg.sample.steps if args.steps is None else args.steps,
                   solver=args.solver or cfg.sample.solver, labels=labels, cfg_scale=cfg_scale, clusters=clusters,
                   conditions_sha256=None if conditions is None else conditions_sha256(conditions))


def _sample_conditions(args, run):
    """The condition embeddings of `ddm sample --conditions FILE` or `--prompt TEXT` (repeatable; one prompt for
    all n), float32 [n, *condition_shape] for `run`; None without either. n comes from the file or the prompts
    (or --n / sample.n for one prompt); a --n that disagrees is an error."""
    given = args.conditions is not None or args.prompt
    if given and run.condition_shape and (args.class_ is not None or args.labels is not None):
        raise DDMError(f"{'--conditions' if args.conditions is not None else '--prompt'} and --class / --labels: a "
                       "run is conditioned on embeddings or on classes, not both")
    return _embedding_rows(args, run, args.n, run.config.sample.n,
                           " (it takes class labels: --class / --labels)" if run.num_classes else "")


def _embedding_rows(args, run, n: int | None, default_n: int, hint: str = ""):
    """float32 [rows, *condition_shape]: the embeddings of --conditions FILE (its rows; DDMError unless n is None
    or their count) or of --prompt TEXT (repeatable; `prompt_image_count` rows); None without either. DDMError
    for both, or either on a run not conditioned on embeddings (`hint` says what it takes instead)."""
    from ddm.app.sample import read_conditions_file
    from ddm.sampling.prompts import encode_prompts, prompt_image_count
    from ddm.sampling.request import condition_rows

    if args.conditions is None and not args.prompt:
        return None
    if args.conditions is not None and args.prompt:
        raise DDMError("give --conditions or --prompt, not both")
    flag = "--conditions" if args.conditions is not None else "--prompt"
    if not run.condition_shape:
        raise DDMError(f"{flag} gives condition embeddings, but run {run.root} is not conditioned on embeddings{hint}")
    if args.prompt:
        if os.getcwd() not in sys.path and "" not in sys.path:  # the encoder's module, as for --features
            sys.path.insert(0, os.getcwd())
        return encode_prompts(run.config.sample.condition_encoder, args.prompt,
                              prompt_image_count(args.prompt, n, default_n), run.condition_shape,
                              max_n=run.config.sample.max_n)
    rows = read_conditions_file(args.conditions)
    if n is not None and n != len(rows):
        raise DDMError(f"--conditions {args.conditions} has {len(rows)} rows for --n {n} images (n is taken "
                       "from the file: drop --n)")
    return condition_rows(rows, len(rows), run.condition_shape, f"conditions file {args.conditions}")


def _clusters(args, n: int, labels: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The oracle strategy's cluster per image (--clusters a,b,c); None without it. Whether each names a trained
    expert of the run is checked when the run is open (`ddm.sampling.request.check_clusters`)."""
    if args.clusters is None:
        return None
    clusters = _index_list(args.clusters, "--clusters", "cluster")
    expected = len(labels) if labels is not None else args.n
    if expected is not None and len(clusters) != expected:
        what = f"{expected} labels" if labels is not None else f"--n {expected} images"
        raise DDMError(f"--clusters gives {len(clusters)} clusters for {what}")
    return clusters


def cmd_sample(args) -> int:
    from ddm.app.sample import default_out, sample_command
    from ddm.sampling.request import check_limits

    if args.key and not args.record:
        raise DDMError("--key signs a verification record: pass --record too")
    if args.model != "ensemble" and args.strategy is not None:
        raise DDMError(f"--strategy routes the ensemble; the {args.model} is one model (drop --strategy)")
    run = _run(args)
    conditions = _sample_conditions(args, run)
    request = check_limits(_request(args, run.config, conditions), run.config.sample)
    out = Path(args.out) if args.out else default_out(run.samples_dir, request, args.model)
    sample_command(run, request, out, record=Path(args.record) if args.record else None,
                   png_dir=Path(args.png_dir) if args.png_dir else None, key=Path(args.key) if args.key else None,
                   model=args.model, server=args.server, conditions=conditions)
    return 0


def _user_features(spec: str | None):
    """`--features module:function`, importable from the working directory as `python -m` would allow."""
    from ddm.eval.features import load_features

    if spec is None:
        return None
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load_features(spec)


def cmd_export(args) -> int:
    from ddm.sampling.export import export_run

    export_run(args.run_dir, args.out)
    return 0


def cmd_config_show(args) -> int:
    from ddm.data.run import Run

    if args.run_dir is not None:
        if args.config is not None:
            raise DDMError("ddm config show takes --config or --run-dir, not both")
        cfg = Run.open(args.run_dir, args.set).config
    else:
        cfg = _load(args)[0]
    print(to_yaml(cfg), end="")
    return 0


def cmd_run(args) -> int:
    from ddm.app.pipeline import run_all
    from ddm.data.run import Run

    cfg, config_path = _load(args)
    run_dir = args.run_dir or cfg.run_dir
    run_all(cfg, run_dir, args.set, base_dir=_base_dir(config_path), overwrite=args.overwrite, parallel=args.parallel)
    # The job went on without the islands that failed (router and samples from the others): done, but not all of
    # it, which is train-islands' code, not 0.
    run = Run.open(run_dir, args.set)
    failed = run.unfinished_experts(run.config.expert.train.steps)  # what launch_local counts as finished
    return _islands_outcome(failed, "failed and were left out of the ensemble")


def cmd_hash(args) -> int:
    from ddm.verify.phash import format_hash_table, hash_files

    print(format_hash_table(hash_files(args.files)))
    return 0


def cmd_verify(args) -> int:
    if args.calibrate:
        return _calibrate_verifier(args)
    if args.record is None:
        raise DDMError("ddm verify needs a record (ddm verify RECORD --run-dir RUN), or --calibrate")
    from ddm.verify.signing import load_public_key
    from ddm.verify.verdict import format_verdict, verify_record

    limits = VerifyLimits(max_n=args.max_n, max_steps=args.max_steps, max_image_steps=args.max_image_steps)
    public_key = load_public_key(args.public_key) if args.public_key else None
    flags = {"phash": args.threshold, "max_abs": args.max_abs, "rms": args.rms}
    conditions = None
    if args.conditions is not None:
        from ddm.app.sample import read_conditions_file

        conditions = read_conditions_file(args.conditions)
    verdict = verify_record(args.run_dir, args.record, mode=args.mode, public_key=public_key, flags=flags,
                            limits=limits, overrides=args.set, conditions=conditions)
    print(format_verdict(verdict))
    return 0 if verdict.honest else 1


def _calibrate_verifier(args) -> int:
    from ddm.verify.calibrate import CalibrationSettings, calibrate, format_calibration

    if args.record is not None:
        raise DDMError("ddm verify --calibrate measures this verifier's own drift and judges no record: drop "
                       f"{args.record}")
    try:
        steps = tuple(COUNT(v) for v in args.calibrate_steps.split(",")) if args.calibrate_steps else ()
    except argparse.ArgumentTypeError as err:
        raise DDMError(f"--calibrate-steps must be comma-separated step counts: {err}") from None
    settings = CalibrationSettings(steps=steps, other_xla_flags=args.calibrate_flags, margin=args.margin)
    print(format_calibration(calibrate(args.run_dir, settings, overrides=args.set)))
    return 0


def cmd_audit(args) -> int:
    import json
    import secrets

    from ddm.core.files import atomic_write, check_output_file
    from ddm.verify.audit import audit_island, format_report

    if args.report:
        check_output_file(args.report, "--report", (".json",))
    seed = secrets.randbelow(SEED_MAX + 1) if args.seed is None else args.seed  # unknown to the island
    report = audit_island(args.out, args.bundle, segments=args.segments, length=args.length, seed=seed,
                          pin=args.chain, supply=args.supply)
    print(format_report(report))
    if args.report:
        atomic_write(args.report, json.dumps(report.to_json(), indent=1) + "\n")
    if report.inconclusive:
        raise DDMError("a replay does not reproduce the chain, but this machine is not the island's environment "
                       f"({'; '.join(report.foreign)}): inconclusive; audit where the island trained")
    return 1 if report.caught else 0


def _chain_head(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a chain head (64 lowercase hex digits)")
    return text


def cmd_serve(args) -> int:
    import signal

    import uvicorn

    if args.launcher == "k8s":
        from ddm.serve.k8s import write_k8s_serve

        if not args.image:
            raise DDMError("--launcher k8s needs --image (a container image with ddm installed)")
        path = write_k8s_serve(args.run_dir, args.set, image=args.image, replicas=args.replicas, gpus=args.gpus,
                               port=args.port, key=args.key, max_batch=args.max_batch,
                               max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
        print(f"wrote {path}\napply it with: kubectl apply -f {path}")
        return 0

    from ddm.serve.app import create_app

    app = create_app(_run(args), key=Path(args.key) if args.key else None, max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT and then re-raises the signal at its previous handler:
    # a no-op one here, so a requested stop is a clean exit (0), not a death by signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_keygen(args) -> int:
    from ddm.verify.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(args.out)
    print(f"wrote {private} (private key, keep it secret) and {public} (public key, {key_id(load_public_key(public))})")
    return 0


def cmd_consensus_eval(args) -> int:
    from ddm.verify.claims import EvalSettings
    from ddm.verify.report import consensus_eval
    from ddm.verify.worker import DEFAULT_VERIFIERS, VerifierSpec

    specs = [VerifierSpec.parse(text) for text in args.verifier] or list(DEFAULT_VERIFIERS)
    if args.verifiers < 1:
        raise DDMError(f"--verifiers must be >= 1, got {args.verifiers}")
    try:
        scales = tuple(float(v) for v in args.perturb_scale.split(","))
    except ValueError:
        raise DDMError(f"--perturb-scale must be comma-separated numbers, got {args.perturb_scale!r}") from None
    copiers = () if args.copiers == "none" else tuple(c for c in args.copiers.split(",") if c)
    settings = EvalSettings(requests=args.requests, images=args.images, steps=args.steps, solver=args.solver,
                            strategy=args.strategy, seed=args.seed,
                            verifiers=tuple(specs[i % len(specs)] for i in range(args.verifiers)),
                            perturb_scales=scales, pixel_noise=args.pixel_noise, parallel=args.parallel,
                            copiers=copiers, margin=args.margin)
    run = _run(args)
    conditions = _embedding_rows(args, run, None, 1)
    out = Path(args.out) if args.out is not None else run.eval_dir
    created = [p for p in (out, out / "consensus_work") if not p.exists()]
    try:
        consensus_eval(args.run_dir, settings, args.out, overrides=args.set, conditions=conditions)
    except DDMError:  # a refused evaluation leaves none of the folders it made
        import shutil

        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return 0


# ---------------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, config: bool = False, run_dir_required: bool = True) -> None:
    if config:
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--run-dir", required=run_dir_required, help="the run directory")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set expert.train.steps=500")


def _add_embedding_options(p: argparse.ArgumentParser, rows: str, prompts: str) -> None:
    """--conditions FILE and --prompt TEXT (`_embedding_rows` reads them); rows / prompts: how this command uses
    them."""
    p.add_argument("--conditions", default=None, metavar="FILE",
                   help="runs conditioned on embeddings: a .npy, or an .npz array 'conditions', of float16/float32: "
                        + rows)
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="runs conditioned on embeddings: a prompt, embedded by sample.condition_encoder "
                        f"(module:function); {prompts}")


def _add_training_job(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that trains one run component: --run-dir, --set and --no-progress."""
    p = sub.add_parser(name, help=help)
    _add_common(p)
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddm", description="Decentralized diffusion models in JAX.")
    parser.add_argument("--version", action="version", version=f"ddm {ddm.__version__}",
                        help="print the installed ddm version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="load, embed and cluster a dataset into K shards + manifest")
    _add_common(p, config=True, run_dir_required=False)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory prepared differently")
    p.add_argument("--islands-to", default=None, metavar="URL",
                   help="also copy each bundle RUN/islands/K to URL/K (a folder or an s3:// / gs:// URL)")
    p.add_argument("--island-key", action="append", default=[], metavar="K=KEY.pub",
                   help="island K's public key (ddm keygen): assemble then accepts expert K only signed by it "
                        "(repeatable; docs/scale-out.md)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("info", help="summarise a run directory")
    p.add_argument("run_dir_positional", nargs="?", metavar="RUN", help="the run directory (or --run-dir)")
    p.add_argument("--run-dir", default=None, help="the run directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train-expert", help="train (or resume) one island's expert, from its bundle alone")
    _add_common(p, run_dir_required=False)
    p.add_argument("--island", default=None, metavar="BUNDLE", help="the island bundle (a copy of RUN/islands/K)")
    p.add_argument("--out", default=None, help="with --island: where the expert goes (checkpoints, final/, "
                                               "expert.json), a folder or an s3:// / gs:// URL; nothing outside "
                                               "it is written")
    p.add_argument("--cluster", type=int_arg(0, COUNT_MAX, "a cluster id"), default=None, help="with --run-dir: which island, the cluster id k (0..K-1)")
    p.add_argument("--no-assemble", action="store_true",
                   help="with --run-dir: train into RUN/experts/K but leave the manifest to `ddm assemble`")
    p.add_argument("--key", default=None, metavar="KEY",
                   help="sign OUT/expert.json with this Ed25519 private key (ddm keygen; the island's key the "
                        "coordinator lists with --island-key)")
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    p.set_defaults(func=cmd_train_expert)

    p = sub.add_parser("assemble", help="check experts trained elsewhere against the run's plan and register them")
    _add_common(p)
    p.add_argument("outs", nargs="*", metavar="OUT", help="expert folders (or s3:// / gs:// URLs) written by train-expert --out")
    p.add_argument("--replace", action="store_true",
                   help="let an expert replace a finished one (invalidates the records made with the old one)")
    p.add_argument("--island-key", action="append", default=[], metavar="K=KEY.pub",
                   help="list island K's public key first (repeatable): expert K must then be signed by it")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("add-island", help="join new data to a finished run as its next cluster: its shard and "
                                          "island bundle (docs/membership.md)")
    p.add_argument("--run-dir", required=True, help="the run directory")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                   help="the new data's settings over the run's (repeatable): data.source, data.limit, "
                        "data.exclude_classes, data.labels, ...")
    p.add_argument("--island-key", default=None, metavar="KEY.pub",
                   help="the new island's public key (ddm keygen): its expert must then be signed by it")
    p.set_defaults(func=cmd_add_island, compiles=False)  # loads no jax

    p = sub.add_parser("remove-island", help="take a cluster out of the run's membership: its expert leaves the "
                                             "ensemble, prior counts and router training (docs/membership.md)")
    p.add_argument("--run-dir", required=True, help="the run directory")
    p.add_argument("--cluster", type=int_arg(0, COUNT_MAX, "a cluster id"), required=True, help="the cluster id k")
    p.add_argument("--delete", action="store_true",
                   help="also delete its bundle (shard, held-out images) and expert folder, once the manifest "
                        "names the new membership")
    p.set_defaults(func=cmd_remove_island, compiles=False)

    p = sub.add_parser("train-islands", help="train every unfinished expert, each in its own process")
    _add_common(p)
    p.add_argument("--parallel", type=COUNT, default=None, help="islands at a time (local: default 1)")
    p.add_argument("--launcher", choices=("local", "slurm", "k8s"), default="local",
                   help="local: one OS process per island here (default); slurm: write an array-job script; k8s: "
                        "write a Kubernetes Indexed Job manifest")
    p.add_argument("--nodes", type=COUNT, default=1, help="slurm: nodes per island")
    p.add_argument("--gpus-per-node", type=int_arg(0), default=0, help="slurm: GPUs per node")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--grace-seconds", type=int_arg(0), default=120,
                   help="slurm / k8s: seconds between SIGTERM and the kill; covers one step + a checkpoint (default 120)")
    p.add_argument("--image", default=None, help="k8s: container image with ddm installed")
    p.add_argument("--bundles", default=None, help="k8s: where pods find the bundles, BUNDLES/<k> (default RUN/islands)")
    p.add_argument("--experts", default=None, help="k8s: where pods write the experts, EXPERTS/<k> (default RUN/experts)")
    p.add_argument("--accelerator", choices=("gpu", "tpu", "cpu"), default="gpu", help="k8s: gpu (default), tpu, cpu")
    p.add_argument("--accelerators", type=COUNT, default=1, help="k8s: GPUs or TPU chips per island (default 1)")
    p.add_argument("--tpu-type", default=None, help="k8s: GKE TPU accelerator, e.g. tpu-v5-lite-podslice")
    p.add_argument("--tpu-topology", default=None, help="k8s: GKE TPU topology, e.g. 2x2")
    p.set_defaults(func=cmd_train_islands)

    _add_training_job(sub, "train-monolith", "train the single-model baseline on all data", cmd_train_monolith)
    p = _add_training_job(sub, "distill", "train one student DiT on the ensemble's velocity (ensemble distillation)",
                          cmd_distill)
    p.add_argument("--teacher", choices=("cluster", "full"), default=None,
                   help="cluster: each sample's own cluster expert (the paper's); full: the router-weighted "
                        "ensemble (default: distill.teacher, cluster)")
    p = _add_training_job(sub, "train-router", "train the router p(cluster | x_t, t) on all shards (or on images the "
                          "experts draw)", cmd_train_router)
    p.add_argument("--source", default=None, metavar="data|experts",
                   help="data: the islands' shards; experts: images each expert draws for its cluster, in the "
                        "manifest's proportions (no shard is read; router.expert_samples / expert_steps / "
                        "expert_solver) (default: router.source, data)")

    p = sub.add_parser("eval-router", help="router accuracy / calibration on held-out data (JSON + PNG)")
    _add_common(p)
    p.add_argument("--seed", type=SEED, default=0, help="seed of the noise levels and noise draws (default 0)")
    p.set_defaults(func=cmd_eval_router)

    p = sub.add_parser("evaluate", help="FD / precision / recall / coverage per routing strategy and the monolith")
    _add_common(p)
    p.add_argument("--n", type=COUNT, default=500, help="samples per strategy (default 500)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated (default full,top1,top2,threshold:0.1,sample,top1+full:0.5)")
    p.add_argument("--steps", type=COUNT, default=None, help="ODE steps (default: sample.steps)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help="ODE solver (default: sample.solver)")
    p.add_argument("--seed", type=SEED, default=0, help="noise seed, the same for every strategy (default 0)")
    p.add_argument("--no-monolith", action="store_true", help="skip RUN/monolith even if it is trained")
    p.add_argument("--no-student", action="store_true", help="skip RUN/student (ddm distill) even if it is trained")
    p.add_argument("--cache-dir", default=None, help="feature-net cache (default $DDM_CACHE_DIR or ~/.cache/ddm)")
    p.add_argument("--feature-steps", type=COUNT, default=None,
                   help="feature-net (and class classifier) training steps (default 600)")
    _add_feature_option(p)
    p.add_argument("--cfg-scales", default=None,
                   help="guidance scales of the class accuracy (class-conditional runs) and of the condition "
                        "following (runs conditioned on embeddings), comma-separated, or none (default 1,2,3)")
    p.add_argument("--class-n", type=COUNT, default=None,  # None: ddm.eval.evaluate.DEFAULT_CLASS_N (a test ties them)
                   help="guided samples per model and scale for the class accuracy or the condition following "
                        "(default 100)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="sample with the routed ensemble (PNG grid + .npz)")
    _add_common(p)
    p.add_argument("--n", type=COUNT, default=None, help="number of images (default: sample.n)")
    p.add_argument("--strategy", default=None,
                   help="full | top1 | top2 | topk:K | threshold:TAU | sample | oracle | prior | single:K; top-k, "
                        "threshold and sample also as S+full:T, e.g. top1+full:0.5 (default top1; oracle with "
                        "--clusters)")
    p.add_argument("--steps", type=COUNT, default=None, help="ODE steps (default: sample.steps)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help="ODE solver (default: sample.solver)")
    p.add_argument("--seed", type=SEED, default=None, help="noise seed (default: sample.seed)")
    p.add_argument("--class", dest="class_", type=int, default=None, metavar="C",
                   help="sample n images of class C (class-conditional runs)")
    _add_embedding_options(p, "one condition per image, [n, *condition_shape] (n from the file; --cfg-scale "
                              "defaults to sample.cfg_scale)", "one for all n images, or repeated once per image")
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels, one per image (their count is n)")
    p.add_argument("--cfg-scale", type=float_arg(0), default=None,
                   help="classifier-free guidance scale with --class/--labels, at most "
                        f"{VerifyLimits.max_cfg_scale:g} (default: sample.cfg_scale; 1: none)")
    p.add_argument("--clusters", default=None,
                   help="comma-separated cluster ids, one per image: the oracle strategy's experts (their count is n)")
    p.add_argument("--model", choices=("ensemble", *SINGLE_NAMES), default="ensemble",
                   help="what to sample: the routed ensemble (default), the monolith, or the distilled student")
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples/sample-STRATEGY-seedS-nN.png, numbered "
                                               "-2, -3, ... rather than overwrite); an .npz is written beside")
    p.add_argument("--record", default=None, help="also write a verification record (JSON) here")
    p.add_argument("--key", default=None, help="sign the record with this Ed25519 private key (ddm keygen)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="generate on a running `ddm serve` of this run (e.g. http://127.0.0.1:8000); same outputs")
    _add_sample_outputs(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("run", help="the main job: prepare, train islands + router, sample every strategy")
    _add_common(p, config=True, run_dir_required=False)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory prepared differently")
    p.add_argument("--parallel", type=COUNT, default=None, help="islands at a time (default: min(K, cores))")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("hash", help="SHA-256, pHash and dHash of PNG files or images in .npz files")
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG files or .npz files with an images array")
    p.set_defaults(func=cmd_hash, compiles=False)  # loads no jax

    p = sub.add_parser("verify", help="regenerate a verification record and judge it (exit 0 honest, 1 not); "
                                      "--calibrate: measure this verifier's honest drift into its thresholds")
    p.add_argument("record", nargs="?", default=None, help="the verification record (JSON) written by ddm sample "
                                                           "--record")
    _add_common(p)
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="exact (bit for bit), tolerance (within thresholds this verifier calibrated: refused "
                        "without them), phash, or auto (default: bit for bit passes; otherwise tolerance when this "
                        "verifier has calibrated the run, else not honest). The record's environment never decides")
    p.add_argument("--public-key", default=None, help="require a signature by this Ed25519 public key (KEY.pub)")
    p.add_argument("--conditions", default=None, metavar="FILE",
                   help="the condition embeddings a record of a run conditioned on embeddings was made for (.npy, or "
                        "the .npz ddm sample wrote); refused unless their digest is the record's")
    p.add_argument("--threshold", type=int_arg(0, 64, "a Hamming distance"), default=None,
                   help="phash mode: max pHash Hamming distance per image (replaces the calibrated one)")
    p.add_argument("--max-abs", type=float_arg(0), default=None,
                   help="tolerance mode: max |dx| per image (replaces the calibrated one)")
    p.add_argument("--rms", type=float_arg(0), default=None,
                   help="tolerance mode: max RMS dx per image (replaces the calibrated one)")
    p.add_argument("--calibrate", action="store_true",
                   help="judge no record: regenerate calibration requests here and in a process with "
                        "--calibrate-flags, and write thresholds = --margin x the honest drift measured to "
                        "RUN/eval/verify_thresholds.json (docs/verification.md)")
    p.add_argument("--calibrate-flags", default="--xla_cpu_enable_fast_math=true",
                   help="--calibrate: XLA flags of the second setup (default --xla_cpu_enable_fast_math=true; '' "
                        "for merged batches alone)")
    p.add_argument("--calibrate-steps", default=None,
                   help="--calibrate: comma-separated solver step counts (default: the run's sample.steps)")
    p.add_argument("--margin", type=float_arg(1), default=4.0,
                   help="--calibrate: thresholds = margin x the largest honest drift (default 4)")
    defaults = VerifyLimits()
    p.add_argument("--max-n", type=int_arg(0), default=defaults.max_n, help=f"refuse records of more images "
                                                                   f"(default {defaults.max_n})")
    p.add_argument("--max-steps", type=int_arg(0), default=defaults.max_steps,
                   help=f"refuse records of more solver steps (default {defaults.max_steps})")
    p.add_argument("--max-image-steps", type=int_arg(0), default=defaults.max_image_steps,
                   help=f"refuse records whose n * steps is larger (default {defaults.max_image_steps})")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("audit", help="replay random segments of an island's training against the chain of state "
                                     "digests its expert.json commits to (exit 0 passed, 1 caught)")
    p.add_argument("out", metavar="OUT", help="the island's output folder (expert.json, audit/, final/)")
    p.add_argument("--bundle", required=True, help="the island's bundle (RUN/islands/<k>), whose data is replayed")
    p.add_argument("--segments", type=COUNT, default=29,  # ddm.verify.audit.DEFAULT_SEGMENTS (a test ties them)
                   help="random segments to replay (default 29: a lazy 10%% of training is caught with "
                        "probability >= 95%%)")
    p.add_argument("--length", type=COUNT, default=1, help="chain intervals per segment (default 1)")
    p.add_argument("--seed", type=SEED, default=None,
                   help="the challenge's seed (default: drawn at random and printed); the island must not know it "
                        "before it has committed to its chain")
    p.add_argument("--chain", type=_chain_head, default=None, metavar="HEAD",
                   help="the chain head expert.json committed to when the challenge was issued: caught if it "
                        "commits to another now")
    p.add_argument("--supply", action="store_true",
                   help="the island's side: write the starting states this challenge (--seed, --segments, --length) "
                        "needs into OUT/audit/states, regenerated from the kept ones; judges nothing")
    p.add_argument("--report", default=None, metavar="FILE", help="also write the report as JSON (.json)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("serve", help="serve the run's ensemble over HTTP: /v1/images/generations, /v1/verify, "
                                     "/v1/models, /health, /metrics and a form at / (docs/serving.md)")
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_arg(0, 65535, "a port"), default=8000, help="TCP port (default 8000)")
    p.add_argument("--key", default=None, help="sign the records the server returns with this Ed25519 private key "
                                               "(ddm keygen)")
    p.add_argument("--max-batch", type=COUNT, default=64, help="images gathered into one batch (default 64)")
    p.add_argument("--max-wait-ms", type=float_arg(0), default=10.0,
                   help="how long a batch waits for compatible requests (default 10 ms)")
    p.add_argument("--max-queue", type=COUNT, default=256,
                   help="pending images beyond which requests get 429 (default 256)")
    p.add_argument("--launcher", choices=("local", "k8s"), default="local",
                   help="local: serve here (default); k8s: write RUN/k8s/serve.yaml (Deployment + Service), not apply it")
    p.add_argument("--image", default=None, help="k8s: container image with ddm installed")
    p.add_argument("--replicas", type=COUNT, default=1, help="k8s: server replicas (default 1)")
    p.add_argument("--gpus", type=int_arg(0), default=0, help="k8s: GPUs per replica (default 0)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="write a new Ed25519 key pair for signing records or an island's "
                                      "expert.json: KEY and KEY.pub")
    p.add_argument("--out", required=True, help="the private key's path; the public key goes to OUT.pub")
    p.set_defaults(func=cmd_keygen, compiles=False)  # loads no jax

    p = sub.add_parser("consensus-eval", help="N verifier processes (commit, then reveal) + majority vote on honest and "
                                              "tampered claims; calibrates the verify thresholds")
    _add_common(p)
    p.add_argument("--verifiers", type=COUNT, default=3, help="verifier processes (default 3)")
    p.add_argument("--verifier", action="append", default=[], metavar="SPEC",
                   help="a verifier's setup, cycled over the verifiers (repeatable): 'plain' or "
                        "'xla_flags=...;cpus=N;batch_size=N|half;param_mantissa=N' (default: plain; 2 devices + "
                        "half batch + 1 cpu + single-threaded fast-math XLA; params rounded to TF32)")
    p.add_argument("--requests", type=COUNT, default=8, help="requests per claim kind (default 8)")
    p.add_argument("--images", type=COUNT, default=8, help="images per request (default 8)")
    p.add_argument("--steps", type=COUNT, default=8, help="solver steps (default 8)")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver (default euler)")
    p.add_argument("--strategy", default="top1", help="routing strategy of the honest requests (default top1)")
    p.add_argument("--seed", type=SEED, default=0, help="first request seed")
    p.add_argument("--perturb-scale", default="0.01,0.1",
                   help="expert parameter noise, relative to each tensor's RMS, comma-separated (default 0.01,0.1)")
    p.add_argument("--pixel-noise", type=float_arg(0), default=8.0, help="std of pixel noise in uint8 levels (default 8)")
    p.add_argument("--parallel", type=COUNT, default=None, help="verifier processes regenerating at a time "
                                                                "(default all)")
    p.add_argument("--copiers", default="reveal,commitment",
                   help="copying verifiers (of verifier 0) that commit-reveal must catch: comma-separated among "
                        "reveal, commitment, or none (default reveal,commitment)")
    p.add_argument("--margin", type=float_arg(0), default=2.0,
                   help="tolerance thresholds = margin x the largest honest drift measured (default 2)")
    _add_embedding_options(p, "the claims' conditions, [m, *condition_shape], cycled over the requests' images "
                              "(default: the null condition)", "repeatable, cycled over the requests' images")
    p.add_argument("--out", default=None, help="output folder, thresholds included (default RUN/eval, where "
                                               "ddm verify reads verify_thresholds.json)")
    p.set_defaults(func=cmd_consensus_eval)
    _add_export_and_config(sub)
    return parser


def _add_sample_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--png-dir", default=None, metavar="DIR",
                   help="also write one PNG per image into DIR (000000.png, ...), for clean-fid / torch-fidelity")


def _add_feature_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default=None, metavar="MODULE:FUNCTION",
                   help="compute FD / precision / recall in your own feature space: a function taking uint8 images "
                        "[N, H, W, C] and returning features [N, D] (module importable from the working directory)")


def _add_export_and_config(sub) -> None:
    p = sub.add_parser("export", help="finished experts, router (and monolith) as safetensors + manifest + pins + "
                                      "model card, a folder to share (load_ensemble and ddm sample read it)")
    p.add_argument("--run-dir", required=True, help="the run directory to export")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (must not exist or be empty)")
    p.set_defaults(func=cmd_export)

    config = sub.add_parser("config", help="inspect configs")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("show", help="print the fully resolved config (every default filled in) as YAML")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} when present, else the built-in defaults)")
    p.add_argument("--run-dir", default=None, help="print the config stored in this run (or export) instead")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set expert.train.steps=500")
    p.set_defaults(func=cmd_config_show, compiles=False)  # loads no jax


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args = build_parser().parse_args(argv)
    except BadArguments as err:
        print(f"ddm: error: {err}", file=sys.stderr)
        return 2
    logs.configure(logging.INFO)
    if getattr(args, "compiles", True):
        enable_compilation_cache()  # each process compiles a program once per machine, not once per run
    try:
        return args.func(args)
    except Preempted as err:
        print(f"ddm: {err}", file=sys.stderr)
        return PREEMPTED_EXIT
    except DDMError as err:
        print(f"ddm: error: {logs.one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddm: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine refused (disk full, permissions, a vanished file): not a ddm bug
        where = logs.write_crash_log(sys.argv if argv is None else ["ddm", *argv], err)
        print(f"ddm: error: {logs.one_line(err)} (details in {where})", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line here, the traceback in a log file
        where = logs.write_crash_log(sys.argv if argv is None else ["ddm", *argv], err)
        print(f"ddm: internal error: {type(err).__name__}: {logs.one_line(err)} (a bug; the traceback is in "
              f"{where})", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
