"""The example scripts check their input first: a bad file or flag ends in one clear line naming it,
never a traceback. (The examples' training itself runs in the README / CI smoke runs, not here.)"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LINE = "In the beginning God created the heaven and the earth.\n"


def run_example(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join("examples", script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def text_file(tmp_path, content):
    path = tmp_path / "corpus.txt"
    path.write_text(content)
    return str(path)


# (script, extra args, file content or None for a missing file, what the one error line must say)
CASES = [
    ("finetune_pdl.py", [], None, "no such file"),
    ("finetune_pdl.py", [], "", "no text"),
    ("finetune_pdl.py", [], ONE_LINE, "need at least 2"),
    ("train_cmha_lm.py", [], None, "no such file"),
    ("train_cmha_lm.py", [], "", "only 0 bytes"),
    ("train_cmha_lm.py", [], ONE_LINE, f"only {len(ONE_LINE)} bytes"),
]


@pytest.mark.parametrize("script,extra,content,says", CASES,
                         ids=[f"{c[0]}-{c[3]}".replace(" ", "_") for c in CASES])
def test_bad_text_file_gives_one_line(tmp_path, script, extra, content, says):
    pytest.importorskip("tokenizers")
    path = str(tmp_path / "missing.txt") if content is None else text_file(tmp_path, content)
    rc, err = run_example(script, "--text-file", path, *extra)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: --text-file") and says in lines[0], err


@pytest.mark.parametrize("script,args,says", [
    ("train_cmha_lm.py", ["--heads", "3"], "--heads 3 must divide --dim 128"),
    ("finetune_pdl.py", ["--n-head", "3"], "--n-head 3 must divide --n-embd 128"),
])
def test_bad_flag_is_a_usage_error(tmp_path, script, args, says):
    rc, err = run_example(script, "--text-file", text_file(tmp_path, ONE_LINE * 40), *args)
    assert rc == 2 and "Traceback" not in err
    assert says in err.strip().splitlines()[-1], err
