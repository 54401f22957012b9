"""Masks: selection (exact top-k with deterministic ties), Mask/MaskSet validation, algebra, files."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmask import Mask, MaskSet, num_selected, select


def oracle_topk(scores: torch.Tensor, k: int) -> list[int]:
    """Brute force: sort flat positions by (-score, position), keep the first k, sorted."""
    flat = scores.detach().reshape(-1).float().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return sorted(order[:k])


def floor_k(density: float, numel: int) -> int:
    """floor(density * numel) computed exactly with fractions (no float artifacts)."""
    from fractions import Fraction

    return math.floor(Fraction(str(density)) * numel)


# ----------------------------------------------------------------------------------------------
# num_selected
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "density,numel,expected",
    [(0.0, 100, 0), (0.1, 100, 10), (1.0, 100, 100), (0.29, 100, 29), (0.57, 100, 57), (0.1, 7, 0),
     (0.15, 7, 1), (0.1, 3072 * 768, 235929), (1.0, 0, 0), (0.5, 0, 0)],
    ids=lambda v: str(v),
)
def test_num_selected(density, numel, expected):
    assert num_selected(density, numel) == expected, f"num_selected({density}, {numel})"


@pytest.mark.parametrize("density", [-0.1, 1.1, float("nan")], ids=["negative", "above_one", "nan"])
def test_num_selected_rejects_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        num_selected(density, 10)


def test_num_selected_float_artifacts_match_exact_floor():
    for numel in (100, 1000, 7, 333):
        for pct in range(0, 101):
            d = pct / 100
            assert num_selected(d, numel) == floor_k(d, numel), f"density {d}, numel {numel}"


# ----------------------------------------------------------------------------------------------
# select
# ----------------------------------------------------------------------------------------------
SHAPES = {"one": (1,), "seven": (7,), "hundred": (100,), "3x5x7": (3, 5, 7), "33x65": (33, 65)}


@pytest.mark.parametrize("density", [0.0, 0.1, 0.29, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_select_matches_oracle(shape, density):
    s = torch.randn(shape).abs() + 0.01
    ms = select({"w": s}, density)
    m = ms["w"]
    k = floor_k(density, s.numel())
    assert m.k == k, f"k={m.k}, expected floor({density}*{s.numel()})={k}"
    assert m.indices.tolist() == oracle_topk(s, k), "selected positions differ from the brute-force top-k"
    assert m.shape == torch.Size(shape)
    assert m.indices.dtype == torch.int32 and m.indices.device.type == "cpu"


def test_select_029_on_100_gives_29():
    s = torch.rand(100) + 0.5
    m = select({"w": s}, 0.29)["w"]
    assert m.k == 29, f"0.29 * 100 must select 29 entries (float artifact 28.999...), got {m.k}"
    assert m.indices.tolist() == oracle_topk(s, 29)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.77], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("levels", [2, 3, 5], ids=lambda n: f"{n}levels")
def test_select_ties_at_threshold_go_to_lowest_positions(levels, density):
    # Few distinct values -> many ties at the threshold.
    s = torch.randint(0, levels, (11, 13)).float() + 0.25
    k = floor_k(density, s.numel())
    first = select({"w": s}, density)["w"]
    assert first.indices.tolist() == oracle_topk(s, k), "ties at the threshold must go to the lowest flat positions"
    for _ in range(3):
        again = select({"w": s.clone()}, density)["w"]
        assert torch.equal(again.indices, first.indices), "selection with ties is not deterministic across calls"


def test_select_all_equal_scores_takes_first_k():
    s = torch.full((5, 7), 3.5)
    m = select({"w": s}, 0.2)["w"]
    assert m.indices.tolist() == list(range(7))


def test_select_indices_sorted_unique_int32_cpu():
    s = torch.randn(37, 41)
    m = select({"w": s}, 0.23)["w"]
    idx = m.indices
    assert idx.dtype == torch.int32, idx.dtype
    assert idx.device.type == "cpu"
    assert idx.dim() == 1
    assert bool((idx[1:] > idx[:-1]).all()), "indices must be strictly increasing"


def test_select_negative_scores_picks_largest_not_magnitude():
    s = -torch.rand(50) - 0.1
    m = select({"w": s}, 0.1)["w"]
    assert m.indices.tolist() == oracle_topk(s, 5)


def test_select_per_name_density_mapping():
    scores = {"a": torch.rand(10, 10) + 0.1, "b": torch.rand(7, 9) + 0.1, "c": torch.rand(100) + 0.1}
    dens = {"a": 0.1, "b": 0.5, "c": 0.29}
    ms = select(scores, dens)
    assert list(ms) == ["a", "b", "c"], "MaskSet should keep the scores' order"
    for n, s in scores.items():
        k = floor_k(dens[n], s.numel())
        assert ms[n].k == k, f"{n}: k={ms[n].k}, expected {k}"
        assert ms[n].indices.tolist() == oracle_topk(s, k), n


def test_select_per_name_density_missing_name_raises():
    with pytest.raises(ValueError, match=r"density.*\['b'\].*per name of scores"):
        select({"a": torch.rand(10), "b": torch.rand(10)}, {"a": 0.5})


@pytest.mark.parametrize("bad", ["0.1", None, True, [0.1], torch.rand(3), object()],
                         ids=["str", "none", "bool", "list", "tensor3", "object"])
def test_select_non_numeric_density_raises_naming_argument(bad):
    scores = {"a": torch.rand(10), "visual.b": torch.rand(10)}
    with pytest.raises(TypeError, match=r"density\['visual\.b'\].*number in \[0, 1\]"):
        select(scores, {"a": 0.5, "visual.b": bad})
    with pytest.raises(TypeError, match=r"^density: expected a number in \[0, 1\]"):
        select(scores, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")], ids=["negative", "above_one", "nan", "inf"])
def test_select_density_mapping_out_of_range_names_entry(bad):
    with pytest.raises(ValueError, match=r"density\['visual\.b'\].*\[0, 1\]"):
        select({"a": torch.rand(10), "visual.b": torch.rand(10)}, {"a": 0.5, "visual.b": bad})


def test_select_density_accepts_numeric_types():
    s = torch.rand(10) + 0.1
    for d in (0.3, 1, torch.tensor(0.3), torch.tensor([0.3])):
        assert select({"w": s}, d)["w"].k == num_selected(float(d), 10), repr(d)
        assert select({"w": s}, {"w": d})["w"].k == num_selected(float(d), 10), repr(d)


def test_select_rejects_non_string_names_and_non_mapping_scores():
    with pytest.raises(TypeError, match=r"scores: parameter names must be strings.*3"):
        select({3: torch.rand(10)}, 0.5)
    with pytest.raises(TypeError, match=r"scores: expected a mapping"):
        select([torch.rand(10)], 0.5)
    with pytest.raises(TypeError, match=r"scores\['w'\].*floating tensor.*list"):
        select({"w": [0.5, 0.2]}, 0.5)


@pytest.mark.parametrize("density,numel,exc,pattern", [
    ("0.5", 10, TypeError, r"density.*str"), (None, 10, TypeError, r"density"), (0.5, -1, ValueError, r"numel.*-1"),
    (0.5, 2.5, TypeError, r"numel.*float"),
], ids=["str_density", "none_density", "negative_numel", "float_numel"])
def test_num_selected_rejects_bad_arguments(density, numel, exc, pattern):
    with pytest.raises(exc, match=pattern):
        num_selected(density, numel)


def test_select_nan_raises_naming_tensor():
    s = torch.rand(4, 5)
    s[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"visual\.weird\.weight.*NaN"):
        select({"ok": torch.rand(3), "visual.weird.weight": s}, 0.5)


def test_select_plus_inf_allowed_and_selected_first():
    s = torch.rand(20) + 0.1
    s[[3, 17]] = float("inf")
    m = select({"w": s}, 0.1)["w"]
    assert m.indices.tolist() == [3, 17], m.indices.tolist()
    m3 = select({"w": s}, 0.15)["w"]
    assert m3.indices.tolist() == oracle_topk(s, 3)


def test_select_empty_tensor():
    ms = select({"e": torch.empty(0, 4)}, 0.5)
    assert ms["e"].k == 0 and ms["e"].shape == torch.Size([0, 4])
    assert ms["e"].indices.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_select_other_float_dtypes(dtype):
    s = (torch.rand(9, 11) + 0.1).to(dtype)
    m = select({"w": s}, 0.2)["w"]
    assert m.indices.tolist() == oracle_topk(s.float(), floor_k(0.2, 99))


def test_select_rejects_integer_scores():
    with pytest.raises(TypeError, match="scores\\['w'\\]"):
        select({"w": torch.arange(10)}, 0.5)


def test_select_does_not_modify_scores():
    s = torch.randn(13, 3)
    before = s.clone()
    select({"w": s}, 0.4)
    assert torch.equal(s, before)


# ----------------------------------------------------------------------------------------------
# Mask validation
# ----------------------------------------------------------------------------------------------
def test_mask_converts_to_int32_cpu_contiguous():
    idx = torch.tensor([0, 3, 8], dtype=torch.int64)
    m = Mask(idx, (3, 3))
    assert m.indices.dtype == torch.int32 and m.indices.is_contiguous()
    assert m.shape == torch.Size([3, 3]) and isinstance(m.shape, torch.Size)
    assert m.k == 3 and m.numel == 9 and m.density == pytest.approx(3 / 9)


@pytest.mark.parametrize(
    "idx,exc,pattern",
    [
        (torch.tensor([0, 5, 15], dtype=torch.int32), IndexError, r"out of range.*15"),
        (torch.tensor([-1, 2], dtype=torch.int32), IndexError, r"out of range.*-1"),
        (torch.tensor([3, 1, 7], dtype=torch.int32), ValueError, r"sorted and unique.*idx\[0\]=3"),
        (torch.tensor([1, 4, 4, 9], dtype=torch.int32), ValueError, r"sorted and unique.*idx\[1\]=4"),
        (torch.tensor([1.0, 2.0]), TypeError, r"integer dtype.*float32"),
        (torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), ValueError, r"1-D.*\(2, 2\)"),
        ([1, 2, 3], TypeError, r"expected a tensor"),
    ],
    ids=["too_large", "negative", "unsorted", "duplicate", "float_dtype", "two_d", "list"],
)
def test_mask_validation_errors(idx, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        Mask(idx, (3, 5))
    assert "Mask.indices" in str(info.value), f"error should name Mask.indices: {info.value}"


@pytest.mark.parametrize(
    "shape,exc,pattern",
    [
        ((-3,), ValueError, r"dimension 0 is -3.*non-negative"),
        ((4, -1), ValueError, r"dimension 1 is -1.*non-negative"),
        ((2.5,), TypeError, r"dimension 0 is 2\.5 \(float\).*non-negative integer"),
        ((3.0, 2), TypeError, r"dimension 0 is 3\.0 \(float\)"),
        (("3",), TypeError, r"dimension 0 is '3' \(str\)"),
        ((True, 2), TypeError, r"dimension 0 is a bool"),
        ((None,), TypeError, r"dimension 0 is None"),
        (5, TypeError, r"expected a shape.*got int"),
        ("35", TypeError, r"expected a shape.*got str"),
        (torch.tensor(3), TypeError, r"expected a shape.*got Tensor"),
        ((2**40, 2**40), ValueError, r"more than 2\*\*63 - 1 entries"),
    ],
    ids=["negative", "negative_second", "float", "float_integral", "str_dim", "bool", "none", "int", "str", "tensor0d",
         "overflow"],
)
def test_mask_shape_validation_errors(shape, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        Mask(torch.empty(0, dtype=torch.int32), shape)
    assert str(info.value).startswith("Mask.shape: "), f"error should name Mask.shape: {info.value}"


def test_mask_shape_accepts_index_like_dims():
    m = Mask(torch.tensor([0, 5], dtype=torch.int32), (torch.tensor(2), 3))
    assert m.shape == torch.Size([2, 3]) and isinstance(m.shape, torch.Size)
    assert Mask(torch.tensor([1]), [2]).shape == torch.Size([2])
    assert Mask(torch.empty(0, dtype=torch.int32), ()).numel == 1


def test_mask_empty_indices_ok():
    m = Mask(torch.empty(0, dtype=torch.int64), (4,))
    assert m.k == 0 and m.density == 0.0 and m.indices.dtype == torch.int32


def test_mask_zero_numel_density():
    m = Mask(torch.empty(0, dtype=torch.int32), (0, 3))
    assert m.density == 0.0 and m.numel == 0


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (33, 65)], ids=lambda s: "x".join(map(str, s)))
def test_mask_bool_round_trip(shape):
    dense = torch.rand(shape) < 0.3
    m = Mask.from_bool(dense)
    assert m.indices.tolist() == dense.reshape(-1).nonzero().squeeze(1).tolist()
    back = m.to_bool()
    assert back.dtype == torch.bool and back.shape == dense.shape
    assert torch.equal(back, dense), "from_bool/to_bool round trip lost entries"
    assert Mask.from_bool(back) == m


def test_mask_from_bool_rejects_non_bool():
    with pytest.raises(TypeError, match="bool"):
        Mask.from_bool(torch.rand(3, 3))


def test_mask_equality_and_repr():
    a = Mask(torch.tensor([1, 2], dtype=torch.int32), (5,))
    b = Mask(torch.tensor([1, 2], dtype=torch.int64), (5,))
    c = Mask(torch.tensor([1, 2], dtype=torch.int32), (6,))
    assert a == b and a != c
    assert "k=2" in repr(a) and "(5,)" in repr(a)


# ----------------------------------------------------------------------------------------------
# Mask algebra vs Python sets
# ----------------------------------------------------------------------------------------------
def _rand_mask(numel: int, p: float, shape=None) -> Mask:
    dense = torch.rand(numel) < p
    return Mask.from_bool(dense.reshape(shape or (numel,)))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0], ids=lambda p: f"p{p}")
def test_mask_algebra_vs_python_sets(p):
    shape = (7, 11)
    a, b = _rand_mask(77, p, shape), _rand_mask(77, 0.4, shape)
    sa, sb = set(a.indices.tolist()), set(b.indices.tolist())
    for got, want, op in [
        (a.union(b), sa | sb, "union"), (a | b, sa | sb, "|"),
        (a.intersection(b), sa & sb, "intersection"), (a & b, sa & sb, "&"),
        (a.difference(b), sa - sb, "difference"), (a - b, sa - sb, "-"),
        (b - a, sb - sa, "- reversed"),
    ]:
        assert got.indices.tolist() == sorted(want), op
        assert got.shape == torch.Size(shape) and got.indices.dtype == torch.int32, op


@pytest.mark.parametrize("op", ["union", "intersection", "difference"])
def test_mask_algebra_shape_mismatch(op):
    a, b = _rand_mask(12, 0.5, (3, 4)), _rand_mask(12, 0.5, (4, 3))
    with pytest.raises(ValueError, match=rf"{op}.*\(3, 4\).*\(4, 3\)"):
        getattr(a, op)(b)


def test_mask_algebra_type_error():
    with pytest.raises(TypeError, match="Mask"):
        _rand_mask(5, 0.5) | torch.tensor([1])


# ----------------------------------------------------------------------------------------------
# MaskSet
# ----------------------------------------------------------------------------------------------
def _rand_maskset(shapes: dict, p: float = 0.3) -> MaskSet:
    return MaskSet({n: Mask.from_bool(torch.rand(s) < p) for n, s in shapes.items()})


def test_maskset_rejects_non_mask():
    with pytest.raises(TypeError, match=r"masks\['x'\]"):
        MaskSet({"x": torch.tensor([1, 2])})


def test_maskset_rejects_non_string_names_and_non_mapping():
    m = Mask(torch.tensor([1]), (3,))
    with pytest.raises(TypeError, match=r"masks: parameter names must be strings.*\(0,\).*tuple"):
        MaskSet({(0,): m})
    with pytest.raises(TypeError, match=r"masks: parameter names must be strings.*int"):
        MaskSet({7: m})
    with pytest.raises(TypeError, match=r"masks: expected a mapping"):
        MaskSet([m])


def test_maskset_from_indices_and_from_bool_name_the_parameter():
    with pytest.raises(ValueError, match=r"shapes\['visual\.w'\]: dimension 0 is -4"):
        MaskSet.from_indices({"visual.w": torch.tensor([0])}, {"visual.w": (-4,)})
    with pytest.raises(TypeError, match=r"shapes\['visual\.w'\]: dimension 1 is 2\.5"):
        MaskSet.from_indices({"visual.w": torch.tensor([0])}, {"visual.w": (3, 2.5)})
    with pytest.raises(IndexError, match=r"indices\['visual\.w'\]: index out of range"):
        MaskSet.from_indices({"visual.w": torch.tensor([0, 9])}, {"visual.w": (3,)})
    with pytest.raises(TypeError, match=r"indices: parameter names must be strings"):
        MaskSet.from_indices({1: torch.tensor([0])}, {1: (3,)})
    with pytest.raises(TypeError, match=r"dense\['visual\.w'\]: expected a bool tensor, got torch\.float32"):
        MaskSet.from_bool({"ok": torch.ones(2, dtype=torch.bool), "visual.w": torch.rand(3)})
    with pytest.raises(TypeError, match=r"dense: parameter names must be strings"):
        MaskSet.from_bool({2: torch.ones(2, dtype=torch.bool)})


def test_maskset_from_indices_and_from_bool():
    ms = MaskSet.from_indices({"a": torch.tensor([0, 4]), "b": torch.tensor([2])}, {"a": (2, 3), "b": (5,)})
    assert ms["a"].indices.tolist() == [0, 4] and ms["a"].shape == torch.Size([2, 3])
    with pytest.raises(ValueError, match=r"\['c'\]"):
        MaskSet.from_indices({"a": torch.tensor([0])}, {"a": (2,), "c": (3,)})
    dense = {"x": torch.rand(3, 5) < 0.5, "y": torch.rand(7) < 0.5}
    fb = MaskSet.from_bool(dense)
    for n, d in dense.items():
        assert torch.equal(fb[n].to_bool(), d)


def test_maskset_stats_summary_k_density():
    ms = MaskSet({
        "layer.a": Mask(torch.arange(0, 10, dtype=torch.int32), (10, 10)),
        "b": Mask(torch.tensor([1, 3, 5], dtype=torch.int32), (7,)),
    })
    assert ms.k == 13 and ms.numel == 107
    assert ms.density == pytest.approx(13 / 107)
    assert len(ms) == 2 and list(ms) == ["layer.a", "b"]
    rows = ms.stats()
    assert rows == [
        {"name": "layer.a", "shape": (10, 10), "numel": 100, "k": 10, "density": pytest.approx(0.1)},
        {"name": "b", "shape": (7,), "numel": 7, "k": 3, "density": pytest.approx(3 / 7)},
    ]
    text = ms.summary()
    lines = text.splitlines()
    assert len(lines) == 4, text
    assert "layer.a" in lines[1] and "10x10" in lines[1] and "0.1000" in lines[1]
    assert lines[2].split()[0] == "b" and "0.4286" in lines[2]
    assert lines[3].split()[0] == "total" and "107" in lines[3] and "13" in lines[3]
    assert "k=13" in repr(ms)


def test_maskset_empty_stats():
    ms = MaskSet()
    assert ms.k == 0 and ms.numel == 0 and ms.density == 0.0 and ms.stats() == []
    assert "total" in ms.summary()


def _set_oracle(ms: MaskSet) -> dict:
    return {n: set(m.indices.tolist()) for n, m in ms.items()}


def test_maskset_algebra_vs_python_sets():
    a = _rand_maskset({"shared1": (5, 7), "shared2": (11,), "only_a": (3, 3)}, 0.4)
    b = _rand_maskset({"shared2": (11,), "shared1": (5, 7), "only_b": (13,)}, 0.5)
    oa, ob = _set_oracle(a), _set_oracle(b)
    union = {**oa, **{n: s for n, s in ob.items() if n not in oa}}
    for n in oa.keys() & ob.keys():
        union[n] = oa[n] | ob[n]
    inter = {n: oa[n] & ob[n] for n in oa if n in ob}
    diff = {n: oa[n] - ob.get(n, set()) for n in oa}
    for got, want, op in [
        (a.union(b), union, "union"), (a | b, union, "|"),
        (a.intersection(b), inter, "intersection"), (a & b, inter, "&"),
        (a.difference(b), diff, "difference"), (a - b, diff, "-"),
    ]:
        assert set(got) == set(want), f"{op}: names {sorted(got)} != {sorted(want)}"
        for n in want:
            assert got[n].indices.tolist() == sorted(want[n]), f"{op}: {n}"
    assert (a | b)["only_b"].shape == torch.Size([13])
    assert list(a | b) == ["shared1", "shared2", "only_a", "only_b"], "union order: self's names then other's new ones"
    assert "only_b" not in (a - b) and "only_a" in (a - b)


@pytest.mark.parametrize("op", ["union", "intersection", "difference"])
def test_maskset_algebra_shape_mismatch_names_param(op):
    a = _rand_maskset({"visual.w": (4, 6), "x": (3,)})
    b = _rand_maskset({"visual.w": (6, 4)})
    with pytest.raises(ValueError, match=rf"{op}.*'visual\.w'.*\(4, 6\).*\(6, 4\)"):
        getattr(a, op)(b)


def test_maskset_algebra_type_error():
    with pytest.raises(TypeError, match="MaskSet"):
        _rand_maskset({"a": (3,)}) | {"a": Mask(torch.tensor([0]), (3,))}


def test_maskset_equality():
    a = _rand_maskset({"a": (5, 3), "b": (9,)})
    b = MaskSet({n: Mask(m.indices.clone(), m.shape) for n, m in a.items()})
    assert a == b
    c = MaskSet({**dict(b), "a": Mask(torch.tensor([0], dtype=torch.int32), (5, 3))})
    assert a != c


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def test_maskset_save_load_round_trip(tmp_path):
    ms = select({
        "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(33, 17),
        "transformer.resblocks.1.mlp.c_fc.weight": torch.randn(3, 5, 7),
        "tiny": torch.randn(1),
        "empty_sel": torch.randn(7),
    }, {"visual.transformer.resblocks.0.mlp.c_fc.weight": 0.1, "transformer.resblocks.1.mlp.c_fc.weight": 0.29,
        "tiny": 1.0, "empty_sel": 0.0})
    path = tmp_path / "masks.safetensors"
    ms.save(path, metadata={"task": "cars", "seed": 3})
    back = MaskSet.load(path)
    assert back == ms, "loaded MaskSet differs from the saved one"
    assert list(back) == list(ms), "the file should keep the MaskSet's order"
    for n in ms:
        assert back[n].indices.dtype == torch.int32 and back[n].shape == ms[n].shape, n
    meta = MaskSet.metadata(path)
    assert meta["task"] == "cars" and meta["seed"] == "3", f"user metadata lost: {meta}"
    assert meta["format"] == "fastmask.maskset/1"
    # str path too
    back2 = MaskSet.load(str(path))
    assert back2 == ms


def test_maskset_load_non_fastmask_file_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(3, 4)}, str(path))
    with pytest.raises(ValueError, match="not a fastmask MaskSet file"):
        MaskSet.load(path)
    path2 = tmp_path / "other.safetensors"
    save_file({"w": torch.tensor([1, 2], dtype=torch.int32)}, str(path2), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not a fastmask MaskSet file.*'pt'"):
        MaskSet.load(path2)


def test_maskset_load_corrupt_indices_raises(tmp_path):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    meta = {"format": "fastmask.maskset/1", "shapes": json.dumps({"w": [2, 3]})}
    save_file({"w": torch.tensor([4, 1], dtype=torch.int32)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="sorted and unique"):
        MaskSet.load(path)
    save_file({"w": torch.tensor([1, 4], dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(TypeError, match=r"'w'.*int64"):
        MaskSet.load(path)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self, a=5, b=7, c=3):
        super().__init__()
        self.fc1 = nn.Linear(a, b)
        self.fc2 = nn.Linear(b, c)


def test_validate_ok_and_for_model():
    model = TwoLayer()
    ms = select({"fc1.weight": torch.randn(7, 5), "fc2.bias": torch.randn(3)}, 0.4)
    ms.validate(model)
    mapping = ms.for_model(model)
    assert set(mapping) == {model.fc1.weight, model.fc2.bias}
    for n, p in model.named_parameters():
        if n in ms:
            assert isinstance(mapping[p], torch.Tensor) and mapping[p].dtype == torch.int32
            assert torch.equal(mapping[p], ms[n].indices), n
            assert mapping[p].device == p.device


def test_validate_unknown_name():
    ms = select({"encoder.fc1.weight": torch.randn(7, 5)}, 0.4)
    with pytest.raises(KeyError, match=r"encoder\.fc1\.weight.*another model.*fc1\.weight"):
        ms.validate(TwoLayer())
    with pytest.raises(KeyError, match=r"encoder\.fc1\.weight"):
        ms.for_model(TwoLayer())


def test_validate_wrong_shape_names_param():
    ms = select({"fc1.weight": torch.randn(7, 5)}, 0.4)
    other = TwoLayer(a=6)
    with pytest.raises(ValueError, match=r"'fc1\.weight'.*\(7, 5\).*\(7, 6\)"):
        ms.validate(other)
    with pytest.raises(ValueError, match=r"fc1\.weight"):
        ms.for_model(other)


@pytest.mark.parametrize("density", [-0.5, 1.5, float("nan")], ids=["negative", "above_one", "nan"])
def test_select_rejects_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        select({"w": torch.rand(10)}, density)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64], ids=str)
def test_mask_accepts_integer_dtypes(dtype):
    m = Mask(torch.tensor([2, 9, 200], dtype=dtype), (15, 15))
    assert m.indices.dtype == torch.int32 and m.indices.tolist() == [2, 9, 200]


def test_mask_is_frozen():
    m = Mask(torch.tensor([1], dtype=torch.int32), (3,))
    with pytest.raises(AttributeError):
        m.indices = torch.tensor([2], dtype=torch.int32)


def test_mask_owns_its_indices():
    """A caller's later in-place write must not reach indices that were validated."""
    idx = torch.tensor([1, 2], dtype=torch.int32)
    m = Mask(idx, (5,))
    idx[0] = 7
    assert m.indices.tolist() == [1, 2]


