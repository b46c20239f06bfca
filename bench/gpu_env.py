"""What the GPU slot's machine has and what travels to it, each listed once: its packages
(gpu_image.txt) and the project's pins carried as wheels (`CARRIED`). The slot command
(gpu_slot.py's docstring) fails at its first import of a package that is neither, and no
registry can be reached there, so:

    python bench/gpu_env.py carried       # the pins to carry (fetch_gpu_wheels.sh)
    python bench/gpu_env.py requirements  # the rehearsal's packages, at the image's versions
    python bench/gpu_env.py check         # what the slot imports: on the machine or carried

What the slot's code imports is read from its source (robovqa_ft.core.source_imports; no
import runs): the module-level imports of gpu_slot.py and of every project module they
reach. Imports inside functions are for `make rehearse-gpu-slot` to meet, in an
environment of exactly those packages.
Free of torch: tests/data runs the check.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from robovqa_ft.core import source_imports
from robovqa_ft.core.source_imports import distributions_of, module_file

ROOT = source_imports.ROOT
IMAGE = Path(__file__).with_name("gpu_image.txt")
ENTRY = Path(__file__).with_name("gpu_slot.py")
# The project's pins the machine lacks or has at another version: transformers and
# tokenizers newer than its own, peft whose version it does not say, and what it lacks.
# bitsandbytes travels while the 64 MiB a command carries allow it (fetch_gpu_wheels.sh).
CARRIED = ("transformers", "tokenizers", "peft", "google-crc32c", "tensorboardx", "bitsandbytes")
# Used there without being imported by name: transformers builds InternVL's and the Qwen
# families' image and video processors on torchvision.
USED_UNNAMED = ("torchvision",)


def image_packages(path: Path = IMAGE) -> dict[str, str | None]:
    """{package: version or None} of the machine's image."""
    packages = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def project_file(module: str) -> Path | None:
    """The project's own file of `module`: the package's, or a bench/ sibling's."""
    sibling = ENTRY.with_name(f"{module}.py")
    if "." not in module and sibling.is_file():
        return sibling
    return module_file(module)


def third_party_imports(entry: Path = ENTRY) -> dict[str, set[str]]:
    """{module imported from outside the project: the project files that import it}, over
    every project module that `entry` reaches through module-level imports."""
    found: dict[str, set[str]] = {}
    for imported in source_imports.third_party_imports(entry, project_file, nested=False):
        found.setdefault(imported.module, set()).add(imported.importer)
    return found


def distribution_of(module: str) -> str:
    """The installed distribution that provides `module`, or the module's own name where
    none does (a package not installed here)."""
    return min(distributions_of(module), default=canonicalize_name(module.split(".")[0]))


def carried_requirements() -> set[str]:
    """What the carried packages require (as installed here, at the same pins), which a
    `--no-deps` install of their wheels expects to find there."""
    needed = set()
    for package in CARRIED:
        for line in metadata.requires(package) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed.add(canonicalize_name(requirement.name))
    return needed - {canonicalize_name(c) for c in CARRIED}


def missing() -> list[str]:
    """Each package the slot needs that is neither on the machine nor carried, and why."""
    image, carried = image_packages(), {canonicalize_name(c) for c in CARRIED}
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
    image, carried = image_packages(), {canonicalize_name(c) for c in CARRIED}
    wanted = {distribution_of(m) for m in third_party_imports()} | carried_requirements()
    wanted |= set(USED_UNNAMED)
    return [f"{p}=={image[p]}" if image[p] else p for p in sorted(wanted - carried) if p in image]


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "carried":
        versions = source_imports.project_pins()
        print("\n".join(f"{c}=={versions[canonicalize_name(c)]}" for c in CARRIED))
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
