"""Train one LoRA run (stage 1, stage 2, or the stage-2-only ablation) so that a crash costs
minutes: checkpoints live outside Snakemake's outputs, each counts only once complete,
and a restart resumes the newest with optimizer, scheduler, RNG and data position.

Reads top to bottom: lock and check the checkpoint folder; build model, data and
Trainer; resume or start; save the adapter atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch.utils.data import DataLoader, Subset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from robovqa_ft import ranks
from robovqa_ft.checkpoints import (
    COMPLETE_MARKER,
    exclusive_lock,
    fingerprint,
    latest_complete_checkpoint,
    prepare_checkpoint_dir,
    rotate_checkpoints,
    set_aside_incomplete,
)
from robovqa_ft.curves import TENSORBOARD, Heartbeat, TensorBoardCurves, trainer_integrations
from robovqa_ft.files import atomic_directory, atomic_open, write_json_atomic
from robovqa_ft.launch import per_rank_accumulation
from robovqa_ft.loss import labelled_token_losses, loss_sums
from robovqa_ft.memory import MemoryGuard, cuda_peak_allocated_gb, refuse_a_repeat
from robovqa_ft.model import (
    attach_lora,
    check_adapter,
    load_model,
    load_processor,
    model_family,
    resolved_revision,
)
from robovqa_ft.provenance import provenance
from robovqa_ft.samples import (
    JsonlDataset,
    SampleBuilder,
    StepSampler,
    clip_order,
    collator,
    split_counters,
)
from robovqa_ft.space import named_if_full, require_training_space
from robovqa_ft.status import EVENTS_DIR

log = logging.getLogger(__name__)

KEPT_ON_FULL_CHECKPOINT = "the last complete checkpoint stays the one a rerun resumes"


class CrashSafety(TrainerCallback):
    """Marks finished checkpoints, saves every `save_every_minutes`, and on SIGTERM.

    Under DDP the ranks agree: a save or a stop wanted by any rank happens on every rank
    at the same step, and rank 0 marks a checkpoint complete only once every rank has
    written its part of it.
    """

    def __init__(self, checkpoint_dir: Path, save_every_minutes: float, keep: int | None = None):
        self.checkpoint_dir, self.keep = checkpoint_dir, keep
        self.interval = save_every_minutes * 60
        self.last_save = time.monotonic()
        self.terminated = self.stopped = False
        self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.terminated = True

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.last_save >= self.interval
        terminated, due = ranks.highest([self.terminated, due])
        if terminated:
            self.stopped = True  # agreed by every rank, unlike `terminated`
            log.warning("stopping at step %d, after saving a checkpoint", state.global_step)
            control.should_save = control.should_training_stop = True
        elif due:
            control.should_save = True

    def on_save(self, args, state, control, model=None, **kwargs):
        # The Trainer calls this on every rank right after that rank's part of the save.
        # Every rank holds the same weights, so all of them refuse a non-finite one alike.
        refuse_non_finite(state, model)
        ranks.barrier()
        if ranks.world().is_main:
            folder = self.checkpoint_dir / f"checkpoint-{state.global_step}"
            files = sorted(p.name for p in folder.iterdir())
            with named_if_full(folder, "a checkpoint", KEPT_ON_FULL_CHECKPOINT):
                (folder / COMPLETE_MARKER).write_text(
                    time.strftime("%Y-%m-%d %H:%M:%S\n") + "".join(f"{f}\n" for f in files)
                )
            log.info("checkpoint saved: step=%d", state.global_step)
            # The project rotates, not the Trainer: after the marker, complete ones only.
            rotate_checkpoints(self.checkpoint_dir, self.keep)
        self.last_save = time.monotonic()


def refuse_non_finite(state: Any, model: Any) -> None:
    """Stop before a checkpoint of non-finite loss or weights is marked complete: resuming
    it could only repeat the divergence."""
    losses = [row["loss"] for row in state.log_history if "loss" in row]
    weights = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    bad_loss = bool(losses) and not math.isfinite(losses[-1])
    bad_weights = any(not torch.isfinite(p).all() for p in weights)
    if bad_loss or bad_weights:
        what = "the loss is" if bad_loss else "the LoRA weights are"
        raise FloatingPointError(
            f"step {state.global_step}: {what} not finite; checkpoint-"
            f"{state.global_step} is not marked complete, and a rerun resumes from the last "
            "complete one: lower the learning rate or check the data of this step"
        )


class SamplerEpoch(TrainerCallback):
    """Gives the sampler its epoch at each epoch's start, from the step count: on a
    mid-epoch resume under DDP the Trainer's own `set_epoch` does not reach a sampler
    inside accelerate's skip and shard wrappers, and would replay epoch 0's order."""

    def __init__(self, sampler: StepSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(state.global_step // self.sampler.steps)


class MetricsLog(TrainerCallback):
    """`train_metrics.csv` and `eval_metrics.csv` in the run folder, kept across resumes,
    and the counters of the logging window behind the project's figures (`figures`, which
    the Trainer adds to its logs). Counters are the job's (summed over ranks); rank 0 writes."""

    TRAIN = ["step", "epoch", "loss", "learning_rate", "grad_norm", "samples", "samples_per_s",
             "tokens_per_s", "real_token_share", "peak_memory_gb", "dropped_turns",
             "skipped_samples"]  # fmt: skip
    EVAL = ["step", "epoch", "eval_loss", "eval_samples", "eval_tokens"]

    def __init__(self, run_dir: Path, resumed_step: int, eval_samples: int):
        self.train_csv, self.eval_csv = run_dir / "train_metrics.csv", run_dir / "eval_metrics.csv"
        self.eval_samples = eval_samples
        self.writes = ranks.world().is_main
        for path, fields in ((self.train_csv, self.TRAIN), (self.eval_csv, self.EVAL)):
            if self.writes:
                _keep_rows_up_to(path, fields, resumed_step)
        self.window_start, self.samples, self.tokens, self.computed = time.monotonic(), 0, 0, 0
        self.dropped = self.skipped = 0  # per logging window, like samples and tokens

    def count(
        self,
        *,
        samples: int,
        dropped_turns: int,
        skipped_samples: int,
        real_tokens: int,
        computed_tokens: int,
    ) -> None:
        """Add a micro-batch's counters (`split_counters`), Python ints from the collator."""
        self.samples += samples
        self.tokens += real_tokens
        self.computed += computed_tokens
        self.dropped += dropped_turns
        self.skipped += skipped_samples

    def figures(self) -> dict[str, float]:
        """The window's samples, throughput, real-token share, peak memory, dropped turns
        and skipped samples, summed over ranks (every rank calls this); then a new window."""
        seconds = max(time.monotonic() - self.window_start, 1e-9)
        samples, tokens, computed, dropped, skipped = ranks.summed(
            [self.samples, self.tokens, self.computed, self.dropped, self.skipped]
        )
        peak = cuda_peak_allocated_gb()  # since the process started, as the guard resets it
        (peak,) = ranks.highest([peak])
        self.window_start, self.samples, self.tokens, self.computed = time.monotonic(), 0, 0, 0
        self.dropped = self.skipped = 0
        return {"samples": int(samples), "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "real_token_share": round(tokens / max(computed, 1), 4),
                "peak_memory_gb": round(peak, 3), "dropped_turns": int(dropped),
                "skipped_samples": int(skipped)}  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        if "eval_loss" in logs and self.writes:
            _append(self.eval_csv, self.EVAL, {**row, "eval_loss": logs["eval_loss"],
                                               "eval_samples": self.eval_samples,
                                               "eval_tokens": logs.get("eval_tokens")})  # fmt: skip
        elif "loss" in logs and self.writes:
            _append(self.train_csv, self.TRAIN, {**row, **{k: logs.get(k) for k in self.TRAIN[2:]}})


