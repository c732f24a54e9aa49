"""Checkpoints that survive a kill at any moment, and resuming from them bit for bit.

A checkpoint is a directory ``checkpoint-STEP`` holding the adapter (and the reference adapter,
where the model has one), the optimizer state (also
bitsandbytes' paged 8-bit state), every RNG, the trainer state (the position in the data, counted
in pairs, and a fingerprint of the data), the metrics so far and the config it was made with. The
learning-rate schedule is not stored: it is a function of the settings and the step number. It is written into a hidden temporary directory, fsynced, and renamed into
place, so a reader sees either the previous checkpoints or the new one complete — never half of
one. Only safetensors and JSON are written or read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import LoraDpoError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last inside the temporary directory


# ---------------------------------------------------------------------------------------------
# Nested Python state <-> (JSON, safetensors)


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write ``obj`` (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as
    ``name.json`` plus ``name.safetensors`` for its tensors, without pickling anything."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    _write_json(directory / f"{name}.json", tree)


def load_state(directory: Path, name: str) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if type(obj).__module__ == "numpy":
        import numpy

        if isinstance(obj, numpy.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(_decode(v, tensors) for v in tree["__tuple__"])
        if "__ndarray__" in tree:
            import numpy

            return numpy.array(tree["__ndarray__"], dtype=tree["dtype"])
    return tree


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------------------------
# Checkpoint directories


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def remove_partial_writes(out_dir: Path) -> None:
    """What a run killed while saving left: a checkpoint's temporary directory, or the ``.tmp-``
    sibling of a file written atomically (``records.write_text_atomic``)."""
    for path in out_dir.glob(".tmp-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_checkpoint(out_dir: Path, step: int, model: Any, optimizer: Any, scaler: Any, trainer_state: dict[str, Any],
                     copies: Sequence[Path], keep_last: int, rank_rngs: list[dict[str, Any]] | None = None,
                     adapter_weights: dict[str, torch.Tensor] | None = None,
                     optimizer_state: dict[str, Any] | None = None) -> Path:
    """Atomically write checkpoint-STEP, then delete all but the newest ``keep_last`` checkpoints.

    ``copies`` are files copied in as they are (the metrics so far, the config). ``rank_rngs``:
    the RNG state of every process of a multi-process run, in rank order (the main process
    writes the checkpoint; the others' dropout streams must continue too). ``adapter_weights`` and
    ``optimizer_state``: a sharded model's, gathered whole (``distributed.Processes``); None: the
    model's and the optimizer's own."""
    from .modeling import save_adapter
    from .reference_sync import save_reference

    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = out_dir / f".tmp-{CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_adapter(model, temporary, adapter_weights)
    save_reference(model, temporary, adapter_weights)  # TR-DPO moves the reference: a resume needs the one it had
    save_state(optimizer_state if optimizer_state is not None else optimizer.state_dict(), temporary, "optimizer")
    extra: dict[str, Any] = {"rng": rng_state()}
    if rank_rngs is not None:
        extra["rank_rngs"] = rank_rngs
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    save_state(extra, temporary, "loop")
    for path in copies:
        if path.exists():
            shutil.copyfile(path, temporary / path.name)
    _write_json(temporary / STATE_FILE, {**trainer_state, "step": step})
    for path in temporary.iterdir():
        _fsync_path(path)
    _fsync_path(temporary)
    if final.exists():  # a stale copy from a run that went further before being resumed earlier
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_path(out_dir)
    checkpoints = complete_checkpoints(out_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (step, data position, data fingerprint...), without loading anything else."""
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def restore_checkpoint(path: Path, model: Any, optimizer: Any, scaler: Any, metrics_path: Path | None,
                       processes: Any = None) -> dict[str, Any]:
    """Load everything write_checkpoint saved; returns the trainer state (step, data position...).

    The optimizer comes back with the hyper-parameters it was saved with; the caller decides which
    current settings replace them. The metrics so far are copied to ``metrics_path`` (None: not,
    on the processes that do not write). ``processes`` (``distributed.Processes``, None: alone):
    each process gets its own RNG state back, and a sharded model its shards of the weights and
    the optimizer state."""
    from safetensors.torch import load_file

    from .errors import one_line
    from .modeling import TRAINED_ADAPTER, load_adapter_weights
    from .reference_sync import restore_reference

    try:
        load_adapter_weights(model, load_file(str(path / "adapter_model.safetensors")), TRAINED_ADAPTER, processes)
        restore_reference(model, path, processes)
        optimizer.load_state_dict(load_state(path, "optimizer"))
        if processes is not None:
            processes.shard_optimizer_state(optimizer)  # sharded: back into shards; otherwise nothing
        _repage(optimizer)
        loop = load_state(path, "loop")
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise LoraDpoError(f"{path} does not fit the current settings ({one_line(exc)}). Fix: resume with the "
                           f"lora.* and train.optim settings in {path.parent / 'config.yaml'}, or pass --overwrite "
                           "to start again") from None
    if scaler is not None and "scaler" in loop:
        scaler.load_state_dict(loop["scaler"])
    if metrics_path is None:
        pass
    elif (path / "metrics.jsonl").exists():
        shutil.copyfile(path / "metrics.jsonl", metrics_path)
    else:
        metrics_path.write_text("", encoding="utf-8")
    rank = processes.rank if processes is not None else 0
    rank_rngs = loop.get("rank_rngs")
    set_rng_state(rank_rngs[rank] if rank_rngs and rank < len(rank_rngs) else loop["rng"])
    return read_trainer_state(path)


def _repage(optimizer: Any) -> None:
    """Put a loaded bitsandbytes paged optimizer's moment buffers back into paged memory.

    load_state_dict leaves them as ordinary tensors, which bitsandbytes then moves to the GPU as
    is: the run works, but the state can no longer be paged out to CPU memory under pressure —
    the point of the paged optimizer on an 8 GB card. get_state_buffer is how bitsandbytes
    allocates them in the first place (paged for large parameters on CUDA, plain elsewhere).
    """
    if not getattr(optimizer, "is_paged", False):
        return
    for param, state in optimizer.state.items():
        for key in ("state1", "state2"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and not getattr(value, "is_paged", False):
                buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
                buffer.copy_(value.reshape(buffer.shape))
                state[key] = buffer


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # some filesystems refuse to open directories; the rename is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
