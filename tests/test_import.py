"""What a new user sees at import: nothing on stderr, and a clear message when _C was never built."""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numpy_is_a_dependency():
    # torch (not a numpy dependent) warns "Failed to initialize NumPy" at every `import torch`
    # without numpy, so a plain `pip install .` must bring it
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        deps = re.search(r"^dependencies = \[(.*)\]", f.read(), re.M).group(1)
    assert '"numpy"' in deps


def test_import_prints_nothing():
    r = subprocess.run([sys.executable, "-c", "import complexformer"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


def test_missing_extension_is_one_clear_error(tmp_path):
    # a fresh checkout: the sources without the compiled _C
    shutil.copytree(os.path.join(ROOT, "complexformer"), tmp_path / "complexformer",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # an editable install's finder would resolve complexformer._C to the installed checkout's build
    # whatever the package's path: a fresh checkout has no install, so the finder is dropped
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "getattr(f, '__module__', '')]; import complexformer")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0
    assert "the compiled extension, is missing" in r.stderr
    assert "circular import" not in r.stderr and r.stderr.count("Traceback") == 1
