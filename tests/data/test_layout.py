"""The package's layout (docs/code.md) and what must not break when a module moves: the
layers' arrows, the Snakefile's torch-free imports, the installed packages, the console
commands, every module path a command or a doc names, and the evaluation journal's code
fingerprint across subpackages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from robovqa_ft.core.source_imports import ROOT, imports_of, module_file

PACKAGE = ROOT / "robovqa_ft"
# From the bottom up: a module imports only its own layer and those below it.
LAYERS = ("core", "data", "training", "evaluation", "tools")
SUBPACKAGES = [p.name for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file()]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_is_a_layer_and_the_package_root_holds_no_module():
    assert sorted(SUBPACKAGES) == sorted(LAYERS)
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import, at any depth of a module, of a layer above the importer's."""
    found = []
    for path in sorted(package.rglob("*.py")):
        importer = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        mine = _layer(importer)
        for imported in imports_of(path, root=package.parent):
            theirs = _layer(imported.target)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(f"{importer} imports {imported.target}")
    return found


def test_no_arrow_runs_from_a_lower_layer_to_a_higher_one():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    copy = tmp_path / "robovqa_ft"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    curves = copy / "training" / "curves.py"  # as it was: folder names from the status tool
    curves.write_text(curves.read_text() + "\nfrom robovqa_ft.tools.status import duration\n")
    assert upward_imports(copy) == [
        "robovqa_ft.training.curves imports robovqa_ft.tools.status.duration"
    ]


def snakefile_imports() -> dict[str, list[str]]:
    """{subpackage: the modules the Snakefile and rules/*.smk import from it}."""
    found: dict[str, list[str]] = {name: [] for name in LAYERS}
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        for module in re.findall(r"^\s*from (robovqa_ft\.[\w.]+) import", path.read_text(), re.M):
            found[module.split(".")[1]].append(module)
    return found


@pytest.mark.parametrize("subpackage", LAYERS)
def test_what_the_snakefile_imports_loads_neither_torch_nor_tensorflow(subpackage):
    """Snakemake imports these in every `snakemake` command, dry runs included."""
    modules = [f"robovqa_ft.{subpackage}", *snakefile_imports()[subpackage]]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [], f"{modules} load {out.stdout.strip()}"


def test_the_snakefile_imports_from_the_package_at_all():
    # the test above must not pass by finding nothing
    imported = snakefile_imports()
    assert "robovqa_ft.core.settings" in imported["core"]
    assert "robovqa_ft.data.bucket" in imported["data"]


