"""Every batch layout against the plain padded one: same per-pair log-probs, same gradients.

The prefix-shared and packed layouts change what the model sees (one row per pair, several
sequences per row, a 4D attention mask, explicit position ids) but must not change a single
number the loss uses. Checked in float32 on tiny Llama and Qwen2 models with both CPU attention
kernels, through a real 4-bit peft model, under bf16 autocast, and on every sliding-window family
of the installed transformers with a window shorter than the sequences, against each sequence's
own plain forward. Families whose layers cannot take the masks are refused with one line.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaModel

from conftest import make_config
from tiny_families import ARCHITECTURES, WINDOW, WINDOW_FAMILIES, plain_logps, tiny_model
from lora_dpo.batching import LAYOUTS, collate, layout_length, length_grouped_batches, pair_logps
from lora_dpo.data import DataReport, PreferenceExample, TokenizedPair, tokenize_examples
from lora_dpo.errors import ConfigError
from lora_dpo.modeling import load_model, reference_model

FAST_LAYOUTS = [layout for layout in LAYOUTS if layout != "padded"]
MAX_PROMPT_LENGTH = 24

# Weights per pair and side, so that a token summed into the wrong pair or side changes the loss.
CHOSEN_WEIGHTS = torch.tensor([1.0, 2.0, -1.5, 0.5])
REJECTED_WEIGHTS = torch.tensor([-0.5, 1.0, 3.0, -2.0])


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[TokenizedPair]:
    """Very different lengths, a prompt cut to max_prompt_length, a one-token prompt and response."""
    report = DataReport("test")
    examples = [
        PreferenceExample("Can you tell me about bread?",
                          "Of course! Bread is a wonderful subject, and it is easy to start. " * 3 + "I hope this helps!",
                          "No.", "row 0"),
        PreferenceExample("Why do people like tea? I want to learn about tea. " * 4, "Sure thing!",
                          "Ugh. Tea is boring and I do not care. Stop asking me.", "row 1"),
        PreferenceExample("Hi", "Great question! " * 5, "Whatever.", "row 2"),
    ]
    tokenized = tokenize_examples(examples, tokenizer, max_length=96, max_prompt_length=MAX_PROMPT_LENGTH, report=report)
    assert report.truncated_prompts == 1 and len(tokenized[1].prompt_ids) == MAX_PROMPT_LENGTH
    assert tokenized[1].prompt_ids[0] != tokenizer.bos_token_id  # truncation kept the end of the prompt
    eos = tokenizer.eos_token_id
    tokenized.append(TokenizedPair([tokenizer.bos_token_id], [40, 41, 42, eos], [eos]))
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized]
    assert max(lengths) > 3 * min(lengths)
    return tokenized


def _float_model(model_dir, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)


def _logps_and_grads(model, pairs, layout, chunk_size=7):
    model.zero_grad(set_to_none=True)
    out = pair_logps(model, collate(pairs, pad_token_id=0, layout=layout), chunk_size=chunk_size)
    loss = (CHOSEN_WEIGHTS * out.chosen).sum() + (REJECTED_WEIGHTS * out.rejected).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(out, grads, want_out, want_grads, atol=1e-4):
    assert torch.allclose(out.chosen, want_out.chosen, atol=atol, rtol=0), (out.chosen, want_out.chosen)
    assert torch.allclose(out.rejected, want_out.rejected, atol=atol, rtol=0), (out.rejected, want_out.rejected)
    assert out.chosen_tokens.tolist() == want_out.chosen_tokens.tolist()
    assert out.rejected_tokens.tolist() == want_out.rejected_tokens.tolist()
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        # float32 sums in another order differ by about 1e-6 of the tensor's largest entry: Gemma 4's
        # embedding gradients reach ~150 (its embeddings are scaled by sqrt(hidden)), so a fixed 1e-4
        # failed on one machine and passed on another. Scale the floor by the tensor's magnitude.
        floor = atol * max(1.0, want_grads[name].abs().max().item())
        assert torch.allclose(grad, want_grads[name], atol=floor, rtol=1e-3), name


def test_prefix_shared_row_masks_chosen_from_rejected():
    pair = TokenizedPair([1, 5, 6], [10, 11, 2], [12, 13, 2])
    batch = collate([pair], pad_token_id=0, layout="prefix_shared", pad_to_multiple_of=1)
    assert batch.input_ids.tolist() == [[1, 5, 6, 10, 11, 2, 12, 13, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 5]]  # rejected restarts after the prompt
    allowed = batch.attention_mask[0, 0]
    assert allowed.shape == (9, 9) and allowed.dtype == torch.bool
    assert allowed[7].tolist() == [True, True, True, False, False, False, True, True, False]  # 2nd rejected token
    assert allowed[4].tolist() == [True] * 5 + [False] * 4  # chosen is plain causal
    rejected = batch.target_segments == 1
    assert batch.target_tokens[rejected].tolist() == [12, 13, 2]
    # The first rejected token is predicted from the last prompt position, like the first chosen one.
    assert batch.target_positions[rejected].tolist() == [2, 6, 7]
    assert batch.target_positions[batch.target_segments == 0].tolist() == [2, 3, 4]


def test_packed_rows_restart_positions_and_isolate_sequences():
    pairs = [TokenizedPair([1, 5], [10, 2], [11, 12, 2]), TokenizedPair([1], [13, 2], [2])]
    batch = collate(pairs, pad_token_id=0, layout="packed", pad_to_multiple_of=1)
    # Sequences of 4, 5, 3, 2 tokens packed first-fit decreasing into rows of the longest (5): 5 | 4 | 3+2.
    assert batch.input_ids.tolist() == [[1, 5, 11, 12, 2], [1, 5, 10, 2, 0], [1, 13, 2, 1, 2]]
    assert batch.position_ids[2].tolist() == [0, 1, 2, 0, 1]
    allowed = batch.attention_mask[:, 0]
    assert allowed[2, 3].tolist() == [False, False, False, True, False]  # a new sequence sees none of the last
    assert allowed[1, 4].tolist() == [True, False, False, False, True]  # padding sees itself and the row's start
    assert not allowed[1, :4, 4].any()  # and no real token sees padding
    wide = collate(pairs, pad_token_id=0, layout="packed", pack_length=64, pad_to_multiple_of=1)
    assert wide.input_ids.shape == (1, 14)
    narrow = collate(pairs, pad_token_id=0, layout="packed_prefix_shared", pack_length=2, pad_to_multiple_of=1)
    assert narrow.input_ids.shape == (2, 7)  # a unit longer than pack_length gets a row of its own


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_match_padded_in_float32(request, pairs, arch, attn):
    model = _float_model(request.getfixturevalue("llama_dir" if arch == "llama" else "qwen_dir"), attn)
    want_out, want_grads = _logps_and_grads(model, pairs, "padded")
    for layout in FAST_LAYOUTS:
        out, grads = _logps_and_grads(model, pairs, layout)
        _assert_same(out, grads, want_out, want_grads)


def test_fast_layouts_process_fewer_tokens(pairs):
    padded = collate(pairs, pad_token_id=0).input_ids.numel()
    sizes = {layout: collate(pairs, pad_token_id=0, layout=layout).input_ids.numel() for layout in FAST_LAYOUTS}
    assert sizes["prefix_shared"] < padded
    assert sizes["packed"] < padded
    assert sizes["packed_prefix_shared"] <= min(sizes["prefix_shared"], sizes["packed"])
    unshared = sum(p.num_tokens for p in pairs)
    assert all(collate(pairs, 0, layout=layout).num_tokens == unshared for layout in LAYOUTS)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layouts_match_padded_through_4bit_peft(request, tmp_path, pairs, arch):
    """Real NF4 base + LoRA via load_model, gradient checkpointing on, train mode. The 4-bit
    weights dequantize identically whatever the layout, so the tolerance stays 1e-4 here too."""
    model_dir = request.getfixturevalue("llama_dir" if arch == "llama" else "qwen_dir")
    config = make_config(model_dir, tmp_path / "unused.jsonl", tmp_path / "out", "model.device=cpu")
    assert config.model.load_in_4bit
    torch.manual_seed(0)
    model = load_model(config, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.train()
    results = {}
    for layout in LAYOUTS:
        batch = collate(pairs, pad_token_id=0, layout=layout)
        with torch.no_grad(), reference_model(model):
            reference = pair_logps(model, batch, chunk_size=7)
        out, grads = _logps_and_grads(model, pairs, layout)
        results[layout] = reference, out, grads
    want_reference, want_out, want_grads = results["padded"]
    assert all("lora_" in name for name in want_grads)
    assert not torch.allclose(want_reference.chosen, want_out.chosen, atol=1e-3)  # the adapter is really on
    for layout in FAST_LAYOUTS:
        reference, out, grads = results[layout]
        assert torch.allclose(reference.chosen, want_reference.chosen, atol=1e-4, rtol=0)
        assert torch.allclose(reference.rejected, want_reference.rejected, atol=1e-4, rtol=0)
        _assert_same(out, grads, want_out, want_grads)


def test_layouts_under_bf16_autocast(llama_dir, pairs):
    """The mask follows the autocast dtype; bf16 results agree with float32 padded within 0.5%."""
    model = _float_model(llama_dir, "sdpa")
    with torch.no_grad():
        want = pair_logps(model, collate(pairs, pad_token_id=0))
        for layout in FAST_LAYOUTS:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = pair_logps(model, collate(pairs, pad_token_id=0, layout=layout))
            assert torch.allclose(got.chosen, want.chosen, rtol=5e-3, atol=0.05), layout
            assert torch.allclose(got.rejected, want.rejected, rtol=5e-3, atol=0.05), layout


def test_masked_layouts_refuse_flash_attention(llama_dir, pairs):
    model = _float_model(llama_dir, "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="model.attn_implementation flash_attention_2 .*data.layout=padded"):
        pair_logps(model, collate(pairs, pad_token_id=0, layout="prefix_shared"))


def test_unknown_layout_names_the_config_key(pairs):
    with pytest.raises(ConfigError, match="data.layout must be one of padded, prefix_shared, packed, packed_prefix_shared"):
        collate(pairs, pad_token_id=0, layout="prefix")


def test_length_grouped_batches_cut_padding_without_ordering_by_length():
    lengths = [(i * 37) % 200 + 5 for i in range(256)]
    pairs = [TokenizedPair([1] * n, [2], [3]) for n in lengths]
    batches = length_grouped_batches(pairs, micro_batch_size=4, seed=7, window=16)
    assert sorted(i for batch in batches for i in batch) == list(range(256))
    assert all(len(batch) == 4 for batch in batches)
    assert batches == length_grouped_batches(pairs, micro_batch_size=4, seed=7, window=16)
    assert batches != length_grouped_batches(pairs, micro_batch_size=4, seed=8, window=16)

    def padded_tokens(batches):
        return sum(len(batch) * max(layout_length(pairs[i]) for i in batch) for batch in batches)

    plain = list(range(256))
    plain_batches = [plain[i : i + 4] for i in range(0, 256, 4)]
    assert padded_tokens(batches) < 0.7 * padded_tokens(plain_batches)
    longest = [max(layout_length(pairs[i]) for i in batch) for batch in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # prefix-shared rows hold prompt + chosen + rejected, so they sort by that
    assert layout_length(TokenizedPair([1, 2], [3], [4, 5]), "prefix_shared") == 5
    assert layout_length(TokenizedPair([1, 2], [3], [4, 5]), "padded") == 4


@pytest.mark.parametrize("family", sorted(WINDOW_FAMILIES))
def test_layouts_match_the_plain_forward_on_sliding_window_models(pairs, family):
    """Sequences of up to 67 tokens against a window of 8: each layout gives the log-probs of each
    sequence run alone through the model's own forward, and the padded layout's gradients."""
    model = tiny_model(family, **WINDOW_FAMILIES[family])
    assert max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) > 4 * WINDOW
    with torch.no_grad():
        alone_chosen = torch.stack([plain_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs])
        alone_rejected = torch.stack([plain_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    want_out, want_grads = _logps_and_grads(model, pairs, "padded")
    assert torch.allclose(want_out.chosen, alone_chosen, atol=1e-4, rtol=0)
    assert torch.allclose(want_out.rejected, alone_rejected, atol=1e-4, rtol=0)
    for layout in FAST_LAYOUTS:
        out, grads = _logps_and_grads(model, pairs, layout)
        _assert_same(out, grads, want_out, want_grads)


@pytest.mark.parametrize("family, overrides, says", [
    ("mamba", dict(state_size=8), "mamba has linear_attention layers"),
    ("lfm2", dict(layer_types=["conv", "full_attention"]), "lfm2 has conv layers"),
    ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_dt_rank=8,
                   use_mamba_kernels=False), "jamba has linear_attention layers"),
    # No layer types to read: the one-time probe finds that the row's state runs across sequences.
    ("rwkv", dict(attention_hidden_size=64, context_length=128), r"rwkv \(RwkvForCausalLM\) gives log-probs .* away"),
    # Positions from the column index (ALiBi), not from position ids.
    ("mpt", dict(d_model=64, n_heads=4, n_layers=2), r"mpt \(MptForCausalLM\) gives log-probs .* away"),
])
def test_masked_layouts_refuse_layers_that_cannot_take_a_per_token_mask(pairs, family, overrides, says):
    model = tiny_model(family, attn=None, **overrides)
    pair = pairs[0]
    with torch.no_grad():
        padded = pair_logps(model, collate([pair], pad_token_id=0))  # the padded layout still works
        assert padded.chosen[0].item() == pytest.approx(plain_logps(model, pair.prompt_ids, pair.chosen_ids).item(), abs=1e-4)
        for layout in FAST_LAYOUTS:
            with pytest.raises(ConfigError, match=f"^data.layout={layout}: {says}.*Fix: set data.layout=padded") as info:
                pair_logps(model, collate(pairs, pad_token_id=0, layout=layout))
            assert info.value.key == "data.layout" and "\n" not in str(info.value)


class RemoteCodeLlamaModel(LlamaModel):
    """Stands in for remote modelling code: a body class from outside transformers."""


def test_masked_layouts_refuse_a_window_that_remote_code_applies_its_own_way(pairs):
    model = tiny_model("llama", sliding_window=WINDOW)
    model.model.__class__ = RemoteCodeLlamaModel
    says = r"^data.layout=packed: llama has sliding_window=8, applied by its own \(remote\) modelling code"
    with pytest.raises(ConfigError, match=says):
        pair_logps(model, collate(pairs, pad_token_id=0, layout="packed"))
    with torch.no_grad():
        pair_logps(model, collate(pairs, pad_token_id=0))  # padded leaves the window to the model


# ---------------------------------------------------------------------------------------------
# The architecture matrix: every family hobbyists train, on the real 4-bit path, every layout

_g = torch.Generator().manual_seed(0)
MATRIX_PAIRS = [TokenizedPair([1] + torch.randint(3, 800, (7,), generator=_g).tolist(),
                              torch.randint(3, 800, (12,), generator=_g).tolist() + [2],
                              torch.randint(3, 800, (5,), generator=_g).tolist() + [2]),
                TokenizedPair([1] + torch.randint(3, 800, (3,), generator=_g).tolist(),
                              torch.randint(3, 800, (4,), generator=_g).tolist() + [2],
                              torch.randint(3, 800, (14,), generator=_g).tolist() + [2])]


def _installed(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@pytest.mark.parametrize("family", [f for f, (model_type, _) in ARCHITECTURES.items() if _installed(model_type)])
def test_each_family_trains_through_every_layout_on_the_4bit_path(family, tmp_path):
    """The family saved and loaded as training loads it (4-bit NF4, LoRA, model.attn_implementation
    auto): each layout's per-pair log-probs equal the model's own full-logits forward of each
    sequence alone (sequences of up to 19 tokens against windows of 8), then one optimizer step
    per layout applies a finite update to every LoRA matrix. Gradient
    checkpointing is off to keep the matrix cheap: it changes no number (test_checkpoint_layers)."""
    from lora_dpo.train import DpoStep, build_scheduler

    model_type, overrides = ARCHITECTURES[family]
    tiny_model(model_type, attn=None, **overrides).save_pretrained(tmp_path / "model")
    assert max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in MATRIX_PAIRS) > 2 * WINDOW
    config = make_config(tmp_path / "model", tmp_path / "unused.jsonl", tmp_path / "out", "model.device=cpu",
                         "lora.r=4", "model.gradient_checkpointing=false")
    torch.manual_seed(0)
    model = load_model(config, torch.device("cpu"))
    assert config.model.load_in_4bit and config.model.attn_implementation == "auto"
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.eval()
    with torch.no_grad():
        alone = [(plain_logps(model, p.prompt_ids, p.chosen_ids).item(), plain_logps(model, p.prompt_ids, p.rejected_ids).item())
                 for p in MATRIX_PAIRS]
        for layout in LAYOUTS:
            got = pair_logps(model, collate(MATRIX_PAIRS, pad_token_id=0, layout=layout))
            for i, (chosen, rejected) in enumerate(alone):
                assert got.chosen[i].item() == pytest.approx(chosen, abs=1e-4), (layout, i)
                assert got.rejected[i].item() == pytest.approx(rejected, abs=1e-4), (layout, i)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = build_scheduler(config, optimizer, 0, len(LAYOUTS))
    model.train()
    for layout in LAYOUTS:
        step = DpoStep(dataclasses.replace(config, data=dataclasses.replace(config.data, layout=layout)), model,
                       optimizer, scheduler, None, torch.device("cpu"), pad_id=0)
        metrics, applied, bad = step(MATRIX_PAIRS, [[0, 1]], None)
        assert applied and not bad and metrics["grad_norm"] > 0, (layout, metrics)
    assert all(not torch.equal(p, old) for p, old in zip(trainable, before))  # every LoRA matrix was updated
