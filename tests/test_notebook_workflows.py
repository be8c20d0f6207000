"""contrastive-ft 0.4.3's six notebooks, one test each, with the calls they make (tiny local model, CPU):
01 basic SFT, 02 best practices (chat template, assistant masks, LoRA, self-align), 03a the loss in a plain
`transformers.Trainer`, 03b TRL SFT with `trainer.craft_metrics`, 03c ORPO on pre-tokenised preference rows,
04 QLoRA with eval before / after."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from craft.testing import make_tokenizer, save_tiny_model, tiny_model, toy_chat_rows, toy_pair_rows

COMMON = dict(per_device_train_batch_size=2, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
              seed=0, disable_tqdm=True, craft_projection_dim=16, bf16=False)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}</s>"
                 "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}")
QUESTIONS = ["What is the capital of France?", "Tell me a joke.", "Name a colour.", "Count to three.",
             "Say hello.", "What is two plus two?", "Name a fruit.", "Describe the sea."]
ANSWERS = ["The capital of France is Paris.", "Why did the chicken cross the road?", "Blue.", "1 2 3",
           "Hello!", "Four.", "An apple.", "The sea be calm today."]


def _logs(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_01_basic_sft_with_paired_datasets(tmp_path):
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    sft_dataset, contrastive_dataset = Dataset.from_list(toy_chat_rows(8, 1)), Dataset.from_list(toy_pair_rows(8, 2))
    bundle = make_craft_datasets(sft_dataset, contrastive_dataset=contrastive_dataset, strategy="paired_dataset")
    args = CRAFTSFTConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=3, craft_alpha=0.6,
                          craft_beta=0.5, **COMMON)
    trainer = CRAFTSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft_dataset, craft_bundle=bundle,
                              data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer())
    trainer.train()
    for entry in trainer.state.log_history[:-1]:  # every step has one SFT and one contrastive micro-batch
        assert entry["loss/craft_total"] == pytest.approx(0.6 * entry["loss/craft_sft"]
                                                          + 0.4 * entry["loss/craft_contrast"], rel=1e-6)
    assert len(_logs(trainer, "loss/craft_total")) == 3


def _chat_dataset(tokenizer) -> Dataset:
    def tokenize(row):
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                "assistant_masks": out["assistant_masks"]}

    rows = Dataset.from_list([{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)])
    return rows.map(tokenize, remove_columns=["question", "answer"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_02_best_practices_self_align_lora_assistant_masks(tmp_path, pooling):
    from peft import LoraConfig, get_peft_model

    from craft.config import CRAFTSFTConfig
    from craft.data import make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenized = _chat_dataset(tokenizer)
    assert all(0 < sum(m) < len(m) for m in tokenized["assistant_masks"])  # a span, after the prompt
    bundle = make_craft_datasets(tokenized, strategy="self_align")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = CRAFTSFTConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2,
                          craft_assistant_mask_strategy="auto", craft_pooling=pooling,
                          craft_report_metrics=["contrastive_accuracy", "representation_consistency"],
                          craft_beta_mode="auto", craft_length_strategy="auto_beta", **COMMON)
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=tokenized, craft_bundle=bundle,
                              processing_class=tokenizer)
    trainer.train()
    assert trainer.craft_modules.infonce.pooling == pooling
    metrics = trainer.craft_metrics
    assert {k for k in metrics if k.startswith("metrics/")} == {"metrics/craft_contrastive_accuracy",
                                                                "metrics/craft_representation_consistency"}
    assert metrics["loss/craft_total"] == pytest.approx(0.6 * metrics["loss/craft_sft"]
                                                        + 0.4 * metrics["loss/craft_contrast"], rel=1e-6)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # only LoRA trained


def test_03a_loss_in_a_plain_transformers_trainer(tmp_path):
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    from craft.data import CRAFTCollator, CRAFTMixedDataLoader
    from craft.losses import InfoNCELoss, combine_craft_losses
    from craft.metrics import compute_contrastive_accuracy

    collator = CRAFTCollator(pad_token_id=3)
    sft_rows, pair_rows = toy_chat_rows(8, 1), toy_pair_rows(8, 2)
    seen, totals = [], []

    class CraftTrainer(Trainer):
        def __init__(self, *args, alpha=0.6, **kwargs):
            super().__init__(*args, **kwargs)
            self.alpha = alpha
            self.craft_loss = InfoNCELoss(temperature=0.1, hidden_size=64, projection_dim=16)

        def get_train_dataloader(self):
            return CRAFTMixedDataLoader(DataLoader(sft_rows, batch_size=2, collate_fn=collator),
                                        DataLoader(pair_rows, batch_size=2, collate_fn=collator),
                                        beta=0.5, gradient_accumulation_steps=2)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch_type = inputs.pop("craft_batch_type")
            seen.append(batch_type)
            if batch_type == "craft":
                h_a = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            output_hidden_states=True).hidden_states[-1]
                h_p = model(input_ids=inputs["input_ids_tgt"], attention_mask=inputs["attention_mask_tgt"],
                            output_hidden_states=True).hidden_states[-1]
                loss, details = self.craft_loss(h_a, h_p, inputs["attention_mask"], inputs["attention_mask_tgt"],
                                                return_details=True)
                accuracy = compute_contrastive_accuracy(details["anchor_embeddings"], details["positive_embeddings"])
                assert float(accuracy) == float((details["logits"].argmax(1) == torch.arange(2)).float().mean())
                sft_loss = torch.zeros((), device=loss.device)
            else:
                sft_loss, loss = model(**inputs).loss, torch.zeros(())
            combined = combine_craft_losses(sft_loss=sft_loss, contrastive_loss=loss, alpha=self.alpha)
            totals.append((float(combined.total_loss), float(sft_loss), float(loss)))
            return combined.total_loss

    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=2,
                             **{k: v for k, v in COMMON.items() if not k.startswith("craft_")})
    trainer = CraftTrainer(model=tiny_model("llama"), args=args)
    trainer.train()
    assert seen == ["sft", "craft"] * 2  # beta 0.5: the contrastive batches reach the "craft" branch
    for total, sft, con in totals:
        assert total == pytest.approx(0.6 * sft + 0.4 * con, rel=1e-6)


def test_03b_trl_sft_reports_craft_metrics(tmp_path):
    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    sft_dataset, pairs = Dataset.from_list(toy_chat_rows(8, 1)), Dataset.from_list(toy_pair_rows(8, 2))
    bundle = make_craft_datasets(sft_dataset, contrastive_dataset=pairs)
    args = CRAFTSFTConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=2, craft_beta=0.5,
                          craft_learnable_temperature=True,
                          craft_report_metrics=["contrastive_accuracy", "representation_consistency", "temperature"],
                          **COMMON)
    trainer = CRAFTSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft_dataset, craft_bundle=bundle,
                              data_collator=CRAFTCollator(pad_token_id=3), processing_class=make_tokenizer())
    assert trainer.craft_metrics == {}
    trainer.train()
    metrics = trainer.craft_metrics
    last = [e for e in trainer.state.log_history if "loss/craft_total" in e][-1]
    assert metrics == pytest.approx({k: v for k, v in last.items() if k.startswith(("loss/", "metrics/", "balancing/"))
                                     and k != "loss"})
    assert metrics["metrics/craft_temperature"] == pytest.approx(float(trainer.craft_modules.infonce.temperature),
                                                                 rel=0.05)


def test_03c_orpo_on_pretokenised_preference_rows(tmp_path):
    pytest.importorskip("trl.experimental.orpo")
    from craft.config import CRAFTORPOConfig
    from craft.data import make_craft_datasets
    from craft.trainers import CRAFTORPOTrainer

    tokenizer = make_tokenizer()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"prompt_input_ids": encode(q), "chosen_input_ids": encode(" " + a), "rejected_input_ids": encode(" no")}
            for q, a in zip(QUESTIONS, ANSWERS)]
    preference = Dataset.from_list(rows)
    bundle = make_craft_datasets(preference, contrastive_dataset=Dataset.from_list(toy_pair_rows(8, 2)))
    args = CRAFTORPOConfig(output_dir=str(tmp_path), max_steps=2, craft_beta=0.0, max_length=64, **COMMON)
    trainer = CRAFTORPOTrainer(model=tiny_model("llama"), args=args, train_dataset=preference,
                               processing_class=tokenizer, craft_bundle=bundle)
    prepared = trainer.train_dataset[0]
    prompt = rows[0]["prompt_input_ids"]
    assert prepared["chosen_input_ids"] == prompt + rows[0]["chosen_input_ids"]  # the response after the prompt
    assert prepared["chosen_labels"] == [-100] * len(prompt) + rows[0]["chosen_input_ids"]
    assert prepared["rejected_attention_mask"] == [1] * (len(prompt) + len(rows[0]["rejected_input_ids"]))
    trainer.train()
    contrast = _logs(trainer, "loss/craft_contrast")
    assert len(contrast) == 2 and all(0 < value < 10 for value in contrast)


def test_04_qlora_eval_before_and_after(tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from craft.config import CRAFTSFTConfig
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    path = save_tiny_model(tmp_path / "base", "llama")
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantized)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj", "down_proj"]))
    train, pairs = Dataset.from_list(toy_chat_rows(8, 1)), Dataset.from_list(toy_pair_rows(8, 2))
    bundle = make_craft_datasets(train, contrastive_dataset=pairs)
    args = CRAFTSFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, learning_rate=2e-2, craft_beta=0.5,
                          gradient_accumulation_steps=2, per_device_eval_batch_size=4,
                          **{**COMMON, "logging_steps": 4})
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=train, craft_bundle=bundle,
                              data_collator=CRAFTCollator(pad_token_id=3, add_labels=True),
                              processing_class=make_tokenizer())
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)  # the SFT data is learnt through the 4-bit base's LoRA
