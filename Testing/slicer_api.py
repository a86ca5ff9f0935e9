"""Which 3D Slicer API the module's code uses, found by reading its syntax tree (no Slicer needed).

"Slicer API" is what the code reaches through the ``slicer``, ``qt``, ``ctk`` and ``vtk`` modules, the
methods it calls on MRML/VTK/Slicer objects (VTK-style ``CamelCase`` methods, wherever the object came
from), the widgets of its ``.ui`` panel (``self.ui.<widget>.<member>``) and what it takes from the
Slicer base classes it derives from (``self.<member>`` it never defines). :func:`used_api` names each
use; ``Testing/slicer_api_allowlist.py`` says where each name is defined in Slicer's source, and
:func:`missing_in_source` checks that against a Slicer git repository at any tag.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Iterable

SLICER_ROOTS = {"slicer", "qt", "ctk", "vtk"}
# Calls that return plain Python objects (str): what is done with their result is not Slicer API.
PLAIN_PYTHON_RESULTS = ("slicer.i18n.tr()", "slicer.i18n.translate()")


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b().c`` -> "<a's alias target>.b().c" when the chain starts at an aliased name, else None."""
    tokens: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            tokens.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            tokens.append("()")
            node = node.func
        elif isinstance(node, ast.Name) and node.id in aliases:
            tokens.append(aliases[node.id])
            return ".".join(reversed(tokens)).replace(".()", "()")
        else:
            return None


class _Scanner(ast.NodeVisitor):
    def __init__(self, label: str):
        self.label = label
        self.uses: dict[str, set[str]] = defaultdict(set)
        self.aliases: dict[str, str] = {}  # local name -> Slicer dotted path
        self.other_modules: set[str] = set()  # names bound to non-Slicer modules (sitk, np, ...)
        self.class_stack: list[tuple[ast.ClassDef, set[str]]] = []

    def use(self, name: str, node: ast.AST) -> None:
        self.uses[name].add(f"{self.label}:{getattr(node, 'lineno', 0)}")

    # imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            local = alias.asname or root
            if root in SLICER_ROOTS:
                self.aliases[local] = alias.name if alias.asname else root
                self.use(alias.name, node)
            else:
                self.other_modules.add(local)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] in SLICER_ROOTS:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
                self.use(f"{module}.{alias.name}", node)
        else:
            self.other_modules.update(alias.asname or alias.name for alias in node.names)

    # classes deriving from Slicer classes: what they take from the base without defining it

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [_dotted(base, self.aliases) for base in node.bases]
        slicer_bases = [base for base in bases if base]
        defined = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for item in ast.walk(node):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(item, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                    defined.add(target.attr)
        self.class_stack.append((node, defined if slicer_bases else None))
        self.generic_visit(node)
        self.class_stack.pop()

    # uses

    def visit_Assign(self, node: ast.Assign) -> None:
        chain = _dotted(node.value, self.aliases)
        # ``widgetRepresentation().self()`` is the module's own Python widget: not Slicer API beyond it
        if chain and not chain.endswith(".self()") and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            self.aliases[node.targets[0].id] = chain  # e.g. threeDWidget = slicer.app.layoutManager().threeDWidget(0)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._record_attribute(node)
        self.generic_visit(node)

    def _record_attribute(self, node: ast.Attribute) -> None:
        parent = getattr(node, "parent", None)
        outermost = not (isinstance(parent, ast.Attribute) or (isinstance(parent, ast.Call) and isinstance(getattr(parent, "parent", None), ast.Attribute) and parent.func is node))
        chain = _dotted(node, self.aliases)
        if chain and chain.startswith(PLAIN_PYTHON_RESULTS):
            return
        if chain:
            if outermost:
                # a method of an object a Slicer call returned: named by the method, as below
                self.use(f"*.{node.attr}" if "()" in chain and node.attr[:1].isupper() else chain, node)
            return
        value = node.value
        # <widget object>.ui.<widget>.<member>: the panel's .ui widgets
        if (isinstance(value, ast.Attribute) and isinstance(value.value, ast.Attribute)
                and isinstance(value.value.value, ast.Name) and value.value.attr == "ui"):
            self.use(f"ui.{value.attr}.{node.attr}", node)
            return
        # self.<member> a Slicer base class provides
        if isinstance(value, ast.Name) and value.id == "self" and self.class_stack:
            cls, defined = self.class_stack[-1]
            if defined is not None and node.attr not in defined and node.attr != "ui":
                self.use(f"{cls.name}.self.{node.attr}", node)
            return
        # VTK-style method of any object that is not a non-Slicer module (sitk.ReadImage is SimpleITK's)
        if isinstance(parent, ast.Call) and parent.func is node and node.attr[:1].isupper():
            root = value
            while isinstance(root, (ast.Attribute, ast.Call)):
                root = root.value if isinstance(root, ast.Attribute) else root.func
            if not (isinstance(root, ast.Name) and root.id in self.other_modules):
                self.use(f"*.{node.attr}", node)


def _with_parents(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def used_api(paths: Iterable[Path], root: Path) -> dict[str, set[str]]:
    """Slicer API name -> {"file:line", ...} over ``paths`` (labels relative to ``root``)."""
    uses: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        scanner = _Scanner(path.relative_to(root).as_posix())
        scanner.visit(_with_parents(ast.parse(path.read_text(encoding="utf-8"))))
        for name, places in scanner.uses.items():
            uses[name] |= places
    return dict(uses)


# ------------------------------------------------------------------------------ checking the source


def _declares(text: str, symbol: str, python: bool) -> bool:
    """True when ``symbol`` is declared in the text of a Python file (def, class, assignment, documented
    module attribute) or a C++ header (a method, a Qt property, an enum value, a VTK Get/Set/Boolean macro)."""
    escaped = re.escape(symbol)
    if python:
        patterns = [rf"^\s*(def|class)\s+{escaped}\b", rf"^\s*(self\.)?{escaped}\s*=", rf"py:attribute::\s+{escaped}\b"]
    else:
        patterns = [rf"\b{escaped}\s*\(", rf"Q_PROPERTY\([^)]*\b{escaped}\b", rf"^\s*{escaped}\s*(=|,)"]
        for prefix in ("Get", "Set"):
            if symbol.startswith(prefix) and len(symbol) > len(prefix):
                patterns.append(rf"vtk{prefix}\w*Macro\(\s*{re.escape(symbol[len(prefix):])}\s*[,)]")
    return any(re.search(pattern, text, re.M) for pattern in patterns)


def missing_in_source(git_dir: str | Path, ref: str, checks: Iterable[tuple[str, str]]) -> list[str]:
    """Of ``(path in Slicer's repository, symbol)`` pairs, those whose file is missing at ``ref`` or does
    not declare the symbol (an empty symbol only checks that the file exists)."""
    missing = []
    cache: dict[str, str | None] = {}
    for path, symbol in checks:
        if path not in cache:
            shown = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{ref}:{path}"], capture_output=True, text=True)
            cache[path] = shown.stdout if shown.returncode == 0 else None
        text = cache[path]
        if text is None:
            missing.append(f"{path} (no such file)")
        elif symbol and not _declares(text, symbol, path.endswith(".py")):
            missing.append(f"{path}: {symbol}")
    return missing
