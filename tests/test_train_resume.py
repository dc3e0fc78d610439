"""python -m complexformer.train survives an interruption: --out checked before any work, a run
directory from other settings refused, a damaged --init-from named, and a run killed with SIGKILL
mid-way resumes to exactly the result of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from complexformer.lab.train import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread: bit-for-bit equality needs the same reduction order in both runs
SMALL = ["--steps", "60", "--checkpoint-every", "10", "--seq-len", "64", "--batch-size", "8", "--hidden-size", "64",
         "--layers", "1", "--heads", "2", "--vocab-size", "300", "--threads", "1", "--val-fraction", "0.01"]


def _cli(out, *extra, wait=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "complexformer.train", "--out", str(out), *SMALL, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)


def _run(out, *extra):
    """main() in this process (cheaper than a subprocess), restoring torch's thread count."""
    before = torch.get_num_threads()
    try:
        main(["--out", str(out), *SMALL, *extra])
    finally:
        torch.set_num_threads(before)


def test_out_checked_before_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="--out .* is a file"):
        main(["--out", str(f)])
    with pytest.raises(ValueError, match="--out .* is a file, so no directory"):
        main(["--out", str(f / "sub")])
    if sys.platform.startswith("linux"):  # not even root may create a directory in /proc
        with pytest.raises(ValueError, match="--out .* is not writable"):
            main(["--out", "/proc/self/complexformer-out"])


@pytest.mark.parametrize("flag,value,match", [("--heads", "0", "positive int"), ("--steps", "0", "positive int"),
                                              ("--heads", "3", "even size"), ("--alpha", "-1", ">= 0"),
                                              ("--checkpoint-every", "0", "positive int")])
def test_bad_numbers_refused_at_parse_time(flag, value, match, capsys):
    with pytest.raises(SystemExit):
        main([flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err and match


def test_text_file_directory(tmp_path):
    with pytest.raises(ValueError, match="--text-file .* is a directory"):
        main(["--text-file", str(tmp_path), "--out", str(tmp_path / "o")])


def test_other_settings_refused_and_older_outputs_kept(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "--steps", "3")
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"different settings: lr \(0.003 there, 0.001 now\), steps \(3 there, 4 now\)"):
        _run(out, "--steps", "4", "--lr", "1e-3")
    capsys.readouterr()
    _run(out, "--steps", "3")  # the same settings: finished, nothing to do
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and printed.strip().endswith("val_ppl=%.4f" % json.loads(before)["val_ppl"])
    assert (out / "metrics.json").read_bytes() == before
    old = tmp_path / "old"  # an older run's outputs, without a run.json: never overwritten
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds metrics.json"):
        _run(old)
    r = _cli(out, "--steps", "4")  # the command line: one line, no traceback
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: --out"), r.stderr


def test_damaged_init_from_names_the_file(tmp_path):
    pre = tmp_path / "pre"
    _run(pre, "--steps", "2")
    (pre / "tokenizer.json").write_bytes(b"")  # what a kill during a non-atomic save left
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        main(["--init-from", str(pre), "--out", str(tmp_path / "a")])
    pre2 = tmp_path / "pre2"
    _run(pre2, "--steps", "2")
    with pytest.raises(ValueError, match="--hidden-size 32 \\(the saved model has 64\\)"):
        main(["--init-from", str(pre2), "--hidden-size", "32", "--out", str(tmp_path / "c")])
    weights = pre2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot load the model from .*model.safetensors"):
        main(["--init-from", str(pre2), "--out", str(tmp_path / "b")])


@pytest.mark.slow  # three short training runs in subprocesses (~30 s on 2 cores)
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = _cli(ref)
    assert r.returncode == 0, r.stderr
    proc = _cli(cut, wait=False)
    ckpt = cut / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and ckpt.exists(), proc.stderr.read()
    assert not (cut / "metrics.json").exists()  # killed mid-run
    r = _cli(cut)
    assert r.returncode == 0, r.stderr
    assert "resuming at step" in r.stdout
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, cut))
    assert b["history"]["loss"] == a["history"]["loss"] and b["history"]["lr"] == a["history"]["lr"]
    assert b["val"] == a["val"] and b["val_ppl"] == a["val_ppl"]
    assert (cut / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not ckpt.exists()  # removed once the run finished