def test_mask_is_unhashable_since_equality_is_by_value():
    with pytest.raises(TypeError):
        hash(Mask(torch.tensor([1]), (3,)))


def test_maskset_load_without_shapes_metadata_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "damaged.safetensors"
    save_file({"w": torch.tensor([0, 1], dtype=torch.int32)}, str(path), metadata={"format": "fastmask.maskset/1"})
    with pytest.raises(ValueError, match="shapes"):
        MaskSet.load(path)


# ----------------------------------------------------------------------------------------------
# Malformed mask files: every error names the file and the parameter at fault
# ----------------------------------------------------------------------------------------------
def _write_maskfile(path, tensors, shapes=None, meta=None):
    """A file laid out as MaskSet.save does: one tensor per name, ``format``/``fastmask_version``/``shapes``
    metadata (``shapes`` as JSON, or a raw string); ``meta`` overrides those keys, ``None`` drops one."""
    import json

    from safetensors.torch import save_file

    if shapes is None:
        shapes = {n: [int(t.numel()) + 10] for n, t in tensors.items()}
    full = {"format": "fastmask.maskset/1", "fastmask_version": "test",
            "shapes": shapes if isinstance(shapes, str) else json.dumps(shapes)}
    full.update(meta or {})
    save_file(tensors, str(path), metadata={k: v for k, v in full.items() if v is not None})
    return path


