"""``python -m resnet_fast train`` in several processes: the launch through torchrun's
machinery (``--nproc-per-node``), the process group, DDP, and the few collectives the loop
needs besides DDP's own (step totals, evaluation sums, the generators' state for a checkpoint).

A process started by torchrun (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set) joins the
process group through torchrun's rendezvous (``MASTER_ADDR``, ``MASTER_PORT``): gloo on the
CPU, NCCL on CUDA (one GPU a process, ``LOCAL_RANK``'s). ``--dist-timeout`` bounds every
collective, so a process whose peer hangs fails instead of waiting for ever; a process that
dies is torchrun's to handle: it stops every other one and reports the failure.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
from datetime import timedelta
from typing import Optional

from resnet_fast.cli import UsageError

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def from_env() -> Optional[tuple[int, int, int]]:
    """``(world size, rank, local rank)`` of a process torchrun started, else None."""
    if not all(k in os.environ for k in ENV):
        return None
    try:
        world, rank, local_rank = (int(os.environ[k]) for k in ENV)
    except ValueError:
        found = ", ".join(f"{k}={os.environ[k]!r}" for k in ENV)
        raise UsageError(f"torchrun's WORLD_SIZE, RANK and LOCAL_RANK must be integers; found "
                         f"{found}") from None
    if not 0 <= rank < world or local_rank < 0:
        raise UsageError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world - 1}) or LOCAL_RANK "
                         f"{local_rank} is negative")
    return world, rank, local_rank


@dataclasses.dataclass
class Dist:
    """This process's place among ``world`` processes; with one, every method is a no-op."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints and outputs."""
        return self.rank == 0

    def sum(self, values: list) -> list[float]:
        """``values`` summed over the processes (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's ``obj``, by rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        found = [None] * self.world
        dist.all_gather_object(found, obj)
        return found

    def sync_buffers(self, module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) in every process, as DDP gives them
        before each training forward: an evaluation sees the model a checkpoint saves."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, 0)

    def wrap(self, module):
        """``module`` in DistributedDataParallel (which starts from rank 0's weights)."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def start(world: int, rank: int, local_rank: int, device: str, timeout_s: float) -> Dist:
    """Joins the process group of a torchrun-started process (nothing with one process)."""
    if world == 1:
        return Dist(device=device)
    import torch
    import torch.distributed as dist

    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but torch sees "
                             f"{torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=timedelta(seconds=timeout_s))
    return Dist(world, rank, local_rank, device)


def free_port() -> int:
    """A TCP port free on the loopback address, for a rendezvous on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Runs ``python -m resnet_fast`` ``argv`` in ``nproc`` processes on this machine through
    torchrun's machinery (rendezvous on 127.0.0.1 at a free port, no restarts); returns the exit
    status: 0, that of the first process to fail (1 for one killed by a signal), or 130 after
    Ctrl-C (torchrun passes SIGINT on to the processes, which stop after the same step and save
    a checkpoint)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets OMP_NUM_THREADS=1 when it is unset, with a warning; share the cores instead
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // nproc)))
    options = torchrun.parse_args([
        "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "resnet_fast", *argv])
    try:
        torchrun.run(options)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        print(f"train: process {rank} of {nproc} {how}; torchrun stopped the others",
              file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    return 0
