"""The experiment application, built on the ops (``complexformer``) and the Hugging Face layer
(``complexformer.hf``); nothing below imports it.

- ``train.py``: ``python -m complexformer.train``, one small ComplexFormer LM trained on a text file
  (``build_model``, ``train``, ``load_model``; DDP under torchrun);
- ``experiment.py``: ``python -m complexformer.experiment``, the CMHA / RoPE / PDL comparison grid;
- ``metrics.py``: held-out CE / perplexity, accuracy per token-frequency quartile, distinct-n;
- ``data/``: the embedded corpus and the tokenizers (byte-level BPE or raw bytes);
- ``runs.py``: run directories that survive an interruption (atomic writes, ``--out`` checks,
  ``run.json``, checkpoints).
"""
