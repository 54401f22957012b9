"""Targets: presets (open_clip, hf_clip, timm_vit), patterns, errors, freeze."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fastmask import PRESETS, Preset, Targets, find_targets, freeze

from .utils import tiny_open_clip

OPEN_CLIP_MASKED = [
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual.transformer.resblocks.1.mlp.c_fc.weight",
    "transformer.resblocks.0.mlp.c_fc.weight",
    "transformer.resblocks.1.mlp.c_fc.weight",
]
OPEN_CLIP_DENSE = [
    "visual.proj",
    "visual.transformer.resblocks.0.mlp.c_fc.bias",
    "visual.transformer.resblocks.1.mlp.c_fc.bias",
    "transformer.resblocks.0.mlp.c_fc.bias",
    "transformer.resblocks.1.mlp.c_fc.bias",
]


def _model_order(model: nn.Module, names) -> list[str]:
    order = [n for n, _ in model.named_parameters()]
    return sorted(names, key=order.index)


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
def test_open_clip_preset_on_tiny_clip():
    model = tiny_open_clip()
    t = find_targets(model)  # default preset: open_clip
    assert isinstance(t, Targets)
    assert list(t.masked) == OPEN_CLIP_MASKED, f"masked: {list(t.masked)}"
    assert list(t.dense) == _model_order(model, OPEN_CLIP_DENSE), f"dense: {list(t.dense)}"
    assert set(t.dense) == set(OPEN_CLIP_DENSE)
    params = dict(model.named_parameters())
    for n, p in t.named_parameters():
        assert p is params[n], f"{n}: Targets must hold the model's own Parameter objects"
    assert t.names == list(t.masked) + list(t.dense)
    assert t.parameters() == [params[n] for n in t.names]
    assert [n for n, _ in t.named_parameters()] == t.names
    assert "masked=4 tensors" in repr(t) and "dense=5 tensors" in repr(t)
    assert find_targets(model, "open_clip").names == t.names
    assert find_targets(model, PRESETS["open_clip"]).names == t.names


def test_open_clip_preset_on_vit_b_16_config():
    """Real ViT-B-16 sizes, built on the meta device (no memory, no weights)."""
    open_clip = pytest.importorskip("open_clip")
    cfg = open_clip.get_model_config("ViT-B-16")
    if cfg is None:
        pytest.skip("open_clip has no ViT-B-16 config")
    with torch.device("meta"):
        model = open_clip.CLIP(**cfg)
    t = find_targets(model)
    shapes = [tuple(p.shape) for p in t.masked.values()]
    assert len(shapes) == 24, f"expected 24 masked tensors, got {len(shapes)}"
    assert shapes == [(3072, 768)] * 12 + [(2048, 512)] * 12, shapes
    assert sum(p.numel() for p in t.masked.values()) == 12 * 3072 * 768 + 12 * 2048 * 512
    # DESIGN.md's "41.35M weights": masked weights + c_fc biases + visual.proj [768, 512].
    assert sum(p.numel() for p in t.parameters()) == 41_349_120
    assert len(t.dense) == 25 and "visual.proj" in t.dense


# ----------------------------------------------------------------------------------------------
# hf_clip: a fake module tree with Hugging Face CLIPModel names
# ----------------------------------------------------------------------------------------------
class _HFMLP(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc1 = nn.Linear(w, 4 * w)
        self.fc2 = nn.Linear(4 * w, w)


class _HFLayer(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(w, w) for n in ("k_proj", "v_proj", "q_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(w)
        self.mlp = _HFMLP(w)
        self.layer_norm2 = nn.LayerNorm(w)


class _HFEncoder(nn.Module):
    def __init__(self, w, n):
        super().__init__()
        self.layers = nn.ModuleList(_HFLayer(w) for _ in range(n))


class _HFTower(nn.Module):
    def __init__(self, w, n):
        super().__init__()
        self.embeddings = nn.Embedding(10, w)
        self.encoder = _HFEncoder(w, n)
        self.final_layer_norm = nn.LayerNorm(w)


class FakeHFCLIP(nn.Module):
    def __init__(self, text_w=6, text_n=2, vis_w=10, vis_n=3, dim=5):
        super().__init__()
        self.text_model = _HFTower(text_w, text_n)
        self.vision_model = _HFTower(vis_w, vis_n)
        self.visual_projection = nn.Linear(vis_w, dim, bias=False)
        self.text_projection = nn.Linear(text_w, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))


def test_hf_clip_preset_on_fake_clipmodel():
    model = FakeHFCLIP()
    t = find_targets(model, "hf_clip")
    want_masked = [f"text_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)] + [
        f"vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)]
    assert list(t.masked) == want_masked, list(t.masked)
    want_dense = [f"text_model.encoder.layers.{i}.mlp.fc1.bias" for i in range(2)] + [
        f"vision_model.encoder.layers.{i}.mlp.fc1.bias" for i in range(3)] + ["visual_projection.weight"]
    assert list(t.dense) == want_dense, list(t.dense)
    assert [tuple(p.shape) for p in t.masked.values()] == [(24, 6)] * 2 + [(40, 10)] * 3


def test_open_clip_preset_on_hf_model_raises_with_names():
    with pytest.raises(ValueError, match=r"open_clip.*FakeHFCLIP.*text_model\.embeddings\.weight"):
        find_targets(FakeHFCLIP(), "open_clip")


# ----------------------------------------------------------------------------------------------
# timm_vit
# ----------------------------------------------------------------------------------------------
def test_timm_vit_preset():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    t = find_targets(model, "timm_vit")
    assert list(t.masked) == [f"blocks.{i}.mlp.fc1.weight" for i in range(12)]
    assert list(t.dense) == [f"blocks.{i}.mlp.fc1.bias" for i in range(12)]
    assert all(tuple(p.shape) == (768, 192) for p in t.masked.values())


# ----------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------
def test_glob_patterns_replace_preset():
    model = tiny_open_clip()
    t = find_targets(model, masked="*c_proj.weight", dense=["ln_final.*", "logit_scale"])
    want = _model_order(model, [n for n, _ in model.named_parameters() if n.endswith("c_proj.weight")])
    assert list(t.masked) == want and len(want) == 4
    assert list(t.dense) == ["logit_scale", "ln_final.weight", "ln_final.bias"], list(t.dense)


def test_glob_star_crosses_dots_and_only_masked_given_keeps_preset_dense():
    model = tiny_open_clip()
    t = find_targets(model, masked="visual.*c_fc.weight")
    assert list(t.masked) == OPEN_CLIP_MASKED[:2]
    assert set(t.dense) == set(OPEN_CLIP_DENSE), "dense patterns of the preset should stay when only masked is given"


def test_regex_patterns_fullmatch():
    model = tiny_open_clip()
    t = find_targets(model, None, masked=re.compile(r"transformer\.resblocks\.\d+\.mlp\.c_fc\.weight"))
    # fullmatch: the visual tower's names start with "visual." and must NOT match.
    assert list(t.masked) == OPEN_CLIP_MASKED[2:], list(t.masked)
    assert t.dense == {}
    t2 = find_targets(model, None, masked=[re.compile(r".*resblocks\.1\..*c_fc\.weight"), "visual.proj"],
                      dense=re.compile(r".*c_fc\.bias"))
    assert list(t2.masked) == _model_order(model, ["visual.proj", OPEN_CLIP_MASKED[1], OPEN_CLIP_MASKED[3]])
    assert len(t2.dense) == 4


def test_pattern_order_does_not_change_model_order():
    model = tiny_open_clip()
    t = find_targets(model, None, masked=["transformer.resblocks.1.*weight", "visual.*c_fc.weight"])
    assert list(t.masked) == _model_order(model, list(t.masked))


def test_param_in_both_lists_is_masked_only():
    model = tiny_open_clip()
    t = find_targets(model, None, masked="visual.proj", dense=["visual.proj", "*c_fc.bias"])
    assert list(t.masked) == ["visual.proj"]
    assert "visual.proj" not in t.dense and len(t.dense) == 4


def test_masked_pattern_matching_nothing_raises_with_names():
    model = tiny_open_clip()
    with pytest.raises(ValueError, match=r"'\*no_such\*'.*matches no parameter of CLIP.*positional_embedding"):
        find_targets(model, None, masked=["*c_fc.weight", "*no_such*"])


def test_dense_pattern_matching_nothing_is_fine():
    t = find_targets(tiny_open_clip(), None, masked="*c_fc.weight", dense="*no_such*")
    assert len(t.masked) == 4 and t.dense == {}


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"unknown 'llama'.*open_clip.*hf_clip.*timm_vit"):
        find_targets(tiny_open_clip(), "llama")


def test_no_preset_no_patterns_raises():
    with pytest.raises(ValueError, match="preset"):
        find_targets(tiny_open_clip(), None)


def test_custom_preset():
    p = Preset("mine", masked=("*c_proj.weight",), dense=("visual.proj",))
    t = find_targets(tiny_open_clip(), p)
    assert len(t.masked) == 4 and list(t.dense) == ["visual.proj"]


def test_integer_parameter_matching_masked_raises():
    model = nn.Module()
    model.w = nn.Parameter(torch.arange(6).reshape(2, 3), requires_grad=False)
    with pytest.raises(TypeError, match=r"'w'.*int64"):
        find_targets(model, None, masked="w")


# ----------------------------------------------------------------------------------------------
# freeze
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Targets", "mapping", "names"])
def test_freeze_sets_requires_grad_exactly(kind):
    model = tiny_open_clip()
    # Start from a mixed state so that both directions are exercised.
    for i, (_, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 3 == 0)
    t = find_targets(model)
    arg = {"Targets": t, "mapping": {**t.masked, **t.dense}, "names": iter(t.names)}[kind]
    out = freeze(model, arg)
    if kind != "names":
        assert out is arg
    keep = set(t.names)
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (n in keep)]
    assert not wrong, f"requires_grad wrong for {wrong}"
    assert sum(p.requires_grad for p in model.parameters()) == 9


def test_freeze_unknown_name_raises_and_changes_nothing():
    model = tiny_open_clip()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(KeyError, match="no_such.weight"):
        freeze(model, ["visual.proj", "no_such.weight"])
    assert [p.requires_grad for p in model.parameters()] == before


def test_freeze_accepts_a_single_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    freeze(model, "1.weight")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight"]
