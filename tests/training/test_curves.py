"""TensorBoard curves (robovqa_ft/training/curves.py): every logged scalar once per step across a
resume, read back with tensorboard's own event reader, with no TensorFlow in the
training process; stale checkpoints take their events along; report_to's other entries
reach the Trainer, and one not installed stops the run before any job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar
from training_helpers import csv_rows, run_settings
from training_helpers import train_tiny as run

from robovqa_ft.core import settings
from robovqa_ft.core.runs import EVENTS_DIR
from robovqa_ft.core.settings import ConfigError, check_config
from robovqa_ft.training.checkpoints import prepare_checkpoint_dir
from robovqa_ft.training.curves import keep_events_up_to
from robovqa_ft.training.train import training_arguments

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("samples_per_s", "tokens_per_s", "real_token_share", "peak_memory_gb")

# tensorboard's reader in a process of its own: with TensorFlow installed it would import
# it, unless tensorboard.compat finds `notf` (what tensorboard's no-TensorFlow build
# ships), and the stub it then picks stays picked for the whole process, which would
# hide from later tests a writer that imports TensorFlow (torch's does).
READER = """
import json, sys, types
sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
from pathlib import Path
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
scalars = {}
for path in sorted(Path(sys.argv[1]).glob("*tfevents*")):
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            number = tensor_util.make_ndarray(value.tensor).item()
            scalars.setdefault(value.tag, []).append([event.step, number])
print(json.dumps({"scalars": scalars, "tensorflow": "tensorflow" in sys.modules}))
"""


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) of every scalar event in `log_dir`, as tensorboard reads them."""
    result = subprocess.run([sys.executable, "-c", READER, str(log_dir)], capture_output=True,
                            text=True, timeout=120, check=True)  # fmt: skip
    read = json.loads(result.stdout)
    assert not read["tensorflow"], "the reader itself imported TensorFlow"
    return {tag: [tuple(pair) for pair in pairs] for tag, pairs in read["scalars"].items()}


@pytest.fixture(scope="module")
def resumed_run(tiny_setup, tmp_path_factory) -> dict:
    """8 steps with checkpoints at 4 and 8, then as if killed after step 8 was logged but
    before its checkpoint was complete: checkpoint-8 gone, resumed from 4 to the end."""
    out = tmp_path_factory.mktemp("resumed")
    same = {"max_steps": 8, "save_steps": 4, "eval_steps": 4, "report_to": ["tensorboard"]}
    run(tiny_setup, out, **same)
    first = scalars(out / EVENTS_DIR)
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")
    shutil.rmtree(out / "adapter")
    run(tiny_setup, out, **same)
    return {"out": out, "first": first, "tensorflow": "tensorflow" in sys.modules}


def test_a_training_never_imports_tensorflow_though_tensorboard_is_installed(resumed_run):
    import tensorboard  # noqa: F401  (installed: torch's writer would import TensorFlow)

    assert not resumed_run["tensorflow"] and "tensorflow" not in sys.modules


def test_event_files_hold_each_logged_scalar_once_per_step_across_a_resume(resumed_run):
    out, first = resumed_run["out"], resumed_run["first"]
    curves = scalars(out / EVENTS_DIR)
    steps = {tag: [step for step, _ in points] for tag, points in curves.items()}
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm",
                *(f"train/{name}" for name in FIGURES)):  # fmt: skip
        assert steps[tag] == list(range(1, 9)), tag
    assert steps["eval/loss"] == [4, 8]
    # steps 1-4 are the first attempt's, 5-8 the resumed one's: as in train_metrics.csv
    assert curves["train/loss"][:4] == first["train/loss"][:4]
    logged = [(int(r["step"]), float(r["loss"])) for r in csv_rows(out / "train_metrics.csv")]
    assert [step for step, _ in logged] == list(range(1, 9))
    for (step, loss), (tb_step, tb_loss) in zip(logged, curves["train/loss"], strict=True):
        assert tb_step == step and tb_loss == pytest.approx(loss, rel=1e-6)


def test_the_projects_figures_are_in_the_logs_every_integration_receives(resumed_run):
    # log_history is what Trainer.log hands every callback, report_to integrations too
    state = json.loads((resumed_run["out"] / "checkpoints" / "checkpoint-8" /
                        "trainer_state.json").read_text())  # fmt: skip
    training_logs = [row for row in state["log_history"] if "loss" in row]
    assert [row["step"] for row in training_logs] == list(range(1, 9))
    for row in training_logs:
        assert all(name in row for name in FIGURES), row
        assert row["samples_per_s"] > 0 and 0 < row["real_token_share"] <= 1


def _write_events(log_dir: Path, steps: range) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    writer = EventsWriter(str(log_dir / "events"), ".test")
    for step in steps:
        writer.write_event(Event(step=step, summary=scalar("train/loss", float(step))))
    writer.close()
    return next(log_dir.glob("*tfevents*"))


def test_a_record_cut_short_by_a_kill_goes_with_the_steps_past_the_checkpoint(tmp_path):
    path = _write_events(tmp_path, range(1, 7))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:20])  # a record's start, as a kill mid-write leaves it
    keep_events_up_to(tmp_path, 3)
    assert scalars(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}
    kept = path.read_bytes()
    keep_events_up_to(tmp_path, 3)  # nothing past 3 left: the file stays as it is
    assert path.read_bytes() == kept and len(list(tmp_path.iterdir())) == 1


def test_stale_checkpoints_take_their_events_with_them(tmp_path):
    checkpoints, events = tmp_path / "checkpoints", tmp_path / "run" / EVENTS_DIR
    checkpoints.mkdir()
    prepare_checkpoint_dir(checkpoints, "old", events)
    (checkpoints / "checkpoint-2").mkdir()
    written = _write_events(events, range(1, 3))
    prepare_checkpoint_dir(checkpoints, "new", events)
    (stale,) = checkpoints.glob("stale-*")
    assert not events.exists()
    assert (stale / EVENTS_DIR / written.name).is_file()
    assert scalars(stale / EVENTS_DIR) == {"train/loss": [(1, 1.0), (2, 2.0)]}
    prepare_checkpoint_dir(checkpoints, "new", events)  # same settings: nothing moves
    assert len(list(checkpoints.glob("stale-*"))) == 1


def test_report_to_gives_the_trainer_its_other_integrations_and_keeps_tensorboard(tmp_path):
    run_ = run_settings(tmp_path)
    for report_to, trainer_gets in ((["tensorboard"], []), (["tensorboard", "mlflow"], ["mlflow"]),
                                    ([], [])):  # fmt: skip
        training = {**run_["training"], "report_to": report_to}
        args = training_arguments(tmp_path, run_["stage"], training, run_["model"])
        assert args.report_to == trainer_gets


def test_an_integration_that_is_not_installed_stops_the_run_before_any_job(monkeypatch):
    monkeypatch.setitem(settings.INTEGRATION_MODULES, "wandb", "robovqa_no_such_module")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["training"]["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(ConfigError) as error:
        check_config(config, ROOT)
    assert str(error.value) == (
        "config error: training.report_to names wandb, which is not installed here: pip "
        "install robovqa_no_such_module, or leave it out (tensorboard needs nothing more)"
    )
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    check_config(config, ROOT)
    assert config["training"]["report_to"] == ["tensorboard"]  # the default: no account
