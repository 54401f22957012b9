"""fastmask.hf: transformers.Trainer with MaskedAdamW (tiny Llama from a config, CPU, no downloads).

Covers: unselected entries bit-exact after Trainer training; Trainer == a hand-written loop with
the same optimizer; step_in_backward (with gradient accumulation) == the plain step; checkpoint +
resume bit-identical to an uninterrupted run (optimizer rebuilt with the saved masks, or without
masks, adopting them from optimizer.pt); the masks file in every checkpoint; gradient
checkpointing; the errors raised at the start of training.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import fastmask

tf = pytest.importorskip("transformers")
import fastmask.hf as hf  # noqa: E402  (after the skip: it imports transformers)

VOCAB = 64
HAS_SIB = "step_in_backward" in inspect.signature(fastmask.MaskedAdamW).parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is as fast, and steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_sib(sib: bool) -> None:
    if sib and not HAS_SIB:
        pytest.skip("MaskedAdamW(step_in_backward=...) does not exist yet")


def _model(seed: int = 0, intermediate: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg)


def _data(n: int = 8, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": x, "labels": x.clone()} for x in torch.randint(0, VOCAB, (n, seq), generator=g)]


def _masks(model: torch.nn.Module, density: float = 0.25) -> fastmask.MaskSet:
    targets = fastmask.find_targets(model, "hf_llama")
    g = torch.Generator().manual_seed(2)
    return fastmask.select({n: torch.rand(p.shape, generator=g) for n, p in targets.masked.items()}, density=density)


def _optimizer(model, masks="random", sib=False, **kw) -> fastmask.MaskedAdamW:
    """Freeze all but the hf_llama targets; MaskedAdamW over them (masks=None: no masks)."""
    targets = fastmask.find_targets(model, "hf_llama")
    fastmask.freeze(model, targets)
    if isinstance(masks, str):
        masks = _masks(model)
    extra = {"step_in_backward": True} if sib else {}
    return fastmask.MaskedAdamW(targets.parameters(), lr=1e-2, weight_decay=0.1, masks=masks, model=model,
                                **extra, **kw)


def _args(out, **kw) -> "tf.TrainingArguments":
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
                save_strategy="no", max_steps=4, per_device_train_batch_size=2, max_grad_norm=0.0, seed=0)
    base.update(kw)
    return tf.TrainingArguments(**base)


def _trainer(model, opt, args, callback=True, **kw) -> "tf.Trainer":
    cbs = [hf.FastmaskCallback(opt)] if callback is True else ([callback] if callback else [])
    return tf.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, None), callbacks=cbs, **kw)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _state(opt: fastmask.MaskedAdamW) -> dict:
    return {k: {key: torch.as_tensor(v).clone() for key, v in st.items()}
            for k, st in opt.state_dict()["state"].items()}


def _assert_same_params(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    pa, pb = (x if isinstance(x, dict) else dict(x.named_parameters()) for x in (a, b))
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), f"{n} differs"


def _assert_same_state(o1: fastmask.MaskedAdamW | dict, o2: fastmask.MaskedAdamW | dict) -> None:
    s1, s2 = (x if isinstance(x, dict) else _state(x) for x in (o1, o2))
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].keys() == s2[k].keys()
        for key in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][key]), torch.as_tensor(s2[k][key])), (k, key)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
RESUME = dict(max_steps=6, save_strategy="steps", save_steps=3)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Parameters and optimizer state after the default run (_args(): 4 steps, plain step)."""
    model = _model()
    opt = _optimizer(model)
    _trainer(model, opt, _args(tmp_path_factory.mktemp("plain"))).train()
    return _params(model), _state(opt)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps without interruption, writing checkpoint-3 (and -6) on the way: parameters, optimizer
    state and the checkpoint-3 folder."""
    out = tmp_path_factory.mktemp("straight")
    model = _model()
    opt = _optimizer(model)
    _trainer(model, opt, _args(out, **RESUME)).train()
    return _params(model), _state(opt), out / "checkpoint-3"


@pytest.mark.parametrize("sib", [False, True], ids=["step", "step_in_backward"])
def test_trainer_updates_selected_entries_only_and_matches_a_hand_loop(tmp_path, sib):
    _need_sib(sib)
    model = _model()
    before = _params(model)
    masks = _masks(model)
    opt = _optimizer(model, masks, sib=sib)
    _trainer(model, opt, _args(tmp_path, train_sampling_strategy="sequential")).train()

    targets = fastmask.find_targets(model, "hf_llama")
    for n, p in model.named_parameters():
        if n in masks:
            sel = torch.zeros(p.numel(), dtype=torch.bool)
            sel[masks[n].indices.long()] = True
            flat, old = p.detach().reshape(-1), before[n].reshape(-1)
            assert torch.equal(flat[~sel], old[~sel]), f"{n}: an unselected entry moved"
            assert (flat[sel] != old[sel]).float().mean() > 0.9, f"{n}: selected entries did not train"
        elif n not in targets.dense:
            assert torch.equal(p, before[n]), f"{n}: a frozen parameter moved"

    # The same steps by hand: sequential batches, the Trainer's linear schedule and loss scaling.
    ref = _model()
    ref_opt = _optimizer(ref, masks)
    sched = tf.get_linear_schedule_with_warmup(ref_opt, 0, 4)
    data = _data()
    ref.train()
    for i in range(4):
        batch = {k: torch.stack([d[k] for d in data[2 * i: 2 * i + 2]]) for k in data[0]}
        n_items = batch["labels"][..., 1:].ne(-100).sum()
        ref(**batch, num_items_in_batch=n_items).loss.backward()
        ref_opt.step()
        sched.step()
        ref_opt.zero_grad()
    _assert_same_params(model, ref)
    _assert_same_state(opt, ref_opt)


@pytest.mark.parametrize("sib", [False, True], ids=["step", "step_in_backward"])
def test_gradient_accumulation(tmp_path, sib):
    """gradient_accumulation_steps=2 (and an odd remainder at the end of the epoch): the step in the
    backward pass is bit-identical to the Trainer's plain optimizer.step()."""
    _need_sib(sib)
    runs = []
    for use_sib in (False, sib):
        model = _model()
        opt = _optimizer(model, sib=use_sib)
        # 8 samples, batch 2: 4 micro-batches per epoch, 3 per step -> steps of 3 and 1 micro-batches
        _trainer(model, opt, _args(tmp_path / str(use_sib), gradient_accumulation_steps=3, max_steps=4)).train()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    _assert_same_params(m1, m2)
    _assert_same_state(o1, o2)
    assert not any(p.grad is not None for p in m2.parameters())


