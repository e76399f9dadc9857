"""Text preference data in TRL's format, tokenized with the model's own tokenizer exactly as TRL does.

Oracle: TRL 1.16's own ``DPOTrainer`` on the real SmolLM2 tokenizer and weights (a 2-layer slice):
its tokenized dataset (prompt / chosen / rejected ids) and its ``compute_ref_log_probs`` against
rwasym's `load_pairs` + `pair_logprobs`.
"""

import copy
import json

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.data.pairs import ByteTokenizer, PreferencePairs, load_pairs_jsonl
from rwasym.objectives import pair_logprobs

TEXT = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin."},
    {"prompt": "Q: 2+2=? A: ", "chosen": "4", "rejected": "five"},  # the trailing space merges into the completion
    {"prompt": "Hello", "chosen": " world<|im_end|>", "rejected": "!"},  # already ends with the EOS string
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "What colour is the sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    },
    {
        "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "22"}],
    },
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _unpadded(pairs, part, i):
    ids, mask = getattr(pairs, part)[i], getattr(pairs, f"{part}_mask")
    return ids.tolist() if mask is None else ids[mask[i]].tolist()


@pytest.fixture(scope="module")
def real2(real_folder):
    return rwasym.load(real_folder(2))


@pytest.mark.parametrize("records", [TEXT, CHAT], ids=["strings", "messages"])
def test_tokenization_and_logprobs_equal_trl_dpo_trainer(real2, real_folder, records, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is the oracle here: install rwasym[hf]")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = real2.load_pairs(_jsonl(tmp_path / "pairs.jsonl", records))
    hf = AutoModelForCausalLM.from_pretrained(str(real_folder(2)), dtype=torch.float32, attn_implementation="eager")
    user_tokenizer = AutoTokenizer.from_pretrained(str(real_folder(2)))  # what a TRL user passes, not the bridge's
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        per_device_train_batch_size=len(records),
        max_length=1024,
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        fp16=False,
    )
    trainer = trl.DPOTrainer(
        model=hf,
        ref_model=copy.deepcopy(hf),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=user_tokenizer,
    )
    rows = [dict(r) for r in trainer.train_dataset]
    for i, row in enumerate(rows):
        for part in ("prompt", "chosen", "rejected"):
            assert _unpadded(pairs, part, i) == row[f"{part}_ids"], (i, part)
    batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    trainer.model.eval()
    with torch.no_grad():
        trl_c, trl_r = trainer.compute_ref_log_probs(trainer.model, batch)
    ours_c, ours_r = pair_logprobs(real2, pairs)
    assert torch.allclose(ours_c.double(), trl_c.double(), atol=2e-4, rtol=1e-5), (ours_c, trl_c)
    assert torch.allclose(ours_r.double(), trl_r.double(), atol=2e-4, rtol=1e-5), (ours_r, trl_r)
    assert float((ours_c - ours_r).abs().max()) > 0.1  # the pairs are distinguishable: a wrong split would show


