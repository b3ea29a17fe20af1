"""Rank specs, rounding, break-even and override files."""

import json

import numpy as np
import pytest

from lrcompile.errors import RankSpecError
from lrcompile.io import overrides as override_files
from lrcompile.numerics import ranks
from lrcompile.numerics.ranks import RankSpec


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("64", "fixed", 64),
        ("0.5", "fraction", 0.5),
        ("1.0", "fraction", 1.0),
        ("energy:0.95", "energy", 0.95),
        (32, "fixed", 32),
        (0.25, "fraction", 0.25),
    ],
)
def test_parse(text, kind, value):
    spec = RankSpec.parse(text)
    assert (spec.kind, spec.value) == (kind, value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "expected an integer rank"),
        ("0", "must be >= 1"),
        ("1.5", "in \\(0, 1\\]"),
        ("energy:2", "in \\(0, 1\\]"),
        ("energy:x", "expected"),
        ("autox", "expected"),
        ("skip", "only valid in a per-layer override"),
        ("-3", "must be >= 1"),
    ],
)
def test_parse_rejects(text, message):
    with pytest.raises(RankSpecError, match=message):
        RankSpec.parse(text)


def test_fixed_rounds_up_and_clamps():
    spec = RankSpec.parse("50")
    assert ranks.choose_rank(spec, 512, 512, multiple=16) == 64
    assert ranks.choose_rank(spec, 512, 512, multiple=1) == 50
    assert ranks.choose_rank(spec, 40, 512, multiple=16) == 40


def test_fraction_is_parameter_budget_rounded_down():
    # floor(0.5 * 1024 * 4096 / 5120) = 409 -> 400 at multiple 16: never over the budget.
    spec = RankSpec.parse("0.5")
    assert ranks.choose_rank(spec, 1024, 4096, multiple=1) == 409
    assert ranks.choose_rank(spec, 1024, 4096, multiple=16) == 400
    assert 400 * (1024 + 4096) <= 0.5 * 1024 * 4096


def test_energy_is_smallest_rank_reaching_the_fraction():
    spectrum = np.sqrt(np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0]))  # energies sum to 100
    spec = RankSpec.parse("energy:0.9")
    assert ranks.choose_rank(spec, 6, 6, multiple=1, spectrum=spectrum) == 3
    assert (
        ranks.choose_rank(RankSpec.parse("energy:0.91"), 6, 6, multiple=1, spectrum=spectrum) == 4
    )
    assert ranks.choose_rank(RankSpec.parse("energy:1.0"), 6, 6, multiple=1, spectrum=spectrum) == 6


def test_break_even():
    assert ranks.break_even_rank(1024, 4096) == pytest.approx(819.2)
    assert ranks.saves(819, 1024, 4096)
    assert not ranks.saves(820, 1024, 4096)


def test_overrides_json_and_yaml_first_match_wins(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"*attn*": "energy:0.9", "W2": "skip", "*": 32}))
    overrides = override_files.load_overrides(path)
    default = RankSpec.parse("0.5")
    assert override_files.resolve_spec(default, overrides, ["layer.attn.q"]).kind == "energy"
    assert override_files.resolve_spec(default, overrides, ["W2", "node"]).kind == "skip"
    assert override_files.resolve_spec(default, overrides, ["other"]) == RankSpec("fixed", 32)
    yaml_path = tmp_path / "o.yaml"
    yaml_path.write_text("'*q*': 0.25\nW9: skip\n")
    assert override_files.load_overrides(yaml_path) == (
        override_files.Override("*q*", RankSpec("fraction", 0.25)),
        override_files.Override("W9", RankSpec("skip")),
    )


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("{", ".json", "not valid JSON/YAML"),
        ("[1, 2]", ".json", "expected a non-empty mapping"),
        ('{"W1": "bogus"}', ".json", "pattern 'W1': invalid rank spec 'bogus'"),
        ("a: [1\n", ".yaml", "not valid JSON/YAML"),
        ("{}", ".json", "non-empty mapping"),
    ],
)
def test_bad_override_files(tmp_path, content, suffix, message):
    path = tmp_path / f"o{suffix}"
    path.write_text(content)
    with pytest.raises(RankSpecError, match=message):
        override_files.load_overrides(path)


def test_missing_override_file(tmp_path):
    with pytest.raises(RankSpecError, match="cannot read the override file"):
        override_files.load_overrides(tmp_path / "none.yaml")


def test_a_fraction_below_one_rank_multiple_keeps_the_layer_dense():
    # 0.1 of a 64x96 layer's parameters is rank 3: less than one multiple of 16, never 16.
    assert ranks.choose_rank(RankSpec("fraction", 0.1), 64, 96, multiple=16) == 0
    assert ranks.choose_rank(RankSpec("fraction", 0.1), 64, 96, multiple=1) == 3
