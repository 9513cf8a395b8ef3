"""Fine-tuning one LoRA adapter (QLoRA with bitsandbytes nf4 when `training.quantization = "4bit"`)
with the transformers `Trainer`: loss on answer tokens only, gradient accumulation, eval loss each
epoch with early stopping, a fixed seed; a warm start continues the champion's weights; the adapter
is written to a temporary folder, fsynced and renamed. Called by the trainer process
(`retraining/train.py`), which owns the run record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gateway.core.settings import Settings
from gateway.engine.model_files import resolve_base_model
from gateway.store.base import utcnow


def _prompt_variants(messages: list[dict]) -> list[list[dict]]:
    """The prompt as the model saw it, then (for long conversations) just the system turn and the
    last customer turn: the system turn carries the retrieved context and must survive."""
    prompt = messages[:-1]
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=0)
    system = [m for m in prompt[:1] if m["role"] == "system"]
    short = system + prompt[last_user:]
    return [prompt] if short == prompt else [prompt, short]


def use_cuda(device: str) -> bool:
    """`training.device`: "auto" trains on a GPU when torch sees one; "cuda" insists (a clear error
    on a machine without one, rather than hours on the CPU); "cpu" never uses one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device = 'cuda' but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    return device != "cpu" and torch.cuda.is_available()


def encode(tokenizer, messages: list[dict], max_tokens: int) -> dict | None:  # noqa: ANN001
    """Token ids with labels only on the answer, whole, with its end-of-turn token (so answers learn
    to end). An example over `max_tokens` drops its earlier conversation turns; if the system turn,
    the last question and the whole answer still do not fit, it is skipped (None): a cut answer
    would teach the model to stop mid-sentence, a cut context to answer without it."""
    answer = messages[-1]
    for prompt_messages in _prompt_variants(messages):
        prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt_messages + [answer], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template does not extend the prompt with the answer")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) <= max_tokens:
            ids = prompt_ids + answer_ids
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + answer_ids}
    return None


