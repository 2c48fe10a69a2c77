"""``python -m resnet_fast train``: train a ResNet on the fused ops, optionally next to eager,
in one process or several.

A plain training loop: SGD with momentum and weight decay (not on BatchNorm parameters and
biases), a learning rate schedule stepped every batch (``cosine`` to zero, or ``step``: divided
by 10 at a third and at two thirds of training), cross-entropy loss, a tqdm bar with the running
loss, accuracy and images/s, and a test-set evaluation after every epoch (and where
``--max-steps`` ends training).

The fused model is :mod:`resnet_fast.models`'s. One epoch of ``--data digits --size 16
--compare-eager`` (23 steps of 64 images, each model) is a demo of under a minute on 2 CPU cores.

Data (``--data``, :mod:`resnet_fast.cli.train_data`):

``digits``
    scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes, bundled with
    scikit-learn), upsampled to ``--size`` (default 32x32), repeated to 3 channels, split 80/20
    into train and test. The model gets the small-input stem by default.
``fake``
    Random images and labels (``--fake-samples``), for throughput.
``folder:PATH``
    An ImageFolder-style tree read with PIL: ``PATH/<class>/<image>``, or ``PATH/train/<class>``
    with ``PATH/val`` (or ``PATH/test``) beside it; without a test split, 20% of the images are
    held out. Images are resized to ``--size`` (default 64x64).
``cifar10:PATH``, ``cifar100:PATH``
    The python version of CIFAR-10 (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
    ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``; the 100 fine labels), tested
    on the test batch. Training images get a random crop with 4 pixels of zero padding and a
    horizontal flip, from a generator fixed by the seed, the step and the process; all are
    normalised per channel with the training set's mean and std. ``--size`` defaults to 32,
    and the small-input stem is the default at any size.

``--compare-eager`` trains the eager model of :mod:`resnet_fast.reference_models` beside the
fused one, from the same initial weights on the same batches in the same order (the two take
turns, step by step), and writes a loss-curve plot of both and a summary: each one's final test
accuracy and images/s, and their ratio.

Several processes (:mod:`resnet_fast.cli.train_dist`): ``--nproc-per-node N`` starts N
processes on this machine through torchrun's machinery, and a process that torchrun started
(``torchrun --nproc-per-node N -m resnet_fast train ...``, any number of nodes) joins them: gloo
on the CPU, NCCL on CUDA (a GPU a process), the models in DistributedDataParallel. ``--batch``
is per process: a step trains on ``batch x N`` images, the epoch's permutation cut into such
steps and each process taking its share, so the steps are those of one process with ``--batch
batch*N`` (but for a short last step, kept with 2 images a process or more). The initial
weights are the same in every process; each has its own random generators. ``--sync-bn``
synchronises the BatchNorm statistics over the whole step's batch
(:func:`resnet_fast.convert_sync_batchnorm`; the eager model: ``torch.nn.SyncBatchNorm``, CUDA
only). Only rank 0 prints, shows progress and writes checkpoints and outputs. When a process
fails, torchrun stops the others; a collective that waits longer than ``--dist-timeout`` seconds
(a peer hung) fails.

``--checkpoint PATH`` is written (atomically: a temporary file in the same directory, then
``os.replace``) after every epoch and at the end, with the models, optimizers, schedulers,
step, epoch, number of processes and RNG states; ``--resume PATH`` continues from one with the
same settings (those not given are taken from it) and the same number of processes. Ctrl-C
finishes the current step, saves a checkpoint (to ``--checkpoint``, else ``OUT/checkpoint.pt``)
and exits with status 130.

Outputs in ``--out`` (default ``runs/<model>_<data>``): ``history.csv`` (one row per step and
model), ``summary.json``, and ``loss_curve.png`` (:mod:`resnet_fast.cli.train_report`).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from resnet_fast.cli import (DEVICES, MODELS, UsageError, check_backend, check_device,
                             check_input_size, check_writable_dir)
from resnet_fast.cli.train_checkpoint import (check_world_size, load_checkpoint,
                                              process_rng_state, set_rng_state)
from resnet_fast.cli.train_config import Config, resolve_config
from resnet_fast.cli.train_data import DATA_CHOICES, derived_seed, load_data, steps_per_epoch
from resnet_fast.cli.train_dist import from_env, launch, start
from resnet_fast.cli.train_loop import Plan, fit, make_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    from resnet_fast.backends import BACKENDS

    p.add_argument("--model", choices=MODELS, default=None, help="default: resnet18")
    p.add_argument("--data", default=None, help=f"{DATA_CHOICES} (default: digits)")
    p.add_argument("--size", default=None,
                   help="image HxW (default: 32 for digits, fake and CIFAR, 64 for folder:PATH)")
    p.add_argument("--small-input", default=None, action=argparse.BooleanOptionalAction,
                   help="the small-input stem (3x3 stride-1 conv1, no max-pool); default: for "
                        "CIFAR and when the size is under 64")
    p.add_argument("--epochs", type=int, default=None, help="default: 1")
    p.add_argument("--batch", type=int, default=None,
                   help="images a step in each process (default: 64)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.05)")
    p.add_argument("--momentum", type=float, default=None, help="default: 0.9")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4")
    p.add_argument("--schedule", choices=("cosine", "step"), default=None,
                   help="learning rate per step: cosine to 0, or /10 at 1/3 and 2/3 "
                        "(default: cosine)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="backend of the fused model (default: the device's default)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="default: cuda when torch sees a GPU")
    p.add_argument("--compare-eager", action="store_true", default=None,
                   help="also train the eager reference model from the same weights and data")
    p.add_argument("--amp", action="store_true", default=None,
                   help="torch.autocast: bfloat16 on the CPU, float16 (with a GradScaler) or "
                        "bfloat16 on CUDA")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default=None,
                   help="autocast dtype (default: bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and images in channels_last")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="write a checkpoint here after every epoch and at the end")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint")
    p.add_argument("--seed", type=int, default=None, help="weights and data order (default: 0)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<model>_<data>)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in all (the last epoch is cut short)")
    p.add_argument("--fake-samples", type=int, default=None,
                   help="training images of --data fake (default: 512; a quarter as many test)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share held out for testing when the data has no test split "
                        "(default: 0.2)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes making the training batches ahead "
                        "(default: 0, the training process makes each; pinned memory on CUDA)")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train in N processes on this machine (torchrun's launcher; gloo on "
                        "the CPU, NCCL on CUDA with a GPU each); --batch is per process")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes, BatchNorm statistics over all their images "
                        "(resnet_fast.convert_sync_batchnorm)")
    p.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                   help="with several processes, a collective waiting longer than this fails "
                        "(default: 600)")


def _validate(cfg: Config, args, device: str, world: int) -> None:
    check_input_size(cfg.size, cfg.small_input, cfg.model)
    for name, value, least in (("--epochs", cfg.epochs, 1), ("--batch", cfg.batch, 2),
                               ("--fake-samples", cfg.fake_samples, 2)):
        if value < least:
            raise UsageError(f"{name} {value} must be at least {least}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps} must be at least 1")
    if not 0 < cfg.test_fraction < 1:
        raise UsageError(f"--test-fraction {cfg.test_fraction} must be between 0 and 1")
    if cfg.lr <= 0 or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise UsageError("--lr must be positive, --momentum and --weight-decay not negative")
    if cfg.amp and cfg.amp_dtype == "float16" and device == "cpu":
        raise UsageError("--amp-dtype float16 is for CUDA; valid on the CPU: bfloat16")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers} must be 0 or more")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout {args.dist_timeout} must be positive (seconds)")
    if device == "cuda" and args.nproc_per_node is not None and from_env() is None:
        import torch

        if world > torch.cuda.device_count():
            raise UsageError(f"--nproc-per-node {world} on cuda needs {world} GPUs (one a "
                             f"process); torch sees {torch.cuda.device_count()}")
    if cfg.sync_bn:
        import resnet_fast

        if not hasattr(resnet_fast, "convert_sync_batchnorm"):
            raise UsageError("--sync-bn needs resnet_fast.convert_sync_batchnorm, which this "
                             "version of resnet_fast lacks")
        if cfg.compare_eager and device == "cpu" and world > 1:
            raise UsageError("--sync-bn with --compare-eager on the CPU: the eager model's "
                             "torch.nn.SyncBatchNorm runs on CUDA only; valid on the CPU: "
                             "--sync-bn without --compare-eager")


def _command_line(args) -> list[str]:
    """``train`` and the options of ``args`` as arguments again (``--nproc-per-node`` left
    out), for the processes that ``--nproc-per-node`` starts."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    argv = ["train"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest == "nproc_per_node" or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])  # --x / --no-x
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def prepare(args, world: int):
    """The checks and set-up before training in ``world`` processes: the checkpoint to resume,
    the settings, the device, the data, the output and checkpoint directories. Bad input is a
    UsageError, found here by ``--nproc-per-node``'s launcher before any process starts."""
    import torch

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    cfg = resolve_config(args, checkpoint)
    if checkpoint is not None:
        check_world_size(checkpoint, args.resume, world)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    check_backend(args.backend, device)
    if cfg.amp and cfg.amp_dtype is None:
        cfg.amp_dtype = "bfloat16" if device == "cpu" else "float16"
    _validate(cfg, args, device, world)
    data = load_data(cfg)
    if data.train_len < 2 * world:
        need = "2 or more" if world == 1 else f"2 a process, {2 * world} or more"
        raise UsageError(f"--data {cfg.data}: {data.train_len} training image(s); need {need}")
    if checkpoint is not None and checkpoint.get("num_classes") != len(data.classes):
        raise UsageError(f"--resume {args.resume!r}: the checkpoint's model has "
                         f"{checkpoint.get('num_classes')} classes, --data {cfg.data} has "
                         f"{len(data.classes)}")
    data_tag = cfg.data.partition(":")[0]
    out = check_writable_dir(args.out or Path("runs") / f"{cfg.model}_{data_tag}")
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    if ckpt_path is not None:
        check_writable_dir(ckpt_path.parent, "checkpoint directory")
    return cfg, checkpoint, device, data, out, ckpt_path


