"""Source generation for ``export-upstream``: this package's fix rewritten as adapters' own code.

Nothing here is a hand-kept copy: every function, class and method body that lands in the adapters tree is
read from this package's modules (``inspect.getsource``) at export time and rewritten:

* :func:`orthogonal_module_source` merges :mod:`adapters_reft.compat` and :mod:`adapters_reft.orthogonal` into
  one module (``src/adapters/methods/orthogonal.py`` upstream): ``from . import compat`` and every ``compat.X``
  reference are folded into the merged namespace, mentions of ``adapters_reft`` are renamed, and the result is
  refused if it still mentions ``adapters_reft``, does not parse as Python 3.9 or has undefined names.
* :func:`patch_reft_source` edits a release's ``src/adapters/methods/reft.py`` in place: the orthogonal
  parametrization of ``ReftUnit.__init__`` is swapped for ours and the half-precision warning/upcast dropped,
  ``ReftUnit.forward`` gets the body of :meth:`adapters_reft.reft.ReftUnit.intervene` (the release's own
  ``def forward(self, x):`` line stays), and ``_gather_adapted_states`` creates its empty slices in
  ``hidden_states.dtype``. Each edit checks that the target looks as expected and raises :class:`ExportError`
  with the reason otherwise, so a release whose ``reft.py`` changed fails loudly instead of being mis-patched.

The environment variable stays ``ADAPTERS_REFT_UPCAST``: it already reads as an adapters-style name
(``ADAPTERS_`` prefix, ReFT method), and keeping it means the same switch works with the fork and upstream.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import io
import itertools
import re
import textwrap
import tokenize
from dataclasses import dataclass
from types import ModuleType

__all__ = [
    "ENV_VAR_UPSTREAM",
    "ExportError",
    "module_parts",
    "orthogonal_module_source",
    "patch_reft_source",
    "undefined_names",
]

ENV_VAR_UPSTREAM = "ADAPTERS_REFT_UPCAST"

# Mentions of this package in the merged module's text (docstrings, messages), in the order applied.
MENTIONS: tuple[tuple[str, str], ...] = (
    (":mod:`adapters_reft.compat`", ":func:`native_support`"),
    ("adapters_reft.orthogonal", "adapters.methods.orthogonal"),
    ("adapters_reft.compat", "adapters.methods.orthogonal"),
    ("Whether the patch computes", "Whether this code computes"),
)

# How a module-level name our ReftUnit code uses is provided in adapters' reft.py: an import line to add when
# the release lacks it, or a rewrite of the name.
IMPORT_PROVIDERS = {
    "torch": "import torch",
    "nn": "import torch.nn as nn",
    "F": "import torch.nn.functional as F",
}
NAME_REWRITES = {"Tensor": "torch.Tensor"}

ORTHOGONAL_IMPORT = "from .orthogonal import orthogonal as dtype_safe_orthogonal"
STOCK_ORTHOGONAL_CALLS = ("nn.utils.parametrizations.orthogonal", "torch.nn.utils.parametrizations.orthogonal")
ZEROS_PATTERN = re.compile(r"torch\.zeros\(\s*bsz\s*,\s*0\s*,\s*ddim\s*,\s*device\s*=\s*hidden_states\.device\s*\)")
ZEROS_REPLACEMENT = "torch.zeros(bsz, 0, ddim, device=hidden_states.device, dtype=hidden_states.dtype)"


class ExportError(RuntimeError):
    """The export cannot be done as asked (the target looks different from what the edit expects, ...)."""


# -- small source utilities --------------------------------------------------------------------------------
def _rename_tokens(source: str, *, drop_prefix: str | None = None, rewrites: dict[str, str] | None = None) -> str:
    """Rewrite names at token level (comments and strings untouched).

    ``drop_prefix="compat"`` turns ``compat.X`` into ``X``; ``rewrites`` maps a bare name (not an attribute)
    to replacement text.
    """
    rewrites = rewrites or {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines(keepends=True)
    edits: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        previous = tokens[i - 1] if i else None
        if previous is not None and previous.type == tokenize.OP and previous.string == ".":
            continue  # an attribute, not a name
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.string == drop_prefix and following is not None and following.string == ".":
            edits.append((tok.start, following.end, ""))
        elif tok.string in rewrites:
            edits.append((tok.start, tok.end, rewrites[tok.string]))
    for (srow, scol), (erow, ecol), text in reversed(edits):
        if srow != erow:
            raise ExportError(f"cannot rewrite a name split over lines at line {srow}")
        line = lines[srow - 1]
        lines[srow - 1] = line[:scol] + text + line[ecol:]
    return "".join(lines)


def _line_span(lines: list[str], first: int, last: int) -> str:
    """Lines ``first``..``last`` (1-based, inclusive)."""
    return "".join(lines[first - 1 : last])


def _reindent(block: str, indent: str) -> str:
    return textwrap.indent(textwrap.dedent(block), indent, lambda line: bool(line.strip()))


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """Names a list of module-level statements binds (defs, classes, assignments, imports)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            names |= _bound_names([n for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node])
    return names


