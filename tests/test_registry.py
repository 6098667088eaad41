"""The one registry type: lookups that say what is known, registration order, one entry per name, and every
extension point of the package built on it."""

import pytest

from kcdlib import artefacts, data, distillers, methods, models, profiles
from kcdlib.condense import VALUE_SIGNALS
from kcdlib.errors import UnknownName
from kcdlib.registry import Registry


def colours() -> Registry[int]:
    return Registry("colour", {"red": 1, "green": 2, "blue": 3})


def test_a_registry_reads_like_a_mapping_in_registration_order():
    reg = colours()
    assert reg.names() == ("red", "green", "blue") == tuple(reg)
    assert list(reg.items()) == [("red", 1), ("green", 2), ("blue", 3)]
    assert list(reg.values()) == [1, 2, 3] and len(reg) == 3
    assert "green" in reg and "grey" not in reg and ["red"] not in reg
    assert reg["blue"] == 3 and reg.get("grey") is None and reg.get("grey", 0) == 0


def test_an_unknown_name_lists_the_known_ones_and_suggests_a_near_miss():
    reg = colours()
    with pytest.raises(UnknownName) as error:
        reg["gren"]
    assert str(error.value) == "unknown colour 'gren' (did you mean 'green'?); known colours: blue, green, red"
    with pytest.raises(UnknownName) as error:
        reg.check("purple")
    assert str(error.value) == "unknown colour 'purple'; known colours: blue, green, red"
    with pytest.raises(UnknownName, match="unknown colour '7'"):
        reg.check(7)
    assert reg.check("red") == "red"


def test_register_as_a_call_or_a_decorator_and_never_twice():
    reg: Registry[object] = Registry("shape")

    @reg.register("square")
    def square():
        pass

    assert reg.register("circle", "round") == "round"
    assert reg.names() == ("square", "circle") and reg["square"] is square
    reg.register("circle", "round")  # the same entry again: nothing changes
    with pytest.raises(ValueError, match="two shapes are called 'circle'"):
        reg.register("circle", "oval")
    assert reg["circle"] == "round"


def test_override_is_undone_at_the_end_of_the_block():
    reg = colours()
    with reg.override("green", 20), reg.override("grey", 4):
        assert reg["green"] == 20 and reg.names() == ("red", "green", "blue", "grey")
    assert dict(reg) == {"red": 1, "green": 2, "blue": 3}


@pytest.mark.parametrize(
    "registry, typo, meant",
    [
        (models.ARCHS, "resnet8x5", "resnet8x4"),
        (data.DATASETS, "digit", "digits"),
        (distillers.DISTILLERS, "unix-kd", "unix_kd"),
        (methods.METHODS, "kcdd", "kcd"),
        (VALUE_SIGNALS, "entropie", "entropy"),
        (profiles.PROFILES, "smok", "smoke"),
        (artefacts.ARTEFACTS, "tabel5", "table5"),
    ],
)
def test_every_extension_point_is_a_registry(registry, typo, meant):
    assert isinstance(registry, Registry)
    with pytest.raises(UnknownName, match=f"unknown {registry.kind} '{typo}' \\(did you mean '{meant}'\\?\\)"):
        registry[typo]


def test_the_public_lookups_refuse_unknown_names_through_the_registry():
    for lookup, typo in ((models.create, "resnet9"), (data.spec, "cifar10"), (profiles.get_profile, "tinny"),
                         (artefacts.get, "figure6")):  # fmt: skip
        with pytest.raises(UnknownName, match="did you mean"):
            lookup(typo)
    with pytest.raises(UnknownName, match="known methods: kcd, kd, unix"):
        methods.canonical_options("kdd", None, 6, 64)
