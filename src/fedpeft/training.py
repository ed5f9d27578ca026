"""The local train / evaluate loop: plain PyTorch, short enough to read in one sitting.

AdamW over exactly the parameters the method trains, linear decay to 0 within the local run, no
warmup steps, gradient clipping, optional bf16 / fp16 autocast (losses stay float32; fp16 with a
gradient scaler). Every random draw (data order, dropout) comes from the seed the caller derives for
(client, round, phase).

Devices: batches are built on the CPU and moved to the device the model's parameters are on
(`model_device`); autocast follows that device's type; what the loop hands back (predictions, a
continued optimiser's state) is on `hardware.WIRE_DEVICE`, so client stores never hold device memory.

Generation data (`EncodedLM`, token labels [B, T]) trains a causal LM: the loss is the float32
cross-entropy of the shifted next-token predictions, averaged over the target tokens of the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedpeft import hardware
from fedpeft.data.batching import Encoded, EncodedLM, eval_batches, num_batches, train_batches


@dataclass
class TrainStats:
    loss: float
    steps: int
    examples: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    compute_seconds: float  # time inside forward + backward + optimizer step
    optimizer_state: dict | None = None  # to continue the same AdamW run later (FedLEASE warmup)
    end_step: int = 0


def autocast(precision: str, device):
    """Autocast for a resolved `precision` on `device` (a torch.device or name): its type decides."""
    return hardware.autocast(precision, device)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    logits = logits.float()
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def model_device(model) -> torch.device:
    """Where the model computes: the device of its parameters (the run's --device; a k-bit decoder's GPU)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A batch's tensors on `device` (the same tensors when they are there already)."""
    return {k: v.to(device) for k, v in batch.items()}


def to_wire(value):
    """`value` (a tensor, or dicts / lists of them, e.g. an optimiser's state_dict) with every tensor on
    `hardware.WIRE_DEVICE`: what a client keeps between rounds and what a checkpoint saves."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(hardware.WIRE_DEVICE)
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_wire(v) for v in value)
    return value


def batch_loss(model, batch: dict[str, torch.Tensor], labels: torch.Tensor, precision: str,
               regression: bool) -> torch.Tensor:
    """The loss of one batch: a classification/regression loss, or (token labels) the causal-LM loss."""
    device = model_device(model)
    batch, labels = to_device(batch, device), labels.to(device)
    with autocast(precision, device):
        out = model(**batch, labels=labels) if labels.dim() == 2 else model(**batch)
    if labels.dim() == 2:
        logits, targets = out
        return F.cross_entropy(logits.float(), targets)
    return task_loss(out, labels, regression)


def train_local(model, data: Encoded, params: list[torch.nn.Parameter], *, epochs: int, lr: float,
                batch_size: int, seed: int, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                precision: str = "fp32", regression: bool = False,
                extra_loss: Callable[[], torch.Tensor] | None = None,
                optimizer_state: dict | None = None, start_step: int = 0,
                schedule_steps: int | None = None, constant_lr: bool = False) -> TrainStats:
    """Train `params` of `model` on `data` for `epochs` epochs; everything else stays frozen.

    By default each call is one fresh AdamW run whose learning rate decays linearly to 0. To spread
    one run over several calls, pass the previous call's `optimizer_state` and `end_step` as
    `start_step`, and the whole run's length as `schedule_steps`.
    """
    start = time.perf_counter()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    torch.manual_seed(seed)  # dropout stream of this (client, round, phase), on every device's generator
    rng = np.random.default_rng(seed)  # data order: numpy, the same on every device
    steps_total = schedule_steps or epochs * num_batches(len(data), batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    # fp16 (CUDA): the loss is scaled so small gradients survive float16; steps with inf/NaN are skipped
    scaler = torch.amp.GradScaler(hardware.device_type(params[0].device)) if precision == "fp16" else None
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 1.0) if constant_lr else (lambda step: max(0.0, 1 - (start_step + step) / steps_total)))
    model.train()
    losses, examples, real, padded, compute = [], 0, 0, 0, 0.0
    for _ in range(epochs):
        for batch in train_batches(data, batch_size, rng):
            labels = batch.pop("labels")
            t0 = time.perf_counter()
            loss = batch_loss(model, batch, labels, precision, regression)
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            schedule.step()
            compute += time.perf_counter() - t0
            losses.append(loss.item())
            examples += len(labels)
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    model.eval()
    return TrainStats(float(np.mean(losses)), len(losses), examples, real, padded,
                      time.perf_counter() - start, compute,
                      to_wire(optimizer.state_dict()) if optimizer_state is not None or schedule_steps else None,
                      start_step + len(losses))


@torch.inference_mode()
def predict(model, data: Encoded, *, batch_size: int, precision: str = "fp32",
            regression: bool = False) -> tuple[np.ndarray, float]:
    """Predictions in the data's original order, and the mean loss."""
    model.eval()
    device = model_device(model)
    preds = np.zeros(len(data), dtype=np.float32 if regression else np.int64)
    total = 0.0
    for idx, batch in eval_batches(data, batch_size):
        labels = batch.pop("labels").to(device)
        with autocast(precision, device):
            logits = model(**to_device(batch, device)).float()
        total += task_loss(logits, labels, regression).item() * len(idx)
        preds[idx] = (logits.squeeze(-1) if regression else logits.argmax(-1)).to(hardware.WIRE_DEVICE).numpy()
    return preds, total / max(1, len(data))


@torch.inference_mode()
def lm_mean_loss(model, data: EncodedLM, *, batch_size: int, precision: str = "fp32") -> float:
    """Mean cross-entropy per target token over the whole dataset (each token weighs the same)."""
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for _, batch in eval_batches(data, batch_size):
        labels = batch.pop("labels")
        batch, labels = to_device(batch, device), labels.to(device)
        with autocast(precision, device):
            logits, targets = model(**batch, labels=labels)
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(1, count)


@torch.inference_mode()
def mean_loss(model, data: Encoded | EncodedLM, *, batch_size: int, precision: str = "fp32",
              regression: bool = False) -> float:
    if isinstance(data, EncodedLM):
        return lm_mean_loss(model, data, batch_size=batch_size, precision=precision)
    return predict(model, data, batch_size=batch_size, precision=precision, regression=regression)[1]