def test_chat_template_flag_renders_string_prompts_as_one_turn(real2, tmp_path):
    plain = [{"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."}]
    as_messages = [
        {
            "prompt": [{"role": "user", "content": plain[0]["prompt"]}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    ]
    a = real2.load_pairs(_jsonl(tmp_path / "a.jsonl", plain), chat_template=True)
    b = real2.load_pairs(_jsonl(tmp_path / "b.jsonl", as_messages))
    c = real2.load_pairs(_jsonl(tmp_path / "c.jsonl", plain))
    for part in ("prompt", "chosen", "rejected"):
        assert _unpadded(a, part, 0) == _unpadded(b, part, 0)
    assert "<|im_start|>assistant\n" in real2.tokenizer.decode(_unpadded(a, "prompt", 0))
    assert _unpadded(c, "prompt", 0) != _unpadded(a, "prompt", 0)


def test_mismatched_text_data_is_refused_clearly(models, tmp_path, real2):
    native = models["native"]  # no tokenizer, d_vocab 64, n_ctx 32
    text = _jsonl(tmp_path / "text.jsonl", TEXT[:1])
    with pytest.raises(RwasymError, match="holds text, but there is no tokenizer"):
        native.load_pairs(text)
    with pytest.raises(RwasymError, match=r"line 1 \(chosen\): token ids must lie in \[0, 64\)"):
        native.load_pairs(_jsonl(tmp_path / "ids.jsonl", [{"prompt": [1, 2], "chosen": [99], "rejected": [3]}]))
    with pytest.raises(RwasymError, match="longer than the model's context n_ctx=32"):
        native.load_pairs(
            _jsonl(tmp_path / "long.jsonl", [{"prompt": list(range(3, 40)), "chosen": [5], "rejected": [6]}])
        )
    with pytest.raises(RwasymError, match="chosen is empty after tokenization"):
        load_pairs_jsonl(
            _jsonl(tmp_path / "empty.jsonl", [{"prompt": "ab", "chosen": "", "rejected": "c"}]), ByteTokenizer()
        )
    with pytest.raises(RwasymError, match="must all be strings, or all message lists"):
        real2.load_pairs(_jsonl(tmp_path / "mixed.jsonl", [{**CHAT[0], "chosen": "Blue."}]))
    big = PreferencePairs(prompt=torch.tensor([[1, 2]]), chosen=torch.tensor([[70]]), rejected=torch.tensor([[3]]))
    big.save(tmp_path / "big.safetensors")
    with pytest.raises(RwasymError, match=r"\(chosen\): token ids must lie in \[0, 64\)"):
        native.load_pairs(tmp_path / "big.safetensors")


def test_cli_intervene_and_probe_on_the_real_model_with_text(real_gguf, real_folder, tmp_path, capsys):
    """As a new user types them: text pairs and a text corpus, the GGUF file and a tuned folder."""
    from rwasym.app.cli import main

    base = rwasym.load(real_folder(2))
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for name in ("blocks.1.attn.W_Q", "blocks.1.mlp.W_out"):
        tuned.set_weight(
            name, tuned.weight(name) + 0.02 * torch.randn(tuned.matrix(name).shape, generator=g, dtype=torch.float64)
        )
    tuned.save_pretrained(tmp_path / "tuned")
    pairs = _jsonl(
        tmp_path / "pairs.jsonl",
        TEXT + [{"prompt": "Water boils at", "chosen": " 100 degrees.", "rejected": " 10 degrees."}],
    )
    out = tmp_path / "sweep.jsonl"
    assert (
        main(
            [
                "intervene",
                "--base",
                str(real_folder(2)),
                "--tuned",
                str(tmp_path / "tuned"),
                "--pairs",
                str(pairs),
                "--matrices",
                "blocks.1.attn.W_Q",
                "--directions",
                "pca:2,random:2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "5 rows in" in capsys.readouterr().out  # pca:2 targets + random:2 controls at one KL budget + the ceiling
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Sentence {i} is about the weather, the sea and the mountains." for i in range(40)))
    assert (
        main(
            [
                "probe",
                "--base",
                str(real_folder(2)),
                "--tuned",
                str(tmp_path / "tuned"),
                "--data",
                str(corpus),
                "--matrices",
                "blocks.1.*.*",
                "--null-samples",
                "0",
                "--no-heads",
                "--no-curves",
                "--quiet",
                "--out",
                str(tmp_path / "probe.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert {r["matrix"] for r in rows} == {"blocks.1.attn.W_Q", "blocks.1.mlp.W_out"}


def test_cli_train_align_a_real_model_on_text_pairs(real_folder, tmp_path, capsys):
    """`rwasym train align` on a real (2-layer SmolLM2) base with TRL-format text pairs and the flags a
    real model needs; the built-in loop (full weights) and TRL with a LoRA adapter."""
    from rwasym.app.cli import main

    pairs = _jsonl(tmp_path / "pairs.jsonl", TEXT + TEXT)
    out = tmp_path / "builtin"
    assert (
        main(
            [
                "train",
                "align",
                "--base",
                str(real_folder(2)),
                "--pairs",
                str(pairs),
                "--steps",
                "1",
                "--lr",
                "1e-5",
                "--batch-size",
                "4",
                "--grad-accum",
                "2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and log[-1]["lr"] == pytest.approx(1e-5 / 20)  # step 1 of the 20 warmup steps
    trained, base = rwasym.load(out / "step_000001"), rwasym.load(real_folder(2))
    assert float((trained.weight("blocks.1.attn.W_Q") - base.weight("blocks.1.attn.W_Q")).abs().max()) > 0
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "align",
                "--base",
                str(real_folder(2)),
                "--pairs",
                str(pairs),
                "--lora-rank",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--lora-rank trains a peft LoRA adapter through TRL: add --backend trl" in capsys.readouterr().err
    pytest.importorskip("trl", reason="the TRL backend needs rwasym[hf]")
    lora_out = tmp_path / "lora"
    assert (
        main(
            [
                "train",
                "align",
                "--base",
                str(real_folder(2)),
                "--pairs",
                str(pairs),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--backend",
                "trl",
                "--lora-rank",
                "2",
                "--quiet",
                "--out",
                str(lora_out),
            ]
        )
        == 0
    )
    config = json.loads((lora_out / "step_000001" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    tuned = rwasym.load(real_folder(2), adapter=lora_out / "step_000001")
    assert any(d.rank == 2 for d in tuned.adapter.values())


def test_max_length_truncates_like_trl_keep_start(real2, tmp_path):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is the oracle here: install rwasym[hf]")
    path = _jsonl(tmp_path / "pairs.jsonl", TEXT)
    full = real2.load_pairs(path)
    prompts = [_unpadded(full, "prompt", i) for i in range(len(TEXT))]
    L = max(len(p) for p in prompts) + 1  # every prompt fits, at least one completion is cut
    cut = real2.load_pairs(path, max_length=L)
    examples = [
        {f"{part}_ids": _unpadded(full, part, i) for part in ("prompt", "chosen", "rejected")} for i in range(len(TEXT))
    ]
    batch = trl_dpo.DataCollatorForPreference(pad_token_id=0, max_length=L)(examples)  # TRL's own truncation
    n = len(TEXT)
    n_cut = 0
    for i in range(n):
        for j, part in ((i, "chosen"), (n + i, "rejected")):
            keep = batch["attention_mask"][j].bool()
            ids, scored = batch["input_ids"][j][keep].tolist(), batch["completion_mask"][j][keep].bool()
            assert _unpadded(cut, "prompt", i) + _unpadded(cut, part, i) == ids
            assert _unpadded(cut, part, i) == [t for t, s in zip(ids, scored.tolist()) if s]  # the scored tokens
            n_cut += len(_unpadded(cut, part, i)) < len(_unpadded(full, part, i))
    assert n_cut >= 1
    with pytest.raises(RwasymError, match="leaves no completion token"):
        real2.load_pairs(path, max_length=max(len(p) for p in prompts))  # the longest prompt fills it
    with pytest.raises(RwasymError, match="max_length must be an integer >= 2"):
        real2.load_pairs(path, max_length=0)
    full.save(tmp_path / "pairs.safetensors")
    with pytest.raises(RwasymError, match="stored token tensors"):
        real2.load_pairs(tmp_path / "pairs.safetensors", max_length=L)


def test_every_command_that_reads_pairs_takes_max_length():
    from rwasym.app import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    readers = {name: p for name, p in sub.choices.items() if any(a.dest == "chat_template" for a in p._actions)}
    nested = {
        f"{name} {n}": q
        for name, p in sub.choices.items()
        for a in p._actions
        if isinstance(a, __import__("argparse")._SubParsersAction)
        for n, q in a.choices.items()
        if any(b.dest == "chat_template" for b in q._actions)
    }
    readers.update(nested)
    assert {"demo", "intervene", "gradients"} <= {k.split()[0] for k in readers}
    assert any(k.startswith("train") for k in readers)
    for name, p in readers.items():
        assert any(a.dest == "max_length" for a in p._actions), name
