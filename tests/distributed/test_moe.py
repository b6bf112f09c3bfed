"""Expert LoRA on tiny Qwen3-MoE, Mixtral and gpt-oss models (fused 3-D experts, saved by transformers),
with the router's weight named too (LoRA on its [E, H] weight, dtrain/lora/router.py):
one process = FSDP2 (2 ranks) = ZeRO-3 (2 ranks); every routed expert's LoRA trains, the router's
LoRA trains and changes the routing; the adapter is
PEFT's (keys, shapes, adapter_config.json) and PEFT's logits on it equal dtrain merge's model and
dtrain's own forward; resume is bit-exact. One launch per backend trains all three families
(tests/distributed/moe_probe.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, env_for_tests, launch_cmd, metrics
from tests.moe_models import FAMILIES, ROUTER, save_all

PROBE = str(REPO / "tests" / "distributed" / "moe_probe.py")
# {router}: each family's router weight (tests/distributed/moe_probe.py fills it in)
TARGETS = [
    "lora.targets=[q_proj,v_proj]",
    "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj,{router}]",
]
KINDS = {"single": ("none", 1, 8), "fsdp": ("fsdp", 2, 4), "zero3": ("deepspeed", 2, 4)}  # same global batch


def _probe(models, out, kind: str, extra: list[str] = ()) -> None:
    backend, nproc, micro = KINDS[kind]
    prefix = [launch_cmd(1, "python")[0]] if nproc == 1 else launch_cmd(nproc, "torchrun")[:-2]
    cmd = prefix + [
        PROBE,
        str(models),
        str(out),
        *TARGETS,
        f"backend.name={backend}",
        f"training.micro_batch_size={micro}",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_tests(), capture_output=True, text=True, errors="replace", timeout=600
    )
    assert proc.returncode == 0, f"{kind}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    return save_all(tmp_path_factory.mktemp("moe_models"))


@pytest.fixture(scope="session")
def moe_runs(moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_runs")
    for kind in KINDS:
        _probe(moe_models, root / kind, kind)
    return root


def _losses(out) -> list[float]:
    return [row["loss"] for row in metrics(out) if "loss" in row]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_runs_equal_one_process(moe_runs, family):
    ref, ref_ad = _losses(moe_runs / "single" / family), _adapter(moe_runs / "single" / family)
    assert len(ref) == 4 and ref[-1] < ref[0]
    for kind in ("fsdp", "zero3"):
        got = _losses(moe_runs / kind / family)
        assert got == pytest.approx(ref, rel=1e-5), kind
        ad = _adapter(moe_runs / kind / family)
        assert set(ad) == set(ref_ad)
        for k, t in ref_ad.items():
            torch.testing.assert_close(ad[k], t, rtol=1e-5, atol=1e-5, msg=f"{kind} {k}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_routed_expert_trains(moe_runs, family):
    """B starts at zero: every expert's B_e (columns k*E + e of PEFT's B) moved, for each expert
    weight of each layer (a 4 x 32-token batch routes tokens to all 4 experts)."""
    ad = _adapter(moe_runs / "fsdp" / family)
    expert_b = {k: t for k, t in ad.items() if ".experts." in k and k.endswith("lora_B.weight")}
    assert len(expert_b) == 4  # 2 layers x (gate_up_proj, down_proj)
    for key, b in expert_b.items():
        per_expert = b.reshape(b.shape[0], -1, 4).abs().sum(dim=(0, 1))
        assert (per_expert > 0).all(), (key, per_expert)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_router_lora_trains_and_changes_the_routing(moe_models, moe_runs, family):
    """The router's B starts at zero and moved, A moved from its seeded init; on the hidden states
    the base feeds its routers, W + s B A picks other top-k experts for some tokens than W."""
    from transformers import AutoModelForCausalLM

    ad, name = _adapter(moe_runs / "fsdp" / family), ROUTER[family].rsplit(".", 1)[0]
    base = AutoModelForCausalLM.from_pretrained(moe_models / family)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    seen = {}

    def keep(i: int):
        def hook(module, args, out) -> None:
            seen.setdefault(i, args[0].detach())

        return hook

    for i in range(2):
        base.model.layers[i].get_submodule(name).register_forward_hook(keep(i))
    with torch.no_grad():
        base(ids)
    changed = 0
    for i, x in seen.items():
        key = f"base_model.model.model.layers.{i}.{name}"
        a, b = ad[f"{key}.lora_A.weight"], ad[f"{key}.lora_B.weight"]
        assert (a.shape, b.shape) == ((2, 32), (4, 2)) and b.abs().min() > 0
        router = base.model.layers[i].get_submodule(name)
        w, bias = router.weight.detach(), getattr(router, "bias", None)  # gpt-oss's router has a bias
        shift = 0 if bias is None else bias.detach()
        top = (x @ w.t() + shift).topk(2).indices.sort().values
        top_adapted = (x @ (w + 2.0 * b @ a).t() + shift).topk(2).indices.sort().values  # s = alpha / r
        changed += int((top != top_adapted).any(dim=-1).sum())
    assert changed > 0, family  # some of the 2 x 128 tokens are routed differently


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_is_what_peft_writes(moe_models, moe_runs, family, tmp_path):
    """PEFT's own adapter for the same targets has dtrain's config and keys; dtrain loads PEFT's
    adapter (random B everywhere, the router's too) to PEFT's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dtrain.lora import peft_format as adapter_lib

    base = AutoModelForCausalLM.from_pretrained(moe_models / family)
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", ROUTER[family]],
    )
    peft = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ids = torch.randint(0, 512, (2, 16), generator=g)
        want = peft(ids).logits
        peft.save_pretrained(tmp_path)
        own = AutoModelForCausalLM.from_pretrained(moe_models / family)
        adapter_lib.load_adapter(own, tmp_path)
        torch.testing.assert_close(own(ids).logits, want, rtol=1e-4, atol=1e-4)
    theirs, ours = (
        json.loads((d / "adapter_config.json").read_text())
        for d in (tmp_path, moe_runs / "single" / family / "adapter")
    )
    # PEFT 0.21 turns the Qwen2-MoE / Mixtral families' target_parameters into a set (its v4 -> v5
    # config conversion) and writes it in set order, which varies with the hash seed; gpt-oss keeps the list
    same = sorted if family in ("qwen3_moe", "mixtral") else list
    assert same(ours["target_parameters"]) == same(theirs["target_parameters"])
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    peft_t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in _adapter(moe_runs / "single" / family).items()} == {
        k: tuple(v.shape) for k, v in peft_t.items()
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_logits_equal_merge_and_dtrain(moe_models, moe_runs, family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtrain.inference import merge as merge_lib
    from dtrain.lora import peft_format as adapter_lib

    ad_dir, base_dir = moe_runs / "single" / family / "adapter", moe_models / family
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ad_dir)(ids).logits
        merge_lib.merge(base_dir, ad_dir, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    ad, router = _adapter(moe_runs / "single" / family), ROUTER[family].rsplit(".", 1)[0]
    base_t, merged_t = (load_file(str(d / "model.safetensors")) for d in (base_dir, tmp_path / "merged"))
    for i in range(2):  # the router: exactly W + s B A (Mixtral's checkpoint keeps block_sparse_moe.gate)
        module = f"model.layers.{i}.{router}"
        a, b = (ad[f"base_model.model.{module}.{k}.weight"] for k in ("lora_A", "lora_B"))
        key = next(k for k in (f"{module}.weight", f"model.layers.{i}.block_sparse_moe.gate.weight") if k in base_t)
        assert torch.equal(merged_t[key], base_t[key].float() + (b.float() @ a.float()) * 2.0)  # s = alpha / r
        own = AutoModelForCausalLM.from_pretrained(base_dir)
        adapter_lib.load_adapter(own, ad_dir)
        dtrain_logits = own(ids).logits
    assert (peft_logits - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(merged, peft_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dtrain_logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_resume_is_bit_exact_and_crosses_world_sizes(moe_models, moe_runs, tmp_path):
    """Each family's run stopped after its step-2 checkpoint (later checkpoint and adapter gone, as
    after a kill) resumes to the same adapter: bit-exact from the single-process run, and to 1e-5
    from the 2-rank FSDP2 run's checkpoint resumed in one process."""
    for kind in ("single", "fsdp"):
        for family in FAMILIES:
            run = tmp_path / f"{kind}-resumed" / family
            shutil.copytree(moe_runs / kind / family, run)
            shutil.rmtree(run / "adapter")
            for ckpt in run.glob("checkpoints/*4*"):
                shutil.rmtree(ckpt)
        _probe(moe_models, tmp_path / f"{kind}-resumed", "single", ["training.resume=auto"])
    for family in FAMILIES:
        ref = _adapter(moe_runs / "single" / family)
        exact = _adapter(tmp_path / "single-resumed" / family)
        assert all(torch.equal(exact[k], t) for k, t in ref.items())
        crossed = _adapter(tmp_path / "fsdp-resumed" / family)
        for k, t in ref.items():
            torch.testing.assert_close(crossed[k], t, rtol=1e-5, atol=1e-5)
