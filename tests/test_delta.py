"""Sparse deltas: bit-exact apply/revert for every dtype, refusals, the file checks, the CLI and the size report."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from fastmask import Mask, MaskSet, cli, delta

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {"a.weight": (37, 29), "b.weight": (5, 1, 3), "c.weight": (1,), "e.weight": (11, 13)}


def make(dtype: torch.dtype, density: float = 0.1, seed: int = 0):
    """Random base and trained state dicts (never zeros), masks; biases change densely."""
    g = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=g) + 3).to(dtype) for n, s in SHAPES.items()}
    base["a.bias"] = (torch.randn(37, generator=g) + 3).to(dtype)
    base["proj"] = (torch.randn(7, 3, generator=g) + 3).to(dtype)
    masks = {}
    for n, s in SHAPES.items():
        numel = torch.Size(s).numel()
        k = 0 if n == "e.weight" else max(1, int(density * numel))  # e.weight: an empty mask
        masks[n] = Mask(torch.randperm(numel, generator=g)[:k].sort().values.to(torch.int32), s)
    trained = {n: t.clone() for n, t in base.items()}
    for n, m in masks.items():
        flat = trained[n].view(-1)
        i = m.indices.long()
        flat[i] = (flat[i].float() + torch.randn(i.numel(), generator=g) * 1e-2).to(dtype)
    trained["a.bias"] += torch.randn(37, generator=g).to(dtype)
    trained["proj"] += torch.randn(7, 3, generator=g).to(dtype)
    return base, trained, MaskSet(masks)


def clone(sd):
    return {n: t.clone() for n, t in sd.items()}


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_bit_exact(tmp_path, dtype):
    base, trained, masks = make(dtype)
    path = tmp_path / "d.safetensors"
    report = delta.export(trained, base, masks, path, dense=["*.bias", "proj"])
    assert {r["name"]: r["kind"] for r in report["tensors"]} == {
        **{n: "sparse" for n in SHAPES}, "a.bias": "dense", "proj": "dense"}
    sd = clone(base)
    assert delta.apply(sd, path) is sd
    assert_equal(sd, trained)
    delta.revert(sd, path)
    assert_equal(sd, base)


def test_exact_where_arithmetic_is_not(tmp_path):
    """Values where base + (trained - base) != trained, NaN payloads and -0.0 survive bit for bit."""
    base = {"w": torch.tensor([1.0, 1e8, 0.0, 3.0, float("nan")])}
    trained = {"w": torch.tensor([1e-8, 1.0, -0.0, float("nan"), 2.0])}
    assert not torch.equal(base["w"] + (trained["w"] - base["w"]), trained["w"])
    masks = MaskSet({"w": Mask(torch.arange(5, dtype=torch.int32), (5,))})
    path = tmp_path / "d.safetensors"
    delta.export(trained, base, masks, path)
    sd = clone(base)
    delta.apply(sd, path)
    assert torch.equal(sd["w"].view(torch.int32), trained["w"].view(torch.int32))
    delta.revert(sd, path)
    assert torch.equal(sd["w"].view(torch.int32), base["w"].view(torch.int32))


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc = nn.Linear(13, 9).to(dtype)
        self.out = nn.Linear(9, 4).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_model_round_trip(tmp_path, dtype):
    base_model, model = Net(dtype), Net(dtype)
    model.load_state_dict(base_model.state_dict())
    masks = MaskSet({"fc.weight": Mask(torch.tensor([0, 5, 50, 116], dtype=torch.int32), (9, 13))})
    with torch.no_grad():
        model.fc.weight.view(-1)[masks["fc.weight"].indices.long()] += 0.5
        model.fc.bias.add_(0.25)
        model.out.bias.add_(0.25)
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    path = tmp_path / "d.safetensors"
    delta.export(model, base_model.state_dict(), masks, path, dense="*.bias")
    base_sd = {n: t.clone() for n, t in base_model.state_dict().items()}
    delta.apply(base_model, path)
    assert_equal(base_model.state_dict(), trained)
    delta.revert(base_model, path)
    assert_equal(base_model.state_dict(), base_sd)


def test_refusals(tmp_path):
    base, trained, masks = make(torch.float32)
    path = tmp_path / "d.safetensors"
    delta.export(trained, base, masks, path, dense=["*.bias", "proj"])
    other, _, _ = make(torch.float32, seed=1)
    sd = clone(other)
    with pytest.raises(ValueError, match=r"parameter 'a\.weight'.*not the base weights"):
        delta.apply(sd, path)
    assert_equal(sd, other)  # nothing written
    sd = clone(base)
    sd["proj"] = sd["proj"] + 1  # only the last tensor differs: still nothing written
    before = clone(sd)
    with pytest.raises(ValueError, match=r"parameter 'proj'"):
        delta.apply(sd, path)
    assert_equal(sd, before)
    sd = clone(trained)
    with pytest.raises(ValueError, match="already applied"):
        delta.apply(sd, path)
    with pytest.raises(ValueError, match="already reverted"):
        delta.revert(clone(base), path)
    sd = clone(base)
    sd["a.weight"] = torch.randn(29, 37) + 3
    with pytest.raises(ValueError, match=r"'a\.weight'.*shape \(37, 29\).*\(29, 37\)"):
        delta.apply(sd, path)
    sd = clone(base)
    sd["a.bias"] = sd["a.bias"].double()
    with pytest.raises(TypeError, match=r"'a\.bias'.*dtype"):
        delta.apply(sd, path)
    sd = clone(base)
    del sd["b.weight"]
    with pytest.raises(KeyError, match=r"'b\.weight' is missing from the model"):
        delta.apply(sd, path)


def test_export_refusals(tmp_path):
    base, trained, masks = make(torch.float32)
    path = tmp_path / "d.safetensors"
    with pytest.raises(ValueError, match=r"changed by training but in neither.*a\.bias"):
        delta.export(trained, base, masks, path)  # biases changed, not listed
    assert not path.exists()
    t2 = clone(trained)
    t2["a.weight"].view(-1)[~masks["a.weight"].to_bool().view(-1)] *= 1.5
    with pytest.raises(ValueError, match=r"'a\.weight'.*changed outside its mask"):
        delta.export(t2, base, masks, path, dense=["*.bias", "proj"])
    delta.export(t2, base, masks, path, dense=["*.bias", "proj"], strict=False)
    sd = clone(base)
    delta.apply(sd, path)
    assert torch.equal(sd["a.weight"], trained["a.weight"])  # the masked entries only
    with pytest.raises(KeyError, match="dense: 'nope.*' names no"):
        delta.export(trained, base, masks, path, dense=["nope.*"])
    with pytest.raises(ValueError, match="either masked or dense"):
        delta.export(trained, base, masks, path, dense=["a.weight"])
    b2 = clone(base)
    del b2["c.weight"]
    with pytest.raises(KeyError, match=r"'c\.weight' is missing from the base"):
        delta.export(trained, b2, masks, path, dense="*.bias,proj")
    b2 = clone(base)
    b2["proj"] = b2["proj"].half()
    with pytest.raises(TypeError, match=r"'proj' has dtype"):
        delta.export(trained, b2, masks, path, dense="*.bias,proj")


def rewrite(path, out, meta=None, tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        m, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors(ts) if tensors else ts, str(out), metadata=meta(m) if meta else m)


def test_damaged_files(tmp_path):
    base, trained, masks = make(torch.bfloat16)
    path = tmp_path / "d.safetensors"
    delta.export(trained, base, masks, path, dense=["*.bias", "proj"])
    bad = tmp_path / "bad.safetensors"

    def edit_entry(key, value):
        def f(m):
            t = json.loads(m["tensors"])
            t["a.weight"][key] = value
            m["tensors"] = json.dumps(t)
            return m
        return f

    cases = [
        (dict(meta=lambda m: {**m, "tensors": "{not json"}), ValueError, "not valid JSON"),
        (dict(meta=lambda m: {**m, "format": "x"}), ValueError, "not a fastmask delta file"),
        (dict(meta=edit_entry("shape", [29, 37])), ValueError, r"'a\.weight'"),
        (dict(meta=edit_entry("dtype", "complex64")), ValueError, r"'a\.weight': dtype"),
        (dict(meta=edit_entry("k", -1)), ValueError, r"'a\.weight': k"),
        (dict(meta=edit_entry("base_sha256", "0" * 64)), ValueError, r"'a\.weight'.*not the base"),
        (dict(tensors=lambda t: {**t, "xor:a.weight": t["xor:a.weight"] ^ 1}), ValueError, "checksum"),
        (dict(tensors=lambda t: {k: v for k, v in t.items() if k != "xor:proj"}), ValueError, "xor:proj"),
        (dict(tensors=lambda t: {**t, "indices:a.weight": t["indices:a.weight"].flip(0)}), ValueError, "sorted"),
    ]
    for kwargs, exc, pattern in cases:
        rewrite(path, bad, **kwargs)
        sd = clone(base)
        with pytest.raises(exc, match=pattern) as info:
            delta.apply(sd, bad)
        assert str(bad) in str(info.value)
        assert_equal(sd, base)
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        delta.info(bad)
    masks.save(bad)
    with pytest.raises(ValueError, match="not a fastmask delta file"):
        delta.info(bad)


def test_info_sizes(tmp_path):
    """ViT-B/16 c_fc shapes: the delta at 10% and 1% against the full weights and a LoRA of as many entries."""
    out_f, in_f = 3072, 768
    g = torch.Generator().manual_seed(0)
    base = {"c_fc.weight": torch.randn(out_f, in_f, generator=g), "c_fc.bias": torch.randn(out_f, generator=g)}
    for density, k, rank in ((0.1, 235929, 61), (0.01, 23592, 6)):
        m = MaskSet({"c_fc.weight": Mask(torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(torch.int32),
                                          (out_f, in_f))})
        trained = clone(base)
        trained["c_fc.weight"].view(-1)[m["c_fc.weight"].indices.long()] += 1e-3
        path = tmp_path / f"d{density}.safetensors"
        r = delta.export(trained, base, m, path, strict=False)
        row = r["tensors"][0]
        assert (row["k"], row["delta_bytes"], row["full_bytes"]) == (k, 8 * k, 4 * out_f * in_f)
        assert (row["lora_rank"], row["lora_bytes"]) == (rank, rank * (in_f + out_f) * 4)
        assert r["model_bytes"] == 4 * (out_f * in_f + out_f)
        assert r["file_bytes"] == os.path.getsize(path)
        assert 8 * k < r["file_bytes"] < 8 * k + 4096  # the header is small
        text = delta.format_info(r)
        assert "c_fc.weight" in text and "LoRA" in text and f"{k}" in text


def test_cli_round_trip(tmp_path, capsys):
    from safetensors.torch import save_file

    base, trained, masks = make(torch.bfloat16)
    save_file(base, str(tmp_path / "base.safetensors"))
    torch.save({"state_dict": trained}, tmp_path / "trained.pt")
    masks.save(tmp_path / "masks.safetensors")
    d, p = str(tmp_path / "delta.safetensors"), lambda n: str(tmp_path / n)
    assert cli.main(["delta", "export", "--base", p("base.safetensors"), "--trained", p("trained.pt"),
                     "--masks", p("masks.safetensors"), "--dense", "proj,*.bias", "-o", d]) == 0
    assert "LoRA" in capsys.readouterr().out
    assert cli.main(["delta", "apply", "--base", p("base.safetensors"), "--delta", d, "-o", p("out.safetensors")]) == 0
    assert_equal(delta.load_state_dict(p("out.safetensors")), trained)
    assert cli.main(["delta", "revert", "--trained", p("out.safetensors"), "--delta", d, "-o", p("back.pt")]) == 0
    assert_equal(delta.load_state_dict(p("back.pt")), base)
    assert cli.main(["delta", "info", d]) == 0
    out = capsys.readouterr().out
    assert "a.weight" in out and "of the full model" in out


@pytest.mark.parametrize("argv,message", [
    (["apply", "--base", "{tmp}/missing.safetensors", "--delta", "{d}", "-o", "{tmp}/o.safetensors"],
     "--base {tmp}/missing.safetensors: no such file"),
    (["apply", "--base", "{tmp}/trained.safetensors", "--delta", "{d}", "-o", "{tmp}/o.safetensors"],
     "--delta {d}: parameter 'a.weight'"),
    (["revert", "--trained", "{tmp}/base.safetensors", "--delta", "{d}", "-o", "{tmp}/o.safetensors"],
     "--delta {d}: parameter 'a.weight'"),
    (["info", "{tmp}/masks.safetensors"], "not a fastmask delta file"),
    (["export", "--base", "{tmp}/base.safetensors", "--trained", "{tmp}/trained.safetensors",
      "--masks", "{tmp}/base.safetensors", "-o", "{d}"], "--masks {tmp}/base.safetensors"),
    (["export", "--base", "{tmp}/base.safetensors", "--trained", "{tmp}/trained.safetensors",
      "--masks", "{tmp}/masks.safetensors", "-o", "{d}"], "in neither the masks nor dense"),
    (["apply", "--base", "{tmp}/base.safetensors", "-o", "x"], "--delta"),
], ids=["missing-file", "other-base", "not-trained", "not-a-delta", "not-masks", "undeclared-change", "no-flag"])
def test_cli_errors(tmp_path, capsys, argv, message):
    from safetensors.torch import save_file

    base, trained, masks = make(torch.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(trained, str(tmp_path / "trained.safetensors"))
    masks.save(tmp_path / "masks.safetensors")
    d = str(tmp_path / "d.safetensors")
    delta.export(trained, base, masks, d, dense="*.bias,proj")
    fmt = lambda s: s.format(tmp=tmp_path, d=d)  # noqa: E731
    with pytest.raises(SystemExit) as exc:
        cli.main(["delta", *map(fmt, argv)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastmask delta"), err
    assert fmt(message) in err, err
