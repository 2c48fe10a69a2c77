"""The training loop of ``python -m resnet_fast train``: the models being trained, one SGD
step, the test-set evaluation, and the epochs with their progress bar, checkpoints and Ctrl-C.

With several processes each trains on its share of every step's batch (DDP averages the
gradients), and the loop adds one all-reduce a step: the loss, correct predictions and images
of the whole step (what the history and the bar show) and whether any process got Ctrl-C, so
all of them stop after the same step. Evaluation splits the test set between the processes.
Only the main process (rank 0) prints, shows the bar and writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from resnet_fast.cli.train_checkpoint import CHECKPOINT_FORMAT, rng_state, save_checkpoint
from resnet_fast.cli.train_data import Data, batch_generator, epoch_batches
from resnet_fast.cli.train_dist import Dist
from resnet_fast.cli.train_report import write_outputs

if TYPE_CHECKING:
    from resnet_fast.cli.train_config import Config


@dataclasses.dataclass
class Run:
    """One model being trained: fused (resnet_fast.models) or eager (resnet_fast.reference).
    ``module`` is the model itself (its state is what a checkpoint saves and an evaluation
    runs); ``model`` what trains, ``module`` in DistributedDataParallel with several processes.
    """

    name: str
    module: object
    optimizer: object
    scheduler: object
    scaler: object = None
    history: list = dataclasses.field(default_factory=list)  # per step
    tests: list = dataclasses.field(default_factory=list)  # per evaluation
    seconds: float = 0.0  # training time, first step of this process excluded
    images: int = 0
    warm: bool = False
    model: object = None
    # running sums over the current epoch, for the progress bar
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    epoch_images: int = 0

    def __post_init__(self):
        if self.model is None:
            self.model = self.module

    def state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history, "tests": self.tests}

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.tests = list(state["tests"])

    def images_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


def make_run(name, model, cfg: Config, total_steps: int, device: str):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BatchNorm, biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=sorted({max(1, round(total_steps / 3)),
                                    max(1, round(2 * total_steps / 3))}), gamma=0.1)
    scaler = None
    if cfg.amp and device == "cuda" and cfg.amp_dtype == "float16":
        scaler = torch.amp.GradScaler("cuda")
    return Run(name, model, opt, sched, scaler)


class Interrupt:
    """SIGINT during training: the first sets ``requested`` (the loop saves a checkpoint after
    the current step and stops), a second raises KeyboardInterrupt at once. ``verbose``: say
    so (the main process)."""

    def __init__(self, verbose: bool = True):
        self.requested = False
        self.previous = None
        self.verbose = verbose

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.verbose:
            return
        from tqdm import tqdm

        tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to stop "
                   "without one)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def autocast(cfg: Config, device: str):
    import torch

    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, cfg.amp_dtype))


def train_step(run: Run, x, y, cfg: Config, device: str) -> tuple[float, int, float]:
    """One SGD step; returns (loss, correct predictions, seconds)."""
    import torch
    import torch.nn.functional as F

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(cfg, device):
        out = run.model(x)
        loss = F.cross_entropy(out, y)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    run.scheduler.step()
    loss_value = loss.item()
    correct = int((out.argmax(1) == y).sum().item())
    return loss_value, correct, time.perf_counter() - t0


def evaluate(run: Run, data: Data, cfg: Config, device: str, memory_format,
             dist: Dist) -> Optional[dict]:
    """Test loss and accuracy (None without test images), each process on its share of the test
    set, all with rank 0's running statistics."""
    import torch
    import torch.nn.functional as F

    if data.test_len == 0:
        return None
    dist.sync_buffers(run.module)
    run.module.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad(), autocast(cfg, device):
        share = torch.arange(data.test_len)[dist.rank::dist.world]
        for idx in share.split(max(cfg.batch, 256)):
            x, y = data.batch("test", idx)
            x = x.to(device).contiguous(memory_format=memory_format)
            y = y.to(device)
            out = run.module(x)
            total_loss += F.cross_entropy(out.float(), y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum().item())
    total_loss, correct = dist.sum([total_loss, correct])
    return {"loss": total_loss / data.test_len, "accuracy": int(correct) / data.test_len}


@dataclasses.dataclass
class Plan:
    """The steps a run trains and where it writes them."""

    steps_per_epoch: int
    total_steps: int
    stop_at: int  # the step training ends after: total_steps, or --max-steps
    step: int  # the steps done so far: 0, or the resumed checkpoint's
    device: str
    memory_format: object
    checkpoint: Optional[Path]  # --checkpoint
    out: Path
    backend: str  # the fused model's, resolved
    workers: int  # --workers


@dataclasses.dataclass
class EpochBatches:
    """The training batches of an epoch from step ``step`` on, as a DataLoader's dataset: item
    ``i`` is step ``step + i``'s batch, augmented with that step's generator, so the batches
    are the same whichever process (a worker or the training process) makes them."""

    data: Data
    batches: list
    step: int
    seed: int
    rank: int

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.data.batch("train", self.batches[i],
                               batch_generator(self.seed, self.step + i, self.rank))


