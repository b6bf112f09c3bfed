"""PEFT interoperability, merge and task switching, on a tiny Llama saved with `save_pretrained`.

dtrain trains (in process, single backend, `model.path=<base dir>`) and saves; PEFT loads that
adapter and gives dtrain's logits. PEFT saves an adapter with non-zero B; dtrain's `load_adapter`
gives PEFT's logits. `dtrain merge` writes a plain HF model whose logits are base + adapter, and
two adapters loaded on one base switch with `lora.set_adapter`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain import lora
from dtrain.backends import env as dist
from dtrain.backends.single import SingleBackend
from dtrain.cli import app as cli
from dtrain.config import schema as config_lib
from dtrain.errors import DtrainError
from dtrain.inference import merge as merge_lib
from dtrain.lora import peft_format as adapter
from dtrain.model.tokenizer import build_tokenizer
from dtrain.training.loss import token_loss

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))
ATOL = 1e-5
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny Llama of configs/tiny.yaml with random weights, saved as a plain HF model + tokenizer."""
    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    build_tokenizer(CORPUS).save_pretrained(d)
    return d


def load_base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def train_dtrain(base_dir: Path, out: Path, *overrides: str) -> torch.Tensor:
    """Train 2 steps with dtrain on the saved base, save the adapter to `out`; dtrain's logits."""
    cfg = config_lib.load(
        TINY,
        [
            "model.arch=null",
            f"model.path={base_dir}",
            f"data.path={CORPUS}",
            "training.warmup_steps=1",
            "training.max_steps=2",
            *overrides,
        ],
    )
    backend = SingleBackend(cfg, dist.detect("cpu", "gloo"))
    backend.build()
    backend.setup_optimizer(2)
    for _ in range(2):
        total, n = token_loss(backend.forward({"input_ids": IDS}), IDS)
        backend.backward(total / n)
        backend.step()
    adapter.save_adapter(backend, cfg, out)
    backend.model.eval()
    return logits(backend.model)