def _append(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    kept = "a rerun drops the row cut short and resumes from the last complete checkpoint"
    with (
        named_if_full(path, "the metrics", kept),
        path.open("a", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _keep_rows_up_to(path: Path, fields: list[str], step: int) -> None:
    """Drop rows past the resumed step: they will be logged again. So is a last row
    that a full disk or a kill cut short (it lacks its line end), which could read as
    another step (12 cut to 1) or not at all."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", newline="") as handle:
        text = handle.read()
    whole = io.StringIO(text[: text.rfind("\n") + 1])
    rows = [r for r in csv.DictReader(whole) if int(r["step"]) <= step]
    with named_if_full(path, "the metrics"), atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class CurriculumTrainer(Trainer):
    """The Trainer, with the loss computed on labelled positions only, counting real
    tokens and dropped turns for the metrics, and taking its training order from
    `train_sampler` when given."""

    metrics: MetricsLog
    train_sampler: StepSampler | None = None
    loss_is_scaled_for_ga = True  # divided by the whole step's labelled tokens, below

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The Trainer counts a step's labelled tokens only for models that take loss
        # kwargs, which Qwen-VL's classes say they do not; `compute_loss` passes none.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            if num_items_in_batch is None:  # the Trainer counts them for models like ours
                raise RuntimeError("the Trainer gave no labelled-token count for this step")
            self.metrics.count(**split_counters(inputs)[1])
        losses = labelled_token_losses(model, inputs).losses
        # As the model's own loss would be: the sum over the step's labelled tokens (of
        # every rank, which DDP's gradient mean then undoes), or this batch's mean. One
        # process per GPU (launch.py): no DataParallel, no tensor parallelism.
        if num_items_in_batch is None:
            loss = losses.mean()
        else:
            # a step with no labelled token (no sample fitted): zero loss, and the
            # optimizer skips it (`create_optimizer`)
            # (a tensor on the device: read once per step, in the optimizer's step)
            tokens = torch.as_tensor(num_items_in_batch)
            loss = losses.sum() / tokens.clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            self.step_tokens = tokens
        return (loss, {}) if return_outputs else loss

    step_tokens = 1  # the current step's labelled tokens (of this rank, or of all)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The project's figures join a training log before any callback sees it, so that
        # the CSV, TensorBoard and every report_to integration get the same numbers.
        if "loss" in logs:
            logs.update(self.metrics.figures())
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        # The Trainer's writes (weights, optimizer, RNG, state) in one place, named as
        # the folder they fill: a full disk leaves it without its completion marker.
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        with named_if_full(folder, "a checkpoint", KEPT_ON_FULL_CHECKPOINT):
            super()._save_checkpoint(model, trial)

    def create_optimizer(self, model=None):
        """The optimizer, skipping a step in which no rank has a labelled token: every
        rank decides alike (their counts summed), so the weights stay the same on all."""
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "skips_empty_steps", False):
            return optimizer
        step = optimizer.step

        def step_unless_empty(*args, **kwargs):
            if ranks.summed([float(self.step_tokens)])[0] == 0:
                log.warning("step %d: no sample fits max_seq_len; the optimizer skips it",
                            self.state.global_step + 1)  # fmt: skip
                return None
            return step(*args, **kwargs)

        optimizer.step, optimizer.skips_empty_steps = step_unless_empty, True
        return optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The periodic val loss as eval.json has it: the training loss summed per token
        over the whole val set, each rank taking every n-th sample, so that any number of
        processes gives the value of one (the Trainer's would be a mean of batch means)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        me = ranks.world()
        loader = _workers_ignore_sigterm(DataLoader(
            Subset(dataset, range(me.rank, len(dataset), me.size)),
            batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        ))  # fmt: skip
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            sums = loss_sums(self.model, loader, self.args.device)
        total, tokens = ranks.summed([sums["loss"], sums["tokens"]])
        metrics = {f"{metric_key_prefix}_loss": total / tokens,
                   f"{metric_key_prefix}_tokens": int(tokens)}  # fmt: skip
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)  # fmt: skip
        return metrics

    def get_train_dataloader(self):
        return _workers_ignore_sigterm(super().get_train_dataloader())

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)


def _workers_ignore_sigterm(loader):
    """A scheduler signals every process of the job, DataLoader workers too, whose death
    would crash the step before the training could save: they leave SIGTERM to it (and
    end with it)."""
    base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates this
    base.worker_init_fn = partial(_ignore_sigterm, base.worker_init_fn)
    return loader


def _ignore_sigterm(then, worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


@contextmanager
def _also_logged_to(path: Path) -> Iterator[None]:
    """The run's own log beside its metrics, appended across resumes."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        with suppress(OSError):  # on a full disk, the lines it could not write are lost,
            handler.close()  # not the run's own error (its close would raise in its place)


def train_run(
    train_jsonl: Path | str,
    val_jsonl: Path | str,
    images_dir: Path | str,
    adapter_dir: Path | str,
    run_dir: Path | str,
    checkpoint_dir: Path | str,
    model: dict,
    lora: dict,
    stage: dict,
    training: dict,
    init_adapter: Path | str | None = None,
    data_metadata: Path | str | None = None,
    val_seed: int = 0,
) -> Path:
    """Train LoRA on `train_jsonl` and write the adapter to `adapter_dir` when done.

    `model`, `lora`, `stage` and `training` are the config sections of the same names.
    `data_metadata` (the data's metadata.json) joins the fingerprint, so frames extracted
    anew with other settings never resume old checkpoints. The periodic val loss is taken
    on the first `training.eval_clips` clips of the seeded order `val_seed` (evaluation's
    seed: the clips of the final loss begin with them). Under torchrun, every rank
    calls this; rank 0 alone locks, checks and writes the run's files.
    """
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    # One hub commit for the whole job, in the fingerprint: a moved branch is another base.
    revision = resolved_revision(model["name"], model.get("revision"))
    family = model_family(model["name"], revision)
    if training["padding"] == "packed" and not family.packs:
        raise ValueError(
            f"training.padding 'packed' needs 1-D rotary positions (InternVL); {model['name']} "
            "uses 3-D ones: use 'grouped' instead"
        )
    if init_adapter is not None:  # before anything loads, locks or moves
        check_adapter(init_adapter, model["name"], lora["r"], lora["alpha"])
    me = ranks.world()
    per_rank_accumulation(stage["grad_accum"], me.size)  # before anything loads
    ranks.start(training["hang_timeout_minutes"])
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "lora": lora, "stage": stage, "training": training,
                "init_adapter": str(init_adapter) if init_adapter else None,
                "model_revision": revision}  # fmt: skip

    def main_only(context: AbstractContextManager) -> AbstractContextManager:
        return context if me.is_main else nullcontext()

    with (
        main_only(_also_logged_to(run_dir / "training.log")),
        main_only(exclusive_lock(checkpoint_dir)),
    ):
        current = None
        if me.is_main:
            inputs = [p for p in (train_jsonl, data_metadata, init_adapter) if p is not None]
            current = fingerprint(settings, inputs)
            prepare_checkpoint_dir(checkpoint_dir, current, run_dir / EVENTS_DIR)
            set_aside_incomplete(checkpoint_dir)
            with atomic_open(run_dir / "config.yaml") as handle:
                yaml.safe_dump({**settings, "provenance": provenance(me.size, revision)},
                               handle, sort_keys=False)  # fmt: skip
            log.info("Training with %d processes; base model %s at revision %s", me.size,
                     model["name"], revision or "(a local folder)")  # fmt: skip
        current = ranks.from_main(current)  # also waits for rank 0 to sort the checkpoints
        refuse_a_repeat(checkpoint_dir, model.get("max_memory_gb"), current)
        resume = latest_complete_checkpoint(checkpoint_dir)

        set_seed(training["seed"])  # before LoRA's random initialisation
        processor = load_processor(model["name"], revision)
        base = load_model(
            model["name"], model["quantization"], model["dtype"], model["attn_implementation"],
            model["gradient_checkpointing"], model.get("max_memory_gb"), revision,
        )  # fmt: skip
        peft_model = attach_lora(base, lora["r"], lora["alpha"], lora["dropout"], init_adapter)
        # Before the first checkpoint, on every rank alike (one statvfs): a rank left
        # waiting in a collective for one that stopped would hang until the timeout.
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        require_training_space(checkpoint_dir, trainable, training["save_total_limit"],
                               run_dir.name)  # fmt: skip
        builder = SampleBuilder(
            processor, family, images_dir, stage["max_frames"], stage["max_seq_len"]
        )
        train_set = JsonlDataset(train_jsonl, builder)
        clips = clip_order(val_jsonl, val_seed)[: training["eval_clips"]]
        val_set = JsonlDataset(val_jsonl, builder, clips=clips)
        sampler = training_order(train_set, stage, training, checkpoint_dir, current)
        args = training_arguments(checkpoint_dir, stage, training, model)
        if args.world_size != me.size:  # e.g. torchrun with use_cpu=False on a CPU box
            raise RuntimeError(f"{me.size} processes, but the Trainer sees {args.world_size}")
        trainer = CurriculumTrainer(
            model=peft_model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=collator(training["padding"], processor.tokenizer.pad_token_id),
        )
        trainer.train_sampler = sampler
        resumed_step = int(resume.name.split("-")[-1]) if resume else 0
        trainer.metrics = MetricsLog(run_dir, resumed_step, len(val_set))
        safety = CrashSafety(
            checkpoint_dir, training["save_every_minutes"], training["save_total_limit"]
        )
        guard = MemoryGuard(model, stage, checkpoint_dir, current)
        # after CrashSafety, so that a save the heartbeat reports is marked complete
        watchers = [Heartbeat(run_dir, resumed_step)]
        if TENSORBOARD in training.get("report_to", []):
            watchers.append(TensorBoardCurves(run_dir, resumed_step))
        for callback in (safety, trainer.metrics, SamplerEpoch(sampler), guard, *watchers):
            trainer.add_callback(callback)
        if resume:
            log.info("Resumed from checkpoint: step=%d (%s)", resumed_step, resume)
        else:
            log.info("Starting from step 0: no complete checkpoint in %s", checkpoint_dir)
        try:
            if resume and finished_at(resume):
                # Resumed at its last step, the Trainer would take one more before it stops.
                log.info("checkpoint-%d is the run's last step: the adapter is its weights",
                         resumed_step)  # fmt: skip
                set_peft_model_state_dict(peft_model, load_peft_weights(str(resume)))
            else:
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            signal.signal(signal.SIGTERM, safety.previous_handler)
        if guard.stop_message:  # agreed by every rank, after the checkpoint was saved
            raise SystemExit(guard.stop_message)
        if safety.stopped:  # a SIGTERM after the last step stops nothing: the run is done
            raise SystemExit(f"stopped by SIGTERM; resume from {checkpoint_dir} by re-running")
        if me.is_main:
            kept = "the checkpoints are kept: a rerun resumes the last one and saves the adapter"
            with (
                named_if_full(adapter_dir, "the adapter", kept),
                atomic_directory(adapter_dir) as tmp,
            ):
                peft_model.save_pretrained(tmp)
            log.info("adapter written to %s", adapter_dir)
        ranks.barrier()
    ranks.stop()
    return Path(adapter_dir)


def training_order(
    train_set: JsonlDataset, stage: dict, training: dict, checkpoint_dir: Path, current: str
) -> StepSampler:
    """The sampler of whole optimizer steps; for length grouping, with the samples' token
    lengths, measured once per run by rank 0 and kept beside its checkpoints."""
    me = ranks.world()
    step = stage["batch_size"] * stage["grad_accum"]
    lengths = None
    if training["padding"] == "grouped":
        path = checkpoint_dir / f"token_lengths-{current[:16]}.json"
        if me.is_main and not path.exists():
            log.info("Measuring %d samples' token lengths for length grouping", len(train_set))
            write_json_atomic(path, train_set.token_lengths())
            for old in checkpoint_dir.glob("token_lengths-*.json"):
                if old != path:
                    old.unlink()
        else:
            log.info("Token lengths for length grouping from %s", path)
        ranks.barrier()
        lengths = json.loads(path.read_text())
    sampler = StepSampler(
        len(train_set), step, training["seed"], lengths, stage["batch_size"], me.size
    )
    if sampler.steps == 0:
        raise ValueError(
            f"{len(train_set)} training samples are fewer than one optimizer step "
            f"(batch_size {stage['batch_size']} × grad_accum {stage['grad_accum']})"
        )
    if len(sampler) < len(train_set):
        log.info(
            "Each epoch is %d whole steps of %d samples: the last %d samples of each "
            "epoch's shuffle are left out", sampler.steps, step, len(train_set) - len(sampler),
        )  # fmt: skip
    return sampler


def finished_at(checkpoint: Path) -> bool:
    """Whether `checkpoint` is of the run's last step, by the Trainer's own count."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"]


def training_arguments(
    checkpoint_dir: Path, stage: dict, training: dict, model: dict
) -> TrainingArguments:
    """The stage's hyperparameters, one to one, plus the run's checkpoint and eval cadence.
    Each process accumulates its share of `grad_accum`: the global batch never changes."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=stage["batch_size"],
        per_device_eval_batch_size=stage["batch_size"],
        gradient_accumulation_steps=per_rank_accumulation(stage["grad_accum"], ranks.world().size),
        learning_rate=stage["learning_rate"],
        num_train_epochs=stage["epochs"],
        max_steps=training["max_steps"],
        warmup_steps=stage["warmup_ratio"],
        lr_scheduler_type=stage["scheduler"],
        max_grad_norm=stage["max_grad_norm"],
        adam_beta1=stage["adam_beta1"],
        adam_beta2=stage["adam_beta2"],
        weight_decay=stage["weight_decay"],
        bf16=cuda and model["dtype"] == "bfloat16",
        fp16=cuda and model["dtype"] == "float16",
        optim="adamw_torch",
        logging_steps=training["logging_steps"],
        eval_strategy="steps",
        eval_steps=training["eval_steps"],
        prediction_loss_only=True,  # the val loss is all the Trainer's evaluation gives
        save_strategy="steps",
        save_steps=training["save_steps"],
        # None: the Trainer rotates before the completion marker exists and by time stamp,
        # and could delete the last complete checkpoint; CrashSafety rotates instead.
        save_total_limit=None,
        seed=training["seed"],
        data_seed=training["seed"],
        dataloader_num_workers=training["dataloader_workers"],
        remove_unused_columns=False,
        # TensorBoard is written by curves.py (without TensorFlow), not the Trainer's;
        # missing (callers that pass no config): no integration
        report_to=trainer_integrations(training.get("report_to", [])),
        disable_tqdm=False,
        use_cpu=not cuda,
        # Only LoRA trains, and every LoRA weight is used: no search for unused ones
        # (the Trainer would do it for a PeftModel).
        ddp_find_unused_parameters=False,
        ddp_timeout=round(training["hang_timeout_minutes"] * 60),
        # Nothing in a micro-batch waits on the GPU: no NaN check of each micro-batch's loss
        # (a read of it; a non-finite loss is refused at the checkpoint instead, and shows
        # in the logged loss rather than being averaged away), and the batches' copies to
        # it from pinned memory (the default on a GPU) are asynchronous.
        logging_nan_inf_filter=False,
        accelerator_config={"non_blocking": True},
    )
