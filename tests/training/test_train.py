import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from training_helpers import (
    adapter_weights,
    csv_rows,
    max_difference,
    run_settings,
    wait_for,
    with_unfit_rows,
)
from training_helpers import train_tiny as run
from transformers import InternVLForConditionalGeneration, Trainer, set_seed

from robovqa_ft.evaluation.journal import Journal
from robovqa_ft.evaluation.val_losses import loss_summary, sample_losses
from robovqa_ft.training.callbacks import refuse_non_finite
from robovqa_ft.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointLockedError,
    exclusive_lock,
    fingerprint,
    latest_complete_checkpoint,
    prepare_checkpoint_dir,
    rotate_checkpoints,
    set_aside_incomplete,
)
from robovqa_ft.training.collate import collator, split_counters
from robovqa_ft.training.families import model_family
from robovqa_ft.training.metrics import MetricsLog
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder
from robovqa_ft.training.train import CurriculumTrainer, train_run, training_arguments

DRIVER = """
import json, logging, sys, time
import torch
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
from training_helpers import run_settings
from robovqa_ft.training.train import train_run
args = json.loads(sys.argv[1])
if args["slow_save"]:  # widen the window in which a kill lands mid-save
    save = torch.save
    torch.save = lambda *a, **k: (time.sleep(args["slow_save"]), save(*a, **k))[1]
train_run(**args["paths"], **run_settings(args["model"], **args["training"]))
"""


def start_training(setup, out: Path, slow_save: float = 0, **training) -> subprocess.Popen:
    paths = {
        "train_jsonl": str(setup["stage1_train"]),
        "val_jsonl": str(setup["stage1_val"]),
        "images_dir": str(setup["images"]),
        "adapter_dir": str(out / "adapter"),
        "run_dir": str(out),
        "checkpoint_dir": str(out / "checkpoints"),
    }
    args = json.dumps({"paths": paths, "model": str(setup["model"]), "training": training,
                       "slow_save": slow_save})  # fmt: skip
    code = DRIVER.format(tests=str(Path(__file__).parent))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "driver.log").open("w")
    return subprocess.Popen([sys.executable, "-c", code, args], stdout=log, stderr=log)


