"""The merge of `dtrain merge` (dtrain/cli/merge.py): fold a LoRA adapter into its base and write
a plain Hugging Face model (safetensors) that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(out)`, no PEFT and no dtrain needed.

The base is streamed tensor by tensor (one safetensors shard in memory at a time, same shard
layout and index as the base): every adapted weight becomes W + s B A (s = alpha / r, or
alpha / sqrt(r) for rsLoRA; DoRA: m / ||W + s B A||_row * (W + s B A)), computed in fp32
and cast to the output dtype (the base's unless --dtype). config.json is copied with its dtype
updated; tokenizer and other non-weight files are copied as they are, then the chat template and
stop tokens the adapter was trained with (dtrain/model/templates.py), where it keeps them. The output is
written to a temporary directory next to --out and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dtrain.errors import DtrainError
from dtrain.model.layers import INDEX_FILE, weight_files
from dtrain.storage.outdir import check_target

if TYPE_CHECKING:  # torch and safetensors are imported when merging, not when the CLI starts
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_HF_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def merge(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str | None = None,
    base_bits: int | None = None,
    quantized_head: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write base + adapter as a plain HF model into `out`; returns `out`.

    `base_bits` (8 or 4): the adapter was trained on dtrain's quantized base, so it is merged into
    deq(q(W)) of every quantized layer (dequantize, then merge), and the result is written in bf16.
    `quantized_head`: that run quantized the output head too (`quantization.include_head`).
    `overwrite`: a non-empty `out` is replaced once the merged model is complete (else refused).
    """
    import torch

    from dtrain.lora import peft_format as adapter_lib, variants
    from dtrain.model import hub
    from dtrain.storage.files import fresh_dir, replace_dir, staging_dir

    base, adapter, out = hub.model_dir(base, "--base"), Path(adapter), Path(out)
    _check_dirs(base, adapter, out, overwrite)
    config = _read_json(base / "config.json", "--base")
    _check_not_quantized(config, base)
    adapter_config, tensors = adapter_lib.read_adapter(adapter)
    spec = adapter_lib.adapter_spec_from_peft(adapter_config, "merge", adapter)
    modules = adapter_lib.adapter_modules(tensors, adapter, spec)
    expert_layout = _expert_layout(base, adapter_config.get("target_parameters"), adapter)
    adapter_lib.check_rank(modules, spec.r, adapter, {n: e for n, (_, e, _) in expert_layout.items()})
    deltas = {f"{m}.weight": ab for m, ab in modules.items() if m not in expert_layout}
    for m, (key, num_experts, transposed) in expert_layout.items():
        if m in modules:  # a fused expert weight: its delta is per expert ([E, out, in] or [E, in, out])
            deltas[key] = {**modules[m], "experts": (num_experts, transposed)}
    files, index = weight_files(base, "--base")
    empty = _layout_model(base)
    transposed = _conv1d_keys(empty, deltas, variants.for_spec(spec), adapter) if empty is not None else set()
    _check_targets(base, files, deltas, transposed)
    if base_bits:
        dtype = "bf16"
    name = DTYPES[dtype] if dtype else config.get("dtype") or config.get("torch_dtype")
    target = getattr(torch, name) if name in _HF_DTYPES else None
    tmp = staging_dir(out)
    fresh_dir(tmp)
    try:
        quantized = _quantized_keys(empty or base, base_bits, quantized_head) if base_bits else {}
        nbytes = _merge_files(base, files, tmp, deltas, spec.scaling, target, quantized, transposed)
        _copy_rest(base, tmp, config, target, index, nbytes)
        _keep_run_template(adapter, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


def _read_json(path: Path, flag: str) -> dict:
    """A JSON object from `path`, or one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DtrainError(f"{flag} '{path}': not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DtrainError(f"{flag} '{path}': not a JSON object")
    return data


def _check_dirs(base: Path, adapter: Path, out: Path, overwrite: bool = False) -> None:
    if not base.is_dir():
        raise DtrainError(f"--base '{base}': directory not found")
    if not (base / "config.json").is_file():
        raise DtrainError(f"--base '{base}': no config.json (not a Hugging Face model directory)")
    if not adapter.is_dir():
        raise DtrainError(f"--adapter '{adapter}': directory not found")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise DtrainError(f"--out '{out}': must differ from --base and --adapter")
    check_target(out, "--out", overwrite, kind="dir")


def _check_not_quantized(config: dict, base: Path) -> None:
    """The base must be a float safetensors model: a quantization_config (GGUF, GPTQ, bitsandbytes
    checkpoints) is refused with the way out for each case."""
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise DtrainError(
            f"--base '{base}': config.json has a quantization_config ({method}); merge reads float "
            "bases: import a GGUF file first (dtrain import FILE --out DIR) and merge into DIR; for an "
            "adapter trained on dtrain's 8-/4-bit base, give the float base and --base-bits 8|4"
        )


def _empty_model(base: Path):
    """The base's model on the meta device (nothing allocated): which layers are Conv1D, which
    dtrain quantizes."""
    import torch
    from transformers import AutoConfig

    from dtrain.model import build as model_lib

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    return model_lib.build_empty(config, torch.float32)


def _layout_model(base: Path):
    """The meta build for the weights' layout, or None where transformers cannot build the base
    (an unknown architecture: its weights are then taken as stored [out, in])."""
    try:
        return _empty_model(base)
    except Exception:  # noqa: BLE001 - ValueError, KeyError, OSError, ConfigError from transformers' config code
        return None


def _conv1d_keys(model, deltas: dict[str, dict], variant, adapter: Path) -> set[str]:
    """Checkpoint keys of the adapted weights stored [in, out] (transformers' Conv1D): B A is added
    transposed there, as PEFT does with fan_in_fan_out."""
    from dtrain.model import layers

    keys = {f"{n}.weight" for n, m in model.named_modules() if layers.is_conv1d(m)}
    if keys & set(deltas) and not variant.conv1d:
        raise DtrainError(
            f"--adapter '{adapter}': a {variant.name} adapter on Conv1D layers ({sorted(keys)[0]}), "
            "which dtrain does not merge"
        )
    return keys


def _check_targets(base: Path, files: list[str], deltas: dict[str, dict], transposed: set[str] = frozenset()) -> None:
    """Every adapted weight exists in the base with the shape B A has (transposed for Conv1D)."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(base / f, "pt") as h:
                for key in h.keys():
                    shapes[key] = tuple(h.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated or missing shard
            raise DtrainError(
                f"--base '{base / f}': not a readable safetensors file (truncated or "
                f"corrupted?): {str(e).splitlines()[0]}"
            ) from None
    _split_experts(deltas, shapes)
    _renamed_keys(deltas, shapes)
    for key, ab in deltas.items():
        if "part_of" in ab:
            continue  # checked against the per-expert tensors by _split_experts
        want = (ab["lora_B"].shape[0], ab["lora_A"].shape[1])
        if "experts" in ab:
            num_experts, stored_in_out = ab["experts"]
            want = (num_experts, *(want[::-1] if stored_in_out else want))
        want = want[::-1] if key in transposed else want
        if key not in shapes:
            raise DtrainError(f"--base '{base}': no tensor '{key}' for the adapter (adapter for another base?)")
        if shapes[key] != want:
            raise DtrainError(
                f"--base '{base}': '{key}' has shape {list(shapes[key])}, the adapter's "
                f"B A is {list(want)} (adapter for another base?)"
            )


def _renamed_keys(deltas: dict[str, dict], shapes: dict[str, tuple]) -> None:
    """An adapted weight the base stores under an older name (Mixtral's router
    `block_sparse_moe.gate.weight` for `mlp.gate.weight`) is merged into that tensor."""
    from dtrain.model.expert_weights import stored_key

    for key in [k for k in deltas if k not in shapes]:
        stored = stored_key(key, shapes.__contains__)
        if stored is not None and stored not in deltas:
            deltas[stored] = deltas.pop(key)


def _split_experts(deltas: dict[str, dict], shapes: dict[str, tuple]) -> None:
    """A fused expert weight the base stores per expert (expert_checkpoint.py): its delta is merged
    into each expert's tensors, `{"part_of": fused delta, "expert": e, "rows": rows of B_e A_e}`."""
    from dtrain.model.expert_weights import per_expert_keys, stored_key

    def stored(k: str) -> str | None:
        return stored_key(k, shapes.__contains__)

    for key in [k for k, ab in deltas.items() if "experts" in ab and k not in shapes]:
        experts = per_expert_keys(key, lambda k: stored(k) is not None)
        ab = deltas[key]
        if experts is None or len(experts) != ab["experts"][0]:
            continue  # reported as a missing tensor
        del deltas[key]
        for e, parts in enumerate(experts):
            start = 0
            for part in parts:
                rows = shapes[stored(part)][0]
                deltas[stored(part)] = {"part_of": ab, "expert": e, "rows": slice(start, start + rows)}
                start += rows


def _expert_layout(base: Path, target_parameters: list[str] | None, adapter: Path) -> dict:
    """{adapter module: (checkpoint key, experts, transposed)} of PEFT's `target_parameters`, found
    on a meta-device build of the base's config (nothing is allocated)."""
    if not target_parameters:
        return {}
    from dtrain.lora import experts

    try:
        return experts.layout(_empty_model(base), target_parameters)
    except DtrainError as e:
        raise DtrainError(f"{adapter}: {e}") from None


def _quantized_keys(model, bits: int, include_head: bool = False) -> dict[str, int]:
    """{checkpoint key: bits} of the weights dtrain stores quantized: every Linear, the head only
    with `include_head` (the rule of `training/assembly.assemble`; found on the meta-device build of the base)."""
    from torch import nn

    from dtrain.model import layers, quant

    model = _empty_model(model) if isinstance(model, (str, Path)) else model
    skip = quant.skip_rule(include_head, model)
    keys = {
        f"{n}.weight": bits
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or layers.is_conv1d(m)) and not skip(n)
    }
    return {**keys, **_quantized_expert_keys(model, bits)}


def _quantized_expert_keys(model, bits: int) -> dict[str, int | tuple[int, bool]]:
    """Fused expert weights, quantized per expert (dtrain/model/expert_quant.py): the fused key ->
    (bits, transposed); the per-expert tensors a checkpoint may store instead -> bits (int8 is per
    row, so a part alone is exact), or for NF4 -> (4, the expert's parts, this one's index): the
    parts quantize together, as the fused expert did (a block of 64 may span gate and up)."""
    from dtrain.lora import experts
    from dtrain.model.expert_weights import LEGACY, stored_names

    out: dict[str, int | tuple[int, bool]] = {}
    for n, m in model.named_modules():
        if not experts.is_experts_module(m):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 3:
                out[f"{n}.{pname}"] = (bits, bool(m.is_transposed))
                for parts, e in ((parts, e) for parts in LEGACY.get(pname, ()) for e in range(p.shape[0])):
                    keys = [f"{n}.{e}.{part}.weight" for part in parts]
                    for names in (tuple(keys), *zip(*map(stored_names, keys))):  # Mixtral's names too
                        joint = bits == 4 and len(names) > 1
                        out.update({k: (bits, names, i) if joint else bits for i, k in enumerate(names)})
    return out


def _round_trip(t: torch.Tensor, bits: int | tuple, conv1d: bool, read=None) -> torch.Tensor:
    """deq(q(t)) as dtrain stored `t` while training: [out, in] rows, per expert for a fused weight;
    one part of an expert stored per part (bits, parts, i): quantized with its sibling parts (`read`)."""
    import torch

    from dtrain.model import expert_quant
    from dtrain.model.quant import round_trip

    if isinstance(bits, tuple) and len(bits) == 3:
        parts = [t if j == bits[2] else read(k) for j, k in enumerate(bits[1])]
        whole = round_trip(torch.cat(parts).float(), bits[0])  # the fused expert's [out, in] rows
        return whole.split([x.shape[0] for x in parts])[bits[2]]
    if isinstance(bits, tuple):
        return expert_quant.round_trip(t.float(), *bits)
    return round_trip(t.float().t(), bits).t() if conv1d else round_trip(t.float(), bits)


def _merge_files(
    base: Path,
    files: list[str],
    out: Path,
    deltas: dict,
    scaling: float,
    dtype: torch.dtype | None,
    quantized: dict[str, int] | None = None,
    transposed: set[str] = frozenset(),
) -> int:
    """Stream every tensor of every file: W + scaling * B A for adapted weights (DoRA's when the
    adapter has a magnitude), cast floats. Returns the bytes of all tensors written."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    where = {}  # key -> its file, for the sibling parts of an expert
    for f in files:
        with safe_open(base / f, "pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    total, nbytes = len(where), 0

    def read(key: str) -> torch.Tensor:
        with safe_open(base / where[key], "pt") as h:
            return h.get_tensor(key)

    with tqdm(total=total, desc="merge", unit="tensor", disable=None) as bar:
        for f in files:
            merged = {}
            with safe_open(base / f, "pt") as h:
                metadata = h.metadata() or {"format": "pt"}
                for key in h.keys():
                    t = h.get_tensor(key)
                    if key in (quantized or {}):
                        t = _round_trip(t, quantized[key], key in transposed, read)
                    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    if key in deltas:
                        ab = deltas[key]
                        t = _merged(t, ab, scaling, key in transposed)
                    merged[key] = t.to(cast).contiguous()
                    nbytes += merged[key].numel() * merged[key].element_size()
                    bar.update(1)
            save_file(merged, str(out / f), metadata)
    return nbytes


def _merged(w: torch.Tensor, ab: dict[str, torch.Tensor], scaling: float, transposed: bool = False) -> torch.Tensor:
    """One adapted weight, merged in float32: W + s B A (transposed for a Conv1D's [in, out] W), or
    as its variant merges it (DoRA: m / ||W + s B A||_row * (W + s B A))."""
    if "part_of" in ab:  # one expert's tensor of a fused weight stored per expert (never transposed)
        fused, e = ab["part_of"], ab["expert"]
        r = fused["lora_A"].shape[0] // fused["experts"][0]
        a = fused["lora_A"].float()[e * r : (e + 1) * r]
        b = fused["lora_B"].float()[:, e :: fused["experts"][0]]  # PEFT's B: column k*E + e is expert e's k
        return w.float() + (b @ a)[ab["rows"]] * scaling
    if "experts" in ab:
        from dtrain.lora import experts

        return w.float() + experts.delta(ab["lora_A"], ab["lora_B"], *ab["experts"], scaling)
    delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scaling
    if transposed:
        return w.float() + delta.t()
    from dtrain.lora import variants

    state = [kind for kind in ab if kind in variants.state_kinds()]  # DoRA's magnitude: its variant merges
    return variants.owner(state[0])().merged_tensor(w, delta, ab) if state else w.float() + delta


def _keep_run_template(adapter: Path, out: Path) -> None:
    """The merged model generates as the adapter was evaluated: its run's template and stop tokens."""
    from dtrain.model import templates

    template, eos = templates.read_settings(adapter)
    if template is not None:
        (out / templates.TEMPLATE_FILE).write_text(template)
    gen_file = out / templates.GENERATION_FILE
    if eos and gen_file.is_file():
        gen = _read_json(gen_file, "--base")
        old = gen.get("eos_token_id")
        gen["eos_token_id"] = list(
            dict.fromkeys([*(old if isinstance(old, list) else [old] if old is not None else []), *eos])
        )
        gen_file.write_text(json.dumps(gen, indent=2) + "\n")
    elif eos:
        gen_file.write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")


def _copy_rest(base: Path, out: Path, config: dict, dtype: torch.dtype | None, index: dict | None, nbytes: int) -> None:
    """config.json (dtype updated), the index (sizes updated), tokenizer and other non-weight files."""
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if index is not None:
        index.setdefault("metadata", {})["total_size"] = nbytes
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for p in base.iterdir():
        if p.is_file() and p.name not in ("config.json", INDEX_FILE) and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, out / p.name)
