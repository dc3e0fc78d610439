"""Counting the label stream a causal LM is trained on: :func:`label_token_counts`.

It counts the shifted labels (``ignore_index`` excluded) over a dataset, a list or a DataLoader,
all-reduced under torch.distributed. Those counts feed :func:`complexformer.pdl_weights`.

Why counting the label stream matters: PDL weights are ``(count + eps) ** -alpha``, so a target
token that was never counted gets ``eps ** -alpha`` (1e7 at the defaults) and swamps every batch it
appears in. Counting exactly the ids the loss will see (shifted labels, special tokens and chat
templates included, padding excluded) means every target has a count >= 1. The authors' reference
trainer counted raw text with ``add_special_tokens=False`` (so EOS targets got weight 1e7) and sized
the weights by ``tokenizer.vocab_size``, which excludes added tokens; we raise instead.

Nothing here imports transformers.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..counts import token_counts


def dist_info(group=None):
    """(rank, world_size) in ``group`` (default: the world), (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _as_blocks(value, label_column):
    """One item's labels as blocks: a Python list (one sequence), a 1-D tensor (one sequence) or a
    2-D tensor (a batch of rows). Python lists stay lists: one torch.tensor call per chunk of
    sequences is much faster than one per sequence."""
    if isinstance(value, Mapping):
        if label_column not in value:
            raise KeyError(
                f"label_token_counts: no {label_column!r} in an item with keys {sorted(value)}; "
                f"pass label_column=... (e.g. label_column='input_ids' when the collator copies "
                f"input_ids to labels)"
            )
        value = value[label_column]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return []
        first = value[0]
        if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) > 0:
            return [b for v in value for b in _as_blocks(v, label_column)]
        if isinstance(first, torch.Tensor):  # a list of 0-d tensors
            value = torch.stack(list(value))
        else:
            return [list(value)]
    elif not isinstance(value, torch.Tensor):
        if not hasattr(value, "__array__"):
            raise TypeError(
                f"label_token_counts: expected label ids as a list, tensor or array, got {type(value).__name__}"
            )
        value = torch.as_tensor(value)
    if value.dim() == 0:
        raise ValueError("label_token_counts: a label sequence must be 1-D, got a scalar")
    return [value if value.dim() <= 2 else value.reshape(-1, value.shape[-1])]


def _num_sequences(blocks):
    return sum(b.shape[0] if isinstance(b, torch.Tensor) and b.dim() == 2 else 1 for b in blocks)


def _count_blocks(blocks, counts, vocab_size, ignore_index, shift):
    """Add the (shifted) ids of ``blocks`` to ``counts`` with one token_counts call."""
    start = 1 if shift else 0
    parts = []
    flat = list(itertools.chain.from_iterable(b[start:] for b in blocks if isinstance(b, list)))
    if flat:
        parts.append(torch.tensor(flat))
    for b in blocks:
        if isinstance(b, torch.Tensor):
            parts.append((b[..., start:]).reshape(-1).to("cpu"))
    for ids in parts:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"label_token_counts: label ids must be integers, got dtype {ids.dtype}")
    parts = [p for p in parts if p.numel()]
    if not parts:
        return
    ids = torch.cat([p.to(torch.int64) for p in parts])
    check_label_range(ids, vocab_size, ignore_index, "label_token_counts", "vocab_size")
    counts += token_counts(ids, vocab_size, ignore_index=ignore_index)


def check_label_range(ids, vocab_size, ignore_index, who, what):
    """Raise a ValueError naming ``who`` / ``what`` for a label id outside [0, vocab_size) other than ignore_index."""
    valid = ids[ids != ignore_index]
    if valid.numel() == 0:
        return
    hi, lo = int(valid.max()), int(valid.min())
    if hi >= vocab_size:
        raise ValueError(
            f"{who}: label id {hi} >= {what} {vocab_size}. Size the vocabulary by the model's output "
            f"layer (model.config.vocab_size / model.get_output_embeddings()) or len(tokenizer); "
            f"tokenizer.vocab_size leaves out added tokens."
        )
    if lo < 0:
        raise ValueError(f"{who}: negative label id {lo} (only ignore_index={ignore_index} may be negative)")


