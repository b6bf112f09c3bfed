"""dtrain.analysis (the LoRA paper's Sec. 7) against direct numpy/torch computations, and
`dtrain analyze` end to end on two adapters `dtrain train` made on a saved tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain.analysis import delta, run, subspace
from dtrain.analysis.weights import BaseWeights
from dtrain.cli import app as cli
from dtrain.model import quant
from dtrain.model.tokenizer import build_tokenizer
from tests.helpers import REPO, TINY, train

CORPUS = REPO / "dtrain" / "assets" / "tiny_corpus.txt"


def orthonormal(rows: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def phi_direct(a1: torch.Tensor, a2: torch.Tensor) -> np.ndarray:
    """phi(i, j) by the definition, with numpy's SVD and a loop over (i, j)."""
    u1 = np.linalg.svd(a1.double().numpy(), full_matrices=False)[2].T
    u2 = np.linalg.svd(a2.double().numpy(), full_matrices=False)[2].T
    out = np.zeros((u1.shape[1], u2.shape[1]))
    for i in range(1, u1.shape[1] + 1):
        for j in range(1, u2.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
    return out


# ----------------------------------------------------------------------------- subspace similarity


def test_phi_of_an_adapter_with_itself_is_one():
    a = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    p = subspace.phi(a, a)
    np.testing.assert_allclose(np.diag(p), 1.0, atol=1e-12)  # phi(i, i) = 1
    np.testing.assert_allclose(p, 1.0, atol=1e-12)  # the smaller subspace lies in the larger one


def test_phi_of_orthogonal_row_spaces_is_zero():
    basis = orthonormal(40, 10, 1).T.float()  # 10 orthonormal rows
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    a1, a2 = mix @ basis[:4], torch.randn(6, 6) @ basis[4:]
    np.testing.assert_allclose(subspace.phi(a1, a2), 0.0, atol=1e-12)


def test_phi_of_a_known_construction():
    """U_1 = [e0, e1] (singular values 3, 1); U_2 = [(e0 + e2)/sqrt 2, e3] (2, 1): the only overlap is
    the first pair, cos^2 = 1/2, so phi = [[1/2, 1/2], [1/2, 1/4]]."""
    e = torch.eye(6, dtype=torch.float64)
    a1 = torch.stack([3 * e[0], e[1]])
    a2 = torch.stack([2 * (e[0] + e[2]) / math.sqrt(2), e[3]])
    np.testing.assert_allclose(subspace.phi(a1, a2), [[0.5, 0.5], [0.5, 0.25]], atol=1e-12)


def test_phi_equals_the_definition_for_random_adapters():
    g = torch.Generator().manual_seed(3)
    a1, a2 = torch.randn(4, 30, generator=g), torch.randn(7, 30, generator=g)
    p = subspace.phi(a1, a2)
    assert p.shape == (4, 7)
    np.testing.assert_allclose(p, phi_direct(a1, a2), atol=1e-10)
    s = subspace.summary(p, 30)
    assert s["phi_11"] == pytest.approx(p[0, 0]) and s["phi_full"] == pytest.approx(p[3, 6])
    assert s["phi_diag_mean"] == pytest.approx(np.mean([p[i, i] for i in range(4)]))
    assert s["chance_full"] == pytest.approx(7 / 30)


# ----------------------------------------------------------------------------- ΔW and W


def test_low_rank_svd_equals_the_full_svd():
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(24, 5, generator=g), torch.randn(5, 16, generator=g)
    u, s, v = delta.low_rank_svd(b, a, 2.5)
    dw = 2.5 * b.double() @ a.double()
    torch.testing.assert_close(s, torch.linalg.svdvals(dw)[:5])
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, dw)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))


def test_projection_and_amplification_equal_a_direct_svd():
    g = torch.Generator().manual_seed(5)
    w, b, a = torch.randn(24, 16, generator=g), torch.randn(24, 4, generator=g), torch.randn(4, 16, generator=g)
    got = delta.relate_to_base(w, b, a, 0.5, seed=9)
    dw = 0.5 * b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dw)
    w64 = w.double()
    proj = torch.linalg.norm(u[:, :4].T @ w64 @ vh[:4].T).item()
    uw, sw, vwh = torch.linalg.svd(w64)
    assert got["k"] == 4
    assert got["delta_norm"] == pytest.approx(torch.linalg.norm(dw).item(), rel=1e-10)
    assert got["proj_delta"] == pytest.approx(proj, rel=1e-10)
    assert got["proj_w"] == pytest.approx(torch.linalg.norm(uw[:, :4].T @ w64 @ vwh[:4].T).item(), rel=1e-10)
    assert got["w_norm"] == pytest.approx(torch.linalg.norm(w64).item(), rel=1e-10)
    assert got["amplification"] == pytest.approx(torch.linalg.norm(dw).item() / proj, rel=1e-10)
    gen = torch.Generator().manual_seed(9)  # the random directions: orthonormal, seeded
    ur, vr = delta.random_orthonormal(24, 4, gen), delta.random_orthonormal(16, 4, gen)
    torch.testing.assert_close(ur.T @ ur, torch.eye(4, dtype=torch.float64))
    assert got["proj_random"] == pytest.approx(torch.linalg.norm(ur.T @ w64 @ vr).item(), rel=1e-10)
    assert got == delta.relate_to_base(w, b, a, 0.5, seed=9, sw=torch.linalg.svdvals(w64))


