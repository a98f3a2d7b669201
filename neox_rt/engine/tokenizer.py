"""Tokenizer: a ``tokenizers`` JSON file; EOS is the tokenizer's ``<|endoftext|>``, never the HF config's."""
from __future__ import annotations

import os

from neox_rt.errors import NeoxRtError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise NeoxRtError(f"tokenizer not found: {path}")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise NeoxRtError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else e}") from None
        self.path = path
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise NeoxRtError(f"tokenizer {path} has no {EOS_TOKEN} token")
        self.eos_id: int = eos
        self.vocab_size: int = max(self._tok.get_vocab().values()) + 1
        """Real entries; ids at or above this (the padded embedding rows) are never sampled."""

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(ids if type(ids) is list else list(ids), skip_special_tokens=False)