def _file_and(path, *parts) -> str:
    """A regex: the file's path, then each part, in order."""
    import re

    return re.escape(str(path)) + "".join(".*" + p for p in parts)


def re_escape(path) -> str:
    import re

    return re.escape(str(path))


I32 = torch.int32
PARAM = "visual.transformer.resblocks.0.mlp.c_fc.weight"
PARAM_RE = r"'visual\.transformer\.resblocks\.0\.mlp\.c_fc\.weight'"


@pytest.mark.parametrize(
    "idx,shape,exc,pattern",
    [
        (torch.tensor([0, 5, 6], dtype=I32), [2, 3], IndexError, r"index out of range.*\[0, 6\].*6 entries"),
        (torch.tensor([-2, 1], dtype=I32), [2, 3], IndexError, r"index out of range.*-2"),
        (torch.tensor([4, 1], dtype=I32), [2, 3], ValueError, r"sorted and unique.*idx\[0\]=4"),
        (torch.tensor([1, 1], dtype=I32), [2, 3], ValueError, r"sorted and unique"),
        (torch.tensor([[0, 1], [2, 3]], dtype=I32), [2, 3], ValueError, r"1-D.*\(2, 2\)"),
        (torch.tensor([1, 4], dtype=torch.int64), [2, 3], TypeError, r"dtype torch\.int64, expected int32"),
        (torch.tensor([1, 4], dtype=torch.int16), [2, 3], TypeError, r"dtype torch\.int16, expected int32"),
        (torch.tensor([1.0, 4.0]), [2, 3], TypeError, r"dtype torch\.float32, expected int32"),
        (torch.tensor([True, False]), [2, 3], TypeError, r"dtype torch\.bool, expected int32"),
    ],
    ids=["too_large", "negative", "unsorted", "duplicate", "two_d", "int64", "int16", "float", "bool"],
)
def test_maskset_load_bad_indices_names_file_and_parameter(tmp_path, idx, shape, exc, pattern):
    path = _write_maskfile(tmp_path / "bad_indices.safetensors",
                           {"ok": torch.tensor([0], dtype=I32), PARAM: idx}, {"ok": [1], PARAM: shape})
    with pytest.raises(exc, match=_file_and(path, PARAM_RE, pattern)):
        MaskSet.load(path)


