r"""``python -m adapters_reft convert --to stock|compact SRC DST``: change the layout of a saved ReFT adapter.

A folder written by ``model.save_adapter`` holds ``adapter_config.json`` and the weights in
``pytorch_adapter.bin`` (default) or ``adapter.safetensors`` (``use_safetensors=True``), next to optional
head files. For every orthogonal projection (``…parametrizations.weight.0.base`` with its
``…parametrizations.weight.original`` sibling) the weight it stands for, :math:`W = B \cdot \phi(X)`, is
computed in float64 without the base model and stored again in the other layout with the original at the
identity point, so a model that loads the result computes the same :math:`W`:

* ``compact``: :math:`B` as ``r`` Householder reflectors and signs in one ``n × r`` tensor (what the patched
  library saves; the same values its load hook computes from a stock checkpoint);
* ``stock``: torch's dense ``n × n`` base, the Q factor of ``[Wᵀ, N]`` with ``N`` standard normal drawn from
  ``--seed`` (what ``torch.nn.utils.parametrizations.orthogonal`` does), loadable by stock adapters.

Every tensor keeps its dtype; all other tensors and files are copied unchanged. The orthogonal map is
``householder``, the one torch and adapters use for ReFT's non-square ``r × n`` projections; a square
projection (``r == n``) has the same ``n × n`` base in both layouts and is copied as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .orthogonal import _compact_base, _identity_point, _orthonormalize, _tall, _weight

__all__ = [
    "CONFIG_NAME",
    "LAYOUTS",
    "WEIGHT_FILES",
    "ConversionError",
    "ConversionReport",
    "add_arguments",
    "convert_adapter",
    "convert_state_dict",
    "run",
]

# adapters.utils.WEIGHTS_NAME / SAFE_WEIGHTS_NAME / CONFIG_NAME (the same in adapters 1.0 to 1.3)
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
WEIGHT_FILES = (WEIGHTS_NAME, SAFE_WEIGHTS_NAME)
CONFIG_NAME = "adapter_config.json"
LAYOUTS = ("stock", "compact")
ORTHOGONAL_MAP = "householder"
_BASE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?parametrizations\.[^.]+\.)0\.base$")
_PROGRESS_FROM = 16  # show a progress bar from this many projections on


class ConversionError(Exception):
    """The folder cannot be converted; the message says why."""


@dataclass
class FileReport:
    """What happened to one weights file."""

    name: str
    converted: int = 0
    already: int = 0
    square: int = 0
    tensor_bytes_before: int = 0
    tensor_bytes_after: int = 0
    file_bytes_before: int = 0
    file_bytes_after: int = 0


@dataclass
class ConversionReport:
    """Summary of :func:`convert_adapter`."""

    layout: str
    files: list[FileReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def converted(self) -> int:
        return sum(f.converted for f in self.files)

    @property
    def already(self) -> int:
        return sum(f.already for f in self.files)

    @property
    def square(self) -> int:
        return sum(f.square for f in self.files)


def _layout(base: Tensor, original: Tensor, key: str) -> str:
    """``dense``, ``compact`` or ``square`` (both layouts alike) for a base and its original."""
    if original.ndim < 2 or base.ndim != original.ndim or base.shape[:-2] != original.shape[:-2]:
        raise ConversionError(
            f"{key}: base {tuple(base.shape)} does not fit original {tuple(original.shape)}; not an orthogonal "
            "parametrization saved by torch or adapters_reft"
        )
    n, k = max(original.shape[-2:]), min(original.shape[-2:])
    if base.shape[-2:] == (n, n):
        return "square" if n == k else "dense"
    if base.shape[-2:] == (n, k):
        return "compact"
    raise ConversionError(
        f"{key}: base {tuple(base.shape)} is neither dense ({n}, {n}) nor compact ({n}, {k}) for original "
        f"{tuple(original.shape)}"
    )


def _projection_pairs(state: dict[str, Tensor]) -> list[tuple[str, str]]:
    pairs = []
    for key in state:
        match = _BASE_KEY.match(key)
        if match is None:
            continue
        original_key = f"{match['prefix']}original"
        if original_key not in state:
            raise ConversionError(f"{key} has no {original_key} next to it; the checkpoint is incomplete")
        pairs.append((key, original_key))
    return pairs


@torch.no_grad()
def _to_compact(base: Tensor, original: Tensor) -> tuple[Tensor, Tensor]:
    # The same computation as adapters_reft.orthogonal's load hook, so loading either file gives equal tensors.
    weight = _weight(original.to(torch.float64), base, ORTHOGONAL_MAP, torch.float64)
    tall, _ = _tall(weight)
    return _compact_base(tall).to(base.dtype).contiguous(), _identity_point(original).contiguous()


@torch.no_grad()
def _to_stock(base: Tensor, original: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    weight = _weight(original.to(torch.float64), base, ORTHOGONAL_MAP, torch.float64)
    tall, _ = _tall(weight)
    n, k = tall.size(-2), tall.size(-1)
    filler = torch.randn(*tall.shape[:-2], n, n - k, generator=generator, dtype=torch.float64)
    # Q of [Wᵀ, N] with a non-negative R diagonal: its first k columns are Wᵀ (orthonormal) itself.
    dense = _orthonormalize(torch.cat([tall, filler], dim=-1))
    return dense.to(base.dtype).contiguous(), _identity_point(original).contiguous()


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def convert_state_dict(
    state: dict[str, Tensor], to: str, *, seed: int = 0, name: str = ""
) -> tuple[dict[str, Tensor], FileReport]:
    """A copy of ``state`` with every orthogonal ReFT projection in layout ``to`` (``stock`` or ``compact``).

    ``seed`` seeds the normal completion of dense bases; ``name`` labels the progress bar and the report.
    Other entries are the same tensor objects. Raises :class:`ConversionError` when ``state`` holds no
    orthogonal projection or a malformed one.
    """
    if to not in LAYOUTS:
        raise ValueError(f"layout has to be one of {', '.join(LAYOUTS)}; got {to!r}")
    pairs = _projection_pairs(state)
    if not pairs:
        raise ConversionError(
            "no orthogonal ReFT projection (…parametrizations.weight.0.base with …parametrizations.weight.original) "
            "found; NoReFT/DiReFT and non-ReFT adapters have no trivialization base and need no conversion"
        )
    report = FileReport(name=name)
    layouts = [_layout(state[b], state[o], b) for b, o in pairs]
    source = "dense" if to == "compact" else "compact"
    todo = [(b, o) for (b, o), layout in zip(pairs, layouts, strict=True) if layout == source]
    report.square = layouts.count("square")
    report.already = len(pairs) - len(todo) - report.square
    report.tensor_bytes_before = _nbytes(state[k] for pair in pairs for k in pair)
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for base_key, original_key in _progress(todo, name):
        base, original = state[base_key], state[original_key]
        if to == "compact":
            out[base_key], out[original_key] = _to_compact(base, original)
        else:
            out[base_key], out[original_key] = _to_stock(base, original, generator)
    report.converted = len(todo)
    report.tensor_bytes_after = _nbytes(out[k] for pair in pairs for k in pair)
    return out, report


def _progress(items: list[tuple[str, str]], desc: str | None) -> Iterable[tuple[str, str]]:
    if len(items) < _PROGRESS_FROM:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc or "converting", unit="projection", file=sys.stderr, leave=False)


# -- files ---------------------------------------------------------------------------------------------------
def _load(path: Path) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    try:
        if path.name == SAFE_WEIGHTS_NAME:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
            return load_file(str(path), device="cpu"), metadata
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as exc:  # unreadable, truncated, pickled objects ...
        raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _save(state: dict[str, Tensor], metadata: dict[str, str] | None, path: Path) -> None:
    """Write atomically: a temporary file next to ``path``, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: keep the usual umask permissions
    try:
        if path.name == SAFE_WEIGHTS_NAME:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_folders(src: Path, dst: Path, force: bool) -> list[Path]:
    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a folder (expected one written by model.save_adapter)")
    if not (src / CONFIG_NAME).is_file():
        raise ConversionError(f"SRC {src} has no {CONFIG_NAME}; is it a folder written by model.save_adapter?")
    weights = [src / name for name in WEIGHT_FILES if (src / name).is_file()]
    if not weights:
        raise ConversionError(f"SRC {src} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    if dst.resolve() == src.resolve():
        raise ConversionError("DST is SRC; write the converted adapter to another folder")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"DST {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"DST {dst} exists and is not empty; pass --force to overwrite the files in it")
    return weights


def convert_adapter(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, *, seed: int = 0, force: bool = False
) -> ConversionReport:
    """Convert the adapter folder ``src`` to layout ``to`` in ``dst`` (see the module docstring).

    Everything is read and converted before anything is written. With ``force`` an existing ``dst`` is
    written into: files of the same name are replaced, and adapter weight files that ``src`` lacks are removed
    (adapters would otherwise load those stale weights).
    """
    if to not in LAYOUTS:
        raise ValueError(f"layout has to be one of {', '.join(LAYOUTS)}; got {to!r}")
    src, dst = Path(src), Path(dst)
    weight_paths = _check_folders(src, dst, force)
    report = ConversionReport(layout=to)
    converted: dict[str, tuple[dict[str, Tensor], dict[str, str] | None]] = {}
    for path in weight_paths:
        state, metadata = _load(path)
        new_state, file_report = convert_state_dict(state, to, seed=seed, name=path.name)
        file_report.file_bytes_before = path.stat().st_size
        report.files.append(file_report)
        converted[path.name] = (new_state, metadata)

    dst.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
        if name not in converted and (dst / name).exists():
            (dst / name).unlink()
            report.removed.append(name)
    for entry in sorted(src.iterdir()):
        if entry.name in converted:
            continue
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target)
        report.copied.append(entry.name)
    for file_report in report.files:
        path = dst / file_report.name
        if file_report.converted:
            _save(*converted[file_report.name], path)
        else:  # nothing to change: keep the file byte for byte
            shutil.copy2(src / file_report.name, path)
        file_report.file_bytes_after = path.stat().st_size
    return report


