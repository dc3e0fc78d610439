import subprocess
import sys

import pytest
import torch

import complexformer
from complexformer import _C
from complexformer._ext import dl


def test_build_info_keys():
    info = complexformer.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_archs", "openmp", "c_compiler"}
    assert isinstance(info["cuda"], bool)


def test_info_cli_runs(tmp_path):
    # cwd outside the checkout: `python -m` puts cwd first on sys.path, where the source tree would
    # shadow the installed package
    r = subprocess.run([sys.executable, "-m", "complexformer.info"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "self-check passed" in r.stdout
    assert "torch" in r.stdout


def _counts_call(ids, counts, bad=None):
    _C.pdl_token_counts(ids, counts, -100, 1, 0, bad)


def test_boundary_accepts_dlpack_views_and_strided_offsets():
    ids = torch.tensor([0, 1, 1, 3, 9, 3], dtype=torch.int64)
    counts = torch.zeros(10, dtype=torch.int64)
    _counts_call(dl(ids[2:]), dl(counts))  # a view with a byte offset: the offset must be honoured
    assert counts.tolist() == [0, 1, 0, 2, 0, 0, 0, 0, 0, 1]
    versioned = ids.__dlpack__(max_version=(1, 0)) if "max_version" in ids.__dlpack__.__code__.co_varnames else dl(ids)
    counts.zero_()
    _counts_call(versioned, dl(counts))  # DLPack 1.x capsules ("dltensor_versioned") too
    assert counts.sum().item() == 6


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: ("not a capsule", dl(torch.zeros(4, dtype=torch.int64))), TypeError, "ids: expected an unconsumed DLPack capsule"),
        (lambda: (dl(torch.zeros(3)), dl(torch.zeros(4, dtype=torch.int64))), TypeError, "ids: dtype float32"),
        (lambda: (dl(torch.zeros(3, dtype=torch.int64)), dl(torch.zeros(4, dtype=torch.int32))), TypeError, "counts: dtype int32"),
        (lambda: (dl(torch.zeros(6, dtype=torch.int64)[::2]), dl(torch.zeros(4, dtype=torch.int64))), ValueError, "ids: must be contiguous"),
        (lambda: (dl(torch.zeros(3, dtype=torch.int64)), dl(torch.zeros(2, 2, dtype=torch.int64))), ValueError, "counts: expected 1 dimensions"),
        (lambda: (dl(torch.tensor([0, 7])), dl(torch.zeros(4, dtype=torch.int64))), ValueError, "ids: value 7"),
    ],
    ids=["not-capsule", "ids-dtype", "counts-dtype", "strided", "ndim", "out-of-range"],
)
def test_boundary_errors_name_the_argument(make, exc, words):
    ids, counts = make()
    with pytest.raises(exc, match=words):
        _counts_call(ids, counts)


def test_consumed_capsule_is_rejected():
    import ctypes

    cap = dl(torch.zeros(2, dtype=torch.int64))
    ctypes.pythonapi.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ctypes.pythonapi.PyCapsule_SetName(cap, b"used_dltensor")  # what a consumer does to a capsule it took
    with pytest.raises(TypeError, match="ids: expected an unconsumed DLPack capsule"):
        _counts_call(cap, dl(torch.zeros(2, dtype=torch.int64)))


def test_empty_tensors_pass_the_boundary():
    counts = torch.zeros(5, dtype=torch.int64)
    _counts_call(dl(torch.empty(0, 3, dtype=torch.int64)), dl(counts))
    assert counts.sum().item() == 0
