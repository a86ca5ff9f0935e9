"""``python -m covidseg_training COMMAND ...``: download, prepare, train, average, crossval, aggregate, evaluate,
robustness, export, ensemble, path_probe, wholescan, nodule_sweep, tradeoff."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "download": ("download", "fetch the Zenodo 3757476 archives (resumable, checksummed) and unpack them"),
    "prepare": ("prepare", "NIfTI volumes or the PNG export -> a training .npz"),
    "train": ("train", "train one fold (or all data) from a config YAML"),
    "average": ("average", "average a run's kept epochs (epochNN.pt) into one checkpoint"),
    "crossval": ("crossval", "train + evaluate every fold, then aggregate"),
    "aggregate": ("aggregate", "folds evaluated one by one -> the cross-validation tables"),
    "evaluate": ("evaluate", "metrics, curves and plots on a validation fold"),
    "robustness": ("robustness", "healthy lung called infection, as is and at 3 mm resolution"),
    "export": ("export", "checkpoint -> TorchScript .pt + JSON manifest"),
    "ensemble": ("ensemble", "several model packages -> one package, the mean of their softmax"),
    "path_probe": ("path_probe", "can a small classifier tell the PNG export from engine-read negatives?"),
    "wholescan": ("wholescan", "whole real scans through the engine: false lung and infection, missed lung, nodules"),
    "nodule_sweep": ("nodule_sweep", "wholescan folders -> the nodule check at other thresholds"),
    "tradeoff": ("tradeoff", "models side by side: healthy-scan infection, COVID-19 infection found, fit"),
}


def usage() -> str:
    lines = ["usage: python -m covidseg_training COMMAND [options]   (COMMAND --help for its options)", ""]
    lines += [f"  {name:11s} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"covidseg_training.{COMMANDS[command][0]}")
    try:
        return int(module.main(rest) or 0)
    except FileNotFoundError as error:  # a path that is not there is the user's to fix: one line, no traceback
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    except SystemExit as error:
        if not isinstance(error.code, str):  # argparse's own exits (--help, a bad option) keep their code
            raise
        # A command's refusal of its arguments (raise SystemExit("why")): exit 2 as argparse's, so that exit 1
        # keeps meaning "ran, and some of the work failed" (wholescan's failed scans).
        print(f"{command}: {error.code}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