# -- command line --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        required=True,
        choices=LAYOUTS,
        help="stock: torch's dense n×n base (loads into stock adapters); compact: O(n·r) reflectors (patched)",
    )
    parser.add_argument("src", metavar="SRC", help="adapter folder written by model.save_adapter")
    parser.add_argument("dst", metavar="DST", help="folder to write the converted adapter to (created)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the normal completion of the dense base (--to stock; default 0)"
    )
    parser.add_argument("--force", action="store_true", help="write into DST even if it is not empty")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _summary(report: ConversionReport, src: str, dst: str) -> str:
    lines = []
    total = report.converted + report.already + report.square
    if report.converted == 0:
        lines.append(
            f"{src} is already in the {report.layout} layout ({total} orthogonal projection(s)); "
            f"copied it unchanged to {dst}"
        )
    else:
        extra = []
        if report.already:
            extra.append(f"{report.already} already {report.layout}")
        if report.square:
            extra.append(f"{report.square} square (same in both layouts)")
        lines.append(
            f"converted {report.converted} orthogonal projection(s) to the {report.layout} layout"
            + (f" ({', '.join(extra)})" if extra else "")
        )
    for f in report.files:
        lines.append(
            f"  {f.name}: projection tensors {_size(f.tensor_bytes_before)} -> {_size(f.tensor_bytes_after)}, "
            f"file {_size(f.file_bytes_before)} -> {_size(f.file_bytes_after)}"
        )
    if report.copied:
        lines.append(f"  copied unchanged: {', '.join(report.copied)}")
    if report.removed:
        lines.append(f"  removed stale weights from DST: {', '.join(report.removed)}")
    lines.append(f"wrote {dst}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = convert_adapter(args.src, args.dst, args.to, seed=args.seed, force=args.force)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(_summary(report, args.src, args.dst))
    return 0
