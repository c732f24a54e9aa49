"""Reference log-probs computed once, kept on disk, and looked up by pair index during training.

The reference model never changes during a run, so its log-probs for every training pair can be
computed in one no-grad pass before the first step; each step then runs only the policy pass.
The pass walks the pairs longest first in micro-batches of similar length (little padding, and an
out-of-memory error shows on the first batch rather than hours in), in eval mode so that dropout
cannot touch the reference.

The result is a safetensors file (tensors ``chosen``, ``rejected``, ``chosen_tokens``,
``rejected_tokens``, one row per pair in the order given) in a cache directory, named by a
sha256 over everything that decides the numbers: the base model (name, revision, config.json,
the size and modification time of its weight files and, with ``trust_remote_code``, the
contents of its own ``*.py`` files), the init adapter (its files' contents), the token ids of
every pair (which covers the data file, chat template, tokenizer and truncation settings), how
the base is loaded (4-bit, double quantization, compute dtype), the attention kernel, and the
batch layout (with the pack length for the packed layouts). The layout is in the key because
it is only "rounding" where the masked layouts reproduce the plain forward; a table from one
layout is never trusted for another. A later run with the same inputs loads the file instead of
running the model; a change to any of them makes a new file. Deliberately not in the key: the
micro-batch size (right padding changes nothing but rounding) and library versions. Format 2
tables replace format 1, whose values were wrong for models that scale their logits (Granite,
Cohere) and for masked layouts on sliding-window models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .batching import PairLogps, score_pairs
from .data import TokenizedPair
from .errors import LoraDpoError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
TENSOR_NAMES = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")


@dataclass
class ReferenceTable:
    """Reference log-probs of a list of pairs, row i for pair i, on the CPU."""

    chosen: torch.Tensor
    """(pairs,) float32 summed log-probs of the chosen responses."""
    rejected: torch.Tensor
    """(pairs,) float32 summed log-probs of the rejected responses."""
    chosen_tokens: torch.Tensor
    """(pairs,) int64 scored tokens of each chosen response."""
    rejected_tokens: torch.Tensor
    """(pairs,) int64 scored tokens of each rejected response."""
    key: str = ""
    """The cache key (sha256 hex) these values belong to."""
    from_cache: bool = False
    """True when the values were read from disk rather than computed."""

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def lookup(self, indices: Sequence[int], device: torch.device | str = "cpu") -> PairLogps:
        """The reference log-probs of the pairs at ``indices``, in that order, as ``pair_logps`` returns them."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return PairLogps(*(getattr(self, name)[index].to(device, non_blocking=True) for name in TENSOR_NAMES))


