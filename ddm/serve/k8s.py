"""`ddm serve --launcher k8s`: a Kubernetes Deployment + Service for the server, written, never applied.

The manifest follows the islands' Job (`ddm.experts.islands.write_k8s_job`): `ddm` in the container image, the
run directory at the same path in the pods as here (a shared volume the cluster mounts; the manifest names the
path, it does not mount it), `--set` overrides passed through, GPUs as `nvidia.com/gpu` limits. Each replica is
one `ddm serve` process on 0.0.0.0:PORT; the readiness probe is GET /health (answered once the ensemble is
loaded), so a Service sends no traffic to a replica still loading its checkpoints. `terminationGracePeriodSeconds`
covers uvicorn's graceful stop (30 s of requests in flight, `ddm serve`) plus a margin.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddm.core.errors import DDMError
from ddm.data.run import Run

SERVE_GRACE_S = 30  # uvicorn's timeout_graceful_shutdown in `ddm serve`


def serve_manifest(run: Run, run_dir: Path, overrides: list[str], *, image: str, replicas: int = 1, gpus: int = 0,
                   port: int = 8000, key: str | None = None, max_batch: int = 64, max_wait_ms: float = 10.0,
                   max_queue: int = 256, grace_seconds: int = SERVE_GRACE_S + 15) -> list[dict]:
    """[Deployment, Service] as dicts (see the module docstring). key: the signing key's path in the pods."""
    if replicas < 1 or gpus < 0:
        raise DDMError(f"--replicas must be >= 1 and --gpus >= 0, got {replicas} and {gpus}")
    if grace_seconds < SERVE_GRACE_S:
        raise DDMError(f"grace_seconds={grace_seconds} must cover the server's graceful stop ({SERVE_GRACE_S} s)")
    name = f"ddm-serve-{run.run_id[:12]}"
    labels = {"app": "ddm-serve", "ddm/run": run.run_id[:12]}
    command = ["ddm", "serve", "--run-dir", str(run_dir), "--host", "0.0.0.0", "--port", str(port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue),
               *(["--key", key] if key else []), *[arg for o in overrides for arg in ("--set", o)]]
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 2}
    container = {
        "name": "serve",
        "image": image,
        "command": command,
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {**probe, "initialDelaySeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6},
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"terminationGracePeriodSeconds": grace_seconds, "containers": [container]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
    }
    return [deployment, service]


def write_k8s_serve(run_dir: str | Path, overrides: list[str], *, image: str, **options) -> Path:
    """Writes (does not apply) `RUN_DIR/k8s/serve.yaml`, the two documents of `serve_manifest(**options)`."""
    run_dir = Path(run_dir).absolute()
    run = Run.open(run_dir, overrides)
    documents = serve_manifest(run, run_dir, overrides, image=image, **options)
    path = run_dir / "k8s" / "serve.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# ddm serve of run {run.run_id[:16]}: kubectl apply -f {path}\n"
    path.write_text(header + yaml.safe_dump_all(documents, sort_keys=False))
    return path
