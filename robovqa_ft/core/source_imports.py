"""What a script imports, read from its source with `ast` (nothing is imported), and what
the project pins: for the checks that an environment holds what a script needs, the rules'
envs/*.yaml (tests/data/test_envs.py) and the GPU slot's machine (bench/gpu_env.py),
and for the code an evaluation journal was written by (`first_party_files`).
Imports are mapped to distributions through the running environment's metadata. Free of
torch and TensorFlow.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]  # the repository: paths are named from it


def exact_pin(line: str, where: str) -> tuple[str, str]:
    """(normalized name, version) of a `name==version` requirement of `where`; anything
    else is an error."""
    requirement = Requirement(line)
    specs = list(requirement.specifier)
    if len(specs) != 1 or specs[0].operator != "==":
        raise ValueError(f"{where}: {line!r} is not an exact `name==version` pin")
    return canonicalize_name(requirement.name), specs[0].version


def project_pins() -> dict[str, str]:
    """{normalized name: version} of pyproject.toml's dependencies, each an exact pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(exact_pin(line, "pyproject.toml") for line in project["dependencies"])


@dataclass(frozen=True)
class Import:
    module: str  # as the import statement names it: `google.protobuf.message`
    target: str  # the longest name it may mean: `from a import b` may import module a.b
    importer: str  # the importing file, relative to the repository


def module_file(module: str) -> Path | None:
    """The source file of a module of the repository (the package's), or None."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, nested: bool = True, root: Path = ROOT) -> Iterator[Import]:
    """Every import a file makes at run time: at module level (under `if` and `try` too)
    and, with `nested`, inside functions and classes (the file named from `root`)."""
    importer = str(path.relative_to(root))
    package = importer.removesuffix(".py").replace("/", ".").rpartition(".")[0]
    if path.name == "__init__.py":
        package = importer.removesuffix("/__init__.py").replace("/", ".")
    pending: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending += node.orelse  # the `if TYPE_CHECKING:` body never runs
            continue
        if isinstance(node, ast.Import):
            yield from (Import(alias.name, alias.name, importer) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                parent = package.rsplit(".", node.level - 1)[0]
                module = ".".join(filter(None, [parent, node.module]))
            for alias in node.names:
                target = module if alias.name == "*" else f"{module}.{alias.name}"
                yield Import(module, target, importer)
        if nested or isinstance(node, ast.Module | ast.If | ast.Try | ast.ExceptHandler):
            pending += ast.iter_child_nodes(node)


def _reached(
    script: Path, first_party: Callable[[str], Path | None], nested: bool
) -> tuple[set[Path], set[Import]]:
    """The first-party files a script reaches (itself included) and their third-party
    imports (`first_party` gives a module's file, or None for a module from outside)."""
    found, seen, pending = set(), set(), [script]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for imported in imports_of(path, nested):
            parts = imported.target.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
            files = [first_party(".".join(parts[:n])) for n in range(1, len(parts) + 1)]
            if files[0] is not None:
                pending += [file for file in files if file]
            elif parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                found.add(imported)
    return seen, found


def third_party_imports(
    script: Path,
    first_party: Callable[[str], Path | None] = module_file,
    nested: bool = True,
) -> set[Import]:
    """The third-party imports of a script and of the first-party modules it reaches."""
    return _reached(script, first_party, nested)[1]


def first_party_files(script: Path) -> list[Path]:
    """The repository's files that a script runs, itself included, in path order: every
    module it imports, at any depth, anywhere in the package."""
    return sorted(_reached(script, module_file, nested=True)[0])


@cache
def _providers() -> dict[str, list[str]]:
    return packages_distributions()


@cache
def _distribution_files(name: str) -> frozenset[str]:
    return frozenset(str(file) for file in distribution(name).files or ())


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide a module, by the environment's metadata.

    A namespace package (`google`) is shared by many distributions: the one that holds
    the longest prefix of the module's path is the one that provides it.
    """
    owners = _providers().get(module.partition(".")[0], [])
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = "/".join(parts[:n])
        holders = [
            owner
            for owner in owners
            if any(
                file == f"{prefix}.py" or file.startswith(f"{prefix}/")
                for file in _distribution_files(owner)
            )
        ]
        if holders:
            return {canonicalize_name(holder) for holder in holders}
    return {canonicalize_name(owner) for owner in owners}