def test_the_installed_package_holds_every_module_and_the_console_commands(tmp_path):
    source = tmp_path / "source"  # a copy: a build in the tree would leave build/ behind
    shutil.copytree(PACKAGE, source / "robovqa_ft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("robovqa_ft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        commands = archive.read(entry_points).decode()
    sources = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert sources - names == set(), "modules the installed package would lack"
    for line in commands.splitlines():
        if "=" in line:
            command, target = (part.strip() for part in line.split("="))
            module, function = target.split(":")
            assert module_file(module) is not None, f"{command}: no module {module}"
            assert f"def {function}(" in module_file(module).read_text(), command


CONSOLE_COMMANDS = ["robovqa-ask", "robovqa-status", "robovqa-gpus", "robovqa-data-summary",
                    "robovqa-readme-figures"]  # fmt: skip


@pytest.mark.parametrize("command", CONSOLE_COMMANDS)
def test_each_console_command_runs(command):
    path = Path(sys.executable).with_name(command)
    out = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {command}")  # named as people type it


def test_the_console_commands_are_the_ones_pyproject_declares():
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.findall(r"^(robovqa-[\w-]+) = ", text, re.M)
    assert sorted(declared) == sorted(CONSOLE_COMMANDS)


# A module path as commands and docs write it: `python -m robovqa_ft.x.y`, `robovqa_ft.x.y`
# in backticks, a file `robovqa_ft/x/y.py`.
MODULE_NAMES = re.compile(r"(?:python -m |`)(robovqa_ft(?:\.\w+)+)")
MODULE_FILES = re.compile(r"\b(robovqa_ft(?:/\w+)+\.py)\b")


def named_modules(text: str) -> tuple[set[str], set[str]]:
    return set(MODULE_NAMES.findall(text)), set(MODULE_FILES.findall(text))


def _resolves(name: str) -> bool:
    """A module, or a name inside one (`robovqa_ft.core.devices.allocated_gpus`)."""
    parts = name.split(".")
    return any(module_file(".".join(parts[:n])) for n in range(len(parts), 1, -1))


def test_every_module_path_that_a_command_or_doc_names_exists():
    places = [ROOT / "Makefile", ROOT / "README.md", ROOT / "Snakefile",
              *(ROOT / "docs").glob("*.md"), *(ROOT / "rules").glob("*.smk"),
              *(ROOT / "workflow_scripts").glob("*.py"), *(ROOT / "bench").glob("*.*"),
              *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_layout.py"),
              *(ROOT / "profiles").rglob("*.yaml"), *(ROOT / "config").glob("*.yaml"),
              *PACKAGE.rglob("*.py")]  # fmt: skip
    wrong = []
    for place in places:
        names, files = named_modules(place.read_text())
        wrong += [f"{place.relative_to(ROOT)}: {n}" for n in sorted(names) if not _resolves(n)]
        wrong += [f"{place.relative_to(ROOT)}: {f}" for f in sorted(files)
                  if not (ROOT / f).is_file()]  # fmt: skip
    assert wrong == []


def test_a_stale_module_path_is_caught():
    names, files = named_modules("run `python -m robovqa_ft.status` or see robovqa_ft/train.py")
    assert [n for n in names if not _resolves(n)] == ["robovqa_ft.status"]
    assert [f for f in files if not (ROOT / f).is_file()] == ["robovqa_ft/train.py"]


def test_the_modules_that_processes_are_started_with_run_as_main():
    """torchrun's workers (`-m` the launcher) and ask's frame reader (`-m` record_frames):
    their names come from the modules themselves, and each runs as `__main__`."""
    code = (
        "import json\n"
        "from robovqa_ft.training.launch import WORKER_MODULE\n"
        "from robovqa_ft.data import record_frames\n"
        "print(json.dumps([WORKER_MODULE, record_frames.__name__]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for module in json.loads(out.stdout.strip().splitlines()[-1]):
        assert module_file(module) is not None, module
        assert 'if __name__ == "__main__":' in module_file(module).read_text(), module
    launcher = (PACKAGE / "training" / "launch.py").read_text()
    assert '"-m", WORKER_MODULE' in launcher
    answering = (PACKAGE / "tools" / "answering.py").read_text()
    assert '"-m", record_frames.__name__' in answering


JOURNAL_CODE = (
    "from robovqa_ft.evaluation.journal import journal_fingerprint\n"
    "print(journal_fingerprint({'name': 'm'}, {'stage1': {}}, {'batch_size': 8}, []))"
)


def _journal_fingerprint(package_parent: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    out = subprocess.run([sys.executable, "-c", JOURNAL_CODE], capture_output=True, text=True,
                         check=True, env=env, cwd=package_parent)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("changed", ["training/samples.py", "training/loss.py",
                                     "evaluation/scoring.py", "core/settings.py"])  # fmt: skip
def test_the_evaluation_journal_covers_the_code_it_runs_in_every_subpackage(tmp_path, changed):
    """A changed sample builder (or loss, or scorer) must not resume a stale journal."""
    copy = tmp_path / "robovqa_ft"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    before = _journal_fingerprint(tmp_path)
    assert _journal_fingerprint(tmp_path) == before  # the same code, the same fingerprint
    source = copy / changed
    source.write_text(source.read_text() + "\n# a change\n")
    assert _journal_fingerprint(tmp_path) != before


NOTICE = "Failed to load CPU gemm_4bit_forward"


@pytest.mark.slow
def test_importing_the_library_prints_no_bitsandbytes_cpu_kernel_notice():
    """bitsandbytes warns at import on CPUs with AVX-512 BF16 that it has no `kernels`
    package for a CPU 4-bit matmul this project never runs; the package drops that line."""
    ours = subprocess.run([sys.executable, "-c", "import robovqa_ft.training.model"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert NOTICE not in ours.stderr
    bare = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True)
    if NOTICE not in bare.stderr:
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes prints nothing to drop")