def _loader(batches: EpochBatches, plan: Plan):
    """The batches in order, made by ``plan.workers`` DataLoader workers ahead of the training
    (0: by this process when each is needed), in pinned memory for a CUDA device."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=plan.workers,
                      pin_memory=plan.device == "cuda")


def fit(runs: list, data: Data, cfg: Config, plan: Plan, dist: Dist, heading: str) -> int:
    """Trains ``runs`` from step ``plan.step`` to ``plan.stop_at``, evaluating after every epoch
    and where training stops, and writes the outputs; returns 0, or 130 after Ctrl-C (a
    checkpoint saved). ``heading``: the first line, printed once Ctrl-C is handled."""
    from tqdm import tqdm

    step, device, memory_format = plan.step, plan.device, plan.memory_format
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    cfg_dict = dataclasses.asdict(cfg)

    def save(path: Path, epoch_done: int) -> None:
        rngs = dist.gather(rng_state())  # called in every process; rank 0 writes
        if not dist.main:
            return
        state = {"format": CHECKPOINT_FORMAT, "config": cfg_dict, "step": step,
                 "epoch": epoch_done, "steps_per_epoch": steps_per_epoch,
                 "num_classes": len(data.classes), "world_size": dist.world,
                 "runs": {r.name: r.state() for r in runs}, "rng": rngs[0]}
        if dist.world > 1:
            state["rank_rng"] = rngs
        save_checkpoint(path, state)

    interrupted = False
    saved_step = None
    with Interrupt(verbose=dist.main) as interrupt:
        if dist.main:
            print(heading, flush=True)
            if step >= plan.stop_at:
                print(f"nothing to train: step {step} reached"
                      + (" the end of training" if step >= total_steps else " --max-steps"))
        epoch = step // steps_per_epoch
        while step < plan.stop_at and not interrupted:
            batches = epoch_batches(cfg, data.train_len, epoch, dist.rank, dist.world)
            first = step - epoch * steps_per_epoch
            last = min(steps_per_epoch, plan.stop_at - epoch * steps_per_epoch)
            for r in runs:
                r.epoch_loss, r.epoch_correct, r.epoch_images = 0.0, 0, 0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/"
                       f"{cfg.epochs}", unit="step", file=sys.stderr, dynamic_ncols=True,
                       mininterval=0.5, disable=not dist.main)
            for x, y in _loader(EpochBatches(data, batches[first:last], step, cfg.seed,
                                             dist.rank), plan):
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                lr = runs[0].optimizer.param_groups[0]["lr"]
                results = [train_step(r, x, y, cfg, device) for r in runs]
                # the whole step's loss sum and correct predictions (per model), images, Ctrl-C
                totals = dist.sum([v for loss, correct, _ in results for v in (loss * len(y),
                                                                             correct)]
                                  + [len(y), interrupt.requested])
                images = int(totals[-2])
                for k, (r, (_, _, seconds)) in enumerate(zip(runs, results)):
                    loss, correct = totals[2 * k] / images, int(totals[2 * k + 1])
                    if r.warm:
                        r.seconds += seconds
                        r.images += images
                    r.warm = True
                    r.epoch_loss += loss * images
                    r.epoch_correct += correct
                    r.epoch_images += images
                    r.history.append({"step": step + 1, "epoch": epoch + 1, "loss": loss,
                                      "accuracy": correct / images, "lr": lr,
                                      "images_per_s": images / seconds})
                step += 1
                bar.update(1)
                head = runs[0]

                def rate(r):  # since the first (warm-up) step of this process
                    return r.images_per_s() or r.history[-1]["images_per_s"]
                post = {"loss": f"{head.epoch_loss / head.epoch_images:.3f}",
                        "acc": f"{head.epoch_correct / head.epoch_images:.1%}",
                        "img/s": f"{rate(head):.0f}"}
                if len(runs) > 1:
                    post["eager loss"] = f"{runs[1].epoch_loss / runs[1].epoch_images:.3f}"
                    post["eager img/s"] = f"{rate(runs[1]):.0f}"
                bar.set_postfix(post, refresh=False)
                if totals[-1] > 0:
                    interrupted = True
                    break
            bar.close()
            if interrupted:
                break
            epoch_done = step // steps_per_epoch
            tested = ""
            for r in runs:
                result = evaluate(r, data, cfg, device, memory_format, dist)
                if result is not None:
                    r.tests.append({"epoch": epoch + 1, "step": step, **result})
                    tested = "test"
            if dist.main:
                print(f"epoch {epoch + 1}/{cfg.epochs} (step {step}/{total_steps}): "
                      + " | ".join(
                          f"{r.name}: train loss {r.epoch_loss / max(1, r.epoch_images):.4f} "
                          f"acc {r.epoch_correct / max(1, r.epoch_images):.1%}" + (
                              f", test loss {r.tests[-1]['loss']:.4f} acc "
                              f"{r.tests[-1]['accuracy']:.1%}" if tested else ", no test images")
                          for r in runs), flush=True)
            if plan.checkpoint is not None:
                save(plan.checkpoint, epoch_done)
                saved_step = step
            if dist.sum([interrupt.requested])[0] > 0:
                interrupted = True
            epoch += 1

    if interrupted:
        path = plan.checkpoint or plan.out / "checkpoint.pt"
        save(path, step // steps_per_epoch)
        if dist.main:
            print(f"interrupted at step {step}/{total_steps}: checkpoint saved to {path}; "
                  f"continue with: python -m resnet_fast train --resume {path}"
                  + (f" --nproc-per-node {dist.world}" if dist.world > 1 else ""),
                  file=sys.stderr, flush=True)
            write_outputs(runs, plan.out, cfg, device, plan.backend, dist.world)
        return 130
    if plan.checkpoint is not None and saved_step != step:
        save(plan.checkpoint, step // steps_per_epoch)
    if dist.main:
        write_outputs(runs, plan.out, cfg, device, plan.backend, dist.world)
        if plan.checkpoint is not None:
            print(f"checkpoint: {plan.checkpoint} (step {step})")
    return 0
