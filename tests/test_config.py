from dataclasses import dataclass, field

import pytest

from torchsfm import config


@dataclass
class Inner:
    a: int = 1
    b: tuple[float, ...] = (0.5, 1.0)


@dataclass
class Root:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_roundtrip_and_merge(tmp_path):
    r = Root(name="y", inner=Inner(a=3, b=(2.0,)))
    p = tmp_path / "c.json"
    p.write_text(config.dumps(r))
    assert config.load(Root, p) == r
    m = config.merge(Root(), {"inner": {"a": 7}})
    assert m.inner.a == 7 and m.inner.b == (0.5, 1.0) and m.name == "x"


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown option.*typo"):
        config.from_dict(Root, {"typo": 1})
    with pytest.raises(ValueError, match="Inner"):
        config.merge(Root(), {"inner": {"c": 1}})
