"""``complexformer.models``: the public name of the ComplexFormer causal LM, which lives in
``complexformer/hf/`` with transformers' file naming (``configuration_complexformer.py``,
``modeling_complexformer.py``). Importing it registers the model with ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` (model_type "complexformer"). Needs transformers.
"""
from .hf.configuration_complexformer import ComplexFormerConfig
from .hf.modeling_complexformer import ComplexFormerForCausalLM, ComplexFormerModel, ComplexFormerPreTrainedModel

__all__ = ["ComplexFormerConfig", "ComplexFormerForCausalLM", "ComplexFormerModel", "ComplexFormerPreTrainedModel"]
