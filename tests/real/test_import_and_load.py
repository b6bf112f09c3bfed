"""The real models: SmolLM2-135M-Instruct imported from its GGUF file, and checkpoint layouts that
`from_pretrained` accepts (keys without the base-model prefix, tied heads absent) loaded by dtrain."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dtrain.model import importer
from tests.helpers import TINY, losses, run_dtrain, train

pytestmark = pytest.mark.slow


@pytest.mark.ondemand  # ~40 s; launch/demo.sh imports the same GGUF file on every Quickstart
def test_imported_smollm2_is_a_plain_float_model_with_the_gguf_logits(smollm2_dir, tmp_path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # the tied head once
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    gguf = importer.fetch_gguf("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)
        answer = ours.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)


def _tiny_tied(tmp_path):
    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"], tie_word_embeddings=True)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_checkpoint_saved_without_prefix_and_head_trains_like_the_full_one(tmp_path):
    """A tied model saved from its base model alone (`LlamaModel`: 'embed_tokens.weight', no
    'model.' and no lm_head) gives the same losses as the same weights saved whole."""
    model = _tiny_tied(tmp_path)
    full, bare = tmp_path / "full", tmp_path / "bare"
    model.save_pretrained(full)
    bare.mkdir()
    model.config.save_pretrained(bare)
    save_file(
        {k: v.contiguous() for k, v in model.model.state_dict().items()},
        str(bare / "model.safetensors"),
        {"format": "pt"},
    )
    with safe_open(str(bare / "model.safetensors"), "pt") as f:
        assert "embed_tokens.weight" in f.keys() and not any(k.startswith("model.") for k in f.keys())
    runs = {}
    for name, d in (("full", full), ("bare", bare)):
        train(tmp_path / f"run-{name}", [f"model.path={d}", "model.arch=null", "training.max_steps=2"])
        runs[name] = losses(tmp_path / f"run-{name}")
    assert runs["full"] == runs["bare"] and len(runs["full"]) == 2


def test_a_model_without_lm_head_or_eos_gets_one_line(minilm_dir, smollm2_dir, tmp_path):
    base = ["train", str(TINY), f"model.path={minilm_dir}", "model.arch=null", "lora.targets=[query,value]"]
    proc = run_dtrain([*base, f"output.dir={tmp_path / 'a'}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dtrain: error: tokenizer directory '{minilm_dir}' has no EOS token: dtrain ends every document and "
        "response with one (a causal LM's tokenizer has it; set data.tokenizer to such a tokenizer)"
    )
    proc = run_dtrain([*base, f"data.tokenizer={smollm2_dir}", f"output.dir={tmp_path / 'b'}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    # the embeddings were found under 'embeddings.*' (no 'bert.' prefix): only the head is missing
    assert line.startswith(f"dtrain: error: model.path = '{minilm_dir}': checkpoint has no tensor 'cls.predictions.")
    assert "the checkpoint is a BertModel, a model without a language-modeling head" in line
