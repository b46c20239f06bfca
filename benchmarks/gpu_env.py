"""What the GPU slot's machine has and what travels to it, each listed once: its packages
(gpu_image.txt) and the project's pins carried as wheels (`CARRIED`). The slot command
(gpu_slot.py's docstring) fails at its first import of a package that is neither, and no
registry can be reached there, so:

    python benchmarks/gpu_env.py carried       # the pins to carry (fetch_gpu_wheels.sh)
    python benchmarks/gpu_env.py requirements  # the rehearsal's packages, at the image's versions
    python benchmarks/gpu_env.py check         # what the slot imports: on the machine or carried

What the slot's code imports is read from its source (no import runs): the module-level
imports of gpu_slot.py and of every project module they reach. Imports inside functions
are for `make rehearse-gpu-slot` to meet, in an environment of exactly those packages.
Free of torch: tests/data runs the check.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import importlib.util
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("gpu_image.txt")
ENTRY = Path(__file__).with_name("gpu_slot.py")
# The project's pins the machine lacks or has at another version: transformers and
# tokenizers newer than its own, peft whose version it does not say, and what it lacks.
# bitsandbytes travels while the 64 MiB a command carries allow it (fetch_gpu_wheels.sh).
CARRIED = ("transformers", "tokenizers", "peft", "google-crc32c", "tensorboardx", "bitsandbytes")
LOCAL = ("robovqa_ft",)  # the project's own package, which runs from the working tree
# Used there without being imported by name: transformers builds InternVL's and the Qwen
# families' image and video processors on torchvision.
USED_UNNAMED = ("torchvision",)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE) -> dict[str, str | None]:
    """{package: version or None} of the machine's image."""
    packages = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[normalized(name)] = version or None
    return packages


def pins() -> dict[str, str]:
    """{package: version} of pyproject.toml's exact pins."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return {normalized(n): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text)}


def module_imports(path: Path) -> set[str]:
    """The modules `path` imports at module level (under `if`/`try` too; not in functions)."""
    found: set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.If | ast.Try):
            body += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            body += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return found


def project_file(module: str) -> Path | None:
    """The project's own file of `module` (the package's, or a benchmarks/ sibling)."""
    parts = module.split(".")
    if parts[0] in LOCAL:
        for candidate in (ROOT.joinpath(*parts).with_suffix(".py"),
                          ROOT.joinpath(*parts, "__init__.py")):  # fmt: skip
            if candidate.is_file():
                return candidate
        return None
    sibling = ENTRY.with_name(f"{module}.py")
    return sibling if len(parts) == 1 and sibling.is_file() else None


def third_party_imports(entry: Path = ENTRY) -> dict[str, set[str]]:
    """{module imported from outside the project: the project files that import it}, over
    every project module that `entry` reaches through module-level imports."""
    seen, todo, outside = set(), [entry], {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in module_imports(path):
            mine = project_file(module)
            if mine is not None:
                todo.append(mine)
            elif module.split(".")[0] not in sys.stdlib_module_names and module != "__future__":
                outside.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return outside


@functools.cache
def distribution_of(module: str) -> str:
    """The installed distribution that provides `module` (a namespace package, such as
    google, is told apart by its next part), or the module's own name where none does."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    name = top
    if spec is not None and spec.origin is None and "." in module:  # a namespace package
        name = ".".join(module.split(".")[:2])
    providers = {normalized(d) for d in _providers().get(top, [])}
    if len(providers) > 1:
        files = name.replace(".", "/") + "/"
        providers = {
            normalized(d.metadata["Name"])
            for d in metadata.distributions()
            if normalized(d.metadata["Name"]) in providers
            and any(str(f).startswith(files) for f in d.files or ())
        }
    return min(providers) if providers else normalized(top)


@functools.cache
def _providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def carried_requirements() -> set[str]:
    """What the carried packages require (as installed here, at the same pins), which a
    `--no-deps` install of their wheels expects to find there."""
    needed = set()
    for package in CARRIED:
        for line in metadata.requires(package) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed.add(normalized(requirement.name))
    return needed - {normalized(c) for c in CARRIED}


def missing() -> list[str]:
    """Each package the slot needs that is neither on the machine nor carried, and why."""
    image, carried = image_packages(), {normalized(c) for c in CARRIED}
    problems = []
    for module, files in sorted(third_party_imports().items()):
        package = distribution_of(module)
        if package not in image and package not in carried:
            problems.append(f"{package} (import {module}: {', '.join(sorted(files))})")
    for package in sorted(carried_requirements() - set(image) - carried):
        problems.append(f"{package} (a carried package requires it)")
    return problems


def requirements() -> list[str]:
    """The rehearsal's packages: what the slot imports and the carried wheels require,
    that the machine has, at its versions where known (pip adds what those require)."""
    image, carried = image_packages(), {normalized(c) for c in CARRIED}
    wanted = {distribution_of(m) for m in third_party_imports()} | carried_requirements()
    wanted |= set(USED_UNNAMED)
    return [f"{p}=={image[p]}" if image[p] else p for p in sorted(wanted - carried) if p in image]


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "carried":
        versions = pins()
        print("\n".join(f"{c}=={versions[normalized(c)]}" for c in CARRIED))
    elif command == "requirements":
        print("\n".join(requirements()))
    elif command == "check":
        if problems := missing():
            print("the GPU slot imports packages its machine lacks and no wheel carries:")
            print("\n".join(f"  {p}" for p in problems))
            print(f"carry them (CARRIED in {Path(__file__).name}) or import them where used")
            return 1
        print(f"every package the GPU slot imports is on its machine ({IMAGE.name}) or carried")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
