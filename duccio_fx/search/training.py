"""Training plumbing shared by the recipe's phases: batches, default loss and metric, evaluation, seeding."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from duccio_fx.common.device import to_device
from duccio_fx.common.errors import DuccioError

PHASES = ("warmup", "search", "finetune")
LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], float]


def cross_entropy(output: Any, target: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def top1(output: Any, target: Any) -> float:
    return float((output.argmax(1) == target).float().mean())


class StepLosses:
    """The losses of an epoch's steps without a host sync per step: the sample-weighted sum stays on the
    device (read once, at the end of the epoch), and the loss shown in the progress is the latest one whose
    copy to the host has arrived (started without blocking; on a CPU it arrives at once)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.shown = math.nan
        self._copy: tuple[torch.Tensor, Any] | None = None  # (host tensor, CUDA event or None)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        loss = loss.detach()
        self.total += loss.double() * samples
        self.count += samples
        if self._copy is None or self._arrived():
            self._start_copy(loss)

    def latest(self) -> float:
        """The most recent step loss the host holds (nan before the first one arrives)."""
        if self._copy is not None and self._arrived():
            self.shown = float(self._copy[0])  # a host tensor: no device read
        return self.shown

    def mean(self) -> tuple[float, int]:
        """(sum, samples) of the epoch: the one read of the device."""
        return float(self.total), self.count

    def _arrived(self) -> bool:
        event = self._copy[1] if self._copy is not None else None
        return event is None or event.query()

    def _start_copy(self, loss: torch.Tensor) -> None:
        if loss.device.type == "cuda":
            host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copy = (host, event)
        else:
            self._copy = (loss.clone(), None)
        self._copy[0].duccio_host_copy = True  # read without waiting for the device (see tests)


def seed_everything(seed: int, phase: str, epoch: int) -> None:
    """Reseed from (seed, phase, epoch), so a resumed run repeats an uninterrupted one exactly."""
    torch.manual_seed(seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch)


def _on(value: Any, device: torch.device | None) -> Any:
    return value if device is None else to_device(value, device)


