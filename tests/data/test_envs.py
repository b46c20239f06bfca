"""The rules' conda environments (envs/*.yaml) against pyproject.toml and the code they run.

Read, never imported: the rules' code is parsed with `ast` (robovqa_ft.core.source_imports), so
this process stays free of torch and TensorFlow, and imports are mapped to distributions
through the venv's metadata.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from robovqa_ft.core.source_imports import (
    distributions_of,
    exact_pin,
    project_pins,
    third_party_imports,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "robovqa_ft"
# How the project itself gets into an environment: its own pins are the env's to make.
EDITABLE_INSTALL = "--no-deps -e .."
ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))
RULE_HEADER = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)
TOP_LEVEL_LINE = re.compile(r"^\S", re.MULTILINE)  # ends a rule's block


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- pyproject.toml and the env files ---------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@dataclass(frozen=True)
class Env:
    path: Path
    conda: list[str]  # `python=3.11`, `pip`
    pins: dict[str, str]  # normalized pip name -> version
    installs_package: bool  # has the `--no-deps -e ..` line


def read_env(path: Path) -> Env:
    conda, pip = [], []
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(entry, dict):
            pip += entry["pip"]
        else:
            conda.append(entry)
    pins = dict(exact_pin(line, rel(path)) for line in pip if line != EDITABLE_INSTALL)
    return Env(path, conda, pins, EDITABLE_INSTALL in pip)


# --- the rules and the code each one runs ------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    smk: Path
    env: Path | None  # `conda:` and `script:` resolve from the .smk file's folder
    script: Path | None


def _directive_path(smk: Path, rule: str, block: str, keyword: str) -> Path | None:
    """The path a `conda:` or `script:` line names, on its line or the next one."""
    match = re.search(rf"^\s+{keyword}:\s*(\S.*)$", block, re.MULTILINE)
    if not match:
        return None
    value = match.group(1).strip().rstrip(",")
    assert re.fullmatch(r"\"[^\"]+\"|'[^']+'", value), (
        f"rule {rule} ({rel(smk)}): `{keyword}:` is {value!r}, not a plain string this test reads"
    )
    return (smk.parent / value[1:-1]).resolve()


def read_rules() -> list[Rule]:
    rules = []
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        text = smk.read_text()
        for header in RULE_HEADER.finditer(text):
            end = TOP_LEVEL_LINE.search(text, header.end())
            block = text[header.end() : end.start() if end else len(text)]
            name = header.group(1)
            env = _directive_path(smk, name, block, "conda")
            script = _directive_path(smk, name, block, "script")
            rules.append(Rule(name, smk, env, script))
    return rules


RULES = [rule for rule in read_rules() if rule.script]


def stacks(names: set[str]) -> set[str]:
    """Which of the two frameworks that must not share a process these names belong to."""
    return {
        stack
        for stack in ("tensorflow", "torch")
        for name in names
        if canonicalize_name(name).startswith(stack)
    }


# --- the tests ----------------------------------------------------------------------------


def test_every_rule_script_runs_in_an_existing_env():
    assert RULES, "no rule with a `script:` was found in rules/*.smk"
    for rule in RULES:
        assert rule.env, f"rule {rule.name} ({rel(rule.smk)}) runs a script but has no `conda:`"
        assert rule.env.is_file(), f"rule {rule.name}: {rule.env} does not exist"
        assert rule.script.is_file(), f"rule {rule.name}: {rule.script} does not exist"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_pins_exactly_what_pyproject_pins(env_file):
    env = read_env(env_file)
    pins = project_pins()
    wrong = [
        f"{name}=={version} (pyproject.toml: {pins.get(name, 'not in dependencies')})"
        for name, version in env.pins.items()
        if pins.get(name) != version
    ]
    assert not wrong, f"{rel(env_file)} pins differently from pyproject.toml: {', '.join(wrong)}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_python_is_the_series_pyproject_requires(env_file):
    env = read_env(env_file)
    pythons = [entry for entry in env.conda if re.match(r"python\b", entry)]
    series = len(pythons) == 1 and re.fullmatch(r"python\s*=\s*(\d+)\.(\d+)", pythons[0])
    assert series, f"{rel(env_file)}: expected one `python=X.Y` entry, got {pythons}"
    major, minor = map(int, series.groups())
    allowed = SpecifierSet(pyproject()["requires-python"])
    # `python=3.11` is 3.11.*: requires-python must allow all of it and nothing beyond.
    inside = [f"{major}.{minor}.0", f"{major}.{minor}.99"]
    outside = [f"{major}.{minor - 1}.99", f"{major}.{minor + 1}.0"]
    assert all(v in allowed for v in inside) and not any(v in allowed for v in outside), (
        f"{rel(env_file)} has {pythons[0]}, pyproject.toml requires-python {allowed}"
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_rule_env_has_every_distribution_its_code_imports(rule):
    env = read_env(rule.env)
    assert env.installs_package, (
        f"rule {rule.name}: {rel(rule.env)} lacks `{EDITABLE_INSTALL}`, so {PACKAGE} is missing"
    )
    missing: dict[tuple[str, str], set[str]] = {}  # (distribution, importer) -> modules
    for imported in third_party_imports(rule.script):
        owners = distributions_of(imported.target)
        if not owners & env.pins.keys():
            provider = " or ".join(sorted(owners)) or "not installed in the venv"
            missing.setdefault((provider, imported.importer), set()).add(imported.module)
    assert not missing, (
        f"rule {rule.name} runs {rel(rule.script)} in {rel(rule.env)}, which lacks:\n  "
        + "\n  ".join(
            f"{provider}: {importer} imports {', '.join(sorted(modules))}"
            for (provider, importer), modules in sorted(missing.items())
        )
    )


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_no_env_lists_both_tensorflow_and_torch(env_file):
    listed = set(read_env(env_file).pins)
    assert stacks(listed) != {"tensorflow", "torch"}, (
        f"{rel(env_file)} lists both TensorFlow and torch: {sorted(listed)}"
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_no_rule_imports_both_tensorflow_and_torch(rule):
    imports = third_party_imports(rule.script)
    by_stack = {
        stack: sorted(
            {f"{i.importer} imports {i.module}" for i in imports if stacks({i.module}) == {stack}}
        )
        for stack in ("tensorflow", "torch")
    }
    assert not all(by_stack.values()), (
        f"rule {rule.name} ({rel(rule.script)}) reaches both TensorFlow and torch, which must "
        f"not share a process:\n  " + "\n  ".join(by_stack["tensorflow"] + by_stack["torch"])
    )
