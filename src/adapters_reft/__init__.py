"""Dtype-safe ReFT for AdapterHub adapters: ``import adapters_reft; adapters_reft.patch()``."""

from __future__ import annotations

from . import compat
from .orthogonal import DtypeSafeOrthogonal, orthogonal
from .patch import convert_units, is_patched, patch, unpatch
from .reft import ReftUnit
from .versions import SUPPORTED_ADAPTERS, UnsupportedVersionError, adapters_version, check_adapters_version

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_ADAPTERS",
    "DtypeSafeOrthogonal",
    "ReftUnit",
    "UnsupportedVersionError",
    "__version__",
    "adapters_version",
    "check_adapters_version",
    "compat",
    "convert_units",
    "is_patched",
    "orthogonal",
    "patch",
    "unpatch",
]