@pytest.mark.parametrize(
    "shapes,exc,pattern",
    [
        ('{"visual.w": [2, 3]', ValueError, r"'shapes' metadata is not valid JSON.*expected a JSON object"),
        ("", ValueError, r"'shapes' metadata is not valid JSON"),
        ('[["visual.w", [2, 3]]]', TypeError, r"'shapes' metadata is a JSON list, expected a JSON object"),
        ('"visual.w"', TypeError, r"'shapes' metadata is a JSON str, expected a JSON object"),
        ('null', TypeError, r"'shapes' metadata is a JSON NoneType, expected a JSON object"),
        ('{"visual.w": [2, 3], "visual.w": [6]}', ValueError, r"'shapes' metadata names parameter 'visual\.w' twice"),
    ],
    ids=["truncated_json", "empty", "list", "string", "null", "duplicate_name"],
)
def test_maskset_load_bad_shapes_metadata_names_file(tmp_path, shapes, exc, pattern):
    path = _write_maskfile(tmp_path / "bad_shapes.safetensors", {"visual.w": torch.tensor([1], dtype=I32)}, shapes)
    with pytest.raises(exc, match=_file_and(path, pattern)):
        MaskSet.load(path)


@pytest.mark.parametrize(
    "dims,exc,pattern",
    [
        ("[-48]", ValueError, r"dimension 0 is -48.*non-negative integer"),
        ("[4, -12]", ValueError, r"dimension 1 is -12"),
        ("[2.5, 3]", TypeError, r"dimension 0 is 2\.5 \(float\).*non-negative integer"),
        ("[6.0]", TypeError, r"dimension 0 is 6\.0 \(float\)"),
        ('["6"]', TypeError, r"dimension 0 is '6' \(str\)"),
        ("[true, 6]", TypeError, r"dimension 0 is a bool"),
        ("[null]", TypeError, r"dimension 0 is None"),
        ("[[2, 3]]", TypeError, r"dimension 0 is \[2, 3\] \(list\)"),
        ("[NaN]", TypeError, r"dimension 0 is nan"),
        ("6", TypeError, r"is 6, expected a list of non-negative integers"),
        ('"2x3"', TypeError, r"is '2x3', expected a list of non-negative integers"),
        ('{"rows": 2}', TypeError, r"expected a list of non-negative integers"),
        ("[1099511627776, 1099511627776]", ValueError, r"more than 2\*\*63 - 1 entries"),
    ],
    ids=["negative", "negative_second", "float", "float_integral", "str", "bool", "null", "nested", "nan", "int",
         "string", "object", "overflow"],
)
def test_maskset_load_bad_shape_entry_names_file_and_parameter(tmp_path, dims, exc, pattern):
    path = _write_maskfile(tmp_path / "bad_dims.safetensors",
                           {"ok": torch.tensor([0], dtype=I32), PARAM: torch.empty(0, dtype=I32)},
                           f'{{"ok": [1], "{PARAM}": {dims}}}')
    with pytest.raises(exc, match=_file_and(path, r"shape of parameter " + PARAM_RE, pattern)):
        MaskSet.load(path)