@pytest.fixture(scope="module")
def dtrain_adapter(base_dir, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    out = tmp_path_factory.mktemp("dtrain") / "adapter"
    return out, train_dtrain(base_dir, out)  # all-linear (configs/tiny.yaml)


@pytest.fixture(scope="module")
def peft_adapter(base_dir, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A PEFT-saved adapter with non-zero B (and rsLoRA scaling), and PEFT's logits."""
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]
    )
    model = peft.get_peft_model(load_base(base_dir), cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out, logits(model)


def test_peft_loads_dtrain_adapter(base_dir, dtrain_adapter):
    adapter_dir, want = dtrain_adapter
    saved = json.loads((adapter_dir / adapter.ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == ALL_LINEAR
    model = peft.PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval()
    assert not torch.allclose(logits(load_base(base_dir)), want, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(model), want, atol=ATOL, rtol=0)


def test_peft_loads_a_regex_targeted_adapter(base_dir, tmp_path):
    """Targets that are not every module of a suffix are written as a regex PEFT full-matches."""
    out = tmp_path / "adapter"
    want = train_dtrain(base_dir, out, r"lora.target_regex=layers\.0\.self_attn\.(q|v)_proj")
    saved = json.loads((out / adapter.ADAPTER_CONFIG).read_text())
    assert isinstance(saved["target_modules"], str)
    model = peft.PeftModel.from_pretrained(load_base(base_dir), out).eval()
    names = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 2 and all("layers.0." in n for n in names)
    torch.testing.assert_close(logits(model), want, atol=ATOL, rtol=0)


def test_dtrain_loads_peft_adapter(base_dir, peft_adapter):
    adapter_dir, want = peft_adapter
    model = load_base(base_dir)
    spec = adapter.load_adapter(model, adapter_dir, "peft")
    assert spec.r == 4 and len(list(lora.lora_modules(model))) == 3 * 2
    torch.testing.assert_close(logits(model), want, atol=ATOL, rtol=0)


def test_load_adapter_errors(base_dir, peft_adapter, tmp_path):
    model = load_base(base_dir)
    with pytest.raises(DtrainError, match="not found"):
        adapter.load_adapter(model, tmp_path / "nope")
    bad = tmp_path / "dora"
    bad.mkdir()
    cfg = json.loads((peft_adapter[0] / adapter.ADAPTER_CONFIG).read_text())
    (bad / adapter.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / adapter.ADAPTER_WEIGHTS).write_bytes((peft_adapter[0] / adapter.ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(DtrainError, match="has only lora_A, lora_B"):  # DoRA without its magnitudes
        adapter.load_adapter(model, bad)
    (bad / adapter.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(DtrainError, match="rank_pattern"):
        adapter.load_adapter(model, bad)
    adapter.load_adapter(model, peft_adapter[0], "a")
    with pytest.raises(DtrainError, match="already has an adapter named 'a'"):
        adapter.load_adapter(model, peft_adapter[0], "a")


def test_merge_writes_a_plain_hf_model(base_dir, dtrain_adapter, tmp_path):
    adapter_dir, want = dtrain_adapter
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), want, atol=ATOL, rtol=0)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    bf16 = tmp_path / "merged-bf16"
    assert (
        cli.main(
            ["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(bf16), "--dtype", "bf16"]
        )
        == 0
    )
    with safe_open(bf16 / "model.safetensors", "pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


@pytest.mark.parametrize("which", ["base", "adapter", "out"])
def test_merge_errors_are_one_line(base_dir, dtrain_adapter, tmp_path, capsys, which):
    args = {"base": str(base_dir), "adapter": str(dtrain_adapter[0]), "out": str(tmp_path / "m")}
    if which == "out":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "x").write_text("x")
    else:
        args[which] = str(tmp_path / "missing")
    assert cli.main(["merge", *(f"--{k}={v}" for k, v in args.items())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dtrain: error: --{which} ")


def test_task_switching_matches_each_merged_model(base_dir, dtrain_adapter, peft_adapter, tmp_path):
    """One base, two adapters (dtrain's on every linear layer, PEFT's on q/k/down only):
    set_adapter gives each adapter's own merged model's logits."""
    model = load_base(base_dir)
    for name, (adapter_dir, _) in {"mine": dtrain_adapter, "theirs": peft_adapter}.items():
        adapter.load_adapter(model, adapter_dir, name)
        merge_lib.merge(base_dir, adapter_dir, tmp_path / name)
    torch.testing.assert_close(logits(model), dtrain_adapter[1], atol=ATOL, rtol=0)  # first stays active
    for name in ["theirs", "mine", "theirs"]:
        lora.set_adapter(model, name)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(logits(model), logits(merged), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["use_rslora", "use_dora"])
def test_variant_adapters_round_trip_with_peft(base_dir, tmp_path, variant):
    """A dtrain-trained rsLoRA / DoRA adapter: PEFT loads it with dtrain's logits, dtrain loads it
    back, and `dtrain merge` writes PEFT's merge_and_unload weights."""
    out = tmp_path / "adapter"
    want = train_dtrain(base_dir, out, f"lora.{variant}=true", "lora.targets=[q_proj,v_proj,down_proj]")
    saved = json.loads((out / adapter.ADAPTER_CONFIG).read_text())
    assert saved[variant] is True and saved["use_dora" if variant == "use_rslora" else "use_rslora"] is False
    with safe_open(out / adapter.ADAPTER_WEIGHTS, "pt") as h:
        magnitudes = [k for k in h.keys() if k.endswith(".lora_magnitude_vector")]  # PEFT: no .weight
    assert len(magnitudes) == (6 if variant == "use_dora" else 0)
    theirs = peft.PeftModel.from_pretrained(load_base(base_dir), out).eval()
    torch.testing.assert_close(logits(theirs), want, atol=ATOL, rtol=0)
    mine = load_base(base_dir)
    spec = adapter.load_adapter(mine, out, "back")
    assert getattr(spec, variant) is True
    torch.testing.assert_close(logits(mine), want, atol=ATOL, rtol=0)
    merge_lib.merge(base_dir, out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = theirs.merge_and_unload()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), p, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(merged), want, atol=ATOL, rtol=0)


def test_dtrain_loads_a_peft_dora_adapter(base_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "up_proj"])
    model = peft.get_peft_model(load_base(base_dir), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    mine = load_base(base_dir)
    assert adapter.load_adapter(mine, tmp_path / "peft").use_dora
    torch.testing.assert_close(logits(mine), logits(model), atol=ATOL, rtol=0)


def test_dora_adapter_of_an_8bit_base_merges_into_the_dequantized_weights(base_dir, tmp_path):
    """`dtrain merge --base-bits 8` of a DoRA adapter trained on the int8 base: every adapted weight is
    m / ||deq(W) + s B A||_row * (deq(W) + s B A), what lora.merge computes on the quantized model."""
    from dtrain.model import quant

    out = tmp_path / "adapter"
    train_dtrain(base_dir, out, "lora.use_dora=true", "quantization.bits=8", "lora.targets=[q_proj,v_proj]")
    merge_lib.merge(base_dir, out, tmp_path / "merged", base_bits=8)
    model = load_base(base_dir)
    quant.quantize_model(model, 8)
    adapter.load_adapter(model, out)
    lora.merge(model)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for name, m in lora.lora_modules(model):
        want = m.base_layer.weight.to(torch.bfloat16).float()  # --base-bits writes bf16
        torch.testing.assert_close(merged.get_submodule(name).weight, want, atol=0, rtol=0)
