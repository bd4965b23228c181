"""Several processes (torchrun): one process per GPU, and what they must agree on.

    torchrun --nproc_per_node=8 train.py ...      # RANK, WORLD_SIZE, LOCAL_RANK set by torchrun

- the list of training videos: rank 0 lists the files, every rank probes a share of them, and every
  rank gets rank 0's result, so all agree on N and on the order of the bank slots;
- the steps: a step is skipped everywhere when one rank's whole batch failed to decode;
- the memory banks: the bank update gathers every rank's embeddings (losses.py), and bank_spread
  checks every epoch that all ranks hold the same banks;
- the end: the ranks meet, and each process leaves without running destructors (end_processes).
A plain `python train.py` is one process, and every function here is then a no-op or a direct call.
"""
import os
import sys

import torch
import torch.distributed as dist

import listings


def setup(device_flag):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is one process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if device_flag == "auto" and torch.cuda.is_available()
                              else "cpu" if device_flag == "auto" else device_flag)
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def every_rank_has_data(has_data, device, world):
    """All ranks take the same steps, or DDP's all-reduce would wait forever: a step is skipped
    everywhere when one rank's whole batch failed."""
    return bool(agreed_count(int(has_data), device, world))


def agreed_count(n, device, world):
    """The smallest n over the ranks: a loop that holds collectives runs as often on every rank."""
    if world > 1:
        t = torch.tensor([float(n)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    return n


def shared_by_ranks(fn, rank, world):
    """fn(probe_many) runs on rank 0; the files it probes are spread over every rank (each probes
    one share, the results are gathered), and every rank returns what rank 0 returned (or raises
    what it raised). With one process it is fn(None)."""
    if world == 1:
        return fn(None)

    def probe_share(paths, need_audio, min_seconds):
        # the machine's cores are shared by the ranks on it
        cores = max(1, listings.available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        mine = listings.probe_all(paths[rank::world], need_audio, min_seconds, quiet=rank != 0,
                              workers=cores)
        shares = [None] * world
        dist.all_gather_object(shares, mine)
        return [shares[k % world][k // world] for k in range(len(paths))]

    if rank == 0:
        def probe_many(paths, need_audio, min_seconds):
            dist.broadcast_object_list([("probe", paths, need_audio, min_seconds)], src=0)
            return probe_share(paths, need_audio, min_seconds)
        try:
            message = ("done", fn(probe_many))
        except BaseException as e:  # the other ranks must hear of it, or they would wait forever
            message = ("raise", e)
        dist.broadcast_object_list([message], src=0)
    else:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
            if message[0] != "probe":
                break
            probe_share(*message[1:])
    if message[0] == "raise":
        raise message[1]
    return message[1]


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def bank_spread(criterion, world):
    """max - min over ranks of a checksum of the banks: 0 when every rank holds the same banks."""
    if world == 1:
        return 0.0
    c = (criterion.bank.v_bar.double().sum() + 2 * criterion.bank.a_bar.double().sum()).reshape(1)
    parts = [torch.zeros_like(c) for _ in range(world)]
    dist.all_gather(parts, c)
    return (max(parts) - min(parts)).item()


def end_processes():
    """The end of a torchrun process. Ranks reach it at different times (rank 0 saves), so they meet
    first. Then the process leaves without running destructors, while the run (and its DDP wrapper)
    is still referenced: freeing the wrapper frees gloo's process group, whose destructor waits,
    holding Python's lock, for a gloo thread that is still freeing tensors of the last collectives
    and needs that lock: a deadlock after everything has been written."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
