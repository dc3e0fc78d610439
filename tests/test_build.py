import subprocess
import sys

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


def test_dlpack_capsule_accepted():
    # any op family must see a plain capsule; a non-capsule must raise a clear TypeError
    t = torch.zeros(3)
    cap = dl(t)
    assert type(cap).__name__ == "PyCapsule"
