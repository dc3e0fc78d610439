"""``python -m complexformer.experiment``: the entry point of :mod:`complexformer.lab.experiment`
(its --help and docstring say what it does). An entry point, not an op module: only ``python -m``
runs it."""
if __name__ == "__main__":
    from complexformer.lab.experiment import main
    from complexformer.lab.train import run_cli

    run_cli(main)
