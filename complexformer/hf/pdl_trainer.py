""":class:`PDLTrainer`: a ``transformers.Trainer`` that trains with the shifted causal-LM PDL loss,
exactly: k accumulated micro-batches on P processes give the gradient of one big batch. Its class
weights come from :func:`complexformer.hf.label_token_counts` (``label_counts.py``).

Why the Trainer needs more than a loss function: a PDL "mean" divides by the sum of the target
weights. Averaging per-micro-batch means (what a plain ``compute_loss`` override gets) weights the
micro-batches equally whatever their weight sums, and Hugging Face's ``num_items_in_batch`` is a
token count, not a weight sum. So :class:`PDLTrainer` computes the weight sum of the whole
accumulation window (over all processes) when the Trainer collects the window's batches, and
passes it to :func:`complexformer.causal_lm_pdl_loss` as the ``normalizer``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

try:
    from transformers import Trainer as _Trainer
except ImportError as e:  # pragma: no cover
    raise ImportError("complexformer.hf.PDLTrainer needs transformers: pip install 'complexformer[hf]'") from e

from ..causal_lm import causal_lm_normalizer, causal_lm_pdl_loss, shift_labels
from ..checks import check_pdl_weights
from .fused_pdl import check_fused_support, final_hidden_states, fused_logit_scale, is_fused_pdl, router_aux_loss
from .label_counts import check_label_range


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
    shifted = batch.get("shift_labels")
    if shifted is not None:
        return shifted
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "PDLTrainer: the batch has no 'labels' (or 'shift_labels'); use a collator that builds "
            "them, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
    return shift_labels(labels, ignore_index)


def _is_peft(model):
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _save_peft_angles(model, directory):
    """save_cmha_angles for a PEFT model with learnable CMHA angles (the full model's own
    checkpoint holds them already)."""
    if _is_peft(model):
        from .angles import _named_angles, save_cmha_angles

        if _named_angles(model):
            save_cmha_angles(model, directory)


def _load_peft_angles(model, directory):
    import os

    from .angles import ANGLES_FILE, load_cmha_angles

    if _is_peft(model) and os.path.isfile(os.path.join(directory, ANGLES_FILE)):
        load_cmha_angles(model, directory)


class PDLTrainer(_Trainer):
    """A ``transformers.Trainer`` that trains a causal LM with the Power-Law Decay Loss.

    ``PDLTrainer(model=..., args=..., train_dataset=..., pdl_weights=w)`` where ``w`` is the
    (V,) weight vector from ``complexformer.pdl_weights(label_token_counts(...))``. The loss is
    ``complexformer.causal_lm_pdl_loss`` on the shifted labels (logits at t predict labels at t+1; HF
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
    no logit transform but a scale (Granite ``logits_scaling``, Cohere ``logit_scale``: folded
    into the head exactly); soft-capping (Gemma 2) raises. The loss is PDLTrainer's own (its
    ``pdl_weights``, ``pdl_ignore_index`` and label smoothing), whatever weights the patch was given.
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
        check_pdl_weights(pdl_weights, "pdl_weights")
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
        """Sum of w[target] over the shifted, non-ignored targets of ``batches`` (this process):
        ``causal_lm_normalizer`` summed over the batches."""
        acc = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS: no float64
        w = self._weights(device, acc)
        total = torch.zeros((), dtype=acc, device=device)
        for batch in batches:
            targets = _shifted_targets(batch, self.pdl_ignore_index).to(device)
            check_label_range(targets, w.numel(), self.pdl_ignore_index, "PDLTrainer", "len(pdl_weights)")
            total += causal_lm_normalizer(targets, w, shift=False, ignore_index=self.pdl_ignore_index)
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
        norm, scale = None, 1
        if isinstance(num_items_in_batch, _WindowNormalizer):
            norm, scale = num_items_in_batch.weight_sum, num_items_in_batch.loss_scale
        head = unwrapped.get_output_embeddings() if fused else None
        loss = causal_lm_pdl_loss(x, targets, self._weights(x.device), shift=False, normalizer=norm,
                                  lm_head=None if head is None else head.weight,
                                  lm_head_bias=None if head is None else head.bias,
                                  logit_scale=None if head is None else fused_logit_scale(unwrapped, "PDLTrainer"),
                                  ignore_index=self.pdl_ignore_index,
                                  label_smoothing=self.args.label_smoothing_factor)
        aux = router_aux_loss(unwrapped, outputs)
        if aux is not None:  # MoE load balancing: added per micro-batch, as the model's own loss under Trainer
            loss = loss + aux.to(loss.device)
        self.loss_is_scaled_for_ga = norm is not None
        return (loss * scale, outputs) if return_outputs else loss * scale


PDLTrainer.__module__ = "complexformer.hf"  # its public home
