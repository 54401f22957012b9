"""The continual job (``fastmask continual``): a small end-to-end run, SPU's update footprint, data."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import fastmask  # noqa: E402
from fastmask import cli  # noqa: E402
from fastmask.continual import data as D  # noqa: E402
from fastmask.continual import job as J  # noqa: E402
from fastmask.continual import model as M  # noqa: E402

SMALL = ["--limit-per-class", "24", "--pretrain-epochs", "2", "--epochs", "2", "--max-steps", "3",
         "--batch-size", "8", "--quiet"]


def _small_cfg(tmp_path, **kw) -> J.JobConfig:
    cfg = J.JobConfig(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), limit_per_class=24,
                      pretrain_epochs=2, epochs=2, max_steps=4, batch_size=8, progress=False, **kw)
    return J.resolve(cfg)


def _numbers(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["continual", *SMALL, "--lrs", "1e-3,1e-4", "--replay", "4", "--seeds", "0,1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "method" in printed and "control" in printed and "spu-original" in printed
    for name in ("results.json", "table.txt", "accuracy.png", "accuracy_lr0.0001.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(os.listdir(out / "masks")) == 2 * 2 * 2 * 2  # seeds x lrs x (spu, spu-original) x tasks
    res = json.loads((out / "results.json").read_text())
    for path, v in _numbers(res):
        assert math.isfinite(v), path
    accs = [(p, v) for p, v in _numbers(res["runs"]) if any(k in p.split(".")[-1] for k in
                                                           ("control", "new_own", "new_seen", "seen_all", "tasks_own"))
            and "drop" not in p]
    assert accs and all(0.0 <= v <= 1.0 for _, v in accs), [a for a in accs if not 0 <= a[1] <= 1][:3]
    # 2 seeds x (3 trained methods x 2 lrs + frozen once)
    assert len(res["runs"]) == 2 * 7
    assert {(s["method"], s["lr"]) for s in res["summary"]} == {
        (m, lr) for m in ("spu", "spu-original", "full") for lr in (1e-3, 1e-4)} | {("frozen", None)}
    for r in res["runs"]:
        assert len(r["tasks"]) == 2
        if r["method"] != "frozen":
            assert all(t["steps"] == 3 and t["step_ms"] > 0 for t in r["tasks"])
    # Scoring: spu with the training loss on ceil(fraction x batches) batches; spu-original the
    # original's way, floor(fraction x batches) + 2 batches (tasks of 4 and 6 batches of 8 here).
    assert res["scoring"]["spu"] == dict(loss="contrastive", accumulate="batch-sum", stop="fixed",
                                         description="contrastive loss, batch sums, fixed batches")
    assert res["scoring"]["spu-original"]["loss"] == "l2-logits"
    assert res["scoring"]["spu-original"]["accumulate"] == "running-sum"
    assert res["scoring"]["spu-original"]["stop"] == "original"
    for r in res["runs"]:
        want = {"spu": [1, 2], "spu-original": [3, 3]}.get(r["method"], [0, 0])
        assert [t["score_batches"] for t in r["tasks"]] == want, (r["method"], r["tasks"])
    # The base model of this smoke configuration is at chance: flagged in the JSON and the table.
    assert res["base_model"]["near_chance"] is True and res["base_model"]["chance"] == pytest.approx(0.2)
    table = (out / "table.txt").read_text()
    assert "WARNING: the base model's control accuracy" in table and "near chance" in table
    assert "spu-original: ||logits||^2, running sums, original stop rule" in table
    # The base model was cached: a second run loads it.
    assert cli.main(argv[:-2] + ["--out", str(tmp_path / "out2"), "--methods", "frozen", "--no-plots"]) == 0
    assert "loaded from cache" in capsys.readouterr().out


def test_score_options_reproduce_spu_originals_masks(tmp_path):
    """spu with --score-loss l2-logits --score-accumulate running-sum --score-stop original selects
    the same first-task masks as spu-original (same data order, same base model)."""
    out = tmp_path / "out"
    common = ["continual", *SMALL, "--methods", "spu,spu-original", "--no-plots", "--cache-dir", str(tmp_path / "cache")]
    original = ["--score-loss", "l2-logits", "--score-accumulate", "running-sum", "--score-stop", "original"]
    assert cli.main(common + original + ["--out", str(out)]) == 0
    a = fastmask.MaskSet.load(out / "masks" / "seed0_lr0.001_spu_task1.safetensors")
    b = fastmask.MaskSet.load(out / "masks" / "seed0_lr0.001_spu-original_task1.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[n].indices, b[n].indices) for n in a)
    res = json.loads((out / "results.json").read_text())
    assert res["scoring"]["spu"] == res["scoring"]["spu-original"]
    # ... and with the defaults, spu's masks differ (contrastive loss, batch sums, fewer batches)
    assert cli.main(common + ["--out", str(tmp_path / "out2")]) == 0
    c = fastmask.MaskSet.load(tmp_path / "out2" / "masks" / "seed0_lr0.001_spu_task1.safetensors")
    assert any(not torch.equal(c[n].indices, b[n].indices) for n in c)


def test_spu_changes_only_selected_entries_and_dense_extras(tmp_path):
    cfg = _small_cfg(tmp_path)
    ctx = J.prepare(cfg, log=lambda *a: None)
    loaders = {"control": J._loader(ctx.bench.control, cfg, False)}
    for j, task in enumerate(ctx.bench.tasks):
        loaders[j] = J._loader(D.subset(ctx.bench.test, task), cfg, False)
        loaders["seen", j] = J._loader(D.subset(ctx.bench.test, ctx.bench.seen(j)), cfg, False)

    def trained(method):
        model = ctx.build()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, masks = J.train_sequence(method, 1e-3, 0, ctx, cfg, loaders, model=model, log=lambda *a: None)
        after = dict(model.named_parameters())
        return before, after, masks

    targets = fastmask.find_targets(ctx.build())
    assert len(targets.masked) == 4 and "visual.proj" in targets.dense  # c_fc of 2 layers x 2 towers

    before, after, masks = trained("spu")
    assert len(masks) == 2 and all(isinstance(m, fastmask.MaskSet) for m in masks)
    for name, p0 in before.items():
        changed = (after[name].detach() != p0)
        if name in targets.masked:
            allowed = masks[0][name].to_bool() | masks[1][name].to_bool()
            assert masks[0][name].density == pytest.approx(0.1, abs=0.01)
            assert not (changed & ~allowed).any(), f"{name}: {int((changed & ~allowed).sum())} unselected entries changed"
            assert changed.any(), f"{name}: no selected entry changed"
        elif name in targets.dense:
            assert changed.any(), f"{name}: dense extra did not train"
        else:
            assert not changed.any(), f"{name}: frozen parameter changed"

    # The original code's behaviour: weight decay also shrinks unselected c_fc entries.
    before, after, masks = trained("spu-original")
    name = next(iter(targets.masked))
    unselected = ~(masks[0][name].to_bool() | masks[1][name].to_bool())
    assert (after[name].detach() != before[name])[unselected].any()
    assert torch.equal(after["positional_embedding"].detach(), before["positional_embedding"])

    # spu-noproj: visual.proj stays as it was; the c_fc biases train.
    before, after, _ = trained("spu-noproj")
    assert torch.equal(after["visual.proj"].detach(), before["visual.proj"])
    assert not torch.equal(after["visual.transformer.resblocks.0.mlp.c_fc.bias"].detach(),
                           before["visual.transformer.resblocks.0.mlp.c_fc.bias"])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_digits_benchmark_tasks_and_prompts():
    from sklearn.datasets import load_digits

    b = D.digits_benchmark()
    all_tasks = [c for t in b.tasks for c in t]
    assert len(all_tasks) == len(set(all_tasks)) and not set(all_tasks) & set(b.base)
    assert all(len(t) >= 2 for t in b.tasks)
    assert b.control_names == ["zero", "one", "two", "three", "four"]
    # Train and test are disjoint and cover the set; class counts match scikit-learn's labels.
    target = torch.as_tensor(load_digits().target)
    labels = torch.cat([b.train.labels, b.test.labels])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.bincount(target, minlength=10))
    # Each task's subset holds only its classes, and the prompt of class c names digit c.
    for t in b.tasks:
        assert set(D.labels_of(D.subset(b.train, t)).tolist()) == set(t)
    p = D.prompts(b.class_names)
    assert [p[c] for c in range(10)] == [f"a photo of a {w}" for w in D.DIGIT_NAMES]
    # Images are aligned with their labels: the class means match scikit-learn's (upsampled).
    x = torch.as_tensor(load_digits().images, dtype=torch.float32)
    for c in (0, 7):
        ours = torch.cat([b.train.images, b.test.images])[labels == c].mean(0)[0]
        ref = torch.nn.functional.interpolate(x[target == c].mean(0)[None, None] / 16, size=(32, 32),
                                              mode="bilinear", align_corners=False)[0, 0]
        assert torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1] > 0.999
    # The word tokenizer: end of text is the highest id (open_clip pools at argmax).
    tok = M.WordTokenizer(p)
    ids = tok(p)
    assert (ids.argmax(1) == (ids != 0).sum(1) - 1).all() and int(ids.max()) == tok.vocab_size - 1


def test_task_split_checks():
    tasks = D.split_classes(range(10), 3, seed=1)
    assert sorted(c for t in tasks for c in t) == list(range(10)) and [len(t) for t in tasks] == [4, 3, 3]
    with pytest.raises(ValueError, match="one class|1 class"):
        D.check_tasks([[0, 1], [2]], 3)
    with pytest.raises(ValueError, match="two tasks"):
        D.check_tasks([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError):
        D.split_classes(range(5), 3)


def test_replay_buffer_is_task_balanced():
    x = torch.randn(40, 3, 4, 4)
    y = torch.arange(40) % 4
    ds = D.TensorImages(x, y)
    buf = D.ReplayBuffer(per_task=6, seed=0)
    buf.add_task(D.subset(ds, [0, 1]))
    buf.add_task(D.subset(ds, [2, 3]))
    assert len(buf) == 12 and buf.classes == [0, 1, 2, 3]
    xs, ys = buf.sample(8)
    assert xs.shape == (8, 3, 4, 4)
    assert int((ys <= 1).sum()) == 4 and int((ys >= 2).sum()) == 4


def test_image_folder(tmp_path):
    from PIL import Image

    def write(root, classes, n):
        for ci, c in enumerate(classes):
            os.makedirs(root / c)
            for i in range(n):
                Image.new("RGB", (12, 10), color=(20 * ci, 5 * i, 100)).save(root / c / f"{i}.png")

    write(tmp_path / "data", ["golden_retriever", "cat", "dog", "bird", "fish"], 5)
    write(tmp_path / "control", ["car", "tree"], 3)
    (tmp_path / "data" / "empty").mkdir()
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")

    import torchvision.transforms as T

    tf = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    b = D.folder_benchmark(tmp_path / "data", tmp_path / "control", 2, tf, tf, test_fraction=0.2)
    assert b.class_names == ["bird", "cat", "dog", "fish", "golden retriever"]  # sorted folders, empty one skipped
    assert [len(t) for t in b.tasks] == [3, 2]
    flat = [c for t in b.tasks for c in t]
    assert sorted(flat) == list(range(5))
    assert len(b.train) == 20 and len(b.test) == 5 and len(b.control) == 6
    assert b.control_names == ["car", "tree"] and b.base == []
    for ds in (b.train, b.test):
        for path, label in zip(ds.paths, ds.labels.tolist()):
            assert D.class_name(os.path.basename(os.path.dirname(path))) == b.class_names[label]
    img, label = b.train[0]
    assert img.shape == (3, 8, 8) and 0 <= label < 5
    loader = torch.utils.data.DataLoader(D.subset(b.test, b.tasks[1]), batch_size=4)
    assert {int(y) for _, ys in loader for y in ys} == set(b.tasks[1])


def test_real_use_path_with_an_open_clip_model_name(tmp_path, capsys):
    """--model/--pretrained/--data/--control: a registered tiny open_clip config, BPE tokenizer."""
    import open_clip
    from PIL import Image

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "fastmask-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    model = open_clip.create_model("fastmask-test-tiny")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    for root, classes in (("data", ["red_car", "blue_sky", "green_tree", "cat"]), ("control", ["dog", "house"])):
        for ci, c in enumerate(classes):
            os.makedirs(tmp_path / root / c)
            for i in range(5):
                Image.new("RGB", (20, 16), (60 * ci, 10 * i, 90)).save(tmp_path / root / c / f"{i}.png")
    out = tmp_path / "out"
    assert cli.main(["continual", "--model", "fastmask-test-tiny", "--pretrained", str(tmp_path / "ckpt.pt"),
                     "--data", str(tmp_path / "data"), "--control", str(tmp_path / "control"), "--tasks", "2",
                     "--batch-size", "4", "--epochs", "1", "--methods", "spu,full", "--quiet", "--no-plots",
                     "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["lr"] == 7.5e-6 and res["config"]["weight_decay"] == 0.2  # the original work's values
    assert res["tasks"] == [["blue sky", "cat"], ["green tree", "red car"]]  # sorted folders, split in order
    assert res["control_classes"] == ["dog", "house"]
    assert all(0 <= t["control"] <= 1 for r in res["runs"] for t in r["tasks"])
    assert "open_clip.get_tokenizer" in res["info"]["tokenizer"]
