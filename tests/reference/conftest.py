"""The default model in float32 on Hugging Face, shared by the reference tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
