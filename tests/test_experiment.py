"""python -m complexformer.experiment with a tiny --steps override: tables, results.json, plots."""
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from complexformer.lab.experiment import main  # noqa: E402


@pytest.mark.slow  # the training is tiny, but every run is still evaluated on the whole held-out text
def test_tiny_experiment_writes_results_and_plots(tmp_path, capsys):
    main(["--steps", "4", "--alphas", "0.5", "1", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "| cmha |" in out and "| rope |" in out and "| none |" in out
    assert "| CE |" in out and "| PDL alpha=0.5 |" in out and "| PDL alpha=1 |" in out
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["seeds"] == [0] and r["config"]["pretrain_steps"] == 4
    pos = r["per_seed"][0]["position"]
    assert list(pos) == ["cmha", "cmha, delta=1 init", "rope", "none", "cmha, delta=0 fixed", "cmha, learnable freqs",
                         "rope, learnable freqs", "rope, 1/4 of pairs rotated"]
    # same model, same parameter count up to CMHA's per-head delta and beta
    assert abs(pos["cmha"]["parameters"] - pos["rope"]["parameters"]) <= 0.01 * pos["rope"]["parameters"]
    for run in pos.values():
        assert len(run["loss"]) == 4 and math.isfinite(run["val"]["ppl"])
        assert list(run["extrapolation"]) == ["1", "2", "4", "8"] and all(map(math.isfinite, run["extrapolation"].values()))
        assert run["extrapolation"]["1"] == run["val"]["ppl"]
    ft = r["per_seed"][0]["finetune"]
    assert list(ft) == ["pretrained (no finetune)", "CE", "PDL alpha=0.5", "PDL alpha=1",
                        "PDL alpha=1, max_weight=0.01", "PDL alpha=1, max_weight=0.001"]
    for run in ft.values():
        assert len(run["val"]["acc_by_bucket"]) == 4 and sum(run["val"]["tokens_by_bucket"]) == run["val"]["tokens"]
        if run["loss"] is not None:  # held-out plain CE along finetuning, ending at the table's value
            curve = run["val_ce_curve"]
            assert curve[0][0] == 0 and curve[-1] == [2, pytest.approx(run["val"]["ce"], rel=1e-6)]
        assert 0 <= run["distinct"]["sampled"]["d2"] <= 1
    # every finetuning run starts from the same weights: the untouched model differs from all of them
    ppl = [run["val"]["ppl"] for run in ft.values()]
    assert len(set(ppl)) == len(ppl)
    for name in r["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(r["plots"]) == {"training_curves.png", "pdl_weights.png", "bucket_accuracy.png", "extrapolation.png",
                               "pdl_tradeoff.png"}


def test_smoothing_is_centred_and_covers_every_step():
    from complexformer.lab.experiment import _smooth

    line = [float(i) for i in range(100)]
    s = _smooth(line)
    assert len(s) == 100
    assert s[10:90] == pytest.approx(line[10:90])  # a centred mean of a line is the line: no shift
    assert _smooth([2.0] * 50) == pytest.approx([2.0] * 50)
    assert _smooth([1.0, 3.0]) == pytest.approx([1.0, 3.0])


def test_bad_alphas_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["--alphas", "-1"])
    assert "argument --alphas: expected a number >= 0, got -1" in capsys.readouterr().err


@pytest.mark.slow  # two tiny grids (each run evaluated on the whole held-out text)
def test_rerun_skips_finished_runs_and_redoes_the_cut_one(tmp_path, monkeypatch, capsys):
    from complexformer.lab import experiment

    args = ["--steps", "2", "--alphas", "1", "--max-weights", "--out", str(tmp_path), "--no-progress"]
    main(args)
    first = json.loads((tmp_path / "results.json").read_text())
    runs = tmp_path / "runs" / "seed0"
    cut = runs / "finetune-PDL_alpha=1.json"
    assert cut.is_file() and (runs / "position-cmha.json").is_file() and (runs / "pretrained-cmha.pt").is_file()
    cut.unlink()  # the run a kill interrupted: its result was never written
    trained = []
    real_train = experiment.train
    monkeypatch.setattr(experiment, "train", lambda *a, **k: trained.append(k["desc"]) or real_train(*a, **k))
    main(args)
    assert trained == ["finetune PDL alpha=1 s0"]  # only the cut run, from the kept pretrained weights
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["per_seed"] == first["per_seed"]  # the redone run equals the original bit for bit
    with pytest.raises(ValueError, match=r"different settings: .*pretrain_steps \(2 there, 3 now\)"):
        main(["--steps", "3", "--alphas", "1", "--max-weights", "--out", str(tmp_path), "--no-progress"])