def _sync_batch_norm(name: str, module):
    """``module`` with BatchNorm statistics synchronised between the processes: the fused
    model by resnet_fast, the eager one by torch."""
    if name == "fused":
        import resnet_fast

        return resnet_fast.convert_sync_batchnorm(module)
    import torch

    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def run(args) -> int:
    import torch

    try:
        import tqdm  # noqa: F401
    except ImportError:
        raise UsageError("train needs tqdm for its progress bar (pip install tqdm)") from None

    launched = from_env()
    nproc = args.nproc_per_node
    if nproc is not None:
        if nproc < 1:
            raise UsageError(f"--nproc-per-node {nproc} must be at least 1")
        if launched is not None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", launched[0]))
            if nproc != local:
                raise UsageError(f"--nproc-per-node {nproc}, but torchrun started {local} "
                                 f"processes on this node; under torchrun leave it out")
        elif nproc > 1:
            prepare(args, nproc)
            return launch(_command_line(args), nproc)
    world, rank, local_rank = launched or (1, 0, 0)
    cfg, checkpoint, device, data, out, ckpt_path = prepare(args, world)
    dist = start(world, rank, local_rank, device, args.dist_timeout)
    from resnet_fast import models, reference_models
    from resnet_fast.backends import resolve_backend

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    random.seed(cfg.seed)
    num_classes = len(data.classes)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    fused = getattr(models, cfg.model)(num_classes=num_classes, small_input=cfg.small_input,
                                       backend=args.backend)
    initial = {k: v.clone() for k, v in fused.state_dict().items()}
    modules = [("fused", fused)]
    if cfg.compare_eager:
        eager = getattr(reference_models, cfg.model)(num_classes=num_classes,
                                              small_input=cfg.small_input)
        eager.load_state_dict(initial)
        modules.append(("eager", eager))
    # from here each process has random generators of its own
    process_seed = derived_seed(cfg.seed, "process", dist.rank)
    torch.manual_seed(process_seed)
    random.seed(process_seed)
    per_epoch = steps_per_epoch(cfg, data.train_len, world)
    total_steps = per_epoch * cfg.epochs
    runs = []
    for name, module in modules:
        if cfg.sync_bn and world > 1:
            module = _sync_batch_norm(name, module)
        module.to(device=device, memory_format=memory_format)
        runs.append(make_run(name, module, cfg, total_steps, device))
    step = 0
    if checkpoint is not None:
        try:
            for r in runs:
                r.load(checkpoint["runs"][r.name])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UsageError(f"--resume {args.resume!r} does not match this run: {first}") \
                from None
        step = int(checkpoint["step"])
        set_rng_state(process_rng_state(checkpoint, rank))
    for r in runs:
        r.model = dist.wrap(r.module)
    backend = resolve_backend(fused.backend, torch.device(device))
    stop_at = min(total_steps, args.max_steps) if args.max_steps else total_steps
    processes = "" if world == 1 else (
        f" a process, {world} processes ({'nccl' if device == 'cuda' else 'gloo'}"
        f"{', synchronised BatchNorm' if cfg.sync_bn else ''})")
    heading = (
        f"training {cfg.model} ({'small-input' if cfg.small_input else 'ImageNet'} stem) on "
        f"{cfg.data}: {data.train_len} train / {data.test_len} test images, {num_classes} "
        f"classes, {cfg.size[0]}x{cfg.size[1]}, batch {cfg.batch}{processes}, {device}"
        f"{', ' + cfg.amp_dtype + ' autocast' if cfg.amp else ''}"
        f"{', channels_last' if args.channels_last else ''}; fused backend {backend}"
        f"{'; eager reference alongside' if cfg.compare_eager else ''}; "
        + (f"resuming at step {step}/{total_steps}" if checkpoint else f"{total_steps} steps")
        + (f", stopping at step {stop_at}" if stop_at < total_steps else ""))
    plan = Plan(per_epoch, total_steps, stop_at, step, device, memory_format, ckpt_path, out,
                backend, args.workers)
    status = fit(runs, data, cfg, plan, dist, heading)
    dist.close()
    return status
