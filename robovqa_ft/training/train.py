"""Train one LoRA run (stage 1, stage 2, or the stage-2-only ablation) so that a crash costs
minutes: checkpoints live outside Snakemake's outputs, each counts only once complete,
and a restart resumes the newest with optimizer, scheduler, RNG and data position.

Reads top to bottom: lock and check the checkpoint folder; build model, data and
Trainer; resume or start; save the adapter atomically.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path

import torch
import yaml
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch.utils.data import DataLoader, Subset
from transformers import Trainer, TrainingArguments, set_seed

from robovqa_ft.core.files import atomic_directory, atomic_open
from robovqa_ft.core.logs import ATTEMPT_START
from robovqa_ft.core.provenance import provenance
from robovqa_ft.core.runs import EVENTS_DIR
from robovqa_ft.core.settings import per_rank_accumulation
from robovqa_ft.core.space import named_if_full
from robovqa_ft.training import ranks
from robovqa_ft.training.callbacks import KEPT_ON_FULL_CHECKPOINT, CrashSafety, SamplerEpoch
from robovqa_ft.training.checkpoints import (
    exclusive_lock,
    fingerprint,
    latest_complete_checkpoint,
    prepare_checkpoint_dir,
    require_training_space,
    set_aside_incomplete,
)
from robovqa_ft.training.collate import collator, split_counters
from robovqa_ft.training.curves import (
    TENSORBOARD,
    Heartbeat,
    TensorBoardCurves,
    trainer_integrations,
)
from robovqa_ft.training.families import model_family
from robovqa_ft.training.loss import labelled_token_losses, loss_sums
from robovqa_ft.training.memory import MemoryGuard, refuse_a_repeat
from robovqa_ft.training.metrics import MetricsLog
from robovqa_ft.training.model import (
    attach_lora,
    check_adapter,
    load_model,
    load_processor,
    resolved_revision,
)
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder, clip_order
from robovqa_ft.training.steps import (
    ClipStepSampler,
    StepSampler,
    finished_at,
    training_order,
    workers_ignore_sigterm,
)
from robovqa_ft.training.trees import ClipTrees, check_layout

log = logging.getLogger(__name__)


class CurriculumTrainer(Trainer):
    """The Trainer, with the loss computed on labelled positions only, counting real
    tokens and dropped turns into `metrics`, and taking its training order from
    `train_sampler` when given (else the Trainer's own)."""

    loss_is_scaled_for_ga = True  # divided by the whole step's labelled tokens, below

    def __init__(
        self,
        *args,
        metrics: MetricsLog,
        train_sampler: StepSampler | ClipStepSampler | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.metrics, self.train_sampler = metrics, train_sampler
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
        loader = workers_ignore_sigterm(DataLoader(
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
        return workers_ignore_sigterm(super().get_train_dataloader())

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)


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
    family = model_family(model["name"], revision, model.get("frames_as", "video"))
    if training["padding"] == "packed" and not family.packs:
        raise ValueError(
            f"training.padding 'packed' needs 1-D rotary positions (InternVL); {model['name']} "
            "uses 3-D ones: use 'grouped' instead"
        )
    trees = stage.get("layout", "separate") == "tree"
    check_layout(stage, model["attn_implementation"])
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
            log.info(ATTEMPT_START + "%d processes; base model %s at revision %s", me.size,
                     model["name"], revision or "(a local folder)")  # fmt: skip
        current = ranks.from_main(current)  # also waits for rank 0 to sort the checkpoints
        refuse_a_repeat(checkpoint_dir, model.get("max_memory_gb"), current)
        resume = latest_complete_checkpoint(checkpoint_dir)

        processor = load_processor(model["name"], revision)
        # The data and its order before the model: a clip too large for a step, or too
        # few samples for one, stops the job before minutes of loading.
        builder = SampleBuilder(
            processor, family, images_dir, stage["max_frames"], stage["max_seq_len"],
            frame_rate=model.get("frame_rate"),
        )  # fmt: skip
        train_set = JsonlDataset(train_jsonl, builder)
        clips = clip_order(val_jsonl, val_seed)[: training["eval_clips"]]
        val_set = JsonlDataset(val_jsonl, builder, clips=clips)
        val_questions = len(val_set)
        if trees:  # items by clip, each clip's questions as trees
            train_set, val_set = ClipTrees(train_set), ClipTrees(val_set)
        sampler = training_order(train_set, stage, training, checkpoint_dir, current)
        set_seed(training["seed"])  # before LoRA's random initialisation
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
        args = training_arguments(checkpoint_dir, stage, training, model)
        if args.world_size != me.size:  # e.g. torchrun with use_cpu=False on a CPU box
            raise RuntimeError(f"{me.size} processes, but the Trainer sees {args.world_size}")
        resumed_step = int(resume.name.split("-")[-1]) if resume else 0
        metrics = MetricsLog(run_dir, resumed_step, val_questions)
        safety = CrashSafety(
            checkpoint_dir, training["save_every_minutes"], training["save_total_limit"]
        )
        guard = MemoryGuard(model, stage, checkpoint_dir, current)
        # after CrashSafety, so that a save the heartbeat reports is marked complete
        watchers = [Heartbeat(run_dir, resumed_step)]
        if TENSORBOARD in training.get("report_to", []):
            watchers.append(TensorBoardCurves(run_dir, resumed_step))
        trainer = CurriculumTrainer(
            model=peft_model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=collator(
                training["padding"], processor.tokenizer.pad_token_id, model["attn_implementation"]
            ),
            callbacks=[safety, metrics, SamplerEpoch(sampler), guard, *watchers],
            metrics=metrics,
            train_sampler=sampler,
        )
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


def training_arguments(
    checkpoint_dir: Path, stage: dict, training: dict, model: dict
) -> TrainingArguments:
    """The stage's hyperparameters, one to one, plus the run's checkpoint and eval cadence.
    Each process accumulates its share of `grad_accum`: the global batch never changes."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        # the tree layout's micro-batch is one item of whole clips (`ClipStepSampler`)
        per_device_train_batch_size=1 if stage.get("layout") == "tree" else stage["batch_size"],
        per_device_eval_batch_size=stage["batch_size"],
        gradient_accumulation_steps=per_rank_accumulation(stage["grad_accum"], ranks.world().size),
        learning_rate=stage["learning_rate"],
        num_train_epochs=stage["epochs"],
        max_steps=training["max_steps"],
        # A float below 1 is read as a share of the steps (transformers has no
        # warmup_ratio argument any more): warmup_ratio 0.03 warms up over 3% of them.
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
