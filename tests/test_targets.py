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


# ----------------------------------------------------------------------------------------------
# Language-model and Hugging Face presets; automatic detection. Tiny models built from configs
# (random init, nothing downloaded); each is detected, its targets checked by name, and it is
# scored, selected and trained one MaskedAdamW step.
# ----------------------------------------------------------------------------------------------
import logging  # noqa: E402

import fastmask  # noqa: E402
from fastmask.optim import MaskedAdamW  # noqa: E402
from fastmask.targets import detect_preset  # noqa: E402

from .utils import clip_batches, clip_loss  # noqa: E402

VOCAB = 100


def _tf():
    return pytest.importorskip("transformers")


def _lm_batches(n=2, batch=2, seq=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _cls_batches(n=2, batch=2, seq=8):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(0, 2, (batch,), generator=g))
            for _ in range(n)]


def _cls_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[1]).loss


def _img_batches(n=2, batch=2, size=32):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n)]


def _hf_img_loss(model, batch):
    return model(pixel_values=batch[0], labels=batch[1]).loss


def _timm_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _hf_clip_batches(n=2, batch=2):
    g = torch.Generator().manual_seed(4)
    return [(torch.randint(0, VOCAB, (batch, 8), generator=g), torch.randn(batch, 3, 32, 32, generator=g))
            for _ in range(n)]


def _hf_clip_loss(model, batch):
    return model(input_ids=batch[0], pixel_values=batch[1], return_loss=True).loss


def _decoder_cfg(tf, cls):
    return getattr(tf, cls)(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def _llama_like(cfg_cls, model_cls):
    def build():
        tf = _tf()
        return getattr(tf, model_cls)(_decoder_cfg(tf, cfg_cls))
    return build


def _gpt2():
    tf = _tf()
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                            bos_token_id=0, eos_token_id=0))


def _bert_like(cfg_cls, model_cls):
    def build():
        tf = _tf()
        cfg = getattr(tf, cfg_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=64, num_labels=2, pad_token_id=1)
        return getattr(tf, model_cls)(cfg)
    return build


def _hf_vit():
    tf = _tf()
    return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, image_size=32, patch_size=8, num_labels=3))


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=3)


def _hf_clip():
    tf = _tf()
    cfg = tf.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return tf.CLIPModel(cfg)


def _open_clip():
    pytest.importorskip("open_clip")
    return tiny_open_clip()


def _names(fmt, layers=2, parts=("",)):
    return [fmt.format(i=i, k=k) for i in range(layers) for k in parts]


_LLAMA_MASKED = _names("model.layers.{i}.mlp.{k}_proj.weight", parts=("gate", "up"))
_GPT2_MASKED = _names("transformer.h.{i}.mlp.c_fc.weight")
_GPT2_DENSE = _names("transformer.h.{i}.mlp.c_fc.bias")

