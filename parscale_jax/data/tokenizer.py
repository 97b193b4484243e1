"""Tokenizers: raw bytes (the default) or a local Hugging Face ``tokenizer.json`` (never downloaded)."""
from __future__ import annotations

import functools
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

    def hf_tokenizer_config(self, model_max_length: int) -> dict:
        """A tokenizer_config.json with which transformers' AutoTokenizer loads this tokenizer.json
        (PreTrainedTokenizerFast) with the same EOS and PAD; no BOS is declared, as the project adds none."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self._tok.id_to_token(self.eos_id),
                "pad_token": self._tok.id_to_token(self.pad_id), "bos_token": None,
                "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length)}

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
    """``"bytes"`` -> ByteTokenizer; a path to a tokenizer.json (or a folder holding one) -> HFTokenizer,
    except the byte tokenizer's own Hugging Face form (:func:`byte_tokenizer_hf`) -> ByteTokenizer."""
    if spec == "bytes" or is_byte_tokenizer_json(spec):
        return ByteTokenizer()
    return HFTokenizer(spec)


# ---- the byte tokenizer as Hugging Face files (exports carry it; AutoTokenizer loads it) ---------------
# The special tokens by id. BOS is in the vocabulary but not declared the tokenizer's bos_token: the
# byte models never see it (EOS separates documents), and lm-eval prefixes a declared BOS to empty
# contexts and rolling windows; without one it uses EOS, as the project's own harness does.
BYTE_SPECIAL_TOKENS = {256: "<|pad|>", 257: "<|bos|>", 258: "<|endoftext|>"}


def _byte_level_chars() -> list[str]:
    """The character that a ByteLevel pre-tokenizer gives each byte value (GPT-2's byte-to-unicode
    table): printable Latin-1 bytes stand for themselves, the other 68 are shifted to 256 + k."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_tokenizer_hf() -> tokenizers.Tokenizer:
    """ByteTokenizer as a ``tokenizers.Tokenizer``: ByteLevel bytes, a BPE without merges whose
    vocabulary maps each byte's character to the byte value, and the three special tokens."""
    vocab = {ch: b for b, ch in enumerate(_byte_level_chars())}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()  # invalid UTF-8 decodes to U+FFFD, as ByteTokenizer.decode
    tok.add_special_tokens([tokenizers.AddedToken(BYTE_SPECIAL_TOKENS[i], special=True, normalized=False)
                            for i in sorted(BYTE_SPECIAL_TOKENS)])
    return tok


def byte_tokenizer_hf_files(model_max_length: int) -> dict[str, str]:
    """{file name: text} of the byte tokenizer for a Hugging Face directory (PreTrainedTokenizerFast).
    ``split_special_tokens``: text that spells a special token stays bytes, as ByteTokenizer.encode."""
    special = {"eos_token": BYTE_SPECIAL_TOKENS[258], "pad_token": BYTE_SPECIAL_TOKENS[256]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True,
              "model_max_length": int(model_max_length)}
    return {"tokenizer.json": byte_tokenizer_hf().to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


def _essentials(tj: dict) -> tuple:
    """What decides a tokenizer.json's ids and text (not the serialisation details of a version)."""
    model, kind = tj.get("model") or {}, lambda k: (tj.get(k) or {}).get("type")
    added = sorted((t.get("id"), t.get("content"), t.get("special")) for t in tj.get("added_tokens", []))
    return (model.get("type"), model.get("vocab"), model.get("merges"), tj.get("normalizer"), kind("pre_tokenizer"),
            kind("decoder"), added)


@functools.lru_cache(maxsize=1)
def _byte_essentials() -> tuple:
    return _essentials(json.loads(byte_tokenizer_hf().to_str()))


def is_byte_tokenizer_json(path: str) -> bool:
    """Whether ``path`` (a tokenizer.json or a folder holding one) is :func:`byte_tokenizer_hf`."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        if os.path.getsize(path) > 200_000:  # a real vocabulary: not read here
            return False
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        return isinstance(tj, dict) and _essentials(tj) == _byte_essentials()
    except (OSError, ValueError):
        return False