def load_model(base: str, cfg, parent: Path | None = None):  # noqa: ANN001
    """The base model with a trainable LoRA adapter: a fresh one, or (warm start) the parent's
    weights loaded trainable, so training continues from what the champion knows."""
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if cfg.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32,
                                                     local_files_only=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    if parent is not None:
        return tokenizer, PeftModel.from_pretrained(model, str(parent), is_trainable=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return tokenizer, get_peft_model(model, lora)


def save_atomically(model, out_dir: Path) -> None:  # noqa: ANN001
    """Write the adapter to a temporary sibling folder, fsync every file and the folder, then rename
    it into place: a crash or a full disk never leaves a half-written version folder."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AnswerLossTrainer(Trainer):
    """The loss the model's own forward computes, with the output head run only where a label is.

    Labels cover the answer alone (about a quarter of an example's tokens: the system turn and the
    retrieved entry come first), yet `LlamaForCausalLM.forward` projects every position onto the
    49k-token vocabulary: on the 135M model that head is a fifth of the matmul work and most of a
    step's activation memory, spent on logits the loss ignores. Same sum of token losses over the
    same normaliser as transformers' `ForCausalLMLoss` (tested equal, gradients included), so
    `loss_is_scaled_for_ga` is left to the Trainer as for the model's own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        causal_lm = self.accelerator.unwrap_model(model)
        if isinstance(causal_lm, PeftModel):
            causal_lm = causal_lm.get_base_model()  # LoRA layers are injected in place: still trained
        targets = inputs["labels"][:, 1:]
        answer = targets != -100
        with self.accelerator.autocast():  # `training.bf16`: what accelerate wraps the model's own forward in
            hidden = causal_lm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            logits = causal_lm.lm_head(hidden[:, :-1][answer]).float()
        loss = F.cross_entropy(logits, targets[answer], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else answer.sum().clamp(min=1))
        return (loss, {"loss": loss}) if return_outputs else loss


class _Progress(TrainerCallback):
    """Step, loss, ETA → the run record (throttled) and the log file."""

    def __init__(self, report, log) -> None:  # noqa: ANN001
        self.report, self.log = report, log
        self.started = time.perf_counter()
        self.epochs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        logs = logs or {}
        elapsed = time.perf_counter() - self.started
        step, total = state.global_step, state.max_steps or 1
        eta = elapsed / step * (total - step) if step else None
        progress = {"phase": "training", "step": step, "total_steps": total, "epoch": round(state.epoch or 0, 3),
                    "loss": logs.get("loss"), "eval_loss": logs.get("eval_loss"),
                    "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                    "eval_losses": self.epochs}
        epoch = round(state.epoch or 0, 3)
        if "eval_loss" in logs and not (self.epochs and self.epochs[-1]["epoch"] == epoch):  # not the final re-check
            self.epochs.append({"epoch": epoch, "eval_loss": logs["eval_loss"]})
        self.log(json.dumps({"at": utcnow().isoformat(), **logs, "step": step}))
        self.report(progress)


def train_adapter(settings: Settings, train_rows: list[list[dict]], eval_rows: list[list[dict]], out_dir: Path,
                  report, log, parent: Path | None = None) -> dict:  # noqa: ANN001
    """Train (from scratch, or on top of `parent`'s adapter) and save the adapter; returns training metrics."""
    cfg = settings.training
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    tokenizer, model = load_model(resolve_base_model(settings.model.base, settings.storage.data_dir), cfg, parent)
    encoded = [encode(tokenizer, m, cfg.max_seq_tokens) for m in train_rows]
    train_ds = [e for e in encoded if e is not None]
    eval_ds = [e for e in (encode(tokenizer, m, cfg.max_seq_tokens) for m in eval_rows) if e is not None]
    skipped = len(encoded) - len(train_ds)
    if skipped:
        log(json.dumps({"skipped_too_long": skipped, "max_seq_tokens": cfg.max_seq_tokens}))
    if not train_ds:
        raise ValueError(f"every training example is longer than training.max_seq_tokens={cfg.max_seq_tokens}")
    learning_rate = settings.retraining.warm_learning_rate if parent is not None else cfg.learning_rate
    epochs = settings.retraining.warm_epochs if parent is not None else cfg.epochs
    steps_per_epoch = max(1, -(-len(train_ds) // (cfg.batch_size * cfg.grad_accum)))
    total = cfg.max_steps or steps_per_epoch * epochs
    checkpoints = out_dir.parent / f".{out_dir.name}-checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=learning_rate, num_train_epochs=epochs, max_steps=cfg.max_steps or -1,
        warmup_steps=int(total * cfg.warmup_ratio), lr_scheduler_type="linear", logging_steps=cfg.progress_every_steps,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, save_only_model=True,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=not use_cuda(cfg.device), report_to="none",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        prediction_loss_only=True,  # never keep eval logits (batch × tokens × 49k vocab) in memory
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding to push through the model
        bf16=cfg.bf16,
    )
    progress = _Progress(report, log)
    trainer = (AnswerLossTrainer if cfg.answer_only_logits else Trainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[progress] + ([EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []),
    )
    started = time.perf_counter()
    try:
        result = trainer.train()
        # load_best_model_at_end: the weights kept are the best evaluation's, whose loss the trainer
        # recorded; evaluating them again would cost a whole pass over the evaluation set
        best = trainer.state.best_metric
        final_eval = {"eval_loss": best} if best is not None else trainer.evaluate()
        seconds = time.perf_counter() - started
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(trainer.model, out_dir)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)  # only the final adapter is kept
    return {
        "train_loss": result.training_loss, "eval_loss": final_eval.get("eval_loss"), "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3), "train_seconds": round(seconds, 1),
        "examples_per_s": round(len(train_ds) * (trainer.state.epoch or 0) / seconds, 3) if seconds else None,
        "eval_losses": progress.epochs, "quantization": cfg.quantization,
        "initialised_from": "parent adapter" if parent is not None else "base model",
        "learning_rate": learning_rate, "examples": len(train_ds), "skipped_too_long": skipped,
        "peak_rss_mb": round(_peak_rss_mb(), 1), "answer_only_logits": cfg.answer_only_logits, "bf16": cfg.bf16,
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