def test_delta_inside_ws_top_directions_has_amplification_from_ws_singular_values():
    """ΔW = the top-2 part of W scaled by 1/10: U^T W V = diag(s1, s2) = W's own top 2."""
    u, v = orthonormal(20, 6, 6), orthonormal(12, 6, 7)
    s = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T
    b, a = u[:, :2] * torch.tensor([0.9, 0.7], dtype=torch.float64), v[:, :2].T
    got = delta.relate_to_base(w, b, a, 1.0)
    assert got["proj_delta"] == pytest.approx(math.hypot(9, 7)) and got["proj_w"] == pytest.approx(math.hypot(9, 7))
    assert got["amplification"] == pytest.approx(0.1)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_effective_rank_of_a_rank_k_update_is_k(k):
    b = orthonormal(30, 8, 8)[:, :8].clone()
    b[:, k:] = 0  # an r = 8 adapter whose B uses only k columns: ΔW has rank k
    a = orthonormal(20, 8, 9).T
    sp = delta.spectrum(b * 3.0, a, 2.0)
    assert sp["effective_rank"] == pytest.approx(k, rel=1e-9)  # k equal singular values
    assert sp["rank_1pct"] == k
    assert sp["singular_values"][:k] == pytest.approx([6.0] * k)


def test_effective_rank_of_a_decaying_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 0.01], dtype=torch.float64)
    p = s / s.sum()
    got = delta.effective_rank(s)
    assert got["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    assert got["rank_1pct"] == 3  # 0.01 is not above 1% of 4


# ----------------------------------------------------------------------------- the CLI on real adapters


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """configs/tiny.yaml's Llama with random weights, saved as a plain HF model + tokenizer."""
    arch = dict(yaml.safe_load(TINY.read_text())["model"]["arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(d)
    build_tokenizer(CORPUS).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """Two dtrain adapters on q_proj/v_proj of the saved base: r=8 and r=4 with other seeds."""
    root = tmp_path_factory.mktemp("runs")
    common = ["model.arch=null", f"model.path={tiny_base}", "training.max_steps=3"]
    train(root / "r8", common)
    train(root / "r4", [*common, "lora.r=4", "lora.init_seed=5", "training.seed=7"])
    return root / "r8" / "adapter", root / "r4" / "adapter"


def _ab(adapter_dir: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    return t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"]


@pytest.mark.ondemand  # the fixture trains two adapters with `dtrain train` (~45 s on 2 cores)
def test_analyze_cli_writes_tables_and_pictures(two_adapters, tiny_base, tmp_path, capsys):
    a8, a4 = two_adapters
    out = tmp_path / "an"
    assert cli.main(["analyze", str(a8), str(a4), "--base", str(tiny_base), "--out", str(out)]) == 0
    assert "| r8 (r=8) | r4 (r=4) | q_proj |" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {
        "analysis.json",
        "analysis.md",
        "spectrum_r8.png",
        "spectrum_r4.png",
        "subspace_r8_vs_r4_q_proj.png",
        "subspace_r8_vs_r4_v_proj.png",
    }
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    result = json.loads((out / "analysis.json").read_text())
    module = "model.layers.1.self_attn.q_proj"
    (A8, B8), (A4, _) = _ab(a8, module), _ab(a4, module)
    pair = result["pairs"][0]
    assert (pair["a"], pair["b"], pair["r_a"], pair["r_b"]) == ("r8", "r4", 8, 4)
    direct = phi_direct(A8, A4)
    assert pair["modules"][module]["phi_11"] == pytest.approx(direct[0, 0], abs=1e-9)
    assert pair["modules"][module]["phi_full"] == pytest.approx(direct[-1, -1], abs=1e-9)
    mean = np.mean(
        [phi_direct(*(_ab(d, f"model.layers.{i}.self_attn.q_proj")[0] for d in (a8, a4))) for i in (0, 1)], axis=0
    )
    np.testing.assert_allclose(pair["by_type"]["q_proj"]["phi"], mean, atol=1e-9)  # averaged over the 2 layers
    w = load_file(str(tiny_base / "model.safetensors"))[f"{module}.weight"]
    ad8 = result["adapters"][0]
    assert ad8["scaling"] == 2.0  # alpha 16 / r 8
    want = delta.relate_to_base(w, B8, A8, 2.0)
    dw = 2.0 * B8.double() @ A8.double()
    assert torch.linalg.norm(dw).item() > 0  # trained: B moved off zero
    assert ad8["modules"][module]["delta_norm"] == pytest.approx(torch.linalg.norm(dw).item(), rel=1e-9)
    u, s, vh = torch.linalg.svd(dw)
    proj = torch.linalg.norm(u[:, :8].T @ w.double() @ vh[:8].T).item()
    assert ad8["modules"][module]["proj_delta"] == pytest.approx(proj, rel=1e-9)
    assert ad8["modules"][module]["amplification"] == pytest.approx(want["amplification"], rel=1e-9)
    rows = [m for m in ad8["modules"].values() if m["type"] == "v_proj"]
    assert ad8["by_type"]["v_proj"]["amplification"] == pytest.approx(np.mean([m["amplification"] for m in rows]))
    assert "| r8 | 8 | q_proj | 2 |" in (out / "analysis.md").read_text()


@pytest.mark.slow
def test_analyze_on_a_quantized_base_and_one_layer(two_adapters, tiny_base, tmp_path):
    a8, _ = two_adapters
    out = tmp_path / "an"
    assert (
        cli.main(
            ["analyze", f"mine={a8}", "--base", str(tiny_base), "--base-bits", "4", "--layer", "1", "--out", str(out)]
        )
        == 0
    )
    result = json.loads((out / "analysis.json").read_text())
    module = "model.layers.1.self_attn.v_proj"
    w = quant.round_trip(load_file(str(tiny_base / "model.safetensors"))[f"{module}.weight"], 4)
    A, B = _ab(a8, module)
    ad = result["adapters"][0]
    assert ad["label"] == "mine" and result["base_bits"] == 4 and result["layer"] == 1
    assert ad["by_type"]["v_proj"]["layers"] == 1  # --layer 1: the per-type numbers are layer 1's
    assert ad["by_type"]["v_proj"]["proj_delta"] == pytest.approx(
        delta.relate_to_base(w, B, A, 2.0)["proj_delta"], rel=1e-9
    )
    base = BaseWeights(tiny_base, bits=8)
    torch.testing.assert_close(
        base.weight("model.layers.0.mlp.down_proj"),
        quant.round_trip(load_file(str(tiny_base / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"], 8),
    )
    assert torch.equal(base.weight("lm_head"), load_file(str(tiny_base / "model.safetensors"))["lm_head.weight"])


def test_analyze_reads_a_peft_adapter(tiny_base, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "peft")
    ad = run.load_adapter(tmp_path / "peft", "p")
    result = run.analyze([ad, ad], BaseWeights(tiny_base))
    assert set(result["adapters"][0]["by_type"]) == {"k_proj"}
    np.testing.assert_allclose(result["pairs"][0]["by_type"]["k_proj"]["phi"], 1.0, atol=1e-9)
    m = result["adapters"][0]["modules"]["model.layers.0.self_attn.k_proj"]
    assert m["rank_1pct"] == 2 and 1 < m["effective_rank"] <= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/adapter"], "adapter directory '/nonexistent/adapter' not found"),
        (["A", "--quantized-head", "--base", "B"], "--quantized-head needs --base-bits 8 or 4"),
        (["A", "--base-bits", "8"], "--base-bits/--quantized-head need --base"),
    ],
)
def test_analyze_bad_input_is_one_line(args, message, tmp_path, capsys):
    args = [str(tmp_path) if x == "A" else x for x in args]  # the flags are checked before any adapter is read
    assert cli.main(["analyze", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"dtrain: error: {message}"]


@pytest.mark.slow
def test_analyze_refuses_a_layer_no_adapter_has(two_adapters, tiny_base, tmp_path, capsys):
    a8, a4 = two_adapters
    assert cli.main(["analyze", str(a8), str(a4), "--layer", "7", "--out", str(tmp_path / "o")]) == 2
    assert "--layer 7: adapter" in capsys.readouterr().err
