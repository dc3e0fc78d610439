"""The learned CMHA angles of a model (delta, beta; omega with ``learnable_freqs``): the
parameters for their own optimizer group, and the file that keeps them beside a PEFT adapter,
which holds adapter weights only (docs/design.md, "Hugging Face state")."""
from __future__ import annotations

import torch

from .cmha_attention import CMHAState

def cmha_parameters(model):
    """The learnable CMHA angles (delta, beta; omega of ``learnable_freqs`` models) of every CMHA
    attention module in ``model``.

    For separate learning rates, e.g. with ``Trainer(optimizers=(opt, None))``::

        angles = cmha_parameters(model)
        ids = {id(p) for p in angles}
        opt = torch.optim.AdamW([{"params": angles, "lr": 1e-2, "weight_decay": 0.0},
                                 {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}],
                                lr=1e-4)
    """
    return [p for *_, p in _angle_items(model)]


ANGLES_FILE = "cmha_angles.safetensors"


def unwrap_model(model):
    """The transformers model inside PEFT (``PeftModel.get_base_model()``) / DDP wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def _angle_items(model):
    """(qualified name, module, "delta" | "beta", parameter) of every learnable CMHA angle, named in
    the transformers model (PEFT's ``base_model.model.`` prefix stripped, so a file fits the bare
    model and its adapters alike)."""
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, CMHAState):
            for n, p in m.named_parameters(recurse=False):
                if n in m._float32_params:  # the angles: delta, beta (and omega with learnable_freqs)
                    yield (f"{name}.{n}" if name else n), m, n, p


def _named_angles(model):
    """{name: parameter} of the learnable delta / beta (see :func:`_angle_items`)."""
    return {key: p for key, _, _, p in _angle_items(model)}


def save_cmha_angles(model, directory):
    """Save the learned CMHA angles (delta / beta, and omega with learnable_freqs) of ``model`` (a converted model or
    ComplexFormerForCausalLM, bare or wrapped by PEFT) to ``directory/cmha_angles.safetensors``.

    PEFT's ``save_pretrained`` saves only the adapter: call this beside it when the angles are
    trained under PEFT, and :func:`load_cmha_angles` after ``PeftModel.from_pretrained``. The file
    is written atomically. Returns its path.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    angles = _named_angles(model)
    if not angles:
        raise ValueError(f"save_cmha_angles: {type(model).__name__} has no learnable CMHA angles")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ANGLES_FILE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cmha_angles.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in angles.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@torch.no_grad()
def load_cmha_angles(model, directory):
    """Load the angles :func:`save_cmha_angles` wrote to ``directory`` into ``model`` (in place).
    Every learnable angle of the model must be in the file and every entry must match one, with
    the same shape; otherwise nothing is loaded and a ValueError names the keys. Returns the model."""
    import os

    from safetensors.torch import load_file

    path = os.path.join(directory, ANGLES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_cmha_angles: no {ANGLES_FILE} in {directory} (written by save_cmha_angles)")
    saved, angles = load_file(path), _named_angles(model)
    missing, unexpected = sorted(set(angles) - set(saved)), sorted(set(saved) - set(angles))
    bad = [k for k in angles if k in saved and saved[k].shape != angles[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"load_cmha_angles: {path} does not fit {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatch {bad}")
    for k, p in angles.items():
        p.copy_(saved[k].to(device=p.device, dtype=p.dtype))
    return model


def _angles_at_risk(model):
    """True when ``model`` holds CMHA angles that a PEFT adapter save would lose: trainable ones,
    or ones moved from their RoPE start (delta = 1, beta = 0) in a converted model."""
    return any(p.requires_grad or _moved(m, n, p) for _, m, n, p in _angle_items(model))


def _moved(m, n, p):
    """Whether angle ``n`` left its known start: omega its frequencies; delta / beta RoPE's 1 / 0
    when they started there (delta_init "rope"; a random start is unknown)."""
    if n == "omega":
        return bool((p != m._freqs_master.to(device=p.device, dtype=p.dtype)).any())
    return m.delta_init == "rope" and bool((p != (1.0 if n == "delta" else 0.0)).any())


def _warn_on_peft_save():
    """Make ``peft.PeftModel.save_pretrained`` warn when it drops learned CMHA angles (it saves the
    adapter only) and no cmha_angles file is beside it. Installed once; changes nothing else."""
    try:
        from peft import PeftModel
    except ImportError:
        return
    original = PeftModel.save_pretrained
    if getattr(original, "_cmha_checked", False):
        return

    import functools
    import os
    import warnings

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        result = original(self, save_directory, *args, **kwargs)
        if not os.path.isfile(os.path.join(save_directory, ANGLES_FILE)) and _angles_at_risk(self):
            warnings.warn(
                f"PeftModel.save_pretrained saved the adapter only: the learned CMHA angles (delta / beta) of "
                f"{type(unwrap_model(self)).__name__} are not in {save_directory}. Save them with "
                "complexformer.hf.save_cmha_angles(model, directory) and restore them with load_cmha_angles "
                "(PDLTrainer does this in its checkpoints).", UserWarning, stacklevel=2)
        return result

    save_pretrained._cmha_checked = True
    PeftModel.save_pretrained = save_pretrained
