"""Loading the tokenizer and the 4-bit base with LoRA adapters, and switching to the reference.

The policy and the reference are one model: the reference is the same base with the trainable
adapter switched off (or, when training starts from an SFT adapter, with a frozen copy of that
adapter switched on instead), so the GPU holds one set of base weights.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import Config, ModelConfig
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
    return (f"{name}: cannot load the {what}: not a local directory, and the hub copy could not be read "
            f"({type(exc).__name__}). Fix: check the name, your network or HF_HUB_OFFLINE, or download the model first")


def load_model(config: Config, device: torch.device) -> Any:
    """The base (4-bit NF4 unless disabled) with a trainable LoRA adapter named 'default'."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model_config = config.model
    compute_dtype = resolve_compute_dtype(model_config, device)
    kwargs: dict[str, Any] = dict(
        revision=model_config.revision,
        trust_remote_code=model_config.trust_remote_code,
        attn_implementation=model_config.attn_implementation,
        dtype=compute_dtype,
        device_map={"": str(device)},
    )
    if model_config.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(model_config, compute_dtype)
    try:
        base = AutoModelForCausalLM.from_pretrained(model_config.name_or_path, **kwargs)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        raise ConfigError(f"model.attn_implementation={model_config.attn_implementation}: {one_line(exc)}. "
                          "Fix: install what it names, or use model.attn_implementation=sdpa",
                          key="model.attn_implementation") from None
    except (OSError, ValueError) as exc:
        raise LoraDpoError(_not_found(model_config.name_or_path, "model", exc)) from None
    if model_config.load_in_4bit and device.type == "cpu":
        keep_cpu_4bit_trainable(base)
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


def four_bit_config(model_config: ModelConfig, compute_dtype: torch.dtype) -> Any:
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


def save_adapter(model: Any, directory: str | Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors of the trained adapter only."""
    model.save_pretrained(str(directory), selected_adapters=[TRAINED_ADAPTER], safe_serialization=True)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
