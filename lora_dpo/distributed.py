"""Several processes, one run: data-parallel DPO through accelerate (torch DDP underneath), or
the model sharded over the processes (FSDP-QLoRA, torch's FSDP2 ``fully_shard``).

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

Sharded (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``, which
sets ACCELERATE_USE_FSDP): each process loads the 4-bit base on the CPU with the 4-bit weights
stored in the compute dtype (bitsandbytes' ``bnb_4bit_quant_storage``: FSDP shards floating
tensors only), and ``wrap`` shards it with ``fully_shard`` — every decoder layer a unit, the
embeddings one, the final norm and head one, and ``PairScorer`` the root — moving each unit's
shards to this process's device as it goes, so no card ever holds the whole base. Every pass
then gathers a unit's weights just before it runs and frees them after, which is why every
process must run the same passes: ``share`` and ``top_up`` give each the same number (a pass of
weight zero, or a repeated pair whose result is dropped), and all scoring goes through the root
``PairScorer``. The LoRA weights and their optimizer state are sharded too: ``whole_adapter`` and
``whole_optimizer_state`` gather them for a checkpoint or the final adapter (a normal PEFT
adapter), ``load_adapter`` and ``shard_optimizer_state`` put a checkpoint's back into shards.
What generates text (train.sample_every, eval.after_training) or changes the model's layout
(TR-DPO, model.compile, micro_batch_size auto, paged 8-bit optimizers) is refused with one line.

Gradient maths: each process's loss is its pairs' summed losses x processes / the step's pairs
on all processes; DDP averages the gradients over the processes (FSDP's reduce-scatter too),
which gives the gradient of the mean over all the step's pairs, the same as one process running
the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch

from .batching import PairBatch, PairLogps, pair_logps
from .errors import ConfigError, LoraDpoError

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

    def __init__(self, accelerator: Any = None, device: torch.device | None = None, fsdp: Any = None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.count = accelerator.num_processes if accelerator else 1
        self.device = accelerator.device if accelerator else device
        self.fsdp = fsdp
        """accelerate's FullyShardedDataParallelPlugin of a sharded run (its settings); None: DDP or alone."""

    @property
    def sharded(self) -> bool:
        """The model is sharded over the processes (FSDP): every process must run the same passes."""
        return self.fsdp is not None

    @property
    def is_main(self) -> bool:
        """The process that logs, shows the progress bar and writes every file."""
        return self.rank == 0

    def describe(self) -> str:
        if self.count == 1:
            return ""
        return f" x {self.count} processes" + (", the model sharded over them (FSDP)" if self.sharded else "")

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
        if self.sharded:
            return shard_model(scorer, model, self.fsdp, self.device, self.count)
        scorer._ddp_params_and_buffers_to_ignore = (
            [name for name, param in scorer.named_parameters() if not param.requires_grad]
            + [name for name, _ in scorer.named_buffers()])
        return self.accelerator.prepare_model(scorer, device_placement=False)

    @contextlib.contextmanager
    def accumulating(self, scorer: torch.nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradients stay local unless ``last``,
        so a step all-reduces once however many micro-batches it accumulates. Sharded, each
        micro-batch's backward reduce-scatters its gradients into the shards (what keeps the
        gradients sharded too; the LoRA gradients are small)."""
        if self.count == 1 or last or self.sharded:
            yield
        else:
            with scorer.no_sync():
                yield

    # -- the data ----------------------------------------------------------------------------

    def share(self, micro_batches: list[list[int]]) -> list[list[int]]:
        """This process's micro-batches of a step: every ``count``-th, from its rank.

        A step with fewer micro-batches than processes (the end of an epoch) is re-cut into
        ``count`` near-equal parts first, so every process has pairs unless the step has fewer
        pairs than there are processes. An empty micro-batch [] in the answer is a pass of
        weight zero (``DpoStep`` runs one pair and counts nothing): DDP needs every process in the
        all-reduce, so a process without pairs gets [[]]; sharded, every process must run the same
        number of passes, so the shorter shares are topped up with [] to the longest.
        """
        if self.count == 1:
            return micro_batches
        if len(micro_batches) < self.count:
            flat = [index for batch in micro_batches for index in batch]
            micro_batches = [flat[len(flat) * r // self.count: len(flat) * (r + 1) // self.count]
                             for r in range(self.count)]
        mine = [batch for batch in micro_batches[self.rank::self.count] if batch]
        passes = -(-len(micro_batches) // self.count) if self.sharded else 1
        return mine + [[]] * (passes - len(mine))

    def shard(self, size: int) -> list[int]:
        """The indices of ``size`` items this process handles (every ``count``-th from its rank);
        ``gather_rows`` puts the results back in order."""
        return list(range(self.rank, size, self.count))

    def top_up(self, mine: list[int], size: int) -> list[int]:
        """The items of ``mine`` (``shard(size)``) this process runs through the model: its own,
        and sharded, as many copies of item 0 as make its share as long as the longest, so that
        every process makes the same passes. The caller keeps the first ``len(mine)`` results."""
        if not self.sharded or size == 0:
            return mine
        return mine + [0] * (-(-size // self.count) - len(mine))

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

    # -- sharded state -----------------------------------------------------------------------

    def whole_adapter(self, model: Any) -> dict[str, torch.Tensor] | None:
        """Sharded: every LoRA weight of ``model`` whole, on the CPU, named as ``model.state_dict()``
        names them (every process takes part: each weight is all-gathered). None otherwise: the
        model holds its weights whole and is saved as it is."""
        if not self.sharded:
            return None
        return {name: whole(param).detach().cpu() for name, param in model.named_parameters() if "lora_" in name}

    def whole_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Sharded: ``optimizer.state_dict()`` with every sharded tensor whole, on the CPU (every
        process takes part, in the same order: the state of parameter 0 first). None otherwise."""
        if not self.sharded:
            return None
        state = optimizer.state_dict()
        state["state"] = {index: {key: whole(value).cpu() if isinstance(value, torch.Tensor) else value
                                  for key, value in entries.items()}
                          for index, entries in sorted(state["state"].items())}
        return state

    def load_adapter(self, model: Any, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Sharded: the weights of a saved adapter (``adapter_model.safetensors``, whole, keys
        without the adapter's name, as peft saves them) into this process's shards of adapter
        ``adapter_name``. Each process takes its own part of each weight; nothing is sent.
        A weight missing or left over is a RuntimeError naming it."""
        from torch.distributed.tensor import distribute_tensor

        params = {name.replace(f".{adapter_name}.", "."): param for name, param in model.named_parameters()
                  if "lora_" in name and f".{adapter_name}." in name}
        missing, unexpected = params.keys() - weights.keys(), weights.keys() - params.keys()
        if missing or unexpected:
            raise RuntimeError(f"adapter weights {'missing' if missing else 'unexpected'}, such as "
                               f"{sorted(missing or unexpected)[0]}")
        with torch.no_grad():
            for name, param in params.items():
                value = weights[name].to(param.device, param.dtype)
                param.copy_(distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None))

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Sharded, after ``optimizer.load_state_dict`` of a whole state: each parameter's state
        tensors (Adam's moments) cut back to this process's shard, as the parameter is."""
        if not self.sharded:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for param, entries in optimizer.state.items():
            if not isinstance(param, DTensor):
                continue
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                    entries[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)

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


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (a DTensor of FSDP) gathered whole on every process; any other as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharding_requested() -> bool:
    """The launch asks for the model sharded over the processes: an accelerate config with
    ``distributed_type: FSDP`` (accelerate launch sets ACCELERATE_USE_FSDP)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_model(scorer: PairScorer, model: Any, fsdp: Any, device: torch.device, count: int) -> PairScorer:
    """``fully_shard`` the peft ``model`` under ``scorer`` over ``count`` processes, as accelerate
    lays out a transformers model: each decoder layer a unit, the input embeddings one, the
    final norm and the head one (with the embeddings when they share the head's weight), and
    ``scorer`` the root, which owns what is left. Each unit's shards move to ``device`` as it
    is sharded, so a base loaded on the CPU never sits whole on the GPU. The tail unit stays
    gathered from its forward to its backward (``reshard_after_forward=False``): the head runs
    again in backward (the log-prob chunks are checkpointed), and gathering it twice would cost
    an all-gather of the largest weight. ``fsdp`` (accelerate's plugin, from the config file)
    gives reshard_after_forward and the CPU offload policy; its other settings are accelerate's
    own Trainer-side options, and gradient checkpointing is model.gradient_checkpointing.
    """
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    from .modeling import decoder_layers

    # FSDP2 warns whenever a unit returns a view (a decoder layer's hidden states, our PairLogps):
    # an in-place op on one would skip its backward hook. Nothing here changes them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (count,))
    offload = fsdp.cpu_offload if isinstance(fsdp.cpu_offload, OffloadPolicy) else OffloadPolicy()
    options = dict(mesh=mesh, offload_policy=offload)
    base = model.get_base_model()
    name = getattr(base.config, "_name_or_path", type(base).__name__)
    layers = decoder_layers(base, name, "FSDP")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=fsdp.reshard_after_forward, **options)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and embeddings.weight is head.weight
    if not tied:
        fully_shard(embeddings, reshard_after_forward=fsdp.reshard_after_forward, **options)
    norm = getattr(base.get_decoder(), "norm", None)
    tail = [module for module in (norm, embeddings if tied else None, head) if module is not None]
    fully_shard(tail, reshard_after_forward=False, **options)
    fully_shard(scorer, **options)
    # bitsandbytes keeps each 4-bit weight's quantization constants beside it (not a parameter):
    # Params4bit.to moved them with the shards; the constants of any weight FSDP skipped follow.
    for module in scorer.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "to"):
            state.to(device)
    log.info("model sharded over %d processes with FSDP: %d decoder layers, embeddings and head", count, len(layers))
    return scorer


def check_sharded_config(config: Any) -> None:
    """One line for each setting a sharded (FSDP) run cannot honour yet, before anything loads."""
    refused = [
        (config.train.optim != "adamw", "train.optim", f"{config.train.optim} keeps its state outside FSDP's shards",
         "set train.optim=adamw (LoRA's optimizer state is small, and FSDP shards it over the processes)"),
        (config.train.micro_batch_size == "auto", "train.micro_batch_size",
         "auto plans the memory of one GPU holding the whole base", "set a number (docs/memory.md sizes it)"),
        (bool(config.dpo.ref_sync_every), "dpo.ref_sync_every", "TR-DPO's reference update works on whole adapter "
         "weights", "train without it under FSDP"),
        (config.train.sample_every > 0, "train.sample_every", "generating text is not supported on a sharded model",
         "set train.sample_every=0, and sample the finished adapter with lora-dpo generate"),
        (config.eval.after_training, "eval.after_training", "generating text is not supported on a sharded model",
         "set eval.after_training=false, and run lora-dpo eval on the finished run"),
        (config.model.compile, "model.compile", "compiling sharded layers is not supported yet",
         "set model.compile=false"),
    ]
    for wrong, key, why, fix in refused:
        if wrong:
            raise ConfigError(f"{key}: {why}. Fix: {fix} (docs/distributed.md)", key=key)


def processes(device: torch.device) -> Processes:
    """The processes of this run. Alone (WORLD_SIZE unset or 1): ``Processes`` on ``device``.

    Launched with N processes: accelerate sets up the process group (NCCL on GPUs, gloo on CPUs)
    and gives this process ``cuda:LOCAL_RANK`` (or the CPU), where the whole base is loaded (or,
    sharded, its share). Its mixed-precision and dynamo settings are not used: model.compute_dtype
    and model.compile decide, as on one GPU. On the processes other than the main one, lora-dpo
    logs warnings only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(device=device)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise LoraDpoError("this accelerate config uses DeepSpeed, which lora-dpo does not support. Fix: launch with "
                           "configs/accelerate/ddp.yaml, or configs/accelerate/fsdp.yaml to shard the model "
                           "(docs/distributed.md)")
    fsdp = None
    if sharding_requested():
        fsdp = FullyShardedDataParallelPlugin()  # the accelerate config's settings, from the environment
        if fsdp.fsdp_version != 2:
            raise LoraDpoError(f"this accelerate config asks for FSDP version {fsdp.fsdp_version}; lora-dpo shards with "
                               "FSDP2 (torch's fully_shard), which 4-bit weights survive. Fix: set fsdp_version: 2 "
                               "under fsdp_config (as configs/accelerate/fsdp.yaml does)")
    # Precision and compilation are lora-dpo's settings (model.compute_dtype, model.compile), not
    # the accelerate config's: its autocast or torch.compile around the scorer would change them.
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no", dynamo_backend="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                                             broadcast_buffers=False)])
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.FSDP):
        raise LoraDpoError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up "
                           f"{accelerator.distributed_type} on {device.type}. Fix: set model.device to cuda on a GPU "
                           "machine, cpu otherwise, and launch with accelerate launch (docs/distributed.md)")
    if not accelerator.is_main_process:
        logging.getLogger("lora_dpo").setLevel(logging.WARNING)
    return Processes(accelerator, fsdp=fsdp)