def test_stage1_loss_falls_and_metrics_are_written(tiny_setup, tmp_path):
    run(tiny_setup, tmp_path, max_steps=12)
    rows = csv_rows(tmp_path / "train_metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < first
    assert all(float(r["tokens_per_s"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    evals = csv_rows(tmp_path / "eval_metrics.csv")
    assert [int(r["step"]) for r in evals] == [5, 10, 12]
    # eval_clips 2: both questions of the first two clips of the seeded clip order
    assert {r["eval_samples"] for r in evals} == {"4"}
    assert len({r["eval_tokens"] for r in evals}) == 1 and int(evals[0]["eval_tokens"]) > 0
    assert "Starting from step 0" in (tmp_path / "training.log").read_text()
    config = (tmp_path / "config.yaml").read_text()
    assert "learning_rate: 0.002" in config
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_packed_training_gives_the_padded_adapter_with_only_real_tokens(tiny_setup, tmp_path):
    # No dropout: its random masks depend on the batch's shape.
    same = {"max_steps": 3, "lora": {"dropout": 0.0}}
    padded = run(tiny_setup, tmp_path / "padded", **same)
    packed = run(tiny_setup, tmp_path / "packed", padding="packed", **same)
    padded_shares = [
        float(r["real_token_share"]) for r in csv_rows(tmp_path / "padded" / "train_metrics.csv")
    ]
    assert min(padded_shares) < 1.0  # so there was padding to do without
    weights = adapter_weights(packed)
    assert max_difference(weights, adapter_weights(padded)) < 1e-5
    assert max(w.abs().max().item() for w in weights.values()) > 1e-3  # it did train
    shares = [
        float(r["real_token_share"]) for r in csv_rows(tmp_path / "packed" / "train_metrics.csv")
    ]
    assert shares == [1.0] * 3
    samples = [
        float(r["samples_per_s"]) for r in csv_rows(tmp_path / "packed" / "train_metrics.csv")
    ]
    assert all(s > 0 for s in samples)


def test_grouped_training_pads_less_than_longest(tiny_setup, tmp_path):
    shares = {}
    for padding in ("longest", "grouped"):
        run(tiny_setup, tmp_path / padding, max_steps=6, padding=padding, stage={"batch_size": 2})
        rows = csv_rows(tmp_path / padding / "train_metrics.csv")
        shares[padding] = sum(float(r["real_token_share"]) for r in rows) / len(rows)
    assert shares["longest"] < shares["grouped"] <= 1.0
    # The lengths are measured once per run, not again on a restart.
    grouped = tmp_path / "grouped"
    assert len(list((grouped / "checkpoints").glob("token_lengths-*.json"))) == 1
    shutil.rmtree(grouped / "adapter")
    run(tiny_setup, grouped, max_steps=6, padding="grouped", stage={"batch_size": 2})
    log = (grouped / "training.log").read_text()
    assert log.count("Measuring") == 1 and "token lengths for length grouping: from" in log


def test_packing_is_refused_for_qwen_vl_models_before_anything_loads(tmp_path):
    config = tmp_path / "qwen"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    settings = run_settings(config, padding="packed")
    with pytest.raises(ValueError, match="3-D"):
        train_run(
            "t.jsonl", "v.jsonl", "images", tmp_path / "a", tmp_path, tmp_path / "c", **settings
        )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["separate", "tree"])
def test_training_killed_with_sigkill_resumes_to_the_same_adapter(tiny_setup, tmp_path, layout):
    # 12 steps an epoch: the kill and the resume fall in the first, the end in the second
    stage = {"layout": layout}
    first = adapter_weights(run(tiny_setup, tmp_path / "a", max_steps=16, stage=stage))
    second = adapter_weights(run(tiny_setup, tmp_path / "b", max_steps=16, stage=stage))
    tolerance = max_difference(first, second)

    killed = tmp_path / "killed"
    process = start_training(tiny_setup, killed, max_steps=16, save_steps=4, stage=stage)
    wait_for(killed / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter").exists()
    assert latest_complete_checkpoint(killed / "checkpoints") is not None

    resumed = start_training(tiny_setup, killed, max_steps=16, save_steps=4, stage=stage)
    assert resumed.wait(timeout=300) == 0, (killed / "driver.log").read_text()
    assert "Resumed from checkpoint: step=" in (killed / "driver.log").read_text()
    assert max_difference(adapter_weights(killed / "adapter"), first) <= tolerance + 1e-7
    steps = [int(r["step"]) for r in csv_rows(killed / "train_metrics.csv")]
    assert steps == list(range(1, 17)), "rows past the checkpoint are logged once, not twice"


def test_a_run_killed_after_its_last_checkpoint_writes_that_adapter_and_steps_no_further(
    tiny_setup, tmp_path
):
    # 4 of an epoch's 6 steps: the Trainer, resumed at its last step, would take a fifth
    out = tmp_path / "run"
    expected = adapter_weights(run(tiny_setup, out, max_steps=4, save_steps=2))
    shutil.rmtree(out / "adapter")  # as a kill after checkpoint-4, before the adapter
    assert max_difference(adapter_weights(run(tiny_setup, out, max_steps=4, save_steps=2)),
                          expected) == 0  # fmt: skip
    assert complete_checkpoints(out / "checkpoints") == [2, 4]
    assert [int(r["step"]) for r in csv_rows(out / "train_metrics.csv")] == [1, 2, 3, 4]
    assert "checkpoint-4 is the run's last step" in (out / "training.log").read_text()


def test_sigterm_saves_a_checkpoint_then_stops(tiny_setup, tmp_path):
    process = start_training(tiny_setup, tmp_path, max_steps=400, save_steps=1000)
    wait_for(tmp_path / "train_metrics.csv", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    saved = latest_complete_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) < 400
    assert not (tmp_path / "adapter").exists()


def descendants(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children + [d for c in children for d in descendants(c)]


def test_sigterm_to_every_process_of_the_job_still_saves(tiny_setup, tmp_path):
    # What a scheduler does: the signal reaches the DataLoader workers too.
    process = start_training(tiny_setup, tmp_path, max_steps=400, save_steps=1000,
                             dataloader_workers=2)  # fmt: skip
    wait_for(tmp_path / "train_metrics.csv", process)
    workers = descendants(process.pid)
    assert workers, "no DataLoader worker to signal"
    for pid in [process.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    saved = latest_complete_checkpoint(tmp_path / "checkpoints")
    assert saved is not None, (tmp_path / "driver.log").read_text()[-3000:]
    assert "killed by signal" not in (tmp_path / "driver.log").read_text()


def test_stage2_starts_from_stage1_weights_with_a_fresh_schedule(tiny_setup, tmp_path):
    stage1 = run(tiny_setup, tmp_path / "stage1", max_steps=6)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False),
                        8, 16, 0.1, init_adapter=stage1)  # fmt: skip
    loaded = {
        name.replace(".default", ""): p.detach()
        for name, p in model.named_parameters()
        if "lora_" in name
    }
    saved = adapter_weights(stage1)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    # One step at a vanishing learning rate leaves the stage-1 weights where they were;
    # a fresh LoRA would have all-zero B matrices.
    still = run(tiny_setup, tmp_path / "still", data="stage2", init_adapter=stage1,
                stage={"learning_rate": 1e-12}, max_steps=1)  # fmt: skip
    assert max_difference(adapter_weights(still), saved) < 1e-6
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)

    run(tiny_setup, tmp_path / "stage2", data="stage2", init_adapter=stage1, max_steps=8)
    rows = csv_rows(tmp_path / "stage2" / "train_metrics.csv")
    assert int(rows[0]["step"]) == 1
    # warmup is 25% of 8 steps: the first step's rate starts low again, then peaks
    assert float(rows[0]["learning_rate"]) < float(rows[1]["learning_rate"])
    assert max(float(r["learning_rate"]) for r in rows) == pytest.approx(2e-3)


def test_unchanged_config_keeps_its_checkpoints(tmp_path):
    prepare_checkpoint_dir(tmp_path, "abc")
    (tmp_path / "checkpoint-2").mkdir()
    prepare_checkpoint_dir(tmp_path, "abc")
    assert (tmp_path / "checkpoint-2").is_dir() and not list(tmp_path.glob("stale-*"))
    prepare_checkpoint_dir(tmp_path, "def")
    assert not (tmp_path / "checkpoint-2").exists() and list(tmp_path.glob("stale-*"))


HOLD_LOCK = """
import sys, time
from pathlib import Path
from robovqa_ft.training.checkpoints import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_trainer_on_the_same_run_fails_at_once_naming_the_holder(tiny_setup, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "checkpoints")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(CheckpointLockedError, match=f"pid {holder.pid} "):
            run(tiny_setup, tmp_path, max_steps=2)
        assert time.monotonic() - start < 10
        assert not (tmp_path / "train_metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(tmp_path / "checkpoints"):  # released when its holder ends
        pass


@pytest.mark.slow
def test_kill_while_saving_leaves_the_previous_checkpoint_usable(tiny_setup, tmp_path):
    reference = adapter_weights(run(tiny_setup, tmp_path / "reference", max_steps=8))
    killed = tmp_path / "killed"
    process = start_training(tiny_setup, killed, slow_save=0.5, max_steps=8, save_steps=2)
    saving = killed / "checkpoints" / "checkpoint-4"
    wait_for(saving, process)  # the folder appears as the save begins
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (saving / COMPLETE_MARKER).exists(), "the kill came after the save finished"
    assert latest_complete_checkpoint(killed / "checkpoints").name == "checkpoint-2"

    resumed = start_training(tiny_setup, killed, max_steps=8, save_steps=2)
    assert resumed.wait(timeout=300) == 0, (killed / "driver.log").read_text()
    assert "Resumed from checkpoint: step=2" in (killed / "driver.log").read_text()
    assert max_difference(adapter_weights(killed / "adapter"), reference) <= 1e-7


def test_qlora_with_gradient_checkpointing_and_workers_trains(tiny_setup, tmp_path):
    nf4 = {"quantization": "nf4", "gradient_checkpointing": True}
    run(tiny_setup, tmp_path, model_settings=nf4, max_steps=2, dataloader_workers=1)
    rows = csv_rows(tmp_path / "train_metrics.csv")
    assert len(rows) == 2 and all(0 < float(r["loss"]) < 100 for r in rows)
    assert float(rows[0]["grad_norm"]) > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_fingerprint_ignores_bookkeeping_but_not_what_shapes_the_weights(tiny_setup):
    settings = run_settings(tiny_setup["model"])
    data = [tiny_setup["stage1_train"]]
    base = fingerprint(settings, data)
    bookkeeping = {"save_steps": 7, "eval_steps": 3, "dataloader_workers": 8}
    watched = {**settings, "training": {**settings["training"], **bookkeeping}}
    assert fingerprint(watched, data) == base
    changed_lr = {**settings, "stage": {**settings["stage"], "learning_rate": 1e-4}}
    assert fingerprint(changed_lr, data) != base
    assert fingerprint(settings, [tiny_setup["stage2_train"]]) != base
    packed = {**settings, "training": {**settings["training"], "padding": "packed"}}
    assert fingerprint(packed, data) == base  # same samples, same order
    grouped = {**settings, "training": {**settings["training"], "padding": "grouped"}}
    assert fingerprint(grouped, data) != base  # another order


class ModelsOwnLoss(Trainer):
    """The stock Trainer and the model's own full-logit loss: what the project's loss
    (`CurriculumTrainer.compute_loss`) must reproduce, scaling included."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, split_counters(inputs)[0], *args, **kwargs)


def _two_logged_steps(tiny_setup, out: Path, trainer_class) -> list[tuple[float, float]]:
    set_seed(0)
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    model = attach_lora(base, 8, 16, 0.0)
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    settings = run_settings(tiny_setup["model"], stage={"batch_size": 2, "grad_accum": 2},
                            max_steps=2, eval_steps=100, save_steps=100)  # fmt: skip
    args = training_arguments(out, settings["stage"], settings["training"], settings["model"])
    trainer = trainer_class(
        model=model, args=dataclasses.replace(args, save_strategy="no", eval_strategy="no"),
        train_dataset=JsonlDataset(tiny_setup["stage2_train"], builder, limit=8),
        data_collator=collator("longest", processor.tokenizer.pad_token_id),
        **({"metrics": MetricsLog(out, 0, 0)} if trainer_class is CurriculumTrainer else {}),
    )  # fmt: skip
    trainer.train()
    return [(row["loss"], row["grad_norm"]) for row in trainer.state.log_history if "loss" in row]


def test_the_training_loss_is_the_models_own_over_the_steps_labelled_tokens(tiny_setup, tmp_path):
    # Two accumulated micro-batches of different label counts a step: a loss divided by
    # the wrong count, or scaled twice for accumulation, changes both loss and gradient.
    ours = _two_logged_steps(tiny_setup, tmp_path / "ours", CurriculumTrainer)
    stock = _two_logged_steps(tiny_setup, tmp_path / "stock", ModelsOwnLoss)
    assert len(ours) == len(stock) == 2
    for (loss, norm), (stock_loss, stock_norm) in zip(ours, stock, strict=True):
        assert loss == pytest.approx(stock_loss, rel=1e-5)
        assert norm == pytest.approx(stock_norm, rel=1e-4)


aten = torch.ops.aten
# Ops that make the host wait for a CUDA device: each reads a device value back, or sizes
# its output by one (a boolean mask as an index is a `nonzero` inside the op).
SYNCING = {aten.nonzero, aten._local_scalar_dense, aten.masked_select, aten.is_nonzero,
           aten.equal, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
           aten.unique_dim_consecutive}  # fmt: skip
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _syncs(func, args, kwargs) -> bool:
    op = func.overloadpacket
    if op in MASK_INDEXED:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if op is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return op in SYNCING


class HostReads(TorchDispatchMode):
    """The ops, forward and backward, that would make the host wait on a GPU. Those inside
    the base model's forward are transformers' own and left out: InternVL's check that image
    tokens and features agree, and the attention mask's look at the padding or the packing."""

    def __init__(self, model):
        super().__init__()
        self.base, self.inside, self.ops = model.get_base_model().model, 0, []

    def __enter__(self):
        self.hooks = [self.base.register_forward_pre_hook(lambda *_: self._step(1)),
                      self.base.register_forward_hook(lambda *_: self._step(-1))]  # fmt: skip
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _step(self, by: int) -> None:
        self.inside += by

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside and _syncs(func, args, kwargs):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_a_training_micro_batch_never_waits_on_the_device(tiny_setup, tmp_path, padding):
    # No GPU here: the ops that would sync one are caught by name, on the CPU.
    set_seed(0)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False), 8, 16, 0)
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    samples = list(JsonlDataset(tiny_setup["stage2_train"], builder, limit=2))
    settings = run_settings(tiny_setup["model"], stage={"batch_size": 2})
    args = training_arguments(tmp_path, settings["stage"], settings["training"], settings["model"])
    trainer = CurriculumTrainer(model=model, args=dataclasses.replace(args, eval_strategy="no"),
                                metrics=MetricsLog(tmp_path, 0, 0))  # fmt: skip
    collate = collator(padding, processor.tokenizer.pad_token_id)
    for batch in (collate(samples), collate([None, None])):  # and the stand-in of none fits
        batch = trainer._prepare_inputs(batch)
        step_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the Trainer's, a step
        with HostReads(model) as reads:
            loss = trainer.compute_loss(model.train(), batch, num_items_in_batch=step_tokens)
            loss.backward()
        assert reads.ops == [], f"host syncs: {reads.ops}"
    assert float(loss) == 0  # the stand-in's, yet in the graph: backward ran (DDP needs it)
    assert trainer.metrics.samples == 2 and trainer.metrics.skipped == 2


def test_the_trainer_neither_reads_each_micro_batchs_loss_nor_waits_for_its_copy(
    tiny_setup, tmp_path
):
    # The Trainer's own reads around compute_loss: its NaN filter reads every micro-batch's
    # loss (a sync each), and accelerate copies batches to the GPU blocking by default.
    settings = run_settings(tiny_setup["model"])
    args = training_arguments(tmp_path, settings["stage"], settings["training"], settings["model"])
    assert args.logging_nan_inf_filter is False
    assert args.accelerator_config.non_blocking is True


def test_a_model_that_takes_no_loss_kwargs_still_trains(tiny_setup, tmp_path, monkeypatch):
    # Qwen2.5-VL and Qwen3-VL say so; the Trainer would then not count labelled tokens.
    reference = run(tiny_setup, tmp_path / "reference", max_steps=2)
    monkeypatch.setattr(InternVLForConditionalGeneration, "accepts_loss_kwargs", False,
                        raising=False)  # fmt: skip
    adapter = run(tiny_setup, tmp_path / "qwen-like", max_steps=2)
    losses = [[row["loss"] for row in csv_rows(folder / "train_metrics.csv")]
              for folder in (tmp_path / "reference", tmp_path / "qwen-like")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert max_difference(adapter_weights(adapter), adapter_weights(reference)) == 0


def test_the_periodic_val_loss_is_token_level_like_eval_json(tiny_setup, tmp_path):
    set_seed(0)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False), 8, 16, 0)
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    val = JsonlDataset(tiny_setup["stage1_val"], builder, limit=7)
    settings = run_settings(tiny_setup["model"], stage={"batch_size": 2})
    args = training_arguments(tmp_path, settings["stage"], settings["training"], settings["model"])
    pad = processor.tokenizer.pad_token_id
    trainer = CurriculumTrainer(model=model, args=args, eval_dataset=val,
                                data_collator=collator("longest", pad),
                                metrics=MetricsLog(tmp_path, 0, len(val)))  # fmt: skip
    periodic = trainer.evaluate()
    trainer.data_collator = collator("packed", pad)  # packing changes no token's loss
    packed = trainer.evaluate()
    assert packed["eval_tokens"] == periodic["eval_tokens"]
    assert packed["eval_loss"] == pytest.approx(periodic["eval_loss"], rel=1e-5)

    journal = Journal(tmp_path / "progress.jsonl", "fingerprint")
    records = sample_losses(model, val, "stage1_val", 3, pad, 0, "float32", journal)
    final = loss_summary(records)
    assert periodic["eval_tokens"] == final["tokens"]
    assert periodic["eval_loss"] == pytest.approx(final["loss"], rel=1e-6)
    # what the Trainer's own evaluation would report: a mean of batch means, here not
    # the same (yes/no answers and longer ones carry different token counts)
    batch_means = []
    for start in range(0, len(val), 2):
        batch = collator("longest", pad)([val[i] for i in range(start, min(start + 2, len(val)))])
        batch_means.append(float(model(**split_counters(batch)[0]).loss))
    assert abs(sum(batch_means) / len(batch_means) - final["loss"]) > 1e-4


