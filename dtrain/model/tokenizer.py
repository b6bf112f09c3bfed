"""Tokenizer from a local directory, or a small byte-level BPE built from the training text."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dtrain.errors import ConfigError

BUILTIN_VOCAB = 512
SPECIALS = ["<pad>", "<s>", "</s>"]


def load_tokenizer(
    directory: str | Path | None, corpus: str | Path | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerFast:
    """A local tokenizer, or (directory None) one built at run time from `corpus`."""
    if directory is None:
        return build_tokenizer(corpus)
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"tokenizer directory '{d}' not found")
    if not has_tokenizer(d) and not (d / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"tokenizer directory '{d}': no tokenizer files (tokenizer.json, tokenizer.model, "
            "vocab.json or tokenizer_config.json); set data.tokenizer to a saved tokenizer, or "
            "leave it unset for the built-in one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer directory '{d}': {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ConfigError(
            f"tokenizer directory '{d}' has no EOS token: dtrain ends every document and "
            "response with one (a causal LM's tokenizer has it; set data.tokenizer to such a tokenizer)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def corpus_file(data_path: str) -> str:
    """The file the built-in tokenizer is trained on: data.path, or the first of its shards."""
    from dtrain.data.locate import locate

    if Path(data_path).is_file():
        return data_path
    loc = locate(data_path)
    if loc.kind != "files":
        raise ConfigError(
            f"data.path = '{data_path}': the built-in tokenizer is trained from data files; for a "
            "save_to_disk or Hub dataset set data.tokenizer (or model.path)"
        )
    return str(loc.shards[0])


def has_tokenizer(directory: str | Path) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def build_tokenizer(corpus: str | Path, vocab_size: int = BUILTIN_VOCAB) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the corpus file (deterministic, about a second for small files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    try:
        tok.train([str(corpus)], trainer)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise ConfigError(
            f"data.path = '{corpus}': cannot build the built-in tokenizer from it "
            f"({str(e).splitlines()[0]}; a binary file?)"
        ) from None
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
