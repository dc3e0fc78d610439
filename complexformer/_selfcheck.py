"""A registry of quick self-checks, run by ``python -m complexformer.info``.

Each op family registers ``fn(device) -> float``: it runs the op on small random inputs on
``device`` and returns the largest error against a float64 reference (raising on failure).
"""
CHECKS = []


def selfcheck(name, tol):
    def register(fn):
        CHECKS.append((name, fn, tol))
        return fn

    return register
