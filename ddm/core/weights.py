"""A finished model's `{"ema": params, "rest": buffers}` tree as one flat `safetensors` file (`ddm export`).

Tensor names are the tree's key paths joined by dots (`ema.blocks.0.attn.qkv.kernel`), so the file reads in
any safetensors loader (`safetensors.numpy.load_file`, PyTorch, the Hugging Face Hub viewer). Reading it back
rebuilds the tree the model expects (names, shapes and dtypes must match exactly), so its `pytree_sha256` is
the same pin as the orbax checkpoint it was exported from: `ddm.train.checkpoint.load_pinned` checks both kinds
the same way.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ddm.core.errors import DDMError

FORMAT = "ddm-weights/v1"


def tensor_name(path: tuple) -> str:
    """A key path as a dotted tensor name; nnx's `.value` leaf attribute is left out."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def flatten(tree) -> dict[str, np.ndarray]:
    """name -> contiguous numpy array of every leaf; DDMError if two leaves share a name."""
    flat: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = tensor_name(path)
        if name in flat:
            raise DDMError(f"two parameters share the tensor name {name!r}")
        flat[name] = np.ascontiguousarray(np.asarray(leaf))
    return flat


def save_safetensors(path: str | Path, tree, metadata: dict[str, str] | None = None) -> Path:
    """Writes the host tree (numpy or fully addressable jax leaves) as one safetensors file; returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flatten(tree), str(path), metadata={"format": FORMAT, **(metadata or {})})
    return path


def load_safetensors(path: str | Path, abstract_tree):
    """The tree saved at `path`, in the structure and placement of `abstract_tree` (ShapeDtypeStructs with
    shardings, as `ddm.train.checkpoint.abstract_final` builds). A file that does not parse or whose names,
    shapes or dtypes differ from the model's is a DDMError naming the first difference."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise DDMError(f"no weights at {path}")
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DDMError(f"weights file {path} is corrupted: {str(err).splitlines()[0][:200]}") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    names = [tensor_name(p) for p, _ in leaves]
    missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has an unknown tensor {extra[0]!r}"
        raise DDMError(f"weights file {path} does not fit this model: it {what}")
    arrays = []
    for name, (_, spec) in zip(names, leaves):
        array = flat[name]
        if array.shape != tuple(spec.shape) or array.dtype != spec.dtype:
            raise DDMError(f"weights file {path} does not fit this model: {name} is {array.dtype}{list(array.shape)}, "
                           f"expected {np.dtype(spec.dtype)}{list(spec.shape)}")
        arrays.append(jax.device_put(array, spec.sharding) if getattr(spec, "sharding", None) else array)
    return jax.tree_util.tree_unflatten(treedef, arrays)
