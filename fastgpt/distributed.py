"""Training on several processes: ``torchrun ... -m fastgpt train`` (DistributedDataParallel).

torchrun starts one process (a *rank*) per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``init``
joins the ranks into a process group (``gloo`` on the CPU, ``nccl`` on CUDA) whose collectives
time out, so a rank that stops answering ends the job instead of hanging it. ``Context`` is what
the trainer needs to know: which rank this is, how many there are, how to average a number over
them, and which rows of a global batch are this rank's. A plain ``fastgpt train`` gets
``SINGLE``, under which every collective is a no-op. ``shard`` wraps a model in FSDP2 instead of
DistributedDataParallel (``--fsdp``). See docs/distributed.md.
"""

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0  # longer than a checkpoint save, which the other ranks wait for at their next collective
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every rank, besides the rendezvous address


class DistributedError(RuntimeError):
    """A distributed run cannot be set up as asked (a bad launcher environment, a missing device)."""


def launched():
    """Whether a launcher (torchrun, or anything setting its variables) started this process as one rank."""
    return "WORLD_SIZE" in os.environ


def environment():
    """``(rank, world_size, local_rank)`` from torchrun's variables, checked; ``(0, 1, 0)`` when not launched."""
    if not launched():
        return 0, 1, 0
    values = {}
    for name in ENVIRONMENT:
        text = os.environ.get(name)
        if text is None:
            raise DistributedError(f"WORLD_SIZE is set but {name} is not: start fastgpt train with torchrun")
        if not text.isdigit():
            raise DistributedError(f"{name}={text}: expected a whole number >= 0")
        values[name] = int(text)
    rank, world_size, local_rank = (values[name] for name in ENVIRONMENT)
    if world_size < 1 or rank >= world_size:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world_size, local_rank


def label():
    """``"rank R: "`` under a launcher (so a message says which rank wrote it), else ``""``; never raises."""
    return f"rank {os.environ['RANK']}: " if launched() and "RANK" in os.environ else ""


@dataclass(frozen=True)
class Context:
    """This process's place in the job. ``distributed`` is False for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    distributed: bool = False
    device: torch.device = torch.device("cpu")  # where this rank's collectives run (nccl needs CUDA tensors)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self):
        """Rank 0 prints, samples and writes the checkpoint."""
        return self.rank == 0

    def rows(self, batch_size, micro_steps, micro_batch):
        """This rank's rows of a global batch of ``batch_size`` rows split into ``micro_steps``
        micro-batches, for micro-batch ``micro_batch``: each micro-batch is shared out among the
        ranks in equal, disjoint parts (``batch_size`` is a multiple of ``micro_steps × world_size``)."""
        per_rank = batch_size // (micro_steps * self.world_size)
        start = (micro_batch * self.world_size + self.rank) * per_rank
        return slice(start, start + per_rank)

    def average(self, tensor):
        """The mean of ``tensor`` over the ranks (``tensor`` itself in a single process)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total)
        return (total / self.world_size).to(tensor.device)

    def largest(self, value):
        """The largest of the ints ``value`` over the ranks (so all ranks take the same decision)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def from_main(self, value):
        """Rank 0's ``value`` (a picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


SINGLE = Context()


def shard(model, context):
    """Shard ``model`` (a ``fastgpt.nn.GPT``) over all ranks with FSDP2, in place: each decoder block is
    one unit (its parameters are gathered just before it runs and freed after), the rest (embeddings,
    final norm, output layer) the root's unit. Parameters, gradients and the optimizer state built on
    them afterwards are DTensors, each rank holding 1/world_size of every one. No mixed-precision
    policy: bf16 training uses autocast, so FSDP gathers and reduces fp32, as DDP does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP warns when a unit returns a view, in case the caller changes it in place; GPT never does
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def init(device, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the process group torchrun set up: ``(Context, this rank's device)``.

    ``device`` is the device type asked for (``cpu`` or ``cuda``); on CUDA each rank takes
    ``cuda:LOCAL_RANK``. Collectives that wait longer than ``timeout_s`` seconds raise.
    """
    rank, world_size, local_rank = environment()
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise DistributedError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per device (torchrun --nproc_per_node)"
            )
        if not dist.is_nccl_available():
            raise DistributedError("this build of torch has no nccl, which fastgpt uses for CUDA")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend, device_id = "nccl", device
    else:
        backend, device_id = "gloo", None
    if not dist.is_gloo_available() and backend == "gloo":
        raise DistributedError("this build of torch has no gloo, which fastgpt uses on the CPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world_size, device_id=device_id)
    return Context(rank, world_size, True, device, timeout_s), device


def shutdown(context, drain=False):
    """Leave the process group (a no-op in a single process, or once left).

    ``drain``: first a barrier, which waits for every collective this rank started. gloo's worker
    threads release a finished collective's tensors themselves, and one still doing so while Python
    shuts down aborts the process ("terminate called without an active exception"; 4 of 10 two-rank
    test runs here). Drain only where every rank leaves normally: after a failure the barrier would
    wait for a rank that is gone, up to the collective timeout."""
    if context.distributed and dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()


def is_collective_failure(exc):
    """Whether ``exc`` is a collective that failed because another rank is gone or stuck: torch raises
    ``DistError`` (nccl, the rendezvous store) or, from gloo, a plain RuntimeError naming gloo's sources."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


def explain(exc, timeout_s):
    """One line saying why a collective failed, for a rank whose partner went away."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "timed out" in first.lower() or "timeout" in first.lower():
        return (f"another rank did not answer within the collective timeout ({timeout_s:g} s, --dist-timeout): "
                f"it is stuck or far slower ({first})")
    return f"lost contact with another rank, which failed or was stopped; its own message says why ({first})"
