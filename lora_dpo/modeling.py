"""Loading the tokenizer and the 4-bit base with LoRA adapters, and switching to the reference.

The policy and the reference are one model: the reference is the same base with the trainable
adapter switched off (or, when training starts from an SFT adapter, with a frozen copy of that
adapter switched on instead), so the GPU holds one set of base weights.

One function, ``load_base``, loads every base: training adds a trainable adapter on top
(``load_model``); merging, generation and the inference commands add a saved adapter, read with
``inspect_adapter`` so that the base is loaded the way the run trained it
(``load_inference_model``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .checkpoint import complete_checkpoints
from .config import Config, ModelConfig, load_config
from .errors import ConfigError, LoraDpoError, one_line

log = logging.getLogger(__name__)

TRAINED_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def resolve_device(choice: str, option: str = "model.device") -> torch.device:
    """auto | cuda | cpu -> a device; ``option`` names the setting in the error (a config key or a flag)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} is cuda but no CUDA GPU is visible. Fix: set {option} to cpu or auto", key=option)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_compute_dtype(model_config: ModelConfig, device: torch.device) -> torch.dtype:
    if model_config.compute_dtype != "auto":
        return getattr(torch, model_config.compute_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU half-precision matmuls are slow and imprecise


def autocast_for(device: torch.device, compute_dtype: torch.dtype) -> torch.autocast:
    """Mixed precision in the compute dtype; float32 runs without autocast."""
    return torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


def load_tokenizer(model_config: ModelConfig, fix: str = "point at a model directory saved with save_pretrained") -> Any:
    """``fix`` is the advice when a local directory holds no usable tokenizer (commands name their flags)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.name_or_path, revision=model_config.revision, trust_remote_code=model_config.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise LoraDpoError(_not_found(model_config.name_or_path, "tokenizer", exc, fix)) from None
    if tokenizer.eos_token_id is None:
        raise LoraDpoError(f"{model_config.name_or_path}: the tokenizer has no EOS token, so responses cannot be "
                           "ended. Fix: use a tokenizer that defines eos_token")
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS avoids resizing embeddings.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _not_found(name: str, what: str, exc: Exception,
               fix: str = "point at a model directory saved with save_pretrained") -> str:
    if Path(name).exists():
        return f"{name}: cannot load the {what} from this directory ({one_line(exc)}). Fix: {fix}"
    text = str(exc).lower()
    if "gated" in text or "401" in text or "restricted" in text:
        # transformers raises these as plain OSErrors; the fix is an account step, not a path
        return (f"{name}: the {what} is in a gated hub repository and this machine is not allowed to read it. "
                f"Fix: accept the model's licence on its hub page, then log in with `hf auth login` (or set HF_TOKEN)")
    return (f"{name}: cannot load the {what}: not a local directory, and the hub copy could not be read "
            f"({type(exc).__name__}). Fix: check the name, your network or HF_HUB_OFFLINE, or download the model first")


def load_base(model_config: ModelConfig, device: torch.device, dtype: torch.dtype | str, *,
              attn_implementation: str | None, four_bit: bool | None = None, what: str = "model",
              fix: str = "point at a model directory saved with save_pretrained", sharded: bool = False) -> Any:
    """The base causal LM of ``model_config`` as training loads it, in eval mode, all on ``device``.

    In 4-bit NF4 (``four_bit``, default ``model_config.load_in_4bit``) with the run's quantization
    settings, computing in ``dtype`` (non-quantized weights such as embeddings, norms and the head
    are held in it too); otherwise unquantized in ``dtype`` ("auto": as the checkpoint was saved).
    On CPU, 4-bit layers keep the layout whose backward is exact (``keep_cpu_4bit_trainable``).
    ``attn_implementation`` is explicit at every call: training passes the run's kernel, while a
    merge passes None (transformers' default), so a CPU merge of a flash-attention run needs no
    flash-attn. "auto" is None too, with a log line naming the kernel transformers chose; an
    explicit kernel the model does not support is a ConfigError naming the ones it does.
    ``what`` and ``fix`` word the one-line error when the model cannot be read. ``sharded``: for
    FSDP, the packed 4-bit weights are stored in ``dtype`` rather than uint8 (the same bits; FSDP
    shards floating tensors only).
    """
    from transformers import AutoModelForCausalLM

    four_bit = model_config.load_in_4bit if four_bit is None else four_bit
    if four_bit and not isinstance(dtype, torch.dtype):
        raise ValueError("a 4-bit base needs its compute dtype")
    kwargs: dict[str, Any] = dict(revision=model_config.revision, trust_remote_code=model_config.trust_remote_code,
                                  dtype=dtype, device_map={"": str(device)})
    kernel = None if attn_implementation == "auto" else attn_implementation
    if kernel is not None:
        kwargs["attn_implementation"] = kernel
    if four_bit:
        kwargs["quantization_config"] = four_bit_config(model_config, dtype, storage=dtype if sharded else None)
    try:
        base = AutoModelForCausalLM.from_pretrained(model_config.name_or_path, **kwargs)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        if kernel is None:
            raise
        raise ConfigError(f"model.attn_implementation={kernel}: {one_line(exc)}. "
                          "Fix: install what it names, or use model.attn_implementation=auto",
                          key="model.attn_implementation") from None
    except (OSError, ValueError) as exc:
        if kernel is not None and "attention implementation" in str(exc):
            raise ConfigError(_unsupported_kernel(model_config, kernel), key="model.attn_implementation") from None
        raise LoraDpoError(_not_found(model_config.name_or_path, what, exc, fix)) from None
    if attn_implementation == "auto":
        log.info("model.attn_implementation=auto: transformers runs %s with %s attention", type(base).__name__,
                 getattr(base.config, "_attn_implementation", "its default"))
    if four_bit and device.type == "cpu":
        keep_cpu_4bit_trainable(base)
    return base.eval()


def _unsupported_kernel(model_config: ModelConfig, kernel: str) -> str:
    """The one-line error for an attention kernel the model's class does not implement, naming the
    values of model.attn_implementation that its class does (from transformers' _supports_* flags)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    working, name = ["auto", "eager"], model_config.name_or_path
    try:
        config = AutoConfig.from_pretrained(name, revision=model_config.revision,
                                            trust_remote_code=model_config.trust_remote_code)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        name = model_class.__name__
        working += [value for value, flag in (("sdpa", "_supports_sdpa"), ("flash_attention_2", "_supports_flash_attn"))
                    if getattr(model_class, flag, False)]
    except (KeyError, OSError, ValueError):  # remote code or an unmapped config: eager always works
        pass
    return (f"model.attn_implementation={kernel}: {name} does not implement {kernel} attention. Fix: set "
            f"model.attn_implementation to one of {', '.join(working)} (auto lets transformers choose)")


def load_model(config: Config, device: torch.device, sharded: bool = False) -> Any:
    """The base (4-bit NF4 unless disabled) with a trainable LoRA adapter named 'default'.

    ``sharded`` (FSDP, ``distributed.shard_model``): loaded on the CPU, 4-bit weights stored in the
    compute dtype; sharding then moves each process's share to ``device``. It costs every process
    CPU memory for the whole 4-bit base while it loads, and bitsandbytes quantizes on the CPU
    (slower than on a GPU), so that no GPU ever holds the whole base.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    model_config = config.model
    base = load_base(model_config, torch.device("cpu") if sharded else device,
                     resolve_compute_dtype(model_config, device), attn_implementation=model_config.attn_implementation,
                     sharded=sharded)
    base.config.use_cache = False
    if model_config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings
        # stay frozen and nothing is upcast; that is why prepare_model_for_kbit_training is not used
        # (it would copy the embeddings and head to float32: +0.5 GB on a 1B model with a 128k vocab).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # It also hooks the embeddings so that their output requires grad, which only reentrant
        # checkpointing needs. Without the hook backward stops at the first layer's LoRA weights
        # instead of also computing the gradient of the embeddings' output, which nothing trains.
        # Removed at once: a second enable (peft's) would orphan this hook where no disable finds it.
        base.disable_input_require_grads()
        if model_config.checkpoint_layers is not None:
            checkpoint_first_layers(base, model_config.checkpoint_layers, model_config.name_or_path)

    if model_config.init_adapter:
        adapter_dir = Path(model_config.init_adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"model.init_adapter: {adapter_dir} holds no adapter_config.json. "
                              "Fix: point it at a directory written by peft's save_pretrained", key="model.init_adapter")
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=TRAINED_ADAPTER, is_trainable=True)
            # A frozen second copy is the reference: DPO measures drift from the SFT model, not the bare base.
            model.load_adapter(str(adapter_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.init_adapter: {adapter_dir} does not fit {model_config.name_or_path} "
                              f"({one_line(exc)}). Fix: use the adapter trained on this base, or the base it names "
                              "in its adapter_config.json", key="model.init_adapter") from None
        model.set_adapter(TRAINED_ADAPTER)
    else:
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(base, lora)
        except ValueError as exc:  # peft's "target modules not found" is a ValueError subclass
            raise ConfigError(f"lora.target_modules={config.lora.target_modules!r}: {one_line(exc)}. Fix: use "
                              "all-linear, or names of the model's linear layers (e.g. q_proj, v_proj)",
                              key="lora.target_modules") from None
        if config.dpo.ref_sync_every:
            from .reference_sync import add_reference_adapter

            add_reference_adapter(model)  # TR-DPO: a frozen adapter the reference lives in, B = 0 (the base) at first
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            raise LoraDpoError(f"unexpected trainable base parameter {name}")
    base.disable_input_require_grads()  # peft hooks them again on unquantized bases (see above)
    if model_config.compile:
        compile_layers(base, model_config.name_or_path)
    return model


def decoder_layers(base: Any, name: str, key: str) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM; ``key`` is the setting that needs them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(isinstance(layer, GradientCheckpointingLayer)
                                                               for layer in layers):
        raise ConfigError(f"{key}: not supported for {name} (its decoder layers are not transformers "
                          f"GradientCheckpointingLayer modules). Fix: remove {key}", key=key)
    return layers


def checkpoint_first_layers(base: Any, count: int, name: str) -> None:
    """Keep gradient checkpointing on the first ``count`` decoder layers only (model.checkpoint_layers)."""
    layers = decoder_layers(base, name, "model.checkpoint_layers")
    if count > len(layers):
        raise ConfigError(f"model.checkpoint_layers={count} but {name} has {len(layers)} decoder layers. Fix: set "
                          f"it to at most {len(layers)}, or null to checkpoint all", key="model.checkpoint_layers")
    # An unchecked layer keeps its activations (memory grows with tokens per micro-batch x hidden and
    # intermediate size) but is not recomputed in backward, saving about a third of its backward cost.
    # The last layers are the unchecked ones: their backward runs first and frees their activations
    # before any recompute needs room, so the peak stays lower than with the first ones unchecked.
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    log.info("gradient checkpointing on %d of %d decoder layers", count, len(layers))


def compile_layers(base: Any, name: str) -> None:
    """torch.compile each decoder layer, LoRA modules included (model.compile).

    Per layer rather than the whole model: identical layers reuse one compiled graph, so compile
    time does not grow with depth, and the head and the log-prob code stay eager. dynamic=True:
    sequence lengths change every step and must not each compile. A handful of variants still
    compile once each: training and the no-grad passes (reference, evaluation), the first layer
    (its input needs no gradient) and the rest, checkpointed and unchecked layers, and a batch of
    a single row. That can pass dynamo's default limit of 8, after which it silently runs eager,
    so the limit is raised for this process. Module.compile keeps parameter names, so adapters
    and checkpoints save as without it.
    """
    import torch._dynamo

    layers = decoder_layers(base, name, "model.compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiling %d decoder layers with torch.compile (the first steps are slow while it compiles)", len(layers))


def four_bit_config(model_config: ModelConfig, compute_dtype: torch.dtype, storage: torch.dtype | None = None) -> Any:
    """bitsandbytes' NF4 settings of the run; ``storage``: the dtype the packed weights are held in
    (None: uint8, bitsandbytes' default)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.load_in_4bit needs the bitsandbytes package. Fix: pip install bitsandbytes, "
                          "or set model.load_in_4bit=false", key="model.load_in_4bit") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=model_config.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({} if storage is None else {"bnb_4bit_quant_storage": storage}),
    )


def keep_cpu_4bit_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode without grad converts its
    weight in place to a packed layout whose matmul has no backward; every later training step
    then silently gets wrong LoRA gradients below that layer (measured: bitsandbytes 0.50.2).
    The cost of turning it off is a slower CPU eval pass; GPUs are unaffected.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """Within this block the model computes reference log-probs (call it under no_grad)."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(TRAINED_ADAPTER)
    else:
        with model.disable_adapter():
            yield model


def load_adapter_weights(model: Any, weights: dict[str, torch.Tensor], adapter_name: str, processes: Any = None) -> None:
    """Saved adapter weights (keys as peft saves them) into the model's adapter ``adapter_name``:
    through peft, or into a sharded model's shards (``distributed.Processes.load_adapter``). A
    weight the model has no place for is a RuntimeError naming it."""
    from peft.utils import set_peft_model_state_dict

    if processes is not None and processes.sharded:
        processes.load_adapter(model, weights, adapter_name)
        return
    unexpected = getattr(set_peft_model_state_dict(model, weights, adapter_name=adapter_name), "unexpected_keys", [])
    if unexpected:
        what = "reference adapter" if adapter_name == REFERENCE_ADAPTER else "adapter"
        raise RuntimeError(f"unexpected {what} weights such as {unexpected[0]}")


def save_adapter(model: Any, directory: str | Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors of the trained adapter only.
    ``weights``: the LoRA weights whole, named as in ``model.state_dict()``, for a sharded model
    (``distributed.Processes.whole_adapter``); None reads them from the model."""
    extra = {} if weights is None else {"state_dict": weights}
    model.save_pretrained(str(directory), selected_adapters=[TRAINED_ADAPTER], safe_serialization=True, **extra)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Adapter directories: a trained adapter, loaded on its base the way the run trained it

TRAINING_CONFIG = "config.yaml"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_FIX = "pass --base with the local directory or hub id of the model the adapter was trained on"


@dataclass
class AdapterSource:
    """A checked adapter directory and what is known about the run that produced it."""

    directory: Path
    model: ModelConfig
    """How training loaded the base (from config.yaml, or the project defaults), naming the base to use."""
    training: Optional[Config]
    """The run's resolved config.yaml, when the directory (or, for a checkpoint, its run) holds one."""
    tokenizer_path: str
    weights: dict[str, torch.Tensor] = field(repr=False)


def inspect_adapter(directory: str | Path, base: str | None = None) -> AdapterSource:
    """Check an adapter directory before any model is loaded; ``base`` overrides the base it names."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        check_finished_run(directory)
        raise LoraDpoError(f"{directory}: no adapter_config.json here. Fix: point at the output.dir of a "
                           "training run (or any directory written by peft's save_pretrained)")
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraDpoError(f"{config_file}: not valid JSON ({one_line(exc)}). "
                           "Fix: restore the file from the training run") from None
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
        raise LoraDpoError(f"{config_file}: peft_type is {kind!r}, only LORA adapters can be merged. "
                           "Fix: point at a LoRA adapter directory")
    weights = _read_adapter_weights(directory)

    # A checkpoint-STEP directory holds the adapter only; its run's config and tokenizer are one level up.
    run_dirs = [directory] + ([directory.parent] if directory.name.startswith("checkpoint-") else [])
    training = None
    for run_dir in run_dirs:
        if (run_dir / TRAINING_CONFIG).is_file():
            training = load_config(run_dir / TRAINING_CONFIG)
            break
    named_base = adapter_config.get("base_model_name_or_path")
    if not base and not named_base:
        raise LoraDpoError(f"{config_file}: names no base model (base_model_name_or_path). Fix: pass --base")
    model = training.model if training is not None else ModelConfig()
    same_base = not base or base == model.name_or_path
    model = dataclasses.replace(model, name_or_path=base or named_base, init_adapter=None,
                                revision=model.revision if same_base else None)
    with_tokenizer = [str(d) for d in run_dirs if (d / "tokenizer_config.json").is_file()]
    tokenizer_path = with_tokenizer[0] if with_tokenizer else model.name_or_path
    return AdapterSource(directory, model, training, tokenizer_path, weights)


def check_finished_run(directory: Path) -> None:
    """Refuse a training run that stopped early with a message naming the checkpoint to use instead.

    Training writes the adapter to the top of output.dir only when it finishes; an interrupted run
    holds config.yaml (written before the first step) and checkpoint-STEP directories, each with an
    adapter of its own. A model directory (config.json) is never one, even with checkpoint-STEP
    directories of its own, as transformers' Trainer leaves them.
    """
    if not (directory / TRAINING_CONFIG).is_file() or (directory / "config.json").is_file():
        return
    complete = complete_checkpoints(directory)
    if complete:
        raise LoraDpoError(f"{directory}: the run did not finish (no adapter_config.json at the top, only "
                           f"checkpoints). Fix: use {complete[-1]}, the newest complete checkpoint, or finish the "
                           "run with lora-dpo train CONFIG --resume")
    raise LoraDpoError(f"{directory}: the run did not finish and saved no complete checkpoint (none holds "
                       "trainer_state.json), so it has no adapter yet. Fix: train it again with "
                       "lora-dpo train CONFIG --overwrite")


def _read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise LoraDpoError(f"{directory}: no adapter_model.safetensors here. Fix: point at a finished training "
                           "run (checkpoints and the final output.dir hold one)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraDpoError(f"{path}: cannot read the adapter weights, the file looks corrupted or cut off "
                           f"({one_line(exc)}). Fix: copy it again from the training run") from None
    if not weights:
        raise LoraDpoError(f"{path}: holds no tensors. Fix: copy it again from the training run")
    broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise LoraDpoError(f"{path}: {len(broken)} tensors hold NaN or inf (first: {broken[0]}), training diverged. "
                           "Fix: retrain with a lower train.learning_rate, or use an earlier checkpoint")
    return weights


def apply_adapter(base_model: Any, source: AdapterSource) -> Any:
    """The base with the adapter loaded (not merged), refusing an adapter that does not fit the base."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        model = PeftModel.from_pretrained(base_model, str(source.directory), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise LoraDpoError(f"{source.directory}: the adapter does not fit the base {source.model.name_or_path} "
                           f"({one_line(exc)}). Fix: pass --base with the model the adapter was trained on") from None
    # peft loads whatever keys match and only warns about the rest; a partial adapter must not pass.
    # Only the LoRA matrices are compared: they are what a merge uses, and what every adapter holds.
    loaded = {key for key in get_peft_model_state_dict(model, save_embedding_layers=False) if ".lora_" in key}
    expected = {key for key in source.weights if ".lora_" in key}
    if loaded != expected:
        odd = sorted(expected - loaded) or sorted(loaded - expected)
        raise LoraDpoError(f"{source.directory}: the adapter weights do not match the layers it adapts in "
                           f"{source.model.name_or_path} ({len(expected - loaded)} unused, {len(loaded - expected)} "
                           f"missing, e.g. {odd[0]}). Fix: pass --base with the model the adapter was trained on")
    return model.eval()


def load_adapter_tokenizer(source: AdapterSource) -> Any:
    """The tokenizer training used: the run directory's copy, else the base's."""
    from_base = source.tokenizer_path == source.model.name_or_path
    fix = BASE_FIX if from_base else "copy the tokenizer files again from the training run"
    return load_tokenizer(dataclasses.replace(source.model, name_or_path=source.tokenizer_path,
                                           revision=source.model.revision if from_base else None), fix)


# ---------------------------------------------------------------------------------------------
# Inference: a ready model and tokenizer for generation and scoring


@dataclass
class InferenceModel:
    """A loaded model with its tokenizer, ready to generate or score."""

    model: Any
    """In eval mode. With an adapter it is a peft model whose adapter ``reference_model(model)``
    (or peft's ``disable_adapter()``) switches off, giving the reference's answers."""
    tokenizer: Any
    device: torch.device
    has_adapter: bool
    description: str
    """What was loaded, as a header line says it: e.g. ``4-bit BASE + adapter DIR``."""


def load_inference_model(model_path: str | None, adapter: str | None = None, *, device: str | torch.device = "auto",
                         dtype: str | torch.dtype = "auto", attn_implementation: str | None = None,
                         four_bit: bool = False) -> InferenceModel:
    """A model (a base or a merged model) or a base + adapter, loaded for inference as it was trained.

    With ``adapter`` (a training run's output.dir, one of its checkpoints, or any peft LoRA
    directory) the base is ``model_path``, or when that is None the base the adapter names, loaded
    as the run's config.yaml says (4-bit NF4 when training was 4-bit, with its quantization
    settings) with the adapter on top, unmerged; ``dtype`` "auto" is the run's compute dtype.
    Without ``adapter``, a ``model_path`` holding adapter_config.json is taken as the adapter on
    the base it names, and anything else loads as a plain model in ``dtype`` ("auto": as saved).
    The tokenizer is the one training used (the run directory's copy, else the base's); it is
    loaded first, so a wrong path fails in seconds rather than after minutes of loading.
    ``attn_implementation`` None is transformers' default kernel (sdpa), which any device runs.
    ``four_bit`` loads a plain model in 4-bit NF4 (computing in ``dtype``, "auto": bfloat16 or
    float16 on a GPU, float32 on CPU); an adapter's base is loaded as its run says instead.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device, "--device")
    chosen = DTYPES[dtype] if isinstance(dtype, str) and dtype != "auto" else dtype
    if adapter is None and model_path is not None and (Path(model_path) / "adapter_config.json").is_file():
        model_path, adapter = None, model_path
    if adapter is not None:
        source = inspect_adapter(adapter, model_path)
        compute_dtype = resolve_compute_dtype(source.model, target) if chosen == "auto" else chosen
        four_bit = source.model.load_in_4bit
        tokenizer = load_adapter_tokenizer(source)
        base = load_base(source.model, target, compute_dtype, attn_implementation=attn_implementation,
                         what="base model", fix=BASE_FIX)
        what = f"{'4-bit' if four_bit else '16-bit'} {source.model.name_or_path} + adapter {adapter}"
        return InferenceModel(apply_adapter(base, source), tokenizer, target, True, what)
    if model_path is None:
        raise ValueError("load_inference_model needs a model path, an adapter directory, or both")
    check_finished_run(Path(model_path))  # an interrupted training run: name its checkpoint, not "a model directory"
    fix = "point at a model directory, a merged model, or an adapter directory"
    plain = ModelConfig(name_or_path=model_path, load_in_4bit=four_bit)
    tokenizer = load_tokenizer(plain, fix)
    if four_bit and chosen == "auto":
        chosen = resolve_compute_dtype(plain, target)
    model = load_base(plain, target, chosen, attn_implementation=attn_implementation, fix=fix)
    return InferenceModel(model, tokenizer, target, False, f"4-bit {model_path}" if four_bit else model_path)
