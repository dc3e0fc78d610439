"""Placeholder: euler_rotate."""


def euler_rotate(*a, **k):
    raise NotImplementedError
