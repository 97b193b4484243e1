"""Tokenizers: raw bytes (the default) or a local Hugging Face ``tokenizer.json`` (never downloaded)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import tokenizers

from parscale_jax.errors import UserError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_ESCAPE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of any str, never raising: surrogate escapes (bytes read with
    errors="surrogateescape") become their original bytes; other lone surrogates (e.g. from a
    JSON "\\ud800" escape) become U+FFFD."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return _NON_ESCAPE_SURROGATE.sub("\ufffd", text).encode("utf-8", errors="surrogateescape")


def _valid_str(text: str) -> str:
    """The text with every lone surrogate replaced by U+FFFD (the Rust tokenizers reject them)."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


class ByteTokenizer:
    """id = byte value (0..255); PAD=256, BOS=257, EOS=258. Takes any bytes, valid UTF-8 or not."""

    name = "bytes"
    fingerprint = "bytes-v1"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str | bytes) -> np.ndarray:
        data = _utf8(text) if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def count_bytes(self, ids: Iterable[int]) -> int:
        """Number of text bytes the ids encode (special tokens count 0): exact for this tokenizer."""
        ids = np.asarray(ids).reshape(-1)
        return int(np.count_nonzero((ids >= 0) & (ids < 256)))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]", "<|eos|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (``tokenizers`` package; nothing is downloaded).

    EOS/PAD/BOS come from a ``tokenizer_config.json`` beside the file when present, else from
    the usual special-token names; a tokenizer without an end-of-text token is rejected (the
    packer needs one). PAD falls back to EOS, BOS to None.
    """

    def __init__(self, path: str):
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"tokenizer {path} not found: pass 'bytes' or the path of a local Hugging Face "
                            f"tokenizer.json (nothing is downloaded)")
        with open(path, "rb") as f:
            blob = f.read()
        try:
            self._tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            msg = " ".join(str(e).split())[:200]
            raise UserError(f"{path} is not a valid Hugging Face tokenizer.json ({msg}): pass a tokenizer.json "
                            f"saved by the tokenizers/transformers libraries") from None
        self.name = path
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        special = self._config_special_tokens(os.path.dirname(path))
        self.eos_id = self._find(special.get("eos_token"), _EOS_NAMES)
        if self.eos_id is None:
            raise UserError(f"tokenizer {path} has no end-of-text token (none of {', '.join(_EOS_NAMES)}, and no "
                            f"eos_token in a tokenizer_config.json beside it): add one, e.g. "
                            f"tokenizer.add_special_tokens(['<|endoftext|>'])")
        pad = self._find(special.get("pad_token"), _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad
        self.bos_id = self._find(special.get("bos_token"), _BOS_NAMES)
        self.fingerprint = "hf-" + hashlib.sha256(blob).hexdigest()[:32] + f"-eos{self.eos_id}"

    @staticmethod
    def _config_special_tokens(folder: str) -> dict[str, str]:
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return {}
        out = {}
        for key in ("eos_token", "pad_token", "bos_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
        return out

    def _find(self, preferred: str | None, names: Sequence[str]) -> int | None:
        for name in ((preferred,) if preferred else ()) + tuple(names):
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str | bytes, parse_special: bool = True) -> np.ndarray:
        """Token ids (no BOS/EOS added). Bytes are decoded as UTF-8 with errors="replace".

        ``parse_special=False`` treats special-token strings in the text as plain text (the
        data pipeline does this, so a literal "<|endoftext|>" in a document is not a boundary).
        """
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self.encode_batch([text], parse_special=parse_special)[0]

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[np.ndarray]:
        old = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = not parse_special
        try:
            encs = self._tok.encode_batch([_valid_str(t) for t in texts], add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = old
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def count_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 bytes of the decoded text (special tokens count 0)."""
        return len(self.decode(ids).encode("utf-8"))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


Tokenizer = ByteTokenizer | HFTokenizer


def encode_documents(tok: Tokenizer, docs: Sequence[str | bytes], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids, each followed by EOS, as one array of ``dtype``; the cumulative end offset
    of each document in it). Special-token strings inside documents are plain text."""
    eos = np.asarray([tok.eos_id], dtype)
    if isinstance(tok, ByteTokenizer):
        encoded = [np.frombuffer(_utf8(d) if isinstance(d, str) else bytes(d), np.uint8) for d in docs]
    else:
        texts = [_valid_str(d) if isinstance(d, str) else bytes(d).decode("utf-8", errors="replace") for d in docs]
        encoded = tok.encode_batch(texts, parse_special=False) if texts else []
    ends = np.cumsum([len(e) + 1 for e in encoded], dtype=np.int64)
    parts = [p for e in encoded for p in (e, eos)]
    ids = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0,), dtype)
    return ids, ends


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` -> ByteTokenizer; a path to a tokenizer.json (or a folder holding one) -> HFTokenizer."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)