def test_maskset_load_tensor_without_shape_entry_and_vice_versa(tmp_path):
    t = torch.tensor([0, 2], dtype=I32)
    path = _write_maskfile(tmp_path / "extra_tensor.safetensors", {"a": t, "visual.extra": t.clone()}, {"a": [4]})
    with pytest.raises(ValueError, match=_file_and(path, r"tensors without a 'shapes' entry: \['visual\.extra'\]",
                                                   r"expected one int32 tensor per 'shapes' entry")):
        MaskSet.load(path)
    path = _write_maskfile(tmp_path / "extra_shape.safetensors", {"a": t}, {"a": [4], "visual.gone": [3]})
    with pytest.raises(ValueError, match=_file_and(path, r"'shapes' entries without a tensor: \['visual\.gone'\]")):
        MaskSet.load(path)
    path = _write_maskfile(tmp_path / "both.safetensors", {"a": t, "x": t.clone()}, {"a": [4], "y": [4]})
    with pytest.raises(ValueError, match=_file_and(path, r"without a 'shapes' entry: \['x'\]",
                                                   r"without a tensor: \['y'\]")):
        MaskSet.load(path)


def test_maskset_load_missing_metadata_keys_names_file(tmp_path):
    t = {"w": torch.tensor([0, 1], dtype=I32)}
    path = _write_maskfile(tmp_path / "no_format.safetensors", t, meta={"format": None})
    with pytest.raises(ValueError, match=_file_and(path, r"not a fastmask MaskSet file.*no 'format' metadata",
                                                   r"fastmask\.maskset/1")):
        MaskSet.load(path)
    path = _write_maskfile(tmp_path / "no_shapes.safetensors", t, meta={"shapes": None})
    with pytest.raises(ValueError, match=_file_and(path, r"without its 'shapes' metadata")):
        MaskSet.load(path)
    path = _write_maskfile(tmp_path / "other_format.safetensors", t, meta={"format": "fastmask.maskset/2"})
    with pytest.raises(ValueError, match=_file_and(path, r"format 'fastmask\.maskset/2'.*expected 'fastmask\.maskset/1'")):
        MaskSet.load(path)
    # fastmask_version is informative only: a file without it loads.
    path = _write_maskfile(tmp_path / "no_version.safetensors", t, {"w": [3]}, meta={"fastmask_version": None})
    assert MaskSet.load(path)["w"].indices.tolist() == [0, 1]


