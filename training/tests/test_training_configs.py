"""Every experiment YAML loads, and configs stored in older checkpoints still do."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidseg_training.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    config = TrainConfig.load(path)
    assert config.name == path.stem and config.input_size % 2**config.depth == 0


def test_config_without_newer_keys_takes_defaults():
    stored = TrainConfig(name="old").to_dict()
    del stored["input_size"]  # written before the key existed
    assert TrainConfig.from_dict(stored).input_size == 256


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown config keys: \\['epoch'\\]"):
        TrainConfig.from_dict({"epoch": 3})


def test_command_line_overrides_set_what_was_given_and_keep_the_rest():
    config = TrainConfig(name="x", fold=2, epochs=30, device="auto", workers=2)
    assert config.override(fold=0, epochs=None, device="", workers=0) is config
    assert (config.fold, config.epochs, config.device, config.workers) == (0, 30, "auto", 0)
    with pytest.raises(ValueError, match="unknown config key: epoch"):
        config.override(epoch=3)


def test_no_import_cycles_between_training_modules():
    """Each training module imports others only one way (issue 10 broke evaluate <-> robustness)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "covidseg_training"
    edges = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in edges.get(start, ()))

    cycles = sorted(module for module in edges if reaches(module, module))
    assert not cycles, f"import cycles through {cycles}"
