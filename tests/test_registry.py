"""Built-in and third-party methods are found the same way; knobs are typed and checked."""

from dataclasses import dataclass

import pytest

from bench import registry
from bench.errors import UserError
from bench.registry import Method


class ThirdParty(Method):
    name = "third-party-demo"

    @dataclass
    class Knobs:
        rank: int = 4
        scale: float = 1.0
        fast: bool = False
        kinds: list[str] | None = None


class FakeEntryPoint:
    def load(self):
        return ThirdParty


def test_entry_point_methods_are_registered(monkeypatch):
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    try:
        found = registry.available()
        assert found["third-party-demo"] is ThirdParty
        assert registry.get_method("third-party-demo") is ThirdParty
    finally:
        registry._REGISTRY.pop("third-party-demo", None)


def test_builtin_methods_register_themselves():
    names = set(registry.available())
    assert {"svdllm", "basis", "shortgpt"} <= names
    for cls in registry.available().values():
        assert cls.name and cls.paper, f"{cls} needs a name and a paper reference"
        cls()  # defaults must construct


def test_knobs_are_coerced_from_cli_strings():
    m = ThirdParty(rank="8", scale="0.5", fast="true", kinds="q,k")
    assert m.knobs.rank == 8 and m.knobs.scale == 0.5 and m.knobs.fast is True and m.knobs.kinds == ["q", "k"]


def test_bad_knobs_are_user_errors():
    with pytest.raises(UserError, match="has no knob nope"):
        ThirdParty(nope=1)
    with pytest.raises(UserError, match="is not an integer; give e.g."):
        ThirdParty(rank="many")


def test_unknown_method_lists_available():
    with pytest.raises(UserError, match="available: .*svdllm"):
        registry.get_method("no-such-method")
