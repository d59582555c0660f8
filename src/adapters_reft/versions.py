"""Which adapters releases the patch supports, and a clear refusal for the others."""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

__all__ = ["SUPPORTED_ADAPTERS", "UnsupportedVersionError", "adapters_version", "check_adapters_version"]

SUPPORTED_ADAPTERS = ">=1.0,<1.4"
_LOWEST, _BEYOND = Version("1.0.0"), Version("1.4.0")


class UnsupportedVersionError(RuntimeError):
    """The installed adapters release is one the patch was not written and tested for."""


def adapters_version() -> str:
    """The installed adapters version (its distribution metadata, or ``adapters.__version__``)."""
    try:
        return metadata.version("adapters")
    except metadata.PackageNotFoundError:
        import adapters

        return adapters.__version__


def check_adapters_version(version: str | None = None) -> str:
    """Return the installed adapters version, or raise :class:`UnsupportedVersionError` naming the range."""
    version = version or adapters_version()
    release = Version(Version(version).base_version)
    if release < _LOWEST:
        raise UnsupportedVersionError(
            f"adapters {version} is not supported: ReFT needs adapters>=1.0 (supported: adapters{SUPPORTED_ADAPTERS})"
        )
    if release >= _BEYOND:
        raise UnsupportedVersionError(
            f"adapters {version} is newer than this adapters-reft was tested with (supported: "
            f"adapters{SUPPORTED_ADAPTERS}); upgrade adapters-reft, or pin adapters<1.4"
        )
    return version
