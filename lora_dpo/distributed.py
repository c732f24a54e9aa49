"""Several processes, one run: data-parallel DPO through accelerate (torch DDP underneath).

``accelerate launch --num_processes N -m lora_dpo train config.yaml`` (or torchrun) starts N
copies of the command. Each loads the 4-bit base whole on its own device (``cuda:LOCAL_RANK``,
never ``device_map="auto"``), holds the same LoRA weights, and runs the same loop over the same
``PairStream``; only the pairs differ. A step's micro-batches (micro-batch x accumulation x
processes pairs: the global batch) are dealt out round-robin, so every pair is seen once per
epoch across the processes, and DDP all-reduces the LoRA gradients once per optimizer step.
Alone (no launcher, or one process), every helper here does nothing and accelerate is never
imported, so a one-GPU run is exactly what it was.

What the loop calls, and why it has to:

- ``processes(device)``: who this process is, and its device.
- ``Processes.wrap(model)``: ``pair_logps`` as a module's forward, wrapped in DDP.
  ``pair_logps`` runs the decoder and head itself rather than the model's forward, and DDP arms
  its gradient all-reduce in its own forward; both passes of a step go through the wrapper.
- ``Processes.share(micro_batches)``: this process's micro-batches of a step.
- ``Processes.accumulating(scorer, last)``: no all-reduce for the micro-batches before the last.
- ``Processes.sum(tensor)``: metric sums over all processes (one all-reduce per step); the
  shares never repeat a pair, so no padding sample is ever counted twice.
- ``Processes.stop_signal(number)``: a signal that reached any one process stops them all at
  the same step, with one checkpoint.
- ``Processes.shard(n)`` / ``Processes.gather_rows(values, n)``: evaluation and the reference
  precompute each score a share of the pairs; the rows are gathered back into pair order
  (``gather_items`` for Python values: ``lora-dpo generate`` shards its prompts the same way).
- ``Processes.rng_states()``: every process's RNG, so a resume continues each one exactly.
- ``Processes.wait()`` and ``main_first()``: the main process does every write.

Gradient maths: each process's loss is its pairs' summed losses x processes / the step's pairs
on all processes; DDP averages the gradients over the processes, which gives the gradient of the
mean over all the step's pairs, the same as one process running the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch

from .batching import PairBatch, PairLogps, pair_logps
from .errors import LoraDpoError

log = logging.getLogger(__name__)


class PairScorer(torch.nn.Module):
    """``pair_logps`` of a (peft) model as this module's forward, so a wrapper around it (DDP)
    sees every pass. The reference pass runs through it too, under ``modeling.reference_model``
    and no_grad: the adapter switch is a flag on the LoRA layers, which the wrapper shares."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PairBatch, chunk_size: int, **options: Any) -> PairLogps:
        """``options``: pair_logps' per-token extras (LD-DPO's ld_alpha, WPO's weights)."""
        return pair_logps(self.model, batch, chunk_size, **options)