def _items(data, label_column, shard, rank, world):
    """(iterator over items, number of sequences or None). Items are fed to _as_blocks."""
    if isinstance(data, torch.Tensor):
        rows = data.reshape(-1, data.shape[-1]) if data.dim() > 1 else data.reshape(1, -1)
        if shard:
            rows = rows[rank::world]
        return iter(rows.split(1024)), rows.shape[0]
    if hasattr(data, "column_names") and hasattr(data, "iter") and hasattr(data, "__len__"):
        # A datasets.Dataset: read the column in batches (row-by-row access is slow).
        if label_column not in data.column_names:
            raise KeyError(
                f"label_token_counts: the dataset has no column {label_column!r} (columns: "
                f"{data.column_names}); pass label_column=... (e.g. 'input_ids' when the collator "
                f"copies input_ids to labels)"
            )
        data = data.select_columns([label_column])
        if shard and world > 1:
            data = data.shard(world, rank, contiguous=True)
        return (b[label_column] for b in data.iter(batch_size=1024)), len(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (str, bytes, Mapping)):
        n = len(data)
        idx = range(rank, n, world) if shard else range(n)
        return (data[i] for i in idx), len(idx)
    if isinstance(data, (str, bytes, Mapping)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"label_token_counts: expected a datasets.Dataset, a list of dicts or sequences, a tensor "
            f"or an iterable of batches, got {type(data).__name__}"
        )
    # A DataLoader or another iterable: its batches are this rank's shard already.
    return iter(data), None


def label_token_counts(
    data,
    vocab_size,
    *,
    label_column="labels",
    ignore_index=-100,
    shift=True,
    batch_size=1024,
    shard=None,
    group=None,
    progress=None,
    desc="counting label tokens",
):
    """How often each token id occurs as a training target: the ``counts`` for ``pdl_weights``.

    Counts exactly the ids the loss sees: for a causal LM (``shift=True``) the shifted labels
    ``labels[1:]`` of every sequence, never ``ignore_index`` (padding, masked prompts).

    Args:
        data: a ``datasets.Dataset`` (column ``label_column``), a list of dicts or of sequences
            (lists, tensors, arrays), a tensor (N, T) or (T,), or an iterable of batches such as a
            ``DataLoader`` (each batch a dict with a (B, T) ``label_column`` or a tensor). Batch the
            loader with the same collator as training to count what the loss will see.
        vocab_size: the model's output size (``model.config.vocab_size`` or ``len(tokenizer)``,
            not ``tokenizer.vocab_size``, which excludes added tokens). An id >= vocab_size raises.
        label_column: the key that holds the labels. Use ``"input_ids"`` when the collator builds
            labels from input_ids (``DataCollatorForLanguageModeling(mlm=False)``).
        ignore_index: the label id the loss skips.
        shift: count ``labels[1:]`` of every sequence (causal LM with unshifted HF labels).
        batch_size: sequences per ``token_counts`` call.
        shard: under torch.distributed, count only this rank's share of an indexable ``data``
            (dataset, list, tensor: rank r takes a contiguous shard / every world-th item). Default:
            True for indexable data, False for iterables (a DataLoader with a DistributedSampler
            already yields this rank's shard; note that sampler pads to equal shards, so a few
            sequences are counted twice unless ``drop_last``).
        group: the process group for the all-reduce (default: the world).
        progress: show a tqdm bar (default: on rank 0 only).

    Returns:
        int64 tensor (vocab_size,) on the CPU. Under an initialized torch.distributed every rank
        counts its shard and the counts are all-reduced (SUM), so all ranks return the global counts.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"label_token_counts: vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"label_token_counts: batch_size must be a positive int, got {batch_size!r}")
    rank, world = dist_info(group)
    indexable = isinstance(data, torch.Tensor) or (
        hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, Mapping)
    )
    if shard is None:
        shard = indexable and world > 1
    items, total = _items(data, label_column, bool(shard) and world > 1, rank, world)

    from tqdm.auto import tqdm

    counts = torch.zeros(vocab_size, dtype=torch.int64)
    show = (rank == 0) if progress is None else bool(progress)
    with tqdm(total=total, desc=desc, unit="seq", disable=not show, dynamic_ncols=True) as bar:
        pending, n = [], 0
        for item in items:
            blocks = _as_blocks(item, label_column)
            pending.extend(blocks)
            n += _num_sequences(blocks)
            if n >= batch_size:
                _count_blocks(pending, counts, vocab_size, ignore_index, shift)
                bar.update(n)
                pending, n = [], 0
        _count_blocks(pending, counts, vocab_size, ignore_index, shift)
        bar.update(n)

    if world > 1:
        backend = dist.get_backend(group)
        dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else counts.device
        buf = counts.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        counts = buf.cpu()
    return counts
