"""Shared set-up of the multi-process tests: each rank of an ``mp.spawn`` joins a gloo group on
CPU, runs its checks, and tears the group down only after every rank is done."""
import contextlib
import os
import socket
import traceback

import torch
import torch.distributed as dist


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank, world, port, init_file):
    """Inside: this process is rank ``rank`` of a ``world``-process gloo group (the torchrun
    environment variables set, one torch thread). A failure re-raises with the rank's traceback,
    readable in the parent's report."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        # no rank tears the group down while the other still has collectives in flight (gloo then
        # aborts the process with "terminate called without an active exception")
        dist.barrier()
    except BaseException:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()
