"""The memory planner (lora_dpo/memory.py): its arithmetic against numbers worked out by hand,
the batch shapes against batching.collate, what fits a budget, ``lora-dpo plan`` on a bare
config.json, and ``train.micro_batch_size: auto`` with its trial step and back-off."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_config, write_jsonl

import lora_dpo.memory as memory
import lora_dpo.train as train_module
from lora_dpo.batching import collate
from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import LoraDpoError
from lora_dpo.memory import (GIB, ModelShape, choose_batch, longest_max_length, longest_micro_batch, micro_batch_of,
                             optimizer_bytes, plan_memory, verdict)

# A shape small enough to work out by hand: per layer q 64x64, k and v 64x32, o 64x64, and
# gate, up, down 64x256.
SMALL = ModelShape(vocab_size=1000, hidden_size=64, intermediate_size=256, layers=2, heads=4, kv_heads=2,
                   head_dim=16, tied=False, model_type="llama")
LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "tie_word_embeddings": True, "max_position_embeddings": 131072}
LLAMA_8B = {**LLAMA_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "head_dim": 128, "tie_word_embeddings": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on two busy cores: one thread (two make tiny steps many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(*overrides):
    return load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", *overrides])


def parts(plan):
    return {part.name: (part.bytes, part.counted) for part in plan.parts}


def test_the_small_shape_worked_out_by_hand():
    plan = plan_memory(SMALL, config("lora.r=8", "train.optim=adamw", "data.max_length=32", "data.max_prompt_length=16"), micro_batch_size=2)
    got = parts(plan)
    # 61,440 linear weights per layer, 2 layers: 122,880 in 4 bits; double-quant constants 1/64 +
    # 4/(64 x 256) bytes per weight; embeddings and head 2 x 1000 x 64 and 5 norms of 64, in bf16.
    assert got["4-bit weights (NF4)"] == (61440, 61440)
    assert got["quantization constants"] == (1950, 1950)
    assert got["16-bit weights (embeddings, head, norms)"] == (256640, 256640)
    # LoRA r=8: 8 x (in + out) per module, 11,264 per layer: 22,528 weights, float32 + bf16 copy,
    # float32 gradients, AdamW's two float32 moments.
    assert got["LoRA weights"] == (22528 * 6,) * 2
    assert got["LoRA gradients"] == (22528 * 4,) * 2
    assert got["optimizer state"] == (22528 * 8,) * 2
    assert got["paged optimizer state"] == (0, 0)
    # The longest batch: 2 pairs padded = 4 rows of 32 tokens, 124 scored tokens.
    assert (plan.batch.rows, plan.batch.length, plan.batch.scored) == (4, 32, 124)
    assert got["attention masks"] == (4 * 32 * 32,) * 2
    assert got["checkpointed layer inputs"] == (2 * 128 * 2 * 64,) * 2
    assert got["activations of unchecked layers"] == (0, 0)
    # Head phase: final norm 6h per token + scored hidden states and gradients 4h each; the chunk
    # 124 tokens x 1000 x 12 bytes. It beats the layer phase: 128 tokens x 4,608 saved bytes
    # (norms 8h, SDPA 8a + 4 heads x 4, MLP 6i, LoRA with dropout 3 x input width per module
    # = 1,920, rank outputs 7 x 2 x 8) and 128 x (6i + 4h) + the 64 x 256 weight in bf16.
    assert got["decoder output and scored hidden states"] == (128 * 6 * 64 + 124 * 4 * 64,) * 2
    assert got["log-prob chunk (logits forward + backward)"] == (124 * 1000 * 12,) * 2
    assert got["one layer's activations in backward"] == (128 * 4608, 0)
    assert got["backward working memory"] == (128 * 1792 + 16384 * 2, 0)
    static = 61440 + 1950 + 256640 + 22528 * 18
    policy = static + 4096 + 32768 + 49152 + 31744 + 1488000
    assert plan.allocated == policy == 2331294
    # Reference pass: static + masks + residual 2h per token + its chunk forward 124 x 1000 x 10.
    assert got["reference pass"] == (4096 + 128 * 128 + 1240000, 0)
    assert got["allocator slack"] == (int(policy * 0.03),) * 2
    assert plan.reserved == policy + int(policy * 0.03)
    assert plan.on_card == plan.reserved + GIB // 2


def test_quantization_optimizer_and_layouts_worked_out_by_hand():
    plain = parts(plan_memory(SMALL, config("model.double_quant=false", "data.max_length=32", "data.max_prompt_length=16")))
    assert plain["quantization constants"][0] == 122880 * 4 // 64  # a float32 absmax per 64 weights
    assert (7680 - 1950) * 8 / 122880 == pytest.approx(0.373, abs=1e-3)  # what double quantization saves
    # 8-bit: 2 bytes + 2 float32 absmaxes per 256 values; float32 under 4,096 elements; paged from 100,000.
    assert optimizer_bytes([1000, 5000, 200000], "paged_adamw_8bit") == (8000 + 10000 + 8 * 20, 400000 + 8 * 782)
    assert optimizer_bytes([1000, 5000], "adamw") == (48000, 0)
    assert longest_micro_batch(2, 100, "prefix_shared") == memory.MicroBatch(2, 200, 396, True)
    assert longest_micro_batch(2, 100, "packed", pack_length=300) == memory.MicroBatch(2, 304, 396, True)
    assert longest_micro_batch(2, 100, "packed_prefix_shared", pack_length=450) == memory.MicroBatch(1, 400, 396, True)
    # Without checkpointing every layer keeps its activations: 2 x 128 x 4,608 bytes.
    off = parts(plan_memory(SMALL, config("model.gradient_checkpointing=false", "data.max_length=32", "data.max_prompt_length=16", "lora.r=8"),
                            micro_batch_size=2))
    assert off["activations of unchecked layers"][1] == 2 * 128 * 4608
    assert off["checkpointed layer inputs"][1] == 0


@pytest.mark.parametrize("layout,pack", [("padded", None), ("prefix_shared", None), ("packed", 64),
                                         ("packed_prefix_shared", None)])
def test_batch_shapes_are_those_collate_builds(layout, pack):
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in ((5, 9, 3), (12, 2, 20), (1, 30, 30))]
    batch = collate(pairs, 0, layout=layout, pack_length=pack)
    predicted = micro_batch_of(pairs, layout, pack)
    assert (predicted.rows, predicted.length) == tuple(batch.input_ids.shape)
    assert predicted.scored == len(batch.target_tokens) and predicted.masked == (layout != "padded")
    worst = [TokenizedPair([1], [2] * 39, [3] * 39)] * 2  # what longest_micro_batch assumes at max_length 40
    assert micro_batch_of(worst, layout, pack) == longest_micro_batch(2, 40, layout, pack)


def test_parts_add_up_and_the_1b_weights_match_the_measured_load():
    shape = ModelShape.from_config(LLAMA_1B)
    for overrides in ([], ["data.layout=packed_prefix_shared"], ["model.gradient_checkpointing=false"],
                      ["model.checkpoint_layers=10"], ["dpo.precompute_reference=true", "train.optim=adamw"],
                      ["dpo.loss=simpo"], ["model.attn_implementation=eager", "lora.dropout=0"]):
        plan = plan_memory(shape, config(*overrides), micro_batch_size=4)
        assert sum(part.counted for part in plan.parts) == plan.reserved, overrides
        assert plan.allocated < plan.reserved and all(part.counted <= part.bytes for part in plan.parts)
    # Measured (H100, docs/bench-reference.md): the 1B shape in 4-bit with double quantization
    # takes 0.96 GiB allocated once loaded.
    loaded = sum(part.counted for part in plan_memory(shape, config()).parts if part.kind == "weights")
    assert loaded / GIB == pytest.approx(0.96, rel=0.03)
    # The chunk size shrinks the head phase; unchecked layers and no checkpointing cost more.
    base = plan_memory(shape, config(), micro_batch_size=4).reserved
    assert plan_memory(shape, config("model.checkpoint_layers=8"), micro_batch_size=4).reserved > base
    assert plan_memory(shape, config("model.gradient_checkpointing=false"), micro_batch_size=4).reserved > base


def test_a_smaller_budget_picks_a_smaller_batch_with_the_same_pairs_per_step():
    shape = ModelShape.from_config(LLAMA_8B)
    run = config("train.micro_batch_size=auto", "train.pairs_per_step=12", "data.max_length=1024")
    chosen = []
    for card in (80, 24, 16, 12):
        choice = choose_batch(shape, run, card * GIB)
        assert choice.micro_batch_size * choice.accumulation == 12
        assert choice.plan.on_card <= card * GIB
        # the next larger divisor of 12 would not fit
        larger = [d for d in memory.divisors(12) if d > choice.micro_batch_size]
        assert not larger or not plan_memory(shape, run, micro_batch_size=min(larger)).fits(card * GIB)
        chosen.append(choice.micro_batch_size)
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > chosen[-1]
    fixed = choose_batch(shape, config("train.micro_batch_size=4", "train.gradient_accumulation_steps=3"), 16 * GIB)
    assert fixed.pairs_per_step == 12 and fixed.micro_batch_size * fixed.accumulation == 12
    longest = longest_max_length(shape, run, 12 * GIB)
    assert plan_memory(shape, run, micro_batch_size=1, max_length=longest).fits(12 * GIB)
    assert not plan_memory(shape, run, micro_batch_size=1, max_length=longest + 64).fits(12 * GIB)


def test_nothing_fits_says_what_would_or_that_the_card_is_too_small():
    shape = ModelShape.from_config(LLAMA_8B)
    long = config("data.max_length=32768", "data.max_prompt_length=512")
    assert choose_batch(shape, long, 8 * GIB).micro_batch_size is None
    line = verdict(shape, long, 8 * GIB)
    assert line.startswith("nothing fits: micro-batch 1 at data.max_length=32768 needs ")
    assert "fits at micro-batch 1" in line and "\n" not in line
    fitting = int(line.split("data.max_length=")[2].split()[0])
    assert plan_memory(shape, long, micro_batch_size=1, max_length=fitting).fits(8 * GIB)
    tiny = verdict(shape, long, 4 * GIB)
    assert "the model needs a larger card (its weights and the CUDA context alone take " in tiny


def test_plan_reads_a_bare_config_json_offline(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "llama-8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B))  # no weights, no tokenizer
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                           "data": {"train_file": "never-read.jsonl", "max_length": 2048},
                                           "train": {"micro_batch_size": 4, "gradient_accumulation_steps": 2}}))
    assert main(["plan", str(config_file), "--gpu-memory", "24GiB", "train.optim=adamw"]) == 0
    out = capsys.readouterr().out
    assert "32 layers, hidden 4096" in out and "| 4-bit weights (NF4) | 3.25 |" in out
    assert "| **peak reserved (predicted)** |" in out and "card: 24.00 GiB (--gpu-memory); pairs per step: 8" in out
    assert "largest micro-batch at data.max_length=2048: train.micro_batch_size=" in out
    assert "longest data.max_length at micro-batch 1: " in out and "train.optim=paged_adamw_8bit: " in out
    # An 8 GiB card: micro-batch 1 at 2048 does not fit; the one line says what does.
    assert main(["plan", str(config_file), "--gpu-memory", "8GiB"]) == 0
    assert "nothing fits: micro-batch 1 at data.max_length=2048 needs " in capsys.readouterr().out
    # Without a GPU and without --gpu-memory: the parts, then a one-line error naming the flag.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", str(config_file)]) == 2
    captured = capsys.readouterr()
    assert "| part |" in captured.out and "pass --gpu-memory SIZE" in captured.err
    # A hub id that is not cached, offline: one line, no traceback.
    assert main(["plan", str(config_file), "model.name_or_path=nobody/not-cached-anywhere", "--gpu-memory", "8GB"]) == 2
    err = capsys.readouterr().err
    assert "not in the local hub cache" in err and err.count("\n") == 1
    assert memory.parse_memory("800MiB") == 800 * 2**20 and memory.parse_memory("12") == 12 * GIB


def test_auto_tries_from_one_divisor_above_the_plan_down():
    model = SimpleNamespace(config=LLAMA_8B)  # what the planner reads of a loaded model: its config
    pairs = [TokenizedPair([1] * 200, [2] * 800, [3] * 700)] * 8
    run = config("train.micro_batch_size=auto", "data.max_length=1024")
    order = list(range(8))
    assert memory.trial_sizes(run, model, pairs, order, None) == ([8, 4, 2, 1], "")
    assert memory.trial_sizes(run, model, pairs, order, 80 * GIB)[0] == [8, 4, 2, 1]
    planned = choose_batch(ModelShape.from_config(LLAMA_8B), run, 12 * GIB,
                           batch_of=lambda size: micro_batch_of(pairs[:size], "padded")).micro_batch_size
    sizes, said = memory.trial_sizes(run, model, pairs, order, 12 * GIB)
    assert planned in (1, 2, 4) and sizes[0] == {1: 2, 2: 4, 4: 8}[planned] and sizes[-1] == 1
    assert said == f"the planner fits {planned} in 12.00 GiB"
    assert memory.trial_sizes(run, model, pairs, order, 4 * GIB) == ([1], "the planner fits none in 4.00 GiB")


def test_the_models_and_cards_table_in_the_docs_is_the_planners():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("lora_dpo_memory_table", REPO / "scripts" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    docs = (REPO / "docs" / "memory.md").read_text(encoding="utf-8")
    between = docs.split("<!-- scripts/memory_table.py: begin -->\n")[1].split("\n<!-- scripts/memory_table.py: end -->")[0]
    assert between == table.card_table() + "\n\n" + table.calibration_table()
    assert "| Llama-3.1-70B | 70.6B | does not fit |" in between and "| 0.96 GiB allocated | 0.96 GiB |" in between
    assert "| Llama-3.1-70B, sharded over 4 cards (FSDP) | 70.6B | does not fit |" in between


def test_oom_message_carries_the_planners_choice(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=8 * GIB))
    run = make_config(llama_dir, "t.jsonl", "out", "train.micro_batch_size=4", "train.gradient_accumulation_steps=2")
    hint = memory.planner_hint(run)
    assert hint.startswith("; the planner (lora-dpo plan) would have chosen train.micro_batch_size=8 with "
                           "train.gradient_accumulation_steps=1 for this 8.00 GiB card")
    message = str(train_module._out_of_memory(run, "at step 1", []))
    assert message.endswith(f"(every layer){hint}; --debug shows the traceback")
    assert "out of GPU memory at step 1" in message


# ---------------------------------------------------------------------------------------------
# train.micro_batch_size: auto


@pytest.fixture(scope="module")
def auto_setup(llama_dir, demo_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    return folder, write_jsonl(folder / "train.jsonl", demo_rows[:12])


def test_auto_backs_off_on_out_of_memory_with_stale_gradients_dropped(auto_setup, llama_dir, monkeypatch, caplog):
    folder, train_file = auto_setup
    real = memory.trial_step
    tried = []

    def first_runs_out_of_memory(step, pairs, indices):
        params = [p for p in step.model.parameters() if p.requires_grad]
        assert all(p.grad is None for p in params), "the failed trial's gradients were left behind"
        tried.append(len(indices))
        real(step, pairs, indices)
        if len(tried) == 1:  # after its backward: gradients exist, as in a real late out-of-memory
            assert any(p.grad is not None for p in params)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memory, "trial_step", first_runs_out_of_memory)
    caplog.set_level("INFO")
    run = make_config(llama_dir, train_file, folder / "run", "train.micro_batch_size=auto", "train.pairs_per_step=4",
                      "train.max_steps=1", "data.eval_fraction=0")
    summary = train_module.train(run, progress=False)
    assert tried == [4, 2]  # the whole step, then the next divisor of 4
    saved = yaml.safe_load((folder / "run" / "config.yaml").read_text())["train"]
    assert (saved["micro_batch_size"], saved["gradient_accumulation_steps"], saved["pairs_per_step"]) == (2, 2, None)
    assert summary.pairs_trained == 4
    assert any("auto: 2 pairs per micro-batch x 2 accumulation steps = 4 pairs per step" in r.getMessage()
               for r in caplog.records)
    # Started again with the same auto config: the finished run is recognised, not "other settings".
    again = make_config(llama_dir, train_file, folder / "run", "train.micro_batch_size=auto", "train.pairs_per_step=4",
                        "train.max_steps=1", "data.eval_fraction=0", "train.resume=auto")
    assert train_module.train(again, progress=False).already_finished
    with pytest.raises(LoraDpoError, match="other settings"):
        train_module.train(make_config(llama_dir, train_file, folder / "run", "train.micro_batch_size=auto",
                                       "train.pairs_per_step=6", "train.max_steps=1", "data.eval_fraction=0",
                                       "train.resume=auto"), progress=False)


def test_auto_that_never_fits_is_one_clear_error(auto_setup, llama_dir, monkeypatch):
    folder, train_file = auto_setup

    def always_out_of_memory(step, pairs, indices):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(memory, "trial_step", always_out_of_memory)
    run = make_config(llama_dir, train_file, folder / "never", "train.micro_batch_size=auto", "train.max_steps=1")
    with pytest.raises(LoraDpoError, match=r"auto: not even one pair fits: a trial step on the longest pair"):
        train_module.train(run, progress=False)
    assert not (folder / "never").exists()  # nothing written before the settings were settled
    with pytest.raises(LoraDpoError, match="train.pairs_per_step is only read with train.micro_batch_size=auto"):
        make_config(llama_dir, train_file, folder / "x", "train.pairs_per_step=4")


def test_plan_check_puts_a_prediction_beside_each_measurement(tmp_path, capsys):
    """scripts/plan_check.py (the `plan` stage of gpu_suite.sh) on the tiny shape on the CPU:
    three lengths, both reference modes, each row with its prediction; no card is emulated
    without CUDA, and the output says so."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("lora_dpo_plan_check", REPO / "scripts" / "plan_check.py")
    plan_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_check)
    report_file = tmp_path / "plan-check.json"
    handler = signal.getsignal(signal.SIGTERM)
    assert plan_check.main(["--shapes", "tiny", "--lengths", "24,40,64", "--steps", "1", "--device", "cpu",
                            "--model-root", str(tmp_path), "--json", str(report_file)]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # its SIGTERM handler does not outlive it
    report = json.loads(report_file.read_text())
    assert [(r["length"], r["reference"], r["status"]) for r in report["accuracy"]] == [
        (n, mode, "ok") for n in (24, 40, 64) for mode in ("every_step", "precomputed")]
    assert [(r["rows"], r["row_length"]) for r in report["accuracy"]] == [(4, 24)] * 2 + [(4, 40)] * 2 + [(4, 64)] * 2
    assert all(r["predicted_reserved_gib"] > r["predicted_allocated_gib"] > 0 for r in report["accuracy"])
    out = capsys.readouterr().out
    assert "| tiny | 64 | precomputed | 2 | 4 x 64 |" in out and "Emulated cards: not run (no CUDA device)." in out


# ---------------------------------------------------------------------------------------------
# Several GPUs: lora-dpo plan --processes N [--sharded]

LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64}
# Llama-3.1-70B by hand: per layer q and o 8192 x 8192, k and v 8192 x 1024, gate, up and down
# 8192 x 28672: 855,638,016 linear weights, 68,451,041,280 over 80 layers. Embeddings and head
# 128,256 x 8192 each, 161 norms of 8192. LoRA r=16 on every linear layer: 16 x (in + out) per
# module, 2,588,672 per layer, 207,093,760 in all.
LINEAR_70B, LORA_70B = 68_451_041_280, 207_093_760
SIXTEEN_BIT_70B = (2 * 128_256 * 8192 + 161 * 8192) * 2
LAYER_70B = 855_638_016 // 2 + 2 * 8192 * 2 + 4 * 2_588_672  # 4-bit linears, two norms, float32 LoRA
TAIL_70B = (128_256 * 8192 + 8192) * 2  # final norm and head, bf16


