"""Text data for the experiments: the embedded corpus, tokenizers, a held-out split, and batches.

The embedded corpus (``load_corpus``) is two parts of the King James Bible shipped inside the
package (see ``complexformer/data/README.md`` for the source): "narrative" (Genesis to Judges) and
"poetry" (Psalms, Proverbs), so every experiment runs offline with no arguments.

Tokenizer. The default is a byte-level BPE with a small vocabulary (1024) trained with the
``tokenizers`` library on the *training* split only (no leakage from the held-out text), in about a
second. Why not bytes: the PDL question is about rare, informative tokens, and the frequency of
BPE tokens follows the Zipf-like power law that PDL's weights (count^-alpha) are designed for, while
the ~65 distinct bytes of this text have no such long tail (its "rare" bytes are brackets and a few
capitals, not content). BPE (1024 ids) also packs about 3x more text into the same sequence length.
Bytes stay available (``tokenizer="bytes"``): no training, no dependency, any UTF-8 text.

Batches are random windows of ``seq_len + 1`` tokens from one token stream; the same seeded
generator draws the *global* batch on every rank and each rank takes its own rows, so a run on W
processes sees exactly the data of a run on one (the DDP test checks the loss curves match).
"""
import json
import lzma
import os
from importlib import resources

import torch

from ..runs import write_atomic, write_json

CORPUS_PARTS = ("narrative", "poetry")
TOKENIZERS = ("bpe", "bytes")
_TOKENIZER_FILE = "tokenizer.json"


def load_corpus(part="narrative"):
    """The text of one embedded corpus part ("narrative" or "poetry"), one verse per line."""
    if part not in CORPUS_PARTS:
        raise ValueError(f"part: expected one of {CORPUS_PARTS}, got {part!r}")
    with resources.files(__name__).joinpath(f"kjv_{part}.txt.xz").open("rb") as f:
        return lzma.decompress(f.read()).decode("utf-8")


def read_text_file(path):
    """Read a UTF-8 text file for training, with a clear error for a missing, empty or binary file."""
    if os.path.isdir(path):
        raise ValueError(f"--text-file {path!r} is a directory; expected a UTF-8 text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text-file: no such file: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"--text-file {path!r} is empty")
    if b"\x00" in raw:
        raise ValueError(f"--text-file {path!r} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text-file {path!r} is not UTF-8 text ({e})") from None


def split_held_out(text, val_fraction=0.05):
    """(train, val): the last ``val_fraction`` of the text, cut at a line boundary, is held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    cut = int(len(text) * (1 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut  # a single-line text is cut mid-line
    return text[:cut], text[cut:]


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory):
        write_json(os.path.join(directory, _TOKENIZER_FILE), {"complexformer_tokenizer": "bytes"})


class BPETokenizer:
    """Byte-level BPE trained with the ``tokenizers`` library (no special tokens: the stream is
    plain text, newlines included, and windows are cut anywhere in it)."""

    kind = "bpe"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text, vocab_size=1024):
        try:
            from tokenizers import ByteLevelBPETokenizer
        except ImportError:
            raise ImportError("the BPE tokenizer needs the `tokenizers` package (pip install tokenizers, "
                              "or complexformer[experiment]); or use tokenizer='bytes'") from None
        if vocab_size < 257:
            raise ValueError(f"vocab_size: a byte-level BPE needs more than 256 ids, got {vocab_size}")
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab_size, min_frequency=2,
                                show_progress=False)
        return cls(tok._tokenizer)

    def encode(self, text):
        # encode line by line: one huge string is slow in the pre-tokenizer, and merges never
        # cross a newline anyway
        return [i for enc in self._tok.encode_batch(text.splitlines(keepends=True)) for i in enc.ids]

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory):
        write_atomic(os.path.join(directory, _TOKENIZER_FILE), self._tok.save)

    def to_str(self):
        return self._tok.to_str()

    @classmethod
    def from_str(cls, s):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s))


def build_tokenizer(kind, text, vocab_size=1024):
    """A tokenizer of ``kind`` ("bpe" or "bytes"); BPE is trained on ``text``."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer: expected one of {TOKENIZERS}, got {kind!r}")


def load_tokenizer(directory):
    """The tokenizer saved by ``save`` in ``directory`` (a training run's output)."""
    path = os.path.join(directory, _TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {_TOKENIZER_FILE} in {directory!r} (not a complexformer.train output?)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("complexformer_tokenizer") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(path))


def encode_stream(tokenizer, text):
    """The whole text as one int64 token stream."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def random_windows(stream, batch_size, seq_len, generator, *, rank=0, world_size=1):
    """This rank's rows of a global batch of random windows: (inputs, targets), each
    (batch_size // world_size, seq_len), targets shifted by one. Every rank draws the same global
    start positions from ``generator`` (same seed everywhere) and keeps rows rank::world_size."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
    if len(stream) < seq_len + 1:
        raise ValueError(f"seq_len ({seq_len}) is longer than the text ({len(stream)} tokens)")
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)[rank::world_size]
    w = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
    return w[:, :-1], w[:, 1:]


def sequential_windows(stream, seq_len, max_windows=None):
    """Non-overlapping windows covering the stream from the start: (inputs, targets), each
    (n, seq_len). Used for evaluation, so every run scores exactly the same tokens."""
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"seq_len ({seq_len}) is longer than the held-out text ({len(stream)} tokens)")
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    return x, y
