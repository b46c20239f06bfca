"""The GPU slot's environment (bench/gpu_env.py): every package the slot's code
imports is on that machine or carried to it, and the rehearsal installs that machine's."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_env  # noqa: E402 - a bench/ module
from packaging.utils import canonicalize_name  # noqa: E402


def test_every_package_the_gpu_slot_imports_is_on_its_machine_or_carried():
    assert gpu_env.missing() == []


def test_a_package_neither_there_nor_carried_is_named_with_its_importer(monkeypatch):
    # as before this check: tensorboardX, which curves.py imports, was not carried
    monkeypatch.setattr(
        gpu_env, "CARRIED", tuple(c for c in gpu_env.CARRIED if c != "tensorboardx")
    )
    problems = gpu_env.missing()
    assert any(p.startswith("tensorboardx (import tensorboardX")
               and "robovqa_ft/training/curves.py" in p for p in problems), problems  # fmt: skip


def test_the_slots_imports_are_read_through_the_project_modules_it_reaches():
    imports = gpu_env.third_party_imports()
    assert (
        "robovqa_ft/training/model.py" in imports["peft"]
    )  # gpu_slot -> robovqa_ft.training.model
    assert "bench/train_step.py" in imports["torch"]  # a bench/ sibling
    assert not [m for m in imports if m.split(".")[0] in ("robovqa_ft", "train_step", "os")]


def test_the_rehearsal_installs_the_machines_versions_and_nothing_off_it():
    image = gpu_env.image_packages()
    wanted = gpu_env.requirements()
    names = {line.split("==")[0] for line in wanted}
    assert {"torch==2.11.0", "torchvision==0.26.0", "accelerate==1.15.0"} <= set(wanted)
    assert names <= set(image)
    assert not names & {canonicalize_name(c) for c in gpu_env.CARRIED}  # they travel as wheels
    for line in wanted:
        name = line.split("==")[0]
        assert line == (f"{name}=={image[name]}" if image[name] else name)


def test_a_namespace_packages_module_is_told_apart_by_its_next_part():
    assert gpu_env.distribution_of("google.protobuf.message") == "protobuf"
    assert gpu_env.distribution_of("google_crc32c") == "google-crc32c"
    assert gpu_env.distribution_of("PIL") == "pillow"