def sharded(count):
    return memory.Sharding(count, sharded=True)


@pytest.mark.parametrize("count", [2, 4])
def test_the_70b_shape_sharded_worked_out_by_hand(count):
    shape = ModelShape.from_config(LLAMA_70B)
    run = config("train.optim=adamw", "data.max_length=1024", "data.max_prompt_length=512")
    plan = plan_memory(shape, run, micro_batch_size=1, sharding=sharded(count))
    got = parts(plan)
    # Split over the processes: the 4-bit weights (stored in bf16, same bytes), the 16-bit
    # weights, the float32 LoRA weights (their bf16 autocast copies are whole), gradients, AdamW.
    assert got["4-bit weights (NF4)"] == (LINEAR_70B // 2 // count,) * 2
    assert got["16-bit weights (embeddings, head, norms)"] == (SIXTEEN_BIT_70B // count,) * 2
    assert got["LoRA weights"] == (LORA_70B * 4 // count + LORA_70B * 2,) * 2
    assert got["LoRA gradients"] == (LORA_70B * 4 // count,) * 2
    assert got["optimizer state"] == (LORA_70B * 8 // count,) * 2
    # Whole on every GPU: the double-quantization constants (1/64 + 4/16384 bytes per weight).
    assert got["quantization constants"] == (1_069_547_520 + 16_711_680,) * 2
    # Micro-batch 1 at 1024: 2 rows of 1024 tokens, 2,046 scored; the head phase wins: final norm
    # 6h per token and the scored states 4h, the 512-token chunk x 12 bytes, and gathered whole
    # the tail unit and the last layer, each with its all-gather input (one shard).
    head = 2048 * 6 * 8192 + 2046 * 4 * 8192 + 512 * 128_256 * 12
    gathered_head = TAIL_70B + TAIL_70B // count + LAYER_70B + LAYER_70B // count
    assert got["gathered: norm and head, and the last layer prefetched"] == (gathered_head,) * 2
    # The layer phase, not at the peak: 537,056 saved bytes per token recomputed, the working
    # memory (6i + 4h per token and the 8192 x 28672 weight in bf16), two layers gathered, and
    # one layer's LoRA gradients whole twice (gradients, reduce-scatter input) and its shard.
    layer = 2048 * 537_056 + 2048 * (6 * 28672 + 4 * 8192) + 8192 * 28672 * 2 \
        + 2 * (LAYER_70B + LAYER_70B // count) + 2 * 4 * 2_588_672 + 4 * 2_588_672 // count
    assert layer < head + gathered_head
    assert got["gathered: two decoder layers"] == (2 * (LAYER_70B + LAYER_70B // count), 0)
    assert got["reduce-scatter of a layer's LoRA gradients"] == (2 * 4 * 2_588_672 + 4 * 2_588_672 // count, 0)
    static = LINEAR_70B // 2 // count + 1_086_259_200 + SIXTEEN_BIT_70B // count + LORA_70B * (4 + 4 + 8) // count \
        + LORA_70B * 2
    checkpoints = 80 * 2048 * 2 * 8192
    assert plan.allocated == static + 2 * 1024 * 1024 + checkpoints + head + gathered_head
    assert plan.on_card == plan.allocated + int(plan.allocated * 0.03) + GIB // 2
    # Four 24 GiB cards hold it, two do not.
    assert plan.fits(24 * GIB) == (count == 4)


def test_sharded_parts_add_up_and_ddp_is_one_gpu_plus_its_buckets():
    for shape_config in (LLAMA_1B, LLAMA_8B, LLAMA_70B):
        shape = ModelShape.from_config(shape_config)
        for overrides in ([], ["model.gradient_checkpointing=false"], ["model.load_in_4bit=false"],
                          ["data.layout=packed_prefix_shared", "model.init_adapter=a"], ["dpo.loss=simpo"]):
            run = config("train.optim=adamw", *overrides)
            for count in (1, 2, 3, 8):
                plan = plan_memory(shape, run, micro_batch_size=2, sharding=sharded(count))
                assert sum(part.counted for part in plan.parts) == plan.reserved, (overrides, count)
                assert all(part.counted <= part.bytes for part in plan.parts)
                more = plan_memory(shape, run, micro_batch_size=2, sharding=sharded(count + 1))
                assert more.on_card < plan.on_card  # another GPU always takes something off each
            one = plan_memory(shape, run, micro_batch_size=2)
            ddp = plan_memory(shape, run, micro_batch_size=2, sharding=memory.Sharding(4))
            lora = sum(memory.lora_tensors(shape, list(memory.LINEAR_NAMES), 16))
            expected = {**parts(one), "DDP gradient buckets": (4 * lora, 4 * lora)}
            slack = int((one.allocated + 4 * lora) * 0.03)
            assert parts(ddp) == {**expected, "allocator slack": (slack, slack)}


def test_one_process_sharded_differs_only_by_the_gathered_working_set():
    shape = ModelShape.from_config(LLAMA_8B)
    # Long rows: a layer's backward is the peak both ways, so the same phase counts.
    run = config("train.optim=adamw", "data.max_length=4096", "data.max_prompt_length=256")
    plain = plan_memory(shape, run, micro_batch_size=2)
    one = plan_memory(shape, run, micro_batch_size=2, sharding=sharded(1))
    assert parts(plain)["backward working memory"][1] > 0 and parts(one)["backward working memory"][1] > 0
    plain_parts, one_parts = parts(plain), parts(one)
    gathered = {name: value for name, value in one_parts.items() if name not in plain_parts}
    assert set(gathered) == {"gathered: norm and head, and the last layer prefetched", "gathered: two decoder layers",
                             "reduce-scatter of a layer's LoRA gradients",
                             "gathered: embeddings, and the first layer prefetched"}
    # Every other part is the same, but the reference pass (it gathers too) and the slack.
    differ = {name for name in plain_parts if plain_parts[name] != one_parts[name]}
    assert differ <= {"reference pass", "allocator slack"}
    # With one process a gathered unit is held twice (whole, and its shard as the all-gather's input).
    layer = 4096 * 14336 * 3 // 2 + (2 * 4096 * 1024 + 2 * 4096 * 4096) // 2 + 2 * 4096 * 2 \
        + 4 * 16 * (3 * (4096 + 14336) + 2 * (4096 + 1024) + 2 * (4096 + 4096))
    assert gathered["gathered: two decoder layers"][0] == 4 * layer
    assert one.allocated - plain.allocated == sum(counted for _, counted in gathered.values())
    tail = (128256 * 4096 + 4096) * 2
    # The reference pass: 16,384 tokens; a layer's no-grad forward (8h + 6i per token) and two
    # layers gathered, or the chunk's logits forward (512 x vocabulary x 10) and the tail gathered.
    no_grad, logits = 16384 * (8 * 4096 + 6 * 14336), 512 * 128256 * 10
    assert one_parts["reference pass"][0] - plain_parts["reference pass"][0] == \
        max(no_grad + 4 * layer, logits + 2 * tail) - max(no_grad, logits)


def test_nothing_fits_names_the_gpus_that_would():
    shape = ModelShape.from_config(LLAMA_70B)
    run = config("train.optim=adamw", "data.max_length=1024", "data.max_prompt_length=512")
    line = verdict(shape, run, 24 * GIB, sharding=sharded(2))
    assert line.startswith("nothing fits: micro-batch 1 at data.max_length=1024 needs ") and "\n" not in line
    needed = int(line.split("sharded over ")[1].split()[0])
    assert f"(--processes {needed} --sharded) it fits" in line
    assert plan_memory(shape, run, micro_batch_size=1, sharding=sharded(needed)).fits(24 * GIB)
    assert not plan_memory(shape, run, micro_batch_size=1, sharding=sharded(needed - 1)).fits(24 * GIB)
    # One GPU: the card is too small, and the same number of them sharded would do.
    alone = verdict(shape, config("data.max_length=1024", "data.max_prompt_length=512"), 24 * GIB)
    assert "the model needs a larger card" in alone and alone.endswith(f"sharded over {needed} GPUs "
                                                                       f"(--processes {needed} --sharded) it fits")
    # What no number of GPUs divides (the quantization constants alone are 1 GiB) on a 1 GiB card.
    floor = verdict(shape, run, GIB, sharding=sharded(8))
    assert "no shorter max_length, switch or number of GPUs helps: what every GPU holds whole" in floor


def test_plan_processes_and_sharded_end_to_end(tmp_path, capsys):
    model_dir = tmp_path / "llama-70b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_70B))  # no weights, no network
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                           "data": {"train_file": "never-read.jsonl", "max_length": 1024},
                                           "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 4}}))
    assert main(["plan", str(config_file), "--gpu-memory", "24GiB", "--processes", "4", "--sharded",
                 "train.sample_every=10"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU of 4 processes, the model sharded over them (FSDP2" in out
    assert "note: train.optim=paged_adamw_8bit is refused under FSDP: planned with train.optim=adamw" in out
    assert "note: the run would stop before loading: train.sample_every: " in out and "train.optim=adamw\n" in out
    assert f"| 4-bit weights (NF4), sharded: 1/4 per GPU | {LINEAR_70B / 8 / GIB:.2f} |" in out
    assert "| quantization constants | 1.01 |" in out and "| gathered: two decoder layers |" in out
    assert "card: 24.00 GiB (--gpu-memory) each; pairs per step per process: 8" in out
    assert "train.micro_batch_size=2 train.gradient_accumulation_steps=4 (8 pairs per step per process, 32 in all" in out
    assert "train.optim=paged_adamw_8bit: " not in out  # not a switch a sharded run may take
    assert main(["plan", str(config_file), "--gpu-memory", "24GiB", "--processes", "2", "--sharded"]) == 0
    assert "nothing fits: micro-batch 1 at data.max_length=1024 needs " in capsys.readouterr().out
    # Data-parallel: each GPU holds the whole model; 70B fits no 24 GiB card that way.
    assert main(["plan", str(config_file), "--gpu-memory", "80GiB", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU of 2 data-parallel processes: each GPU holds the whole model" in out
    assert "| DDP gradient buckets |" in out and "sharded: 1/" not in out
    assert main(["plan", str(config_file), "--gpu-memory", "24GiB", "--sharded"]) == 2
    err = capsys.readouterr().err
    assert "--sharded: lora-dpo shards the model only over 2 or more processes" in err and err.count("\n") == 1
