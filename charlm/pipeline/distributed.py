"""Data-parallel training on one machine: `train.processes: N` re-executes the stage under torchrun, and each
process joins the group (gloo on CPU, NCCL on CUDA). train.batch_size stays the global batch."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from charlm.base.errors import CharlmError
from charlm.core.device import pick_device

T = TypeVar("T")


def relaunch_under_torchrun(module: str, processes: int) -> None:
    """With processes > 1, replace this process by torchrun running `python -m module` that many times."""
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        os.execv(sys.executable, [*cmd, "-m", module])


def setup_processes(train_params) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group first."""
    device = pick_device(train_params.device, "train.device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    die_with_parent()
    if train_params.batch_size % world:
        raise CharlmError(
            f"train.batch_size={train_params.batch_size} is the global batch and must divide evenly over "
            f"{world} processes; pick a multiple of {world}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def agree(flag: bool, device: torch.device) -> bool:
    """True on every process when it is True on any (a stop request), at the same step everywhere."""
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def lead_choice(choose: Callable[[], T], world: int) -> T:
    """What `choose()` returns on the lead process (rank 0), on every process: a choice such as the precision
    is made once, on the lead's hardware, and no process can differ."""
    if world == 1:
        return choose()
    box: list = [choose() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def finish(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def die_with_parent() -> None:
    """A worker must not outlive its torchrun launcher: if the launcher is killed (SIGKILL leaves it no chance
    to stop its workers), orphaned workers would train on and write files. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)
