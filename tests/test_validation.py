"""An unknown craft_* keyword is a UserError naming it and the closest known name (configs and trainers)."""

from __future__ import annotations

import pytest
from datasets import Dataset

import craft.config as config
from craft.data import make_craft_datasets
from craft.errors import UserError
from craft.testing import make_tokenizer, tiny_model, toy_chat_rows


def test_unknown_craft_keyword_to_a_config_names_the_closest_key():
    with pytest.raises(UserError, match="CRAFTSFTConfig: unknown keyword 'craft_alfa'; did you mean 'craft_alpha'"):
        config.CRAFTSFTConfig(output_dir="out", use_cpu=True, craft_alfa=0.5)
    with pytest.raises(UserError, match="CRAFTORPOConfig: unknown keyword 'craft_betta'; did you mean 'craft_beta'"):
        config.CRAFTORPOConfig(output_dir="out", use_cpu=True, craft_betta=0.5)
    assert config.CRAFTSFTConfig(output_dir="out", use_cpu=True, report_to=[], craft_alpha=0.3).craft_alpha == 0.3


def test_unknown_craft_keyword_to_a_trainer_is_a_user_error():
    from craft.trainers import CRAFTSFTTrainer

    sft = Dataset.from_list(toy_chat_rows(4, 1))
    args = config.CRAFTSFTConfig(output_dir="out", use_cpu=True, report_to=[])
    with pytest.raises(UserError, match="CRAFTSFTTrainer: unknown keyword 'craft_sft_loaders'; did you mean "
                                        "'craft_sft_loader'"):
        CRAFTSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft, processing_class=make_tokenizer(),
                        craft_bundle=make_craft_datasets(sft, strategy="self_align"), craft_sft_loaders=None)
