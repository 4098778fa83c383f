import re

import pytest

from src.config import Config, load_config, parse_override
from src.errors import UserError


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("run:\n  name: abc\nssl:\n  epochs: 3\n  lr: 1\n")
    cfg = load_config(p)
    assert cfg.run.name == "abc" and cfg.ssl.epochs == 3
    assert isinstance(cfg.ssl.lr, float) and cfg.ssl.lr == 1.0  # int accepted for a float field
    assert cfg.ssl.batch_size == Config().ssl.batch_size  # untouched default


def test_overrides_are_typed():
    cfg = load_config(None, ["ssl.epochs=5", "run.device=cpu", "heads.heads=[knn,logreg]",
                             "ssl.objectives={byol: 1.0, rotation: 0.5}", "ssl.lr=1e-3"])
    assert cfg.ssl.epochs == 5 and cfg.run.device == "cpu"
    assert cfg.heads.heads == ["knn", "logreg"]
    assert cfg.ssl.objectives == {"byol": 1.0, "rotation": 0.5}
    assert cfg.ssl.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, message", [
    ("ssl.epochs=ten", "ssl.epochs: expected int"),
    ("ssl.nope=1", "unknown key 'nope'"),
    ("nosection.x=1", "unknown section 'nosection'"),
    ("run.compile=3", "run.compile: expected bool"),
    ("heads.heads=knn", "expected a list"),
    ("pseudo.threshold=1.5", "pseudo.threshold: must be in [0, 1]"),
    ("ssl.embed_power=0", "ssl.embed_power: must be in (0, 1] (1: off), got 0.0"),
    ("epochs", "expected section.key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [override])


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_section_hash_tracks_only_named_sections():
    a, b = Config(), Config()
    b.heads.knn_k = 99
    assert a.section_hash("ssl") == b.section_hash("ssl")
    assert a.section_hash("heads") != b.section_hash("heads")
    assert parse_override("a.b= 3") == ("a", "b", 3)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
