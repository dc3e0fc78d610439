"""``python -m complexformer.train``: the entry point of :mod:`complexformer.lab.train` (its --help
and docstring say what it does). An entry point, not an op module: only ``python -m`` runs it."""
if __name__ == "__main__":
    from complexformer.lab.train import main, run_cli

    run_cli(main)