def reference_logps_for(model: Any, pairs: Sequence[TokenizedPair], model_config: Any, compute_dtype: torch.dtype,
                        pad_token_id: int, cache_dir: str | Path, micro_batch_size: int = 8,
                        layout: str = "padded", chunk_size: int = 512, pack_length: int | None = None,
                        processes: Any = None, scorer: Any = None, ld_alpha: float | None = None) -> ReferenceTable:
    """Reference log-probs of ``pairs``: read from ``cache_dir`` when present, else computed and saved there.

    ``model_config`` is the run's ``ModelConfig`` (it names the base, adapter and quantization);
    ``compute_dtype`` is the resolved dtype (``modeling.resolve_compute_dtype``). ``processes``
    (``distributed.Processes``) of a multi-process run: the file is read only when every process
    finds it; otherwise each computes its share of the pairs, the rows are gathered in pair
    order on every process, and the main process writes the one file. ``scorer``: the module the
    passes run through (``batching.score_pairs``). ``ld_alpha``: LD-DPO's length-weighted sums
    (``batching.pair_logps``), which depend on the pair alone, so they are cached like the others.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = reference_cache_key(model_config, compute_dtype, pairs, layout, pack_length,
                              getattr(base.config, "_attn_implementation", None), ld_alpha=ld_alpha)
    path = cache_path(cache_dir, key)
    table = _load(path, key, pairs)
    if processes is not None and not processes.all(table is not None):
        table = None  # a machine of the run without the file: all compute, so none waits alone
    if table is not None:
        log.info("reference log-probs of %d pairs read from %s", len(pairs), path)
        return table
    started = time.perf_counter()
    mine = processes.shard(len(pairs)) if processes is not None else list(range(len(pairs)))
    scored = processes.top_up(mine, len(pairs)) if processes is not None else mine  # sharded: the same passes
    table = compute_reference_logps(model, [pairs[i] for i in scored], pad_token_id, compute_dtype, micro_batch_size,
                                    layout, chunk_size, pack_length, scorer=scorer, ld_alpha=ld_alpha)
    if processes is not None:
        table = ReferenceTable(*(processes.gather_rows(getattr(table, name)[: len(mine)], len(pairs))
                                 for name in TENSOR_NAMES))
    table.key = key
    if processes is None or processes.is_main:
        _save(table, path, key)
    log.info("reference log-probs of %d pairs computed in %.1f s, saved to %s", len(pairs),
             time.perf_counter() - started, path)
    return table


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"reference-logps-{key}.safetensors"


def compute_reference_logps(model: Any, pairs: Sequence[TokenizedPair], pad_token_id: int, compute_dtype: torch.dtype,
                            micro_batch_size: int = 8, layout: str = "padded", chunk_size: int = 512,
                            pack_length: int | None = None, scorer: Any = None,
                            ld_alpha: float | None = None) -> ReferenceTable:
    """One no-grad pass of the reference model over ``pairs`` (``batching.score_pairs``), on the CPU;
    rows follow the order of ``pairs``."""
    logps = score_pairs(model, pairs, pad_token_id, micro_batch_size=micro_batch_size, layout=layout,
                        chunk_size=chunk_size, pack_length=pack_length, compute_dtype=compute_dtype, reference=True,
                        scorer=scorer, ld_alpha=ld_alpha)
    return ReferenceTable(*(getattr(logps, name).cpu() for name in TENSOR_NAMES))


# ---------------------------------------------------------------------------------------------
# The key


def reference_cache_key(model_config: Any, compute_dtype: torch.dtype, pairs: Sequence[TokenizedPair],
                        layout: str = "padded", pack_length: int | None = None,
                        attn_implementation: str | None = None, ld_alpha: float | None = None) -> str:
    """sha256 hex of everything that decides the reference log-probs of ``pairs``.

    ``attn_implementation`` is the kernel the loaded model runs (None: the configured one).
    ``ld_alpha`` (LD-DPO's weighted sums) is part of the key only when set, so the tables of
    every other run keep the keys they were written under.
    """
    identity = reference_identity(model_config, compute_dtype)
    identity["layout"] = layout
    identity["pack_length"] = pack_length if layout.startswith("packed") else None
    identity["attn_implementation"] = attn_implementation or model_config.attn_implementation
    identity["pairs"] = pairs_digest(pairs)
    if ld_alpha is not None:
        identity["ld_alpha"] = float(ld_alpha)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def reference_identity(model_config: Any, compute_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "base": _base_identity(model_config.name_or_path, model_config.revision, model_config.trust_remote_code),
        "init_adapter": adapter_identity(model_config.init_adapter),
        "load_in_4bit": bool(model_config.load_in_4bit),
        "double_quant": bool(model_config.double_quant),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
    }


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 over every pair's three lengths and token ids, in order (about 1 s per 100M tokens)."""
    digest = hashlib.sha256()
    for pair in pairs:
        parts = (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
        digest.update(array("q", [len(part) for part in parts]).tobytes())
        for part in parts:
            digest.update(array("q", part).tobytes())
    return digest.hexdigest()


def _base_identity(name_or_path: str, revision: str | None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Name and revision, plus config.json and weight-file sizes and mtimes of the directory the
    weights come from: the local directory, or the hub cache snapshot (named by its commit). With
    remote code, also the sha256 of the directory's ``*.py`` files: the modelling code runs from
    there, and an edited file changes the numbers without touching config or weights."""
    identity: dict[str, Any] = {"name_or_path": name_or_path, "revision": revision}
    directory = Path(name_or_path)
    if directory.is_dir():
        identity["path"] = str(directory.resolve())
    else:
        directory = _hub_snapshot(name_or_path, revision)
        if directory is None:
            log.warning("%s: no local copy found, so the reference cache key uses the name and revision alone",
                        name_or_path)
            return identity
        identity["commit"] = directory.name
    config_file = directory / "config.json"
    identity["config_json"] = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    identity["weights"] = [_file_stamp(path) for path in sorted(directory.iterdir())
                           if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)]
    if trust_remote_code:
        identity["code"] = {path.name: _sha256_file(path) for path in sorted(directory.glob("*.py")) if path.is_file()}
    return identity


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The hub cache snapshot the model was loaded from (offline: only looks in the cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()  # follows hub-cache symlinks to the blob
    return [path.name, stat.st_size, stat.st_mtime_ns]


def adapter_identity(adapter: str | None) -> dict[str, Any] | None:
    """Path and content hash of an adapter directory's ``adapter_*`` files (the init adapter's here, the
    evaluated run's in evaluation's resume fingerprint; adapters are megabytes, so hashing is cheap)."""
    if not adapter:
        return None
    directory = Path(adapter)
    files = {}
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name.startswith("adapter_"):
                files[path.name] = _sha256_file(path)
    return {"path": str(directory.resolve()), "files": files}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The file


def _save(table: ReferenceTable, path: Path, key: str) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tensors = {name: getattr(table, name).contiguous() for name in TENSOR_NAMES}
        save_file(tensors, str(partial), metadata={"format": str(CACHE_FORMAT), "key": key, "pairs": str(len(table))})
        os.replace(partial, path)  # readers never see half a file
    except OSError as exc:
        raise LoraDpoError(f"dpo.reference_cache_dir {path.parent}: cannot write the reference cache ({exc.strerror}). "
                           "Fix: choose a writable directory") from None


def _load(path: Path, key: str, pairs: Sequence[TokenizedPair]) -> ReferenceTable | None:
    """The cached table, or None when there is none or it does not fit these pairs (then it is recomputed)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    except Exception as exc:  # a truncated or foreign file: safetensors raises several types
        log.warning("%s: unreadable reference cache (%s); computing it again", path, exc)
        return None
    count = len(pairs)
    problem = None
    if metadata.get("key") != key:
        problem = "it was written for another key"
    elif any(t.shape != (count,) for t in tensors.values()):
        problem = f"it holds {tensors['chosen'].shape} rows for {count} pairs"
    elif (tensors["chosen_tokens"].tolist() != [len(p.chosen_ids) for p in pairs]
          or tensors["rejected_tokens"].tolist() != [len(p.rejected_ids) for p in pairs]):
        problem = "its token counts do not match the pairs"
    elif not (torch.isfinite(tensors["chosen"]).all() and torch.isfinite(tensors["rejected"]).all()):
        problem = "it holds non-finite values"
    if problem:
        log.warning("%s: %s; computing the reference log-probs again", path, problem)
        return None
    return ReferenceTable(tensors["chosen"].float(), tensors["rejected"].float(), tensors["chosen_tokens"].long(),
                          tensors["rejected_tokens"].long(), key=key, from_cache=True)
