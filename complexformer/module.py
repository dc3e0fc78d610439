"""Placeholder: the CMHA nn.Module."""


class CMHA:
    pass
