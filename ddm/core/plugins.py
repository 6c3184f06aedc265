"""A user's function named in a setting as "module:function" (a VAE decoder, a text encoder, a feature
extractor): imported only when it is used, from sys.path, never downloaded."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ddm.core.errors import DDMError


def import_function(spec: str, setting: str) -> Callable:
    """The callable `spec` = "module:function" (the function part may be dotted, "module:Class.method") names.
    DDMError (one line, naming `setting`) when spec is malformed, the module does not import, the attribute is
    missing, or it is not callable."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise DDMError(f"{setting} must look like module:function, got {spec!r}")
    try:
        fn = importlib.import_module(module_name)
    except ImportError as err:
        raise DDMError(f"{setting}={spec}: cannot import {module_name!r} ({err})") from None
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise DDMError(f"{setting}={spec}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise DDMError(f"{setting}={spec}: {attr!r} is not callable")
    return fn
