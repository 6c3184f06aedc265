"""ddm: decentralized diffusion models in JAX (the package map is in docs/design.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddm")
except PackageNotFoundError:  # the sources on sys.path without an install
    __version__ = "0+unknown"
