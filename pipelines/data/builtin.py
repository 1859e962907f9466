"""The built-in corpus: English text that ships with every Python, so the quickstart needs no download.

Documents are the docstrings of the standard library (one document per module: its docstring then
each class and function docstring, read with ``ast`` — nothing is imported, so no module's import-time
side effects run) and the ``pydoc_data`` topic pages (one document per topic). Ids are stable:
``stdlib:<module>`` and ``pydoc:<topic>``. Order is sorted, so the corpus is the same on every run
of the same Python.
"""
from __future__ import annotations

import ast
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

SOURCE = "builtin"
# Test suites, IDLE's and tkinter's GUI help and vendored packages are not prose worth training on.
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "ensurepip", "turtledemo", "_vendor"}
MIN_DOC_CHARS = 200


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module, its classes and its functions, in source order."""
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        yield "", module_doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and not child.name.startswith("__"):
                    continue
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield name, doc
                if isinstance(child, ast.ClassDef):
                    yield from visit(child, name + ".")

    yield from visit(tree, "")


def _module_text(module: str, tree: ast.Module) -> str:
    sections = []
    for name, doc in _docstrings(tree):
        sections.append(doc if not name else f"{module}.{name}\n\n{doc}")
    return "\n\n".join(sections).strip()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's modules that hold corpus documents, in corpus order."""
    root = root or stdlib_root()
    return [path for path in sorted(root.rglob("*.py")) if not SKIPPED_PARTS.intersection(path.relative_to(root).parts)]


def parse_module(path: Path) -> ast.Module | None:
    """The module's syntax tree, or None for the few stdlib files that are deliberately invalid (test
    fixtures, bad encodings)."""
    try:
        source = path.read_bytes()
    except OSError:
        return None
    for attempt in range(5):
        try:
            return ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):
            return None
        except SystemError:
            # CPython 3.11 keeps ast.parse's recursion counter per interpreter, not per thread: another
            # thread parsing at the same time (Ray's driver threads can) trips "AST constructor recursion
            # depth mismatch". The same file parses correctly on retry.
            if attempt == 4:
                raise
            time.sleep(0.02 * (attempt + 1))  # let the other thread's parse finish
    return None


def iter_stdlib_documents(root: Path | None = None, paths: list[Path] | None = None) -> Iterator[dict]:
    """Documents of ``paths`` (default: all of :func:`stdlib_files`); parsing is most of the cost, so
    the data stage hands contiguous slices of the list to parallel tasks."""
    root = root or stdlib_root()
    for path in stdlib_files(root) if paths is None else paths:
        tree = parse_module(path)
        if tree is None:
            continue
        module = _module_name(root, path)
        text = _module_text(module, tree)
        if len(text) >= MIN_DOC_CHARS:
            yield {"id": f"stdlib:{module}", "text": text, "source": SOURCE,
                   "meta": {"kind": "docstrings", "module": module}}


def iter_pydoc_documents() -> Iterator[dict]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        text = topics[topic].strip()
        if len(text) >= MIN_DOC_CHARS:
            yield {"id": f"pydoc:{topic}", "text": text, "source": SOURCE,
                   "meta": {"kind": "pydoc_topic", "topic": topic}}


def iter_builtin_documents() -> Iterator[dict]:
    """Every document of the built-in corpus in the common record shape (id, text, source, meta)."""
    yield from iter_stdlib_documents()
    yield from iter_pydoc_documents()


def corpus_version() -> str:
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
