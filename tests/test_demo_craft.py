"""`make demo-craft`: the bundled paired task is well formed, every run sees the same SFT micro-batches over the
same optimizer steps, and a tiny run of the demo gives the numbers the table reports."""

from __future__ import annotations

import math

import pytest

from craft.demo_craft import Result, Setup, format_table, load_pairs, run, sft_text


def test_bundled_pairs_tell_one_plot_twice():
    train, heldout = load_pairs("train"), load_pairs("heldout")
    assert (len(train), len(heldout)) == (256, 64)
    assert not {p["plain"] for p in train} & {p["plain"] for p in heldout}
    pair = train[0]
    who = pair["plain"].split(". ")[1].split(" went to ")[0]  # "The young sailor"
    assert who in pair["pirate"] and "Arrr" not in pair["plain"]
    assert sft_text(pair) == pair["pirate"]


@pytest.fixture(scope="module")
def tiny_results():
    """8 optimizer steps on 32 pairs (micro-batches of 8: two epochs), 16 held-out pairs: plain SFT and CRAFT at
    alpha 0.6."""
    return run(Setup(steps=8, alphas=(0.6,), train_rows=32, heldout_rows=16))


def test_plain_sft_and_craft_train_the_same_sft_micro_batches_over_the_same_steps(tiny_results):
    base, plain, craft = tiny_results
    assert (base.run, plain.run, craft.run) == ("base model", "plain SFT", "CRAFT")
    assert plain.steps == craft.steps == 8
    assert len(plain.sft_digest) == 8 and plain.sft_digest == craft.sft_digest  # same batches, same order
    assert len(set(plain.sft_digest[:4])) == 4 and plain.sft_digest[:4] != plain.sft_digest[4:]  # reshuffled epoch 2
    assert plain.sft_tokens == craft.sft_tokens == 8 * 8 * 64  # 8 pirate stories cut to 64 tokens per step


def test_tiny_demo_numbers(tiny_results):
    base, plain, craft = tiny_results
    for result in tiny_results:
        assert 0.0 <= result.retrieval <= 1.0 and result.retrieval * 16 == round(result.retrieval * 16)
        assert math.isfinite(result.lm_loss) and 0.0 < result.lm_loss < math.log(1024)
    assert plain.lm_loss != base.lm_loss and craft.lm_loss != plain.lm_loss  # both trained, differently
    # already after 8 steps the contrastive micro-batches make the plot retrievable (measured: 0.875 vs 0.5)
    assert craft.retrieval >= 0.75 and craft.retrieval >= plain.retrieval + 0.25
    table = format_table(tiny_results).splitlines()
    assert table[3].startswith("| plain SFT | 1 | 8 | 4096 |") and table[3].endswith("| +0.0 % |")
    assert table[4].startswith("| CRAFT | 0.6 | 8 | 4096 |")


def test_table_reports_lm_loss_relative_to_plain_sft():
    rows = [Result("base model", None, 0.25, 2.0), Result("plain SFT", 1.0, 0.2, 1.0, 40, 100),
            Result("CRAFT", 0.9, 0.95, 1.04, 40, 100)]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| run | alpha | optimizer steps | SFT tokens | held-out retrieval@1")
    assert lines[2] == "| base model | - | - | - | 0.250 | 2.000 | - |"
    assert lines[3] == "| plain SFT | 1 | 40 | 100 | 0.200 | 1.000 | +0.0 % |"
    assert lines[4] == "| CRAFT | 0.9 | 40 | 100 | 0.950 | 1.040 | +4.0 % |"