def undefined_names(source: str) -> set[str]:
    """Names read somewhere in ``source`` that nothing in the module, no enclosing scope and no builtin binds.

    Conservative (one namespace per function, comprehension variables and parameters all count as bound);
    enough to catch a name our code uses that the merged or edited upstream module does not provide.
    """
    tree = ast.parse(source)
    bound = _bound_names(tree.body) | set(dir(builtins)) | {"__file__", "__name__", "__doc__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - bound


# -- the merged orthogonal module --------------------------------------------------------------------------
@dataclass
class ModuleParts:
    """A module split into docstring, imports, ``__all__`` and everything else (comments kept)."""

    name: str
    docstring: str
    imports: list[ast.stmt]
    exported: list[str]
    body: str
    tree: ast.Module

    @property
    def top_level_names(self) -> set[str]:
        kept = [n for n in self.tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
        return _bound_names(kept) - {"__all__"}


def _module(module: ModuleType | str) -> ModuleType:
    """The module itself: ``import adapters_reft.orthogonal as m`` yields the *function* ``orthogonal``, which
    ``adapters_reft/__init__.py`` binds over the submodule attribute, so names are resolved via importlib."""
    if isinstance(module, str):
        return importlib.import_module(module)
    if not isinstance(module, ModuleType):
        raise TypeError(f"expected a module or a module name, got {module!r}")
    return module


def module_parts(module: ModuleType | str) -> ModuleParts:
    module = _module(module)
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    docstring = ast.get_docstring(tree, clean=True) or ""
    imports: list[ast.stmt] = []
    exported: list[str] = []
    chunks: list[str] = []
    previous_end = 0
    for index, node in enumerate(tree.body):
        is_docstring = (
            index == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)
        )
        is_all = isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == "__all__"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            pass
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif is_all:
            exported = list(ast.literal_eval(node.value))
        elif not is_docstring:
            chunks.append(_line_span(lines, previous_end + 1, node.end_lineno))
        previous_end = node.end_lineno
    body = "".join(chunks).strip("\n") + "\n"
    return ModuleParts(module.__name__, docstring, imports, exported, body, tree)


def _rewrite_mentions(text: str) -> str:
    for old, new in MENTIONS:
        text = text.replace(old, new)
    return text


def orthogonal_module_source(
    compat: ModuleType | str = "adapters_reft.compat", orthogonal: ModuleType | str = "adapters_reft.orthogonal"
) -> str:
    """``src/adapters/methods/orthogonal.py``: our probe and parametrization as one module (not black-formatted).

    Raises :class:`ExportError` when our modules use a construct this merge does not know how to fold in
    (another relative import, a name defined in both, ``compat`` used other than as ``compat.X``).
    """
    probe, param = module_parts(compat), module_parts(orthogonal)
    for parts in (probe, param):
        for node in parts.imports:
            if isinstance(node, ast.ImportFrom) and node.level:
                is_compat = parts is param and node.module is None and [a.name for a in node.names] == ["compat"]
                if not is_compat or node.names[0].asname:
                    raise ExportError(
                        f"{parts.name} has the relative import {ast.unparse(node)!r}; the upstream export only "
                        f"knows how to fold 'from . import compat' into adapters/methods/orthogonal.py"
                    )
    clashes = probe.top_level_names & param.top_level_names
    if clashes:
        raise ExportError(
            f"{probe.name} and {param.name} both define {sorted(clashes)}; they cannot be merged into one "
            "upstream module as they are"
        )
    # Every use of ``compat`` in orthogonal.py has to be an attribute of it that compat.py defines.
    folded: set[int] = set()
    for node in ast.walk(param.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "compat":
            if node.attr not in probe.top_level_names:
                raise ExportError(f"{param.name} uses compat.{node.attr}, which {probe.name} does not define")
            folded.add(id(node.value))
    for node in ast.walk(param.tree):
        if isinstance(node, ast.Name) and node.id == "compat" and id(node) not in folded:
            raise ExportError(f"{param.name} uses 'compat' other than as 'compat.NAME' (line {node.lineno})")
    param_body = _rename_tokens(param.body, drop_prefix="compat")

    imports: list[str] = []
    for node in [*probe.imports, *param.imports]:
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        line = ast.unparse(node)
        if line not in imports:
            imports.append(line)
    exported = sorted(set(probe.exported) | set(param.exported))
    docstring = f"{param.docstring}\n\n{probe.docstring}".strip()
    if '"""' in docstring or docstring.endswith("\\"):
        raise ExportError('our module docstrings contain \'"""\' or end in a backslash; cannot merge them')
    prefix = "r" if "\\" in docstring else ""
    all_lines = "".join(f'    "{name}",\n' for name in exported)
    text = (
        f'{prefix}"""{docstring}\n"""\n\n'
        "from __future__ import annotations\n\n" + "\n".join(imports) + f"\n\n__all__ = [\n{all_lines}]\n\n\n"
        f"{_section('native kernel support and the cast policy')}\n"
        f"{probe.body}\n\n"
        f"{_section('the parametrization')}\n"
        f"{param_body}"
    )
    text = _rewrite_mentions(text)
    _check_generated(text, "adapters/methods/orthogonal.py")
    return text


def _section(title: str, width: int = 119) -> str:
    head = f"# -- {title} "
    return head + "-" * (width - len(head))


def _check_generated(text: str, where: str) -> None:
    if "adapters_reft" in text:
        lines = [i + 1 for i, line in enumerate(text.splitlines()) if "adapters_reft" in line]
        raise ExportError(
            f"the generated {where} still mentions adapters_reft (lines {lines}); add a rule to "
            "adapters_reft.upstream_codegen.MENTIONS"
        )
    try:
        ast.parse(text, feature_version=(3, 9))
    except SyntaxError as exc:
        raise ExportError(f"the generated {where} is not valid Python 3.9 (adapters' minimum): {exc}") from exc
    missing = undefined_names(text)
    if missing:
        raise ExportError(f"the generated {where} uses names nothing defines: {sorted(missing)}")


# -- the edited reft.py ----------------------------------------------------------------------------------------
@dataclass
class _Edit:
    start: int  # character offsets into the original text
    end: int
    text: str


class _Text:
    """The target file with (line, utf-8 byte column) → character offset conversion."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, byte_col: int = 0) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:byte_col].decode("utf-8"))

    def line_start(self, lineno: int) -> int:
        return self.starts[lineno - 1]

    def line_end(self, lineno: int) -> int:
        """Offset just past the newline of line ``lineno``."""
        return self.starts[lineno]


def _find(body: list[ast.stmt], kind: type, name: str, where: str) -> ast.AST:
    found = [n for n in body if isinstance(n, kind) and getattr(n, "name", None) == name]
    if len(found) != 1:
        raise ExportError(f"expected exactly one {name} in {where}, found {len(found)}: reft.py looks different")
    return found[0]


def _method_source(function: object) -> tuple[ast.FunctionDef, list[str]]:
    source = textwrap.dedent(inspect.getsource(function))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise ExportError(f"{function!r} is not a plain function")
    return node, source.splitlines(keepends=True)


def _body_source(function: object) -> str:
    """The body of one of our functions (comments kept, a docstring dropped), dedented."""
    node, lines = _method_source(function)
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return textwrap.dedent(_line_span(lines, body[0].lineno, node.end_lineno))


def _function_source(function: object) -> str:
    node, lines = _method_source(function)
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return _line_span(lines, first, node.end_lineno)


def _is_half_precision_upcast(node: ast.stmt) -> bool:
    """``if dtype in [torch.float16, torch.bfloat16]: logger.warning(...); projection = projection.to(...)``."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = ast.unparse(node.test)
    return "float16" in test and "bfloat16" in test and "float32" in ast.unparse(node)


def patch_reft_source(text: str, ours: ModuleType | str = "adapters_reft.reft") -> str:
    """``text`` (a release's ``adapters/methods/reft.py``) with the fix written in (not yet formatted).

    ``ours`` is :mod:`adapters_reft.reft`, where ``ReftUnit.forward``, the helpers it uses, and the layout
    of the fix are read from.
    """
    ours = _module(ours)
    if "dtype_safe_orthogonal" in text or re.search(r"from \.orthogonal import", text):
        raise ExportError("reft.py already imports from .orthogonal: the tree looks patched already")
    tree = ast.parse(text)
    target = _Text(text)
    edits: list[_Edit] = []
    module_names = _bound_names(tree.body)

    unit = _find(tree.body, ast.ClassDef, "ReftUnit", "reft.py")
    init = _find(unit.body, ast.FunctionDef, "__init__", "ReftUnit")
    forward = _find(unit.body, ast.FunctionDef, "forward", "ReftUnit")
    reft_module = _find(tree.body, ast.ClassDef, "ReftModule", "reft.py")
    gather = _find(reft_module.body, ast.FunctionDef, "_gather_adapted_states", "ReftModule")
    for name in ("_compute_dtype",):
        if any(isinstance(n, ast.FunctionDef) and n.name == name for n in unit.body):
            raise ExportError(f"ReftUnit already has {name}: the tree looks patched already")

    # 1. ReftUnit.__init__: our parametrization instead of torch's.
    calls = [n for n in ast.walk(init) if isinstance(n, ast.Call) and ast.unparse(n.func) in STOCK_ORTHOGONAL_CALLS]
    if len(calls) != 1:
        raise ExportError(
            f"expected one call of {STOCK_ORTHOGONAL_CALLS[0]}(...) in ReftUnit.__init__, found {len(calls)}"
        )
    func = calls[0].func
    edits.append(
        _Edit(
            target.offset(func.lineno, func.col_offset),
            target.offset(func.end_lineno, func.end_col_offset),
            "dtype_safe_orthogonal",
        )
    )

    # 2. ReftUnit.__init__: drop the half-precision warning + fp32 upcast (adapters >= 1.1; 1.0 has none).
    upcasts = [n for n in ast.walk(init) if isinstance(n, ast.stmt) and _is_half_precision_upcast(n)]
    if len(upcasts) > 1:
        raise ExportError(
            f"expected at most one half-precision upcast block in ReftUnit.__init__, found {len(upcasts)}"
        )
    for block in upcasts:
        parents = [
            n
            for n in ast.walk(init)
            for f in ("body", "orelse")
            if block in getattr(n, f, []) and len(getattr(n, f)) > 1
        ]
        if not parents:
            raise ExportError("the half-precision upcast block is the only statement of its block; cannot drop it")
        first = block.lineno
        while first > 1 and target.lines[first - 2].strip().startswith("#"):
            if not re.search(r"half|precision", target.lines[first - 2], re.IGNORECASE):
                break
            first -= 1
        edits.append(_Edit(target.line_start(first), target.line_end(block.end_lineno), ""))

    # 3. ReftUnit.forward: our body under the release's own signature, plus the helpers it uses.
    stock_args = [a.arg for a in forward.args.args]
    # ``intervene`` is our forward without the eval-mode inference plan (adapters_reft.inference, not exported)
    our_forward, _ = _method_source(ours.ReftUnit.intervene)
    our_args = [a.arg for a in our_forward.args.args]
    if stock_args != our_args or forward.args.vararg or forward.args.kwarg or forward.args.kwonlyargs:
        raise ExportError(
            f"ReftUnit.forward takes ({', '.join(stock_args)}) in this release; the exported body expects "
            f"({', '.join(our_args)})"
        )
    body_nodes = forward.body
    if isinstance(body_nodes[0], ast.Expr) and isinstance(body_nodes[0].value, ast.Constant) and len(body_nodes) > 1:
        body_nodes = body_nodes[1:]  # keep upstream's docstring, if it ever gets one
    body_indent = re.match(r"\s*", target.lines[body_nodes[0].lineno - 1]).group(0)
    method_indent = re.match(r"\s*", target.lines[forward.lineno - 1]).group(0)
    class_indent = re.match(r"\s*", target.lines[unit.lineno - 1]).group(0)

    new_body = _body_source(ours.ReftUnit.intervene)
    forward_source = textwrap.dedent(_function_source(ours.ReftUnit.intervene))
    helper_methods = [m for m in ("_compute_dtype",) if re.search(rf"\bself\.{m}\b", new_body)]
    method_sources = []
    for name in helper_methods:
        method = getattr(ours.ReftUnit, name, None)
        if method is None:
            raise ExportError(f"adapters_reft.reft.ReftUnit.intervene calls self.{name}, which ReftUnit lacks")
        method_sources.append(textwrap.dedent(_function_source(method)))
    # Module-level functions of ours the new code calls (and those they call), copied next to ReftUnit.
    helper_functions: list[str] = []
    pending = [forward_source, *method_sources]
    needed: set[str] = set()
    while pending:
        for name in sorted(undefined_names(pending.pop())):
            if name in IMPORT_PROVIDERS or name in NAME_REWRITES:
                needed.add(name)
            elif name not in helper_functions and inspect.isfunction(getattr(ours, name, None)):
                helper_functions.append(name)
                pending.append(_function_source(getattr(ours, name)))
            elif name not in helper_functions:
                raise ExportError(
                    f"adapters_reft.reft.ReftUnit.intervene (or a helper) uses {name!r}; add how adapters' reft.py "
                    "provides it to adapters_reft.upstream_codegen.IMPORT_PROVIDERS or NAME_REWRITES"
                )
    function_sources = [_function_source(getattr(ours, name)) for name in helper_functions]
    clashes = set(helper_functions) & module_names
    if clashes:
        raise ExportError(f"reft.py already defines {sorted(clashes)}: the tree looks patched already")
    added_imports = [IMPORT_PROVIDERS[n] for n in sorted(needed & set(IMPORT_PROVIDERS)) if n not in module_names]

    def adapt(snippet: str) -> str:
        return _rename_tokens(snippet, rewrites=NAME_REWRITES)

    edits.append(
        _Edit(
            target.line_start(body_nodes[0].lineno),
            target.line_end(forward.end_lineno),
            _reindent(adapt(new_body), body_indent),
        )
    )
    forward_first = min([forward.lineno, *(d.lineno for d in forward.decorator_list)])
    if method_sources:
        inserted = "\n".join(_reindent(adapt(s), method_indent) for s in method_sources) + "\n"
        edits.append(_Edit(target.line_start(forward_first), target.line_start(forward_first), inserted))
    if function_sources:
        unit_first = min([unit.lineno, *(d.lineno for d in unit.decorator_list)])
        inserted = "\n\n".join(_reindent(adapt(s), class_indent) for s in function_sources) + "\n\n"
        edits.append(_Edit(target.line_start(unit_first), target.line_start(unit_first), inserted))

    # 4. ReftModule._gather_adapted_states: empty slices in the hidden states' dtype.
    gather_start, gather_end = target.line_start(gather.lineno), target.line_end(gather.end_lineno)
    gather_text = text[gather_start:gather_end]
    new_gather, count = ZEROS_PATTERN.subn(ZEROS_REPLACEMENT, gather_text)
    if count != 2:
        raise ExportError(
            "expected two 'torch.zeros(bsz, 0, ddim, device=hidden_states.device)' calls in "
            f"ReftModule._gather_adapted_states, found {count}: reft.py looks different"
        )
    edits.append(_Edit(gather_start, gather_end, new_gather))

    # 5. Imports (isort puts them in place afterwards).
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if not imports:
        raise ExportError("reft.py has no imports at module level: it looks different")
    last_import_line = max(n.end_lineno for n in imports if n.end_lineno < unit.lineno)
    new_imports = "".join(f"{line}\n" for line in [*added_imports, ORTHOGONAL_IMPORT])
    edits.append(_Edit(target.line_end(last_import_line), target.line_end(last_import_line), new_imports))

    result = _apply_edits(text, edits)
    _check_generated(result, "adapters/methods/reft.py")
    return result


def _apply_edits(text: str, edits: list[_Edit]) -> str:
    ordered = sorted(edits, key=lambda e: (e.start, e.end))
    for before, after in itertools.pairwise(ordered):
        if after.start < before.end:
            raise ExportError("internal error: overlapping edits of reft.py")
    for edit in reversed(ordered):
        text = text[: edit.start] + edit.text + text[edit.end :]
    return text