def split_batch(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DuccioError("a data loader batch must be an (inputs, targets) pair", where="train_loader()/val_loader()",
                          fix="yield (inputs, targets) tuples, e.g. from a torch DataLoader over a TensorDataset")
    return batch[0], batch[1]


def call_model(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def evaluate_model(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, metric_fn: MetricFn,
                   device: torch.device | None = None, *, name: str = "val_loader()",
                   during: str = "") -> tuple[float, float]:
    """Sample-weighted mean loss and metric over a loader, in eval mode (batches moved to `device`). A batch
    the model, the loss or the metric fails on is a DuccioError naming `during` (e.g. "search epoch 3"), the
    batch and its shapes."""
    was = model.training
    model.eval()
    total = loss_sum = metric_sum = 0.0
    steps = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with torch.no_grad():
        for i, batch in enumerate(loader):
            x, y = _on(split_batch(batch), device)
            out, loss = loss_on_batch(model, x, y, loss_fn, where=batch_where(during, i, steps, name, x, y))
            n = len(y)
            loss_sum += float(loss) * n
            try:
                metric_sum += float(metric_fn(out, y)) * n
            except Exception as err:
                raise DuccioError(f"the metric failed on batch {i + 1} of {name}: {_first_line(err)}",
                                  where=batch_where(during, i, steps, name, x, y) + f", model output {_shapes(out)}",
                                  fix="make metric_fn(output, target) in the model file accept these batches "
                                      "(it returns a number; the default is top-1 accuracy)") from None
            total += n
    model.train(was)
    if total == 0:
        raise DuccioError(f"{name} yielded no batches", where=name)
    return loss_sum / total, metric_sum / total


def batch_where(during: str, index: int, steps: int | None, name: str, x: Any, y: Any) -> str:
    """`search epoch 2, batch 3 of 6 of train_loader(): inputs float32[32,1,8,8], targets int64[32]`."""
    batch = f"batch {index + 1}" + (f" of {steps}" if steps else "") + f" of {name}"
    return (f"{during}, " if during else "") + f"{batch}: inputs {_shapes(x)}, targets {_shapes(y)}"


def loss_on_batch(model: nn.Module, x: Any, y: Any, loss_fn: LossFn, *, where: str) -> tuple[Any, torch.Tensor]:
    """The model's output and the loss on one batch. A batch the model or the loss fails on (a class index out
    of range in batch 3, a sample of another shape) is a DuccioError saying where, not a traceback."""
    try:
        out = call_model(model, x)
    except DuccioError:
        raise
    except Exception as err:
        raise DuccioError(f"the model failed on a batch: {_first_line(err)}", where=where,
                          fix="every batch must hold inputs the model accepts, shaped like example_input") from None
    try:
        loss = loss_fn(out, y)
    except DuccioError:
        raise
    except Exception as err:
        raise DuccioError(f"the loss failed on a batch: {_first_line(err)}{_target_hint(out, y)}",
                          where=f"{where}, model output {_shapes(out)}",
                          fix="every batch must hold targets the loss accepts (class indices for the default "
                              "cross-entropy): check the data of this batch, or define loss_fn(output, target) "
                              "in the model file") from None
    return out, loss


def _target_hint(out: Any, y: Any) -> str:
    """For class-index targets: their range against the model's number of outputs."""
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and isinstance(y, torch.Tensor) \
            and not y.is_floating_point() and y.numel():
        n = out.shape[1] if out.dim() > 1 else out.shape[0]
        return (f"; the targets range over [{int(y.min())}, {int(y.max())}], but the model has {n} outputs, "
                f"so class indices must lie in [0, {n - 1}]")
    return ""


def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int,
                          device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` training batches, the rest of the model
    in eval mode (masks binarized, each choice at its argmax), without gradients. During a search the
    statistics lag behind the architecture, which changes every step; validating with stale ones makes the
    metric swing and the best-feasible-epoch choice arbitrary. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    was = model.training
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
        m.train()
    used = 0
    with torch.no_grad():
        for batch in loader:
            if used == batches:
                break
            call_model(model, _on(split_batch(batch)[0], device))
            used += 1
    for m, momentum, (mean, var, count) in zip(norms, momenta, saved):
        m.momentum = momentum
        if int(m.num_batches_tracked) == 0:  # not on the current path (an alternative not chosen): unchanged
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    model.train(was)
    return used


def _shapes(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(map(str, value.shape))}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


def check_first_batch(model: nn.Module, loader: Iterable[Any], name: str, example: tuple[Any, ...],
                      loss_fn: LossFn, device: torch.device | None = None) -> None:
    """Refuse, before any training, a loader whose batches do not fit the example input (the costs are
    computed for the example's shape) or that the model and loss cannot take (e.g. labels out of range)."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise DuccioError(f"{name}() yielded no batches", where=f"{name}()",
                          fix="return a loader over a non-empty dataset") from None
    x, y = _on(split_batch(batch), device)
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    where = f"first batch of {name}(): inputs {_shapes(x)}, targets {_shapes(y)}"
    if len(inputs) != len(example):
        raise DuccioError(f"{name}() batches hold {len(inputs)} input(s), but example_input has {len(example)}",
                          where=where, fix="yield (inputs, targets) with inputs shaped like example_input")
    for i, (got, want) in enumerate(zip(inputs, example)):
        if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.shape[1:] != want.shape[1:]:
            raise DuccioError(
                f"{name}() yields samples of shape {list(got.shape[1:])}, but example_input has "
                f"{list(want.shape[1:])}: the costs and constraints are computed for example_input's shape",
                where=where + (f" (input {i})" if len(inputs) > 1 else ""),
                fix="make example_input one sample of the loader's shape (batch dim first), or resize the data")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, x)
    except Exception as err:
        raise DuccioError(f"the model failed on the first batch of {name}(): {_first_line(err)}", where=where,
                          fix="yield inputs the model accepts, shaped like example_input") from None
    finally:
        model.train(was)
    try:
        loss_fn(out, y)
    except Exception as err:
        raise DuccioError(f"the loss failed on the first batch of {name}(): {_first_line(err)}{_target_hint(out, y)}",
                          where=f"{where}, model output {_shapes(out)}",
                          fix="yield targets the loss accepts (class indices for the default cross-entropy), "
                              "or define loss_fn(output, target) in the model file") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(err).__name__