def test_maskset_load_empty_file_set_ok(tmp_path):
    path = tmp_path / "empty.safetensors"
    MaskSet().save(path)
    assert len(MaskSet.load(path)) == 0


@pytest.mark.parametrize("content", [b"", b"hello world, not a safetensors file", b"\xff" * 64],
                         ids=["empty", "text", "garbage"])
def test_maskset_load_non_safetensors_bytes_names_file(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=_file_and(path, r"not a readable safetensors file")):
        MaskSet.load(path)
    with pytest.raises(ValueError, match=_file_and(path, r"not a readable safetensors file")):
        MaskSet.metadata(path)


def test_maskset_load_truncated_file_names_file(tmp_path):
    path = tmp_path / "masks.safetensors"
    select({"w": torch.rand(40)}, 0.5).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match=_file_and(path, r"not a readable safetensors file")):
        MaskSet.load(path)


def test_maskset_load_missing_file_or_directory_names_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re_escape(missing)):
        MaskSet.load(missing)
    with pytest.raises(IsADirectoryError, match=_file_and(tmp_path, r"is a directory")):
        MaskSet.load(tmp_path)


def test_maskset_save_reserved_metadata_keys_write_nothing(tmp_path):
    ms = select({"w": torch.rand(10)}, 0.3)
    path = tmp_path / "masks.safetensors"
    for key in ("format", "shapes", "fastmask_version"):
        with pytest.raises(ValueError, match=_file_and(path, r"metadata.*\['" + key + r"'\].*reserved")):
            ms.save(path, metadata={"task": "a", key: "x"})
    assert list(tmp_path.iterdir()) == [], "a failed save must write nothing"
    with pytest.raises(TypeError, match=_file_and(path, r"metadata: expected a mapping")):
        ms.save(path, metadata=[("task", "a")])
    assert list(tmp_path.iterdir()) == []


