"""python -m complexformer.train: clear errors on bad input, and a tiny end-to-end run."""
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from complexformer.lab import data as cfdata  # noqa: E402
from complexformer.lab.train import main  # noqa: E402

TINY = ["--steps", "12", "--seq-len", "32", "--batch-size", "4", "--hidden-size", "32", "--layers", "1",
        "--heads", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def poetry_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "poetry.txt"
    path.write_text(cfdata.load_corpus("poetry")[:40000], encoding="utf-8")
    return path


def test_missing_empty_binary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text-file.*no such file"):
        main(["--text-file", str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="--text-file.*empty"):
        main(["--text-file", str(empty)])
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="--text-file.*binary"):
        main(["--text-file", str(binary)])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="--text-file.*not UTF-8"):
        main(["--text-file", str(latin1)])


def test_seq_len_longer_than_text(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    with pytest.raises(ValueError, match="--seq-len 4096 is longer than the"):
        main(["--text-file", str(short), "--tokenizer", "bytes", "--seq-len", "4096", "--out", str(tmp_path)])


# ids spelled out: conftest skips tests whose keywords contain "cuda" on a machine without a GPU
@pytest.mark.parametrize("device", ["tpu", "cuda:banana", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]),
                         ids=lambda d: "unavailable-gpu" if d == "cuda" else d.replace("cuda", "gpu"))
def test_unknown_device(device, tmp_path):
    with pytest.raises(ValueError, match="--device"):
        main(["--device", device, "--out", str(tmp_path)])


def test_cli_reports_errors_without_traceback(tmp_path):
    # cwd outside the checkout: `python -m` puts cwd first on sys.path, where the source tree has no
    # compiled extension
    r = subprocess.run([sys.executable, "-m", "complexformer.train", "--text-file", str(tmp_path / "x.txt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "error: --text-file: no such file" in r.stderr and "Traceback" not in r.stderr


def test_end_to_end_then_finetune_from_it(poetry_file, tmp_path, capsys):
    pre = tmp_path / "pre"
    main(["--text-file", str(poetry_file), "--out", str(pre), "--vocab-size", "300"] + TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("val_ppl=")
    m = json.loads((pre / "metrics.json").read_text())
    assert m["val_ppl"] == pytest.approx(float(lines[-1].split("=")[1]), rel=1e-4)
    assert math.isfinite(m["val_ppl"]) and m["val_ppl"] < m["vocab_size"]  # better than uniform
    loss = m["history"]["loss"]
    assert len(loss) == 12 and loss[-1] < loss[0] - 0.5, loss  # it learned something
    assert m["seed"] == 0 and m["tokenizer"] == "bpe" and m["vocab_size"] <= 300

    ft = tmp_path / "ft"
    main(["--corpus", "poetry", "--init-from", str(pre), "--loss", "pdl", "--alpha", "0.5", "--out", str(ft),
          "--no-save"] + TINY)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("val_ppl=")
    m2 = json.loads((ft / "metrics.json").read_text())
    assert m2["vocab_size"] == m["vocab_size"]  # the tokenizer came from --init-from
    assert not (ft / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="--attention rope differs"):
        main(["--init-from", str(pre), "--attention", "rope", "--out", str(ft)] + TINY)


def test_help_shows_defaults(capsys):
    from complexformer.lab.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default: 300)" in out and "(default: runs/train)" in out
    assert "--threads" in out and "(default: None)" not in out


def test_choose_threads(monkeypatch):
    from complexformer.lab import train as cftrain

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cftrain, "_cores_and_cpus", lambda: (2, [0, 1]))
    try:
        for busy, want in ((0.1, 2), (1.0, 1), (1.9, 1), (None, 2)):  # None: /proc/stat unreadable
            monkeypatch.setattr(cftrain, "_busy_cpus", lambda cpus, b=busy: b)
            line = cftrain.choose_threads()
            assert torch.get_num_threads() == want and line.startswith(f"threads: {want} (2 cores available")
        monkeypatch.setattr(cftrain, "_busy_cpus", lambda cpus: 0.0)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks share the cores
        assert cftrain.choose_threads().startswith("threads: 1 ") and torch.get_num_threads() == 1
        assert cftrain.choose_threads(3) == "threads: 3 (--threads)" and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert "OMP_NUM_THREADS" in cftrain.choose_threads()
        with pytest.raises(ValueError, match="--threads"):
            cftrain.choose_threads(0)
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_reads_proc_stat():
    from complexformer.lab.train import _busy_cpus, _cores_and_cpus

    cores, cpus = _cores_and_cpus()
    assert 1 <= cores <= (len(cpus) if cpus else cores)
    busy = _busy_cpus(set(cpus), seconds=0.05) if cpus else None
    assert busy is None or -0.01 <= busy <= len(cpus) + 0.01


def test_train_records_held_out_curve():
    from complexformer.lab.train import build_model, train

    model = build_model(64, "cmha", hidden_size=16, num_layers=1, num_heads=2)
    stream = torch.randint(0, 64, (400,))
    calls = []
    hist = train(model, stream, steps=7, batch_size=2, seq_len=8, progress=False, eval_every=3,
                 evaluate=lambda m: calls.append(m.training) or float(len(calls)))
    assert [s for s, _ in hist["eval"]] == [0, 3, 6, 7] and [v for _, v in hist["eval"]] == [1, 2, 3, 4]
    assert model.training is False and len(hist["loss"]) == 7