def complete_checkpoints(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                  if (p / COMPLETE_MARKER).exists())  # fmt: skip


@pytest.mark.slow
def test_kills_during_consecutive_saves_never_rotate_the_last_complete_checkpoint_away(
    tiny_setup, tmp_path
):
    settings = {"max_steps": 6, "save_steps": 1, "save_total_limit": 2}
    reference = adapter_weights(run(tiny_setup, tmp_path / "reference", **settings))
    assert complete_checkpoints(tmp_path / "reference" / "checkpoints") == [5, 6]
    killed = tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    for done in (1, 2, 3):  # each attempt killed in the middle of saving step done + 1
        process = start_training(tiny_setup, killed, slow_save=0.5, **settings)
        wait_for(checkpoints / f"checkpoint-{done}" / COMPLETE_MARKER, process)
        wait_for(checkpoints / f"checkpoint-{done + 1}", process)  # its save has begun
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        assert not (checkpoints / f"checkpoint-{done + 1}" / COMPLETE_MARKER).exists()
        # the half-written one counts for nothing: the newest complete ones stay
        assert complete_checkpoints(checkpoints) == {1: [1], 2: [1, 2], 3: [2, 3]}[done]
    resumed = start_training(tiny_setup, killed, **settings)
    assert resumed.wait(timeout=300) == 0, (killed / "driver.log").read_text()
    log = (killed / "driver.log").read_text()
    assert "Resumed from checkpoint: step=3" in log and "half-written" in log
    assert complete_checkpoints(checkpoints) == [5, 6]
    assert not [p for p in checkpoints.glob("checkpoint-*") if not (p / COMPLETE_MARKER).exists()]
    assert list(checkpoints.glob("incomplete-*/checkpoint-4"))  # moved aside, not resumed
    assert max_difference(adapter_weights(killed / "adapter"), reference) <= 1e-7