def test_maskset_save_refuses_safetensors_reserved_name(tmp_path):
    ms = MaskSet({"__metadata__": Mask(torch.tensor([1]), (3,))})
    path = tmp_path / "masks.safetensors"
    with pytest.raises(ValueError, match=_file_and(path, r"parameter '__metadata__'.*reserved")):
        ms.save(path)
    assert not path.exists()


def test_maskset_failed_save_keeps_previous_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "masks.safetensors"
    old = select({"w": torch.rand(10)}, 0.3)
    old.save(path, metadata={"task": "1"})
    before = path.read_bytes()
    with pytest.raises(ValueError):
        select({"w": torch.rand(10)}, 0.6).save(path, metadata={"shapes": "x"})
    assert path.read_bytes() == before, "a failed save must leave the previous file untouched"
    new = select({"w": torch.rand(10)}, 0.6)
    new.save(path)
    assert MaskSet.load(path) == new
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"], "temporary files left behind"


def test_maskset_save_to_missing_directory_names_path(tmp_path):
    path = tmp_path / "no" / "such" / "masks.safetensors"
    with pytest.raises(FileNotFoundError, match=re_escape(path)):
        select({"w": torch.rand(10)}, 0.3).save(path)
    with pytest.raises(IsADirectoryError, match=re_escape(tmp_path)):
        select({"w": torch.rand(10)}, 0.3).save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_maskset_save_through_symlink_writes_target(tmp_path):
    target = tmp_path / "real.safetensors"
    link = tmp_path / "link.safetensors"
    MaskSet().save(target)
    link.symlink_to(target)
    ms = select({"w": torch.rand(10)}, 0.3)
    ms.save(link)
    assert link.is_symlink() and MaskSet.load(target) == ms
