"""Run directories that survive an interruption: atomic writes, an ``--out`` checked before any
work starts, a record of the configuration that made the directory, and checkpoints.

Every file the lab writes goes through :func:`write_atomic` (a temporary file beside the target,
fsync, ``os.replace``), so a kill at any moment leaves either the old file or the new one, never
half of one. A directory's ``run.json`` holds the settings that determine its results; a rerun
with the same ``--out`` resumes when they match and is refused, naming the fields, when they do not.
"""
import contextlib
import json
import os
import random
import tempfile

import torch

RUN_FILE = "run.json"


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path, write):
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix), fsync it, then move it over
    ``path``: a reader never sees half a file, and an interrupted run leaves the old one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the writer may have used its own handle: flush the data to disk
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    write_atomic(path, write)


def save_pretrained_atomic(model, directory):
    """``model.save_pretrained(directory)`` with every file moved in atomically: the files are written
    to a temporary directory beside ``directory`` first, then each is renamed over its target."""
    tmpdir = tempfile.mkdtemp(dir=directory, prefix=".tmp-model-")
    try:
        model.save_pretrained(tmpdir)
        for name in sorted(os.listdir(tmpdir)):
            src = os.path.join(tmpdir, name)
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(src, os.path.join(directory, name))
    finally:
        for name in os.listdir(tmpdir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)


def prepare_out(path, flag="--out"):
    """Create the output directory ``path`` (and its parents) and check that files can be written
    there, before any work starts; a ValueError naming ``flag`` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: {parent!r} is a file, so no directory can be created under it")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path!r} is not writable ({e.strerror or e})") from None


def check_run_dir(out, settings, outputs, flag="--out"):
    """Check ``settings`` (a JSON-able dict: what determines the results) against the ``out/run.json``
    an earlier run left there. Returns True when the directory is from an earlier run with the same
    settings (resume), False when it is new (the caller then writes ``settings`` there with
    :func:`write_json` once its own checks have passed).

    Refused (ValueError): a record with different settings (the fields are named), or a directory
    that holds any of ``outputs`` but no record (an older run's results: never overwritten)."""
    record = os.path.join(out, RUN_FILE)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
    if os.path.isfile(record):
        try:
            with open(record) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {out!r}: cannot read {record!r} ({e}); use another {flag}") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            what = ", ".join(f"{k} ({old.get(k)!r} there, {settings.get(k)!r} now)" for k in diff)
            raise ValueError(f"{flag} {out!r} holds a run with different settings: {what}; "
                             f"use another {flag} or the same settings to resume it")
        return True
    found = [n for n in outputs if os.path.exists(os.path.join(out, n))]
    if found:
        raise ValueError(f"{flag} {out!r} already holds {', '.join(found)} from a run that did not record its "
                         f"settings; use another {flag} (nothing there is overwritten)")
    return False


def rng_state():
    """The global random states a run draws from (torch CPU and CUDA, Python's random, numpy)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def save_checkpoint(path, state):
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """The dict :func:`save_checkpoint` wrote, or a ValueError naming the file when it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file can fail in many ways inside the unpickler
        raise ValueError(f"cannot read the checkpoint {path!r} ({type(e).__name__}: {e}); "
                         "delete it to start the run over") from None
