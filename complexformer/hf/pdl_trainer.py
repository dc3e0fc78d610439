"""Hugging Face integration for the Power-Law Decay Loss.

- :func:`label_token_counts` counts the label stream a causal LM is trained on (the shifted labels,
  ``ignore_index`` excluded) over a dataset, a list or a DataLoader, all-reduced under
  torch.distributed. Those counts feed :func:`complexformer.pdl_weights`.
- :class:`PDLTrainer` is a ``transformers.Trainer`` that trains with the shifted causal-LM PDL loss,
  exactly: k accumulated micro-batches on P processes give the gradient of one big batch.

Why counting the label stream matters: PDL weights are ``(count + eps) ** -alpha``, so a target
token that was never counted gets ``eps ** -alpha`` (1e7 at the defaults) and swamps every batch it
appears in. Counting exactly the ids the loss will see (shifted labels, special tokens and chat
templates included, padding excluded) means every target has a count >= 1. The authors' reference
trainer counted raw text with ``add_special_tokens=False`` (so EOS targets got weight 1e7) and sized
the weights by ``tokenizer.vocab_size``, which excludes added tokens; we raise instead.

Why the Trainer needs more than a loss function: a PDL "mean" divides by the sum of the target
weights. Averaging per-micro-batch means (what a plain ``compute_loss`` override gets) weights the
micro-batches equally whatever their weight sums, and Hugging Face's ``num_items_in_batch`` is a
token count, not a weight sum. So :class:`PDLTrainer` computes the weight sum of the whole
accumulation window (over all processes) when the Trainer collects the window's batches, and
passes it to ``pdl_loss`` as the ``normalizer``.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..counts import token_counts
from ..pdl import pdl_loss
from .fused_pdl import check_fused_support, final_hidden_states, fused_head_loss, is_fused_pdl, router_aux_loss
from .fused_pdl import shift_labels as _shift_labels



# --------------------------------------------------------------------------------------------------
# Counting the label stream
# --------------------------------------------------------------------------------------------------

def _dist_info(group=None):
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
    _check_label_range(ids, vocab_size, ignore_index, "label_token_counts", "vocab_size")
    counts += token_counts(ids, vocab_size, ignore_index=ignore_index)


def _check_label_range(ids, vocab_size, ignore_index, who, what):
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
    rank, world = _dist_info(group)
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


# --------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------

class _WindowNormalizer(NamedTuple):
    """What PDLTrainer passes through the Trainer's ``num_items_in_batch`` slot.

    weight_sum: sum of w[target] over the whole accumulation window on all processes.
    loss_scale: the number of data-parallel processes, undoing DDP's gradient averaging.
    """

    weight_sum: torch.Tensor
    loss_scale: int


def _shifted_targets(batch, ignore_index):
    """(B, T) targets aligned with the (B, T) logits: labels[:, 1:] padded with ignore_index.

    Padding the targets (instead of slicing logits[:, :-1]) keeps the logits contiguous: the last
    position's logits simply get no loss and no gradient. A collator that provides
    ``shift_labels`` (padding-free / packed batches) has already done the shift.
    """
    shift_labels = batch.get("shift_labels")
    if shift_labels is not None:
        return shift_labels
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "PDLTrainer: the batch has no 'labels' (or 'shift_labels'); use a collator that builds "
            "them, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    return _shift_labels(labels, ignore_index)


def _is_peft(model):
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _save_peft_angles(model, directory):
    """save_cmha_angles for a PEFT model with learnable CMHA angles (the full model's own
    checkpoint holds them already)."""
    if _is_peft(model):
        from .cmha import _named_angles, save_cmha_angles

        if _named_angles(model):
            save_cmha_angles(model, directory)


def _load_peft_angles(model, directory):
    import os

    from .cmha import ANGLES_FILE, load_cmha_angles

    if _is_peft(model) and os.path.isfile(os.path.join(directory, ANGLES_FILE)):
        load_cmha_angles(model, directory)


def _build_pdl_trainer():
    try:
        from transformers import Trainer as _Trainer
    except ImportError as e:
        raise ImportError("complexformer.hf.PDLTrainer needs transformers: pip install 'complexformer[hf]'") from e

    class PDLTrainer(_Trainer):
        """A ``transformers.Trainer`` that trains a causal LM with the Power-Law Decay Loss.

        ``PDLTrainer(model=..., args=..., train_dataset=..., pdl_weights=w)`` where ``w`` is the
        (V,) weight vector from ``complexformer.pdl_weights(label_token_counts(...))``. The loss is
        ``complexformer.pdl_loss`` on the shifted labels (logits at t predict labels at t+1; HF
        collators pass unshifted labels). The model never computes its own cross-entropy: labels
        are popped before the forward.

        Exactness: the Trainer's loss mean is taken over the whole optimizer step. k micro-batches
        of gradient accumulation on P data-parallel processes produce the same gradient as one
        batch of all of them, because each micro-batch's weighted loss sum is divided by the weight
        sum of the whole window on all processes (one scalar all-reduce per optimizer step) and
        multiplied by P to undo DDP's gradient averaging. This happens whatever
        ``average_tokens_across_devices`` says. Tensor / context / sequence parallelism are not
        supported.

        Verified (tests) with transformers 5.x, single process and 2-process DDP (gloo). FSDP and
        DeepSpeed ZeRO average gradients the same way, and 4.46 <= transformers < 5 has the same
        hooks; those combinations are untested.

        Evaluation (``evaluate``/``predict``) reports the PDL mean of each eval batch; the Trainer
        averages those per batch.

        Label smoothing: ``TrainingArguments(label_smoothing_factor=...)`` is applied inside
        ``pdl_loss`` (torch's weighted-CE definition). Smoothing spreads weight over every class
        with its own w_c, so clip the weights of never-seen ids (``pdl_weights(..., max_weight=)``).

        ``use_fused_linear=True``, or a model patched by ``complexformer.hf.apply_fused_pdl``,
        computes the training loss with ``complexformer.fused_linear_pdl_loss`` from the final
        hidden states and the LM head (weight and bias), never materialising the (B, T, V)
        logits. It needs a model whose forward takes ``logits_to_keep`` and returns
        ``hidden_states[-1]`` as the input of an ``nn.Linear`` ``get_output_embeddings()``
        (GPT-2, Llama, Mistral, Qwen2 and most decoder-only models in transformers >= 4.45) and
        no logit scaling or soft-capping. The loss is PDLTrainer's own (its ``pdl_weights``,
        ``pdl_ignore_index`` and label smoothing), whatever weights the patch was given.
        """

        def __init__(self, *args, pdl_weights, pdl_ignore_index=-100, use_fused_linear=False, **kwargs):
            if not hasattr(_Trainer, "get_batch_samples"):
                raise ImportError("PDLTrainer needs transformers >= 4.46 (Trainer.get_batch_samples)")
            super().__init__(*args, **kwargs)
            self.pdl_use_fused_linear = bool(use_fused_linear)
            if self.pdl_use_fused_linear:
                check_fused_support(self.model, "PDLTrainer(use_fused_linear=True)")
            if not isinstance(pdl_weights, torch.Tensor):
                pdl_weights = torch.as_tensor(pdl_weights)
            if pdl_weights.dim() != 1 or pdl_weights.numel() == 0 or not pdl_weights.is_floating_point():
                raise ValueError(
                    f"PDLTrainer: pdl_weights must be a non-empty 1-D float tensor (V,), got shape "
                    f"{tuple(pdl_weights.shape)} dtype {pdl_weights.dtype}"
                )
            if not bool(torch.isfinite(pdl_weights).all()) or bool((pdl_weights < 0).any()):
                raise ValueError("PDLTrainer: pdl_weights must be finite and >= 0")
            out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            if out is not None and getattr(out, "weight", None) is not None:
                if out.weight.shape[0] != pdl_weights.numel():
                    raise ValueError(
                        f"PDLTrainer: pdl_weights has {pdl_weights.numel()} entries but the model "
                        f"outputs {out.weight.shape[0]} logits; count with vocab_size="
                        f"{out.weight.shape[0]} (model.config.vocab_size, not tokenizer.vocab_size)"
                    )
            if self.compute_loss_func is not None:
                raise ValueError("PDLTrainer computes the loss itself; do not pass compute_loss_func")
            sizes = [getattr(self, f"get_{p}_size", lambda: 1)() for p in ("tp", "cp", "sp")]
            if any(s > 1 for s in sizes):
                raise NotImplementedError(
                    "PDLTrainer supports data parallelism (DDP; FSDP / DeepSpeed ZeRO untested); tensor, "
                    "context and sequence parallelism are not supported"
                )
            if not hasattr(_Trainer, "loss_is_scaled_for_ga"):
                # transformers < 5: training_step divides by the accumulation steps unless the
                # model "accepts loss kwargs" and num_items_in_batch is set (ours always is).
                self.model_accepts_loss_kwargs = True
            self.pdl_weights = pdl_weights.detach().to("cpu", torch.float32).contiguous()
            self.pdl_ignore_index = int(pdl_ignore_index)
            self._pdl_weights_on = {}

        # -- checkpoints: learned CMHA angles beside a PEFT adapter ---------------------------
        def _save(self, output_dir=None, state_dict=None):
            # A PEFT model saves its adapter only; the CMHA angles go beside it (cmha_angles.safetensors).
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if self.args.should_save:
                _save_peft_angles(self.accelerator.unwrap_model(self.model), output_dir)
            return super()._save(output_dir, state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            _load_peft_angles(model if model is not None else self.accelerator.unwrap_model(self.model),
                              resume_from_checkpoint)

        # -- helpers -------------------------------------------------------------------------
        def _weights(self, device, dtype=torch.float32):
            key = (torch.device(device), dtype)
            w = self._pdl_weights_on.get(key)
            if w is None:
                w = self._pdl_weights_on[key] = self.pdl_weights.to(device=device, dtype=dtype)
            return w

        def pdl_weight_sum(self, batches, device):
            """Sum of w[target] over the shifted, non-ignored targets of ``batches`` (this process)."""
            acc = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS: no float64
            w = self._weights(device, acc)
            total = torch.zeros((), dtype=acc, device=device)
            for batch in batches:
                targets = _shifted_targets(batch, self.pdl_ignore_index).to(device)
                ids = targets[targets != self.pdl_ignore_index]
                _check_label_range(ids, w.numel(), self.pdl_ignore_index, "PDLTrainer", "len(pdl_weights)")
                total += w[ids].sum()
            return total

        # -- Trainer hooks -------------------------------------------------------------------
        def get_batch_samples(self, epoch_iterator, num_batches, device=None):
            """Collect the accumulation window (as the Trainer does) and its global PDL weight sum.

            The Trainer passes the second value to training_step -> compute_loss as
            ``num_items_in_batch``; for PDL it is a weight sum, not a token count.
            """
            if device is None:  # transformers < 4.49 has no device argument
                batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches)
                device = self.args.device
            else:
                batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if not batch_samples:
                return batch_samples, None
            total = self.pdl_weight_sum(batch_samples, device)
            processes = self.args.world_size
            if processes > 1:
                total = self.accelerator.gather(total.reshape(1)).sum()
            return batch_samples, _WindowNormalizer(total, processes)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Shifted causal-LM PDL loss.

            With the window normalizer from :meth:`get_batch_samples` (training) the value is this
            micro-batch's share of the whole optimizer step's PDL mean, times the number of
            processes; ``training_step`` then neither divides it by the accumulation steps nor
            does DDP's averaging change the sum. Otherwise (evaluation, direct calls) it is the
            batch's PDL mean, and training_step divides it by the accumulation steps as usual.
            """
            targets = _shifted_targets(inputs, self.pdl_ignore_index)
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
            unwrapped = self.accelerator.unwrap_model(model)
            fused = (self.pdl_use_fused_linear or is_fused_pdl(unwrapped)) and model.training
            if fused:
                # Logits for one position only (unused); the loss reads the final hidden states.
                outputs, x = final_hidden_states(model, inputs)
            else:
                outputs = model(**inputs)
                x = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            if x.shape[:-1] != targets.shape:
                raise ValueError(
                    f"PDLTrainer: model outputs {tuple(x.shape)} do not match labels {tuple(targets.shape)}"
                )
            w = self._weights(x.device)
            kw = dict(ignore_index=self.pdl_ignore_index, label_smoothing=self.args.label_smoothing_factor)
            targets = targets.to(x.device)
            scale = 1
            if isinstance(num_items_in_batch, _WindowNormalizer):
                norm = num_items_in_batch.weight_sum.to(x.device)
                # An all-ignored window has sum 0 and every term 0: divide by 1, not 0.
                norm = torch.where(norm > 0, norm, torch.ones_like(norm))
                kw["normalizer"] = norm.to(torch.promote_types(x.dtype, torch.float32))
                scale = num_items_in_batch.loss_scale
            if fused:
                loss = fused_head_loss(unwrapped.get_output_embeddings(), x, targets, w, **kw)
            else:
                loss = pdl_loss(x, targets, w, **kw)
            aux = router_aux_loss(unwrapped, outputs)
            if aux is not None:  # MoE load balancing: added per micro-batch, as the model's own loss under Trainer
                loss = loss + aux.to(loss.device)
            self.loss_is_scaled_for_ga = "normalizer" in kw
            return (loss * scale, outputs) if return_outputs else loss * scale

    PDLTrainer.__module__ = "complexformer.hf"
    PDLTrainer.__qualname__ = "PDLTrainer"
    return PDLTrainer
