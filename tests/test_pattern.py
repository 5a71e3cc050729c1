import json

import pytest

from indexcache import Pattern, PatternError
from indexcache.pattern import parse_spec


@pytest.mark.parametrize(
    "n, freq, conv, offset, expected",
    [
        # official patches: Full iff max(l-1, 0) % freq == 0
        (12, 4, "official", None, "FFSSSFSSSFSS"),
        (12, 2, "official", None, "FFSFSFSFSFSF"),
        (12, 1, "official", None, "FFFFFFFFFFFF"),
        (8, 3, "official", None, "FFSSFSSF"),
        # transformers: Full iff max(i-offset+1, 0) % freq == 0, default offset 2
        (12, 2, "transformers", 2, "FFSFSFSFSFSF"),
        (12, 2, "transformers", None, "FFSFSFSFSFSF"),
        (12, 4, "transformers", 2, "FFSSSFSSSFSS"),
        (12, 2, "transformers", 3, "FFFSFSFSFSFS"),
        (12, 4, "transformers", 1, "FSSSFSSSFSSS"),
        (12, 4, "transformers", 5, "FFFFFSSSFSSS"),
        # GLM-5.2 ships offset 3
        (12, 4, "glm52", None, "FFFSSSFSSSFS"),
        (12, 2, "glm52", None, "FFFSFSFSFSFS"),
        # the paper's text
        (12, 4, "paper", None, "FSSSFSSSFSSS"),
        (12, 2, "paper", None, "FSFSFSFSFSFS"),
    ],
)
def test_uniform_conventions(n, freq, conv, offset, expected):
    p = Pattern.uniform(n, freq, conv, offset)
    assert str(p) == expected
    assert conv in p.origin or "offset" in p.origin


def test_glm52_real_depth_matches_shipped_schedule():
    # GLM-5.2: 78 layers, Full at 0,1,2,6,10,...,74 -> 21 Full layers
    p = Pattern.uniform(78, 4, "glm52")
    assert p.full_layers == [0, 1, 2] + list(range(6, 78, 4))
    assert p.num_full == 21
    # default offset 2: 61 layers -> 31 (freq 2) / 16 (freq 4); 78 layers -> 40 / 21
    assert Pattern.uniform(61, 2).num_full == 31 and Pattern.uniform(61, 4).num_full == 16
    assert Pattern.uniform(78, 2).num_full == 40 and Pattern.uniform(78, 4).num_full == 21


def test_uniform_that_shares_layer_zero_is_refused():
    with pytest.raises(PatternError, match="layer 0 Shared"):
        Pattern.uniform(12, 4, "transformers", 0)


def test_parse_and_accessors():
    p = Pattern.parse("fssfsf")
    assert str(p) == "FSSFSF"
    assert p.indexer_types == ["full", "shared", "shared", "full", "shared", "full"]
    assert p.full_layers == [0, 3, 5] and p.shared_layers == [1, 2, 4]
    assert p.sources == [0, 0, 0, 3, 3, 5]
    assert [str(b) for b in p.blocks] == ["[0-2]", "[3-4]", "[5]"]
    assert p.num_full == 3 and p.retention == 0.5
    assert Pattern.parse(p.indexer_types) == p
    assert Pattern.parse(json.dumps(p.indexer_types)) == p
    assert p.with_layer(5, "S") == "FSSFSS"


@pytest.mark.parametrize(
    "value, message",
    [
        ("FSXF", "bad character 'X' at layer 2"),
        ("SFFF", "layer 0 is Shared"),
        ("", "empty"),
        (["full", "sometimes"], "bad indexer type 'sometimes' at layer 1"),
        ("[full", "JSON"),
    ],
)
def test_parse_errors_are_one_line(value, message):
    with pytest.raises(PatternError, match=message) as e:
        Pattern.parse(value)
    assert "\n" not in str(e.value)


def test_validate():
    p = Pattern.parse("FSSFSS")
    p.validate(num_layers=6, stage_starts=[0, 3], indexer_layers=[0, 3, 4])
    with pytest.raises(PatternError, match="wrong length: pattern has 6 layers but the model has 7"):
        p.validate(num_layers=7)
    with pytest.raises(PatternError, match="layer 2 starts a pipeline stage but is Shared"):
        p.validate(stage_starts=[0, 2])
    with pytest.raises(PatternError, match="layers 3 are Full but the checkpoint has no indexer weights"):
        p.validate(indexer_layers=[0, 1, 2])


def test_from_config_precedence():
    n = 8
    both = {"num_hidden_layers": n, "indexer_types": ["full"] + ["shared"] * 7, "index_topk_pattern": "FFFFFFFF",
            "index_topk_freq": 2}
    assert str(Pattern.from_config(both)[0]) == "FSSSSSSS"
    pat = {"num_hidden_layers": n, "index_topk_pattern": "FSFSFSFS", "index_topk_freq": 4}
    assert str(Pattern.from_config(pat)[0]) == "FSFSFSFS"
    freq = {"num_hidden_layers": n, "index_topk_freq": 4}
    assert str(Pattern.from_config(freq)[0]) == "FFSSSFSS"  # default offset 2
    freq_off = {"num_hidden_layers": n, "index_topk_freq": 4, "index_skip_topk_offset": 3}
    assert str(Pattern.from_config(freq_off)[0]) == "FFFSSSFS"
    assert str(Pattern.from_config({"num_hidden_layers": n})[0]) == "F" * n


def test_describe_and_exports():
    p = Pattern.uniform(12, 4)
    d = p.describe()
    assert d["num_full"] == 4 and d["num_shared"] == 8 and d["blocks"] == ["[0]", "[1-4]", "[5-8]", "[9-11]"]
    assert "official freq=4" in p.match_uniform() and "transformers freq=4 offset=0" not in p.match_uniform()
    assert Pattern.parse("FSFFSSFS").match_uniform() == []
    assert p.config_patch() == {"indexer_types": p.indexer_types, "index_topk_pattern": "FFSSSFSSSFSS"}
    assert json.loads(p.sglang_override()) == {"index_topk_pattern": "FFSSSFSSSFSS"}
    assert json.loads(p.vllm_override()) == {"use_index_cache": True, "index_topk_pattern": "FFSSSFSSSFSS"}
    flags = p.engine_flags()
    assert flags["sglang"].startswith("--json-model-override-args '") and flags["vllm"].startswith("--hf-overrides '")
    assert "retention 0.333" in p.describe_text()


def test_parse_spec():
    assert str(parse_spec("uniform:4", 12)) == "FFSSSFSSSFSS"
    assert str(parse_spec("uniform:4:glm52", 12)) == "FFFSSSFSSSFS"
    assert str(parse_spec("uniform:2:transformers:3", 12)) == "FFFSFSFSFSFS"
    assert str(parse_spec("all-full", 3)) == "FFF"
    with pytest.raises(PatternError, match="wrong length"):
        parse_spec("FSF", 4)
    with pytest.raises(PatternError, match="bad uniform spec"):
        parse_spec("uniform:x", 4)
    with pytest.raises(PatternError, match="unknown convention"):
        parse_spec("uniform:4:sglang", 4)
