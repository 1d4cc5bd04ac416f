"""Tokenizers behind one small interface: a sentencepiece model (Llama 2 style) or a
Hugging Face `tokenizers` file / directory (SmolLM2 style).

`encode` never adds special tokens; the preprocessor places BOS / EOD itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

# GPT-2-family tokenizers (SmolLM2 included) separate pretraining documents with this
# token; chat-tuned checkpoints often declare a different eos (e.g. "<|im_end|>").
DOCUMENT_SEPARATOR = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece `.model` file; EOD is the model's eos piece (`</s>` for Llama 2)."""

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        path = Path(model_file)
        if not path.is_file():
            raise ValueError(
                f"sentencepiece model {path} not found: pass --tokenizer-model with the path "
                "to a tokenizer.model file (e.g. the one shipped with Llama 2 weights)"
            )
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path} has no eos piece to use as EOD")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, given as the file or the directory holding it.

    EOD is `eod_token` if given, else `<|endoftext|>` when the vocabulary has it, else the
    `eos_token` of a `tokenizer_config.json` beside the file.
    """

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        json_file = _tokenizer_json(Path(path))
        self._tok = _Tokenizer.from_file(str(json_file))
        self._eod_id = self._resolve_eod(json_file.parent, eod_token)
        self._bos_id = self._config_token_id(json_file.parent, "bos_token")

    def _resolve_eod(self, directory: Path, eod_token: str | None) -> int:
        if eod_token is not None:
            eod = self._tok.token_to_id(eod_token)
            if eod is None:
                raise ValueError(f"EOD token {eod_token!r} is not in the tokenizer's vocabulary")
            return eod
        eod = self._tok.token_to_id(DOCUMENT_SEPARATOR)
        if eod is None:
            eod = self._config_token_id(directory, "eos_token")
        if eod is None:
            raise ValueError(
                f"cannot tell the EOD token of the tokenizer in {directory}: it has no "
                f"{DOCUMENT_SEPARATOR} and no eos_token in tokenizer_config.json; name one "
                "(eod_token=...)"
            )
        return eod

    def _config_token_id(self, directory: Path, key: str) -> int | None:
        config_file = directory / "tokenizer_config.json"
        if not config_file.is_file():
            return None
        token = json.loads(config_file.read_text(encoding="utf-8")).get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._eod_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _tokenizer_json(path: Path) -> Path:
    json_file = path / "tokenizer.json" if path.is_dir() else path
    if not json_file.is_file():
        raise ValueError(
            f"no tokenizer.json at {path}: pass --tokenizer-dir with a Hugging Face model "
            "directory (or a tokenizer.json file) that contains a fast tokenizer"
        )
    return json_file


def build_tokenizer(
    tokenizer_model: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    eod_token: str | None = None,
) -> Tokenizer:
    """The tokenizer named by exactly one of `--tokenizer-model` / `--tokenizer-dir`."""
    if (tokenizer_model is None) == (tokenizer_dir is None):
        raise ValueError(
            "give exactly one of --tokenizer-model (a sentencepiece .model file) or "
            "--tokenizer-dir (a Hugging Face directory or tokenizer.json)"
        )
    if tokenizer_model is not None:
        if eod_token is not None:
            raise ValueError("eod_token applies to --tokenizer-dir only")
        return SentencePieceTokenizer(tokenizer_model)
    return HFTokenizer(tokenizer_dir, eod_token=eod_token)