@pytest.mark.parametrize("how", ["trainer_args", "trainer_args_reentrant", "model"])
@pytest.mark.parametrize("sib", [False, True], ids=["step", "step_in_backward"])
def test_gradient_checkpointing(tmp_path, plain_run, sib, how):
    _need_sib(sib)
    model = _model()
    extra = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_* are aliases of activation_*
        if how == "model":
            model.gradient_checkpointing_enable()
        else:
            extra = {"gradient_checkpointing": True}
            if how.endswith("reentrant"):
                extra["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
        opt = _optimizer(model, sib=sib)
        _trainer(model, opt, _args(tmp_path / "gc", **extra)).train()
    assert model.model.layers[0].gradient_checkpointing
    _assert_same_params(model, plain_run[0])
    _assert_same_state(opt, plain_run[1])


def test_step_in_backward_with_per_tensor_clipping_and_bf16(tmp_path):
    """What the max_grad_norm error recommends instead: a clipping hook per tensor registered before
    the optimizer (so it runs before the step in the backward pass), and bf16 autocast."""
    _need_sib(True)

    def run(sib, clip, name):
        model = _model()
        if clip:
            def hook(p):  # must return None
                torch.nn.utils.clip_grad_norm_(p, max_norm=1e-3)
            for p in fastmask.find_targets(model, "hf_llama").parameters():
                p.register_post_accumulate_grad_hook(hook)
        opt = _optimizer(model, sib=sib)
        _trainer(model, opt, _args(tmp_path / name, bf16=True, max_steps=2)).train()
        return model

    clipped = run(True, True, "a")
    _assert_same_params(clipped, run(False, True, "b"))
    unclipped = run(True, False, "c")
    assert any(not torch.equal(p, q) for p, q in zip(clipped.parameters(), unclipped.parameters()))


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def test_masks_written_into_every_checkpoint(tmp_path):
    model = _model()
    masks = _masks(model)
    opt = _optimizer(model, masks)
    _trainer(model, opt, _args(tmp_path, save_strategy="steps", save_steps=2)).train()
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert (ckpt / hf.MASKS_NAME).is_file()
        assert hf.load_masks(ckpt) == masks
        assert fastmask.MaskSet.load(ckpt / hf.MASKS_NAME) == masks
        meta = fastmask.MaskSet.metadata(ckpt / hf.MASKS_NAME)
        assert meta["global_step"] == str(step) and meta["written_by"] == "fastmask.hf.FastmaskCallback"
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # the Trainer's own copy of the masks
        names = fastmask.find_targets(model, "hf_llama").names  # the optimizer's parameter order
        got = {names[i]: st["mask_indices"] for i, st in saved["state"].items() if "mask_indices" in st}
        assert got.keys() == set(masks)
        assert all(torch.equal(got[n], masks[n].indices) for n in masks)
    assert hf.masks_of(opt, model) == masks
    with pytest.raises(FileNotFoundError, match="fastmask_masks.safetensors"):
        hf.load_masks(tmp_path)


@pytest.mark.parametrize("rebuild", ["same_masks", "no_masks"])
@pytest.mark.parametrize("sib", [False, True], ids=["step", "step_in_backward"])
def test_resume_is_bit_identical(tmp_path, straight_run, rebuild, sib):
    """A fresh model, optimizer and Trainer resuming from checkpoint-3 of a 6-step run (random
    sampling, so resumed mid-epoch) end where the uninterrupted run ended; the resumed optimizer is
    rebuilt with the masks read back from the checkpoint, or without masks: it adopts those saved
    in optimizer.pt."""
    _need_sib(sib)
    params, state, ckpt = straight_run
    model = _model(seed=123)  # other weights: the Trainer loads checkpoint-3's
    opt = _optimizer(model, hf.load_masks(ckpt) if rebuild == "same_masks" else None, sib=sib)
    if rebuild == "no_masks":
        assert not opt.masks
    _trainer(model, opt, _args(tmp_path, **RESUME)).train(resume_from_checkpoint=str(ckpt))
    assert hf.masks_of(opt, model) == _masks(model)
    _assert_same_params(model, params)
    _assert_same_state(opt, state)
    assert hf.load_masks(tmp_path / "checkpoint-6") == _masks(model)


# ----------------------------------------------------------------------------------------------
# errors at the start of training (nothing trained before them)
# ----------------------------------------------------------------------------------------------
def _raises_before_training(model, trainer, exc, match):
    before = _params(model)
    with pytest.raises(exc, match=match):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_step_in_backward_refuses_global_clipping(tmp_path):
    _need_sib(True)
    model = _model()
    opt = _optimizer(model, sib=True)
    args = _args(tmp_path, max_grad_norm=1.0)
    _raises_before_training(model, _trainer(model, opt, args), ValueError,
                            r"(?s)max_grad_norm: got 1\.0.*max_grad_norm=0.*register_post_accumulate_grad_hook")
    # the same arguments with the plain step are fine (global clipping works there)
    model = _model()
    _trainer(model, _optimizer(model), _args(tmp_path, max_grad_norm=1.0, max_steps=1)).train()


def test_step_in_backward_refuses_fp16(tmp_path):
    _need_sib(True)
    model = _model()
    opt = _optimizer(model, sib=True)
    args = _args(tmp_path)
    args.fp16 = True  # a CPU run cannot use fp16 autocast; the check comes first anyway
    cb = hf.FastmaskCallback(opt)
    with pytest.raises(ValueError, match=r"fp16: .*GradScaler.*bf16=True"):
        cb.on_train_begin(args, None, None, model=model, optimizer=opt)


def test_refuses_an_optimizer_for_another_model(tmp_path):
    model, other = _model(), _model()
    opt = _optimizer(other)  # same architecture, other parameters
    _raises_before_training(model, _trainer(model, opt, _args(tmp_path)), ValueError,
                            r"optimizer: parameter 'model\.layers\.0\.mlp\.gate_proj\.weight'.*another model")


def test_refuses_masks_for_another_model(tmp_path):
    model = _model()
    opt = _optimizer(model)
    wrong = _masks(_model(intermediate=48))  # built for another shape
    cb = hf.FastmaskCallback(opt, masks=wrong)
    _raises_before_training(model, _trainer(model, opt, _args(tmp_path), callback=cb), ValueError,
                            r"masks: the mask for 'model\.layers\.0\.mlp\.gate_proj\.weight' was built for shape")
    other = _masks(model, density=0.5)  # right model, but not the optimizer's masks
    cb = hf.FastmaskCallback(opt, masks=other)
    _raises_before_training(model, _trainer(model, opt, _args(tmp_path), callback=cb), ValueError,
                            r"masks: the optimizer holds other masks.*other entries selected")


def test_refuses_other_optimizers(tmp_path):
    model = _model()
    opt = _optimizer(model)
    with pytest.raises(TypeError, match="optimizer: expected a fastmask.MaskedAdamW"):
        hf.FastmaskCallback(torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match="masks: expected a fastmask.MaskSet"):
        hf.FastmaskCallback(opt, masks={})
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    _raises_before_training(model, _trainer(model, adamw, _args(tmp_path), callback=hf.FastmaskCallback()),
                            TypeError, "optimizer: FastmaskCallback needs the Trainer to step a fastmask.MaskedAdamW")
    _raises_before_training(model, _trainer(model, adamw, _args(tmp_path), callback=hf.FastmaskCallback(opt)),
                            ValueError, "optimizer: the Trainer steps another optimizer")


def test_callback_without_optimizer_argument_uses_the_trainers(tmp_path):
    model = _model()
    masks = _masks(model)
    opt = _optimizer(model, masks)
    _trainer(model, opt, _args(tmp_path, save_strategy="steps", save_steps=4),
             callback=hf.FastmaskCallback()).train()
    assert hf.load_masks(tmp_path / "checkpoint-4") == masks


def test_warns_about_trainable_parameters_outside_the_optimizer(tmp_path):
    model = _model()
    opt = _optimizer(model)
    model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 trainable parameters of the model are not in the optimizer.*lm_head"):
        _trainer(model, opt, _args(tmp_path, max_steps=1)).train()
