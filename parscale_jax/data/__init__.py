"""Training data: sources, tokenizers, train/held-out split, packing and a checkpointable grain iterator.

Flow, one way, one module per stage::

    config.DataConfig -> sources: files -> split units (hash of the relative path)
      -> tokens: documents -> token ids, one stream per split, every document followed by EOS
      -> iterator: records of seq_len + 1 tokens; grain: global shuffle per epoch (seed),
         repeat, global batches -> this process's rows

Sources: the running interpreter's standard library (``source="stdlib"``, the default, needs
no download), a file, a directory, or a glob of text files, JSONL files (one JSON object per
line with a text field) and ``.npy`` arrays of token ids. Tokenizers (:mod:`.tokenizer`): raw
bytes (default) or a local Hugging Face ``tokenizer.json``. Only the iterator imports grain
(and with it jax); configs, sources and tokens do not.

Callers use the package: ``from parscale_jax import data as D; D.DataConfig, D.load_tokenizer,
D.train_iterator, D.heldout_tokens, ...``.
"""
from parscale_jax.data.config import FORMATS, DataConfig
from parscale_jax.data.iterator import DataIterator, train_iterator
from parscale_jax.data.sources import SourceFile, Split, is_heldout, list_files, split_files, split_units, stdlib_root
from parscale_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from parscale_jax.data.records import (Source, all_tokens, check_vocab, dataset_tokenizer, eval_source, heldout_streams,
                                       heldout_tokens, is_prepared, open_sources, prepared_dir)
from parscale_jax.data.tokens import cache_dir

__all__ = ["FORMATS", "DataConfig", "DataIterator", "train_iterator", "SourceFile", "Split", "is_heldout",
           "list_files", "split_files", "split_units", "stdlib_root", "ByteTokenizer", "HFTokenizer", "Tokenizer",
           "load_tokenizer", "all_tokens", "cache_dir", "heldout_tokens", "Source", "check_vocab",
           "dataset_tokenizer", "eval_source", "heldout_streams", "is_prepared", "open_sources", "prepared_dir"]