def test_rotation_counts_and_deletes_complete_checkpoints_only(tmp_path):
    for step in range(1, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step <= 4:
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("done")
    time.sleep(0.01)
    os.utime(tmp_path / "checkpoint-1")  # the newest time stamp must not matter
    assert [p.name for p in rotate_checkpoints(tmp_path, keep=2)] == ["checkpoint-1",
                                                                       "checkpoint-2"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6"]  # fmt: skip
    assert rotate_checkpoints(tmp_path, keep=None) == []
    moved = set_aside_incomplete(tmp_path)
    assert sorted(p.name for p in moved) == ["checkpoint-5", "checkpoint-6"]
    assert complete_checkpoints(tmp_path) == [3, 4] and len(list(tmp_path.glob("incomplete-*")))
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"


def test_a_non_finite_loss_or_weight_is_never_marked_complete(tmp_path):
    class State:
        global_step, log_history = 7, [{"loss": 1.0}, {"loss": float("nan")}]

    model = torch.nn.Linear(2, 2)
    with pytest.raises(FloatingPointError, match="step 7: the loss is not finite"):
        refuse_non_finite(State(), model)
    State.log_history = [{"loss": 1.0}]
    refuse_non_finite(State(), model)  # finite: saved as usual
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="LoRA weights are not finite; checkpoint-7"):
        refuse_non_finite(State(), model)


def test_steps_in_which_no_sample_fits_are_skipped_not_fatal(tiny_setup, tmp_path):
    from peft import get_peft_model_state_dict

    unfit = with_unfit_rows(tiny_setup["stage1_train"], tmp_path / "unfit.jsonl", every=1)
    setup = {**tiny_setup, "stage1_train": unfit}
    adapter = adapter_weights(run(setup, tmp_path / "run", max_steps=2))
    log = (tmp_path / "run" / "training.log").read_text()
    assert log.count("no sample fits max_seq_len; the optimizer skips it") == 2
    rows = csv_rows(tmp_path / "run" / "train_metrics.csv")
    assert [int(r["skipped_samples"]) for r in rows] == [8, 8]
    assert [int(r["samples"]) for r in rows] == [0, 0]
    # no optimizer step: not even weight decay moved the freshly initialised LoRA weights
    set_seed(0)
    fresh = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False),
                        8, 16, 0.1)  # fmt: skip
    initial = {k: v for k, v in get_peft_model_state_dict(fresh).items()}
    assert max_difference(adapter, initial) == 0
