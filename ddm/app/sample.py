"""`ddm sample`: load a run, generate a request, write the grid + arrays (and a verification record).

Runs conditioned on embeddings take them from a file (`--conditions FILE`: .npy, or .npz with an array
`conditions`, float16 / float32 [n, *condition_shape], `read_conditions_file`) or from prompts through the
user's encoder (`--prompt TEXT` with `sample.condition_encoder: module:function`,
`ddm.sampling.prompts.encode_prompts`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.files import Staged, check_output_dir, check_output_file
from ddm.data.components import SINGLE_NAMES, component
from ddm.data.run import Run
from ddm.data.sources import DEFAULT_CONDITIONS_KEY, check_conditions
from ddm.sampling.load import load_ensemble, load_single
from ddm.sampling.outputs import load_decoder, save_outputs, save_pngs, usage_summary
from ddm.sampling.request import Request, check_clusters, check_condition, generate
from ddm.verify.limits import VerifyLimits
from ddm.verify.records import sample_record, write_record
from ddm.verify.signing import key_id, load_private_key

logger = logging.getLogger(__name__)

MODELS = ("ensemble", *SINGLE_NAMES)  # what `ddm sample --model` draws from (`ddm.data.components`)


def check_cfg_scale(scale: float | None, what: str = "cfg_scale") -> None:
    """DDMError unless a guidance scale is within what `ddm verify` accepts (`VerifyLimits.max_cfg_scale`): one
    bound for making and checking images, so no command makes what no verifier reads (and a huge scale
    overflows float32 into NaN images)."""
    bound = VerifyLimits.max_cfg_scale
    if scale is not None and abs(scale) > bound:
        raise DDMError(f"{what}={scale:g} is beyond {bound:g}, the largest guidance scale ddm verify accepts")


def read_conditions_file(path: str | Path) -> np.ndarray:
    """The condition embeddings in `path`: a .npy array, or the array `conditions` of an .npz (what `ddm sample`
    writes beside its grid, so a grid's conditions can be reused), float16 / float32 [n, D] or [n, L, D] with
    finite values (`ddm.data.sources.check_conditions`). Returned as stored; DDMError (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DDMError(f"conditions file not found: {path}")
    if path.suffix not in (".npy", ".npz"):
        raise DDMError(f"conditions file {path} must be a .npy, or an .npz with an array {DEFAULT_CONDITIONS_KEY!r}")
    try:
        if path.suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as loaded:
                if DEFAULT_CONDITIONS_KEY not in loaded.files:
                    raise DDMError(f"{path} has no array {DEFAULT_CONDITIONS_KEY!r} (arrays: {loaded.files})")
                rows = loaded[DEFAULT_CONDITIONS_KEY]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DDMError(f"cannot read conditions file {path}: {str(err).splitlines()[0]}") from None
    return check_conditions(rows, len(rows) if rows.ndim else 0, f"conditions file {path}")


def default_out(samples_dir: Path, request: Request, model: str = "ensemble") -> Path:
    """Where `ddm sample` writes without --out: SAMPLES/sample-<strategy or model>-seed<S>-n<N>[-guided].png, or
    the first of ...-2.png, -3.png, ... whose .png and .npz are both free. No other command writes `sample-*`
    names (`ddm run` writes <strategy>.png), and no existing file is ever taken, so nothing is overwritten."""
    what = (request.strategy if model == "ensemble" else model).replace(":", "_")
    guided = request.labels is not None or request.conditions_sha256 is not None
    stem = f"sample-{what}-seed{request.seed}-n{request.n}" + ("-guided" if guided else "")
    out, i = samples_dir / f"{stem}.png", 1
    while out.exists() or out.with_suffix(".npz").exists():
        i += 1
        out = samples_dir / f"{stem}-{i}.png"
    return out


def sample_command(run: Run, request: Request, out: Path, *, record: Path | None = None,
                   png_dir: Path | None = None, key: Path | None = None, model: str = "ensemble",
                   server: str | None = None, conditions: np.ndarray | None = None) -> Path:
    """Generates `request` with the run's routed ensemble (or, `model` "monolith" / "student", that single
    model: the request's strategy must then be `single:0`); writes `out` (PNG grid) and its .npz (and one PNG
    per image into `png_dir`); returns the npz.

    record: also write a verification record there (ensemble only: records name a run's routed ensemble); key:
    sign it with this Ed25519 private key (`ddm keygen`). Every output path is checked before the models load,
    and the files are written together at the end (`ddm.core.files.Staged`): a command that fails leaves none
    of them behind. server: a `ddm serve` URL of this run that generates the request instead
    (`ddm.serve.client`); the outputs are the same, and a record is the server's (signed by its key, if any).
    conditions: the condition embeddings float [n, *condition_shape] the request names by digest (runs
    conditioned on embeddings), stored in the .npz as `conditions`.
    """
    # before loading anything: a bad class or condition is the user's first error
    check_condition(request, run.num_classes, run.condition_shape)
    check_cfg_scale(request.cfg_scale)
    if request.clusters is not None:  # oracle's clusters: in range, with trained experts
        check_clusters(request, [run.finished(run.expert(k)) for k in range(run.num_clusters)])
    if model not in MODELS:
        raise DDMError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if server is not None and (model != "ensemble" or key is not None):
        raise DDMError("--server samples the server's routed ensemble, and its records are signed by the server's "
                       "key (ddm serve --key): drop --model / --key")
    if model != "ensemble" and record is not None:
        raise DDMError(f"--record verifies the routed ensemble; it cannot record samples of the {model}")
    check_output_file(out, "--out", (".png",))
    check_output_file(out.with_suffix(".npz"), "the .npz beside --out")
    if record is not None:
        check_output_file(record, "--record")
    if png_dir is not None:
        check_output_dir(png_dir, "--png-dir")
    private_key = None if key is None else load_private_key(key)  # a bad key fails before any work
    decoder = load_decoder(run.config.sample.decoder)  # a bad decoder too
    if server is not None:
        from ddm.serve.client import remote_generate

        t0 = time.perf_counter()
        result, rec = remote_generate(server, request, manifest_sha=run.sha256, codec=run.codec,
                                      record=record is not None, conditions=conditions)
        seconds = time.perf_counter() - t0
    else:
        if model == "ensemble":
            ensemble = load_ensemble(run)
        else:
            ensemble = load_single(run, model)
            if ensemble is None:
                raise DDMError(f"the {model} of {run.root} is not trained: run `{component(model).command} "
                               f"--run-dir {run.root}`")
            request = dataclasses.replace(request, strategy="single:0")
        t0 = time.perf_counter()
        result = generate(ensemble, request, conditions=conditions)
        seconds = time.perf_counter() - t0
        rec = None
        if record is not None:
            rec = sample_record(run.sha256, request, result, run.codec, private_key)
    with Staged() as staged:
        npz = save_outputs(result, request, out, manifest_sha=run.sha256, decoder=decoder, stage=staged.stage,
                           conditions=conditions)
        if png_dir is not None:
            save_pngs(result.images, png_dir, stage=staged.stage)
        if rec is not None:
            write_record(staged.stage(record), rec)
    guided = "" if request.labels is None else f", classes {_classes_text(request.labels)}, cfg scale {request.cfg_scale}"
    if request.conditions_sha256 is not None:
        guided = f", conditions {request.conditions_sha256[:16]}, cfg scale {request.cfg_scale}"
    what = request.strategy if model == "ensemble" else model
    logger.info(f"{request.n} samples ({what}, {request.steps} {request.solver} steps{guided}, "
                f"{result.dispatch} dispatch) in {seconds:.1f}s -> {out} and {npz}")
    if model == "ensemble":
        logger.info(usage_summary(result))
    if png_dir is not None:
        logger.info(f"{request.n} PNGs -> {png_dir}")
    if rec is not None:
        signed = "" if private_key is None else f", signed by {key_id(private_key.public_key())}"
        logger.info(f"verification record -> {record}{signed}")
    return npz


def _classes_text(labels: tuple[int, ...]) -> str:
    distinct = sorted(set(labels))
    return str(distinct[0]) if len(distinct) == 1 else ",".join(map(str, distinct[:10])) + ("..." if len(distinct) > 10 else "")