class Processes:
    """The processes of a run: this one's rank and device, and the few collectives the loop needs.

    Built by ``processes``; ``Processes()`` is a process alone, for which everything below is
    the identity and costs nothing.
    """

    def __init__(self, accelerator: Any = None, device: torch.device | None = None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.count = accelerator.num_processes if accelerator else 1
        self.device = accelerator.device if accelerator else device

    @property
    def is_main(self) -> bool:
        """The process that logs, shows the progress bar and writes every file."""
        return self.rank == 0

    def describe(self) -> str:
        return "" if self.count == 1 else f" x {self.count} processes"

    # -- the model ---------------------------------------------------------------------------

    def wrap(self, model: Any) -> torch.nn.Module:
        """The module both passes of a step run through: DDP around ``PairScorer(model)``.

        Only the LoRA weights are DDP's to broadcast and all-reduce: every frozen weight and
        buffer is listed as ignored, as each process loaded the same base from disk (broadcasting
        a 4-bit 8B base would move 5 GB at start-up for nothing). No unused-parameter search: every
        LoRA weight gets a gradient in every step.
        """
        scorer = PairScorer(model)
        if self.count == 1:
            return scorer
        scorer._ddp_params_and_buffers_to_ignore = (
            [name for name, param in scorer.named_parameters() if not param.requires_grad]
            + [name for name, _ in scorer.named_buffers()])
        return self.accelerator.prepare_model(scorer, device_placement=False)

    @contextlib.contextmanager
    def accumulating(self, scorer: torch.nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradients stay local unless ``last``,
        so a step all-reduces once however many micro-batches it accumulates."""
        if self.count == 1 or last:
            yield
        else:
            with scorer.no_sync():
                yield

    # -- the data ----------------------------------------------------------------------------

    def share(self, micro_batches: list[list[int]]) -> list[list[int]]:
        """This process's micro-batches of a step: every ``count``-th, from its rank.

        A step with fewer micro-batches than processes (the end of an epoch) is re-cut into
        ``count`` near-equal parts first, so every process has pairs unless the step has fewer
        pairs than there are processes; such a process gets [] (``DpoStep`` then runs a pass
        of weight zero, as DDP needs every process in the all-reduce).
        """
        if self.count == 1:
            return micro_batches
        if len(micro_batches) < self.count:
            flat = [index for batch in micro_batches for index in batch]
            micro_batches = [flat[len(flat) * r // self.count: len(flat) * (r + 1) // self.count]
                             for r in range(self.count)]
        return [batch for batch in micro_batches[self.rank::self.count] if batch]

    def shard(self, size: int) -> list[int]:
        """The indices of ``size`` items this process handles (every ``count``-th from its rank);
        ``gather_rows`` puts the results back in order."""
        return list(range(self.rank, size, self.count))

    def gather_rows(self, values: torch.Tensor, size: int) -> torch.Tensor:
        """Rows computed for ``shard(size)`` on every process, gathered into (size, ...) in item
        order on every process. Each process pads its share to the longest for the all-gather;
        the padding rows are dropped here, so none is ever counted."""
        if self.count == 1:
            return values
        longest = -(-size // self.count)
        padded = values.new_zeros((longest, *values.shape[1:]))
        padded[: values.shape[0]] = values
        parts = self.accelerator.gather(padded.to(self.device))  # (count x longest, ...), rank-major
        parts = parts.reshape(self.count, longest, *values.shape[1:])
        # Item i is row i // count of rank i % count.
        return parts.transpose(0, 1).reshape(self.count * longest, *values.shape[1:])[:size].to(values.device)

    def gather_items(self, items: list[Any], size: int) -> list[Any]:
        """Python values computed for ``shard(size)`` on every process (answers to prompts),
        gathered in item order on every process (pickled in transit, as torch.distributed does)."""
        if self.count == 1:
            return items
        parts: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(parts, items)
        return [parts[i % self.count][i // self.count] for i in range(size)]

    # -- agreement ---------------------------------------------------------------------------

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (an all-reduce; the identity alone)."""
        if self.count == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), reduction="sum")

    def stop_signal(self, number: int) -> int:
        """The signal number any process was asked to stop by (0: none); every process gets the
        same answer at the same step. One scalar all-reduce per step."""
        if self.count == 1:
            return number
        flag = torch.tensor([number], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is True on every process."""
        if self.count == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def rng_states(self, state: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every process's RNG state (``checkpoint.rng_state()``), in rank order; None alone.
        Moved between the processes by pickling, as torch.distributed does for objects; what is
        written to disk stays safetensors and JSON."""
        if self.count == 1:
            return None
        states: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(states, state)
        return states

    def wait(self) -> None:
        """Every process reaches this point before any goes on (a barrier)."""
        if self.count > 1:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (downloads, dataset caches), then the others."""
        if self.count == 1:
            yield
            return
        with self.accelerator.main_process_first():
            yield


def launched_as_main() -> bool:
    """True alone, and in the main process of a launch (RANK 0, as torchrun and accelerate set it)."""
    return int(os.environ.get("RANK", "0")) == 0


def processes(device: torch.device) -> Processes:
    """The processes of this run. Alone (WORLD_SIZE unset or 1): ``Processes`` on ``device``.

    Launched with N processes: accelerate sets up the process group (NCCL on GPUs, gloo on CPUs)
    and gives this process ``cuda:LOCAL_RANK`` (or the CPU), where the whole base is loaded. Its
    mixed-precision and dynamo settings are not used: model.compute_dtype and model.compile
    decide, as on one GPU. On the processes other than the main one, lora-dpo logs warnings only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(device=device)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise LoraDpoError("this accelerate config shards the model (FSDP or DeepSpeed), which lora-dpo does not "
                           "support yet: every process must hold the whole 4-bit base. Fix: launch with "
                           "configs/accelerate/ddp.yaml (docs/distributed.md)")
    # Precision and compilation are lora-dpo's settings (model.compute_dtype, model.compile), not
    # the accelerate config's: its autocast or torch.compile around the scorer would change them.
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no", dynamo_backend="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                                             broadcast_buffers=False)])
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise LoraDpoError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up "
                           f"{accelerator.distributed_type} on {device.type}. Fix: set model.device to cuda on a GPU "
                           "machine, cpu otherwise, and launch with accelerate launch (docs/distributed.md)")
    if not accelerator.is_main_process:
        logging.getLogger("lora_dpo").setLevel(logging.WARNING)
    return Processes(accelerator)
