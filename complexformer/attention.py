"""Placeholder: cmha_attention."""


def cmha_attention(*a, **k):
    raise NotImplementedError