# name: (build, preset, masked names, dense names, batches, loss)
MODELS = {
    "llama": (_llama_like("LlamaConfig", "LlamaForCausalLM"), "hf_llama", _LLAMA_MASKED, [], _lm_batches, _lm_loss),
    "mistral": (_llama_like("MistralConfig", "MistralForCausalLM"), "hf_llama", _LLAMA_MASKED, [], _lm_batches,
                _lm_loss),
    "qwen2": (_llama_like("Qwen2Config", "Qwen2ForCausalLM"), "hf_llama", _LLAMA_MASKED, [], _lm_batches, _lm_loss),
    "gpt2": (_gpt2, "hf_gpt2", _GPT2_MASKED, _GPT2_DENSE, _lm_batches, _lm_loss),
    "bert": (_bert_like("BertConfig", "BertForSequenceClassification"), "hf_bert",
             _names("bert.encoder.layer.{i}.intermediate.dense.weight"),
             _names("bert.encoder.layer.{i}.intermediate.dense.bias"), _cls_batches, _cls_loss),
    "roberta": (_bert_like("RobertaConfig", "RobertaForSequenceClassification"), "hf_bert",
                _names("roberta.encoder.layer.{i}.intermediate.dense.weight"),
                _names("roberta.encoder.layer.{i}.intermediate.dense.bias"), _cls_batches, _cls_loss),
    "hf_vit": (_hf_vit, "hf_vit", None, None, _img_batches, _hf_img_loss),  # names depend on the transformers version
    "timm_vit": (_timm_vit, "timm_vit", _names("blocks.{i}.mlp.fc1.weight"), _names("blocks.{i}.mlp.fc1.bias"),
                 _img_batches, _timm_loss),
    "open_clip": (_open_clip, "open_clip", OPEN_CLIP_MASKED, OPEN_CLIP_DENSE, lambda: clip_batches(2, batch=2),
                  clip_loss),
    "hf_clip": (_hf_clip, "hf_clip",
                _names("text_model.encoder.layers.{i}.mlp.fc1.weight")
                + _names("vision_model.encoder.layers.{i}.mlp.fc1.weight"),
                _names("text_model.encoder.layers.{i}.mlp.fc1.bias")
                + _names("vision_model.encoder.layers.{i}.mlp.fc1.bias") + ["visual_projection.weight"],
                _hf_clip_batches, _hf_clip_loss),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_detect_score_select_step(kind, caplog):
    build, preset, want_masked, want_dense, batches_fn, loss_fn = MODELS[kind]
    torch.manual_seed(0)
    model = build()
    if want_masked is None:  # HF ViT: vit.layers.N.mlp.fc1 (transformers >= 5) or the BERT-style layout before
        params = dict(model.named_parameters())
        if "vit.layers.0.mlp.fc1.weight" in params:
            want_masked, want_dense = _names("vit.layers.{i}.mlp.fc1.weight"), _names("vit.layers.{i}.mlp.fc1.bias")
        else:
            preset = "hf_bert"
            want_masked = _names("vit.encoder.layer.{i}.intermediate.dense.weight")
            want_dense = _names("vit.encoder.layer.{i}.intermediate.dense.bias")
    assert detect_preset(model).name == preset
    with caplog.at_level(logging.INFO, logger="fastmask.targets"):
        t = find_targets(model)
    assert t.preset == preset and f"preset={preset!r}" in repr(t)
    assert any(r.levelno == logging.INFO and repr(preset) in r.getMessage() for r in caplog.records), caplog.text
    assert list(t.masked) == _model_order(model, want_masked), list(t.masked)
    assert list(t.dense) == _model_order(model, want_dense), list(t.dense)
    assert find_targets(model, preset).names == t.names

    freeze(model, t)
    batches = batches_fn()
    scores = fastmask.score(model, batches, loss_fn, progress=False)  # no targets=: detected again
    assert list(scores) == list(t.masked)
    for n, s in scores.items():
        assert s.shape == t.masked[n].shape and torch.isfinite(s).all() and s.abs().sum() > 0, n
    masks = fastmask.select(scores, density=0.1)
    opt = MaskedAdamW(t.parameters(), lr=1e-2, weight_decay=0.1, masks=masks, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn(model, batches[0]).backward()
    opt.step()
    for n, p in model.named_parameters():
        diff = (p.detach() != before[n]).reshape(-1)
        if n in t.masked:
            sel = masks[n].to_bool().reshape(-1)
            assert not diff[~sel].any(), f"{n}: an unselected entry changed"
            assert diff[sel].any(), f"{n}: no selected entry changed"
        elif n in t.dense:
            assert diff.any(), f"{n}: dense parameter did not change"
        else:
            assert not diff.any(), f"{n}: frozen parameter changed"


def test_gpt2_conv1d_masks_index_the_stored_layout():
    model = _gpt2()
    t = find_targets(model)
    w = t.masked["transformer.h.0.mlp.c_fc.weight"]
    assert tuple(w.shape) == (32, 128), "Conv1D stores [in, out]"
    masks = fastmask.select({n: torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
                             for n, p in t.masked.items()}, density=0.25)
    idx = masks["transformer.h.0.mlp.c_fc.weight"].to_bool()
    assert idx.shape == w.shape and idx[24:].all() and not idx[:24].any(), "flat indices of the stored tensor"


def test_llama_down_proj_is_an_opt_in_preset_never_detected():
    model = _llama_like("LlamaConfig", "LlamaForCausalLM")()
    assert detect_preset(model).name == "hf_llama"
    assert not PRESETS["hf_llama_mlp"].detect
    t = find_targets(model, "hf_llama_mlp")
    assert list(t.masked) == _names("model.layers.{i}.mlp.{k}_proj.weight", parts=("gate", "up", "down"))
    assert t.preset == "hf_llama_mlp"
    assert not any("down_proj" in n for n in find_targets(model).names)


def test_extra_dense_extends_the_preset():
    model = _bert_like("BertConfig", "BertForSequenceClassification")()
    t = find_targets(model, extra_dense="classifier.*")
    base = find_targets(model)
    assert list(t.masked) == list(base.masked) and t.preset == "hf_bert"
    assert list(t.dense) == list(base.dense) + ["classifier.weight", "classifier.bias"]
    same = find_targets(model, "hf_bert", dense=[*PRESETS["hf_bert"].dense, "classifier.*"])
    assert same.names == t.names
    # dense= still replaces; extra_dense adds to it.
    t2 = find_targets(model, dense="bert.pooler.*", extra_dense=["classifier.weight"])
    assert list(t2.dense) == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]


def test_explicit_patterns_skip_detection():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    t = find_targets(model, masked="0.weight", dense="1.*")
    assert t.preset is None and list(t.masked) == ["0.weight"] and list(t.dense) == ["1.weight", "1.bias"]
    # masked alone on a model no preset fits: the dense side is empty, as before.
    t = find_targets(model, masked="0.weight")
    assert t.preset is None and t.dense == {}


def test_no_preset_fits_lists_presets_and_patterns():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as e:
        find_targets(model)
    msg = str(e.value)
    assert "no preset fits Sequential" in msg
    for name in PRESETS:
        assert name in msg
    assert "masked=" in msg and "targets=" in msg and "0.weight" in msg
    with pytest.raises(ValueError, match="no preset fits"):
        fastmask.score(model, [torch.randn(2, 3)], lambda m, x: m(x).sum(), progress=False)


class _Block(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            self.add_module(k, v)


def test_several_presets_fit_is_an_error_naming_them():
    model = _Block(
        h=nn.ModuleList([_Block(mlp=_Block(c_fc=nn.Linear(2, 8)))]),
        layers=nn.ModuleList([_Block(mlp=_Block(gate_proj=nn.Linear(2, 8), up_proj=nn.Linear(2, 8)))]),
    )
    with pytest.raises(ValueError, match=r"more than one preset fits _Block: hf_llama, hf_gpt2(.|\n)*presets:"):
        find_targets(model)
    assert find_targets(model, "hf_gpt2").names == ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"]


def test_hf_patterns_allow_a_wrapper_prefix_but_not_lookalikes():
    inner = _llama_like("LlamaConfig", "LlamaForCausalLM")()
    model = _Block(backbone=inner)
    t = find_targets(model)
    assert t.preset == "hf_llama" and list(t.masked) == ["backbone." + n for n in _LLAMA_MASKED]
    # open_clip's transformer.resblocks.N.mlp.c_fc is not GPT-2's h.N.mlp.c_fc
    assert detect_preset(tiny_open_clip()).name == "open_clip"
