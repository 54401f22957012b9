"""Fine-tune a small causal LM on 1% of its MLP entries, offline, and export the change as a delta.

A Llama-style model (transformers' LlamaForCausalLM, random init, byte-level: no tokenizer
download) is first pretrained densely on Python *source code* from the standard library, then
fine-tuned on English *docstrings* of other standard-library modules. Only 1% of the entries of
every gate_proj/up_proj weight (fastmask's ``hf_llama`` preset) are trained, chosen by gradient
score on the docstrings; every other entry stays bit-for-bit what it was. The change is exported
as a sparse delta file and applied to / reverted from a fresh copy of the base model.

    python examples/finetune_lm.py                      # about 20 s on 2 CPU cores
    python examples/finetune_lm.py --layers 4 --hidden 256 --steps 300 --out delta_dir

On a CPU shared with other jobs, OMP_NUM_THREADS=1 can be several times faster than two threads
that wait for each other. The held-out loss on the Python source shows what the fine-tuning costs
the pretrained skill; the loss on held-out docstrings, what it gains.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import tempfile
import time

import fastmask.compat

fastmask.compat.patch_torchvision()  # before transformers imports torchvision (CPU torch + CUDA torchvision wheel)

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastmask  # noqa: E402

BOS = 256  # byte-level tokens: 0..255 are bytes, 256 starts every window
PRETRAIN_MODULES = ["argparse", "json.decoder", "textwrap", "string", "shutil", "pathlib", "zipfile", "subprocess"]
FINETUNE_MODULES = ["collections", "logging", "email.message", "http.client", "urllib.parse", "functools",
                    "unittest.case", "re", "os", "calendar", "decimal", "fractions", "heapq", "statistics"]


def source_text(names):
    """Python source of standard-library modules (its docstrings if a source file is missing)."""
    parts = []
    for name in names:
        mod = importlib.import_module(name)
        try:
            parts.append(inspect.getsource(mod))
        except (OSError, TypeError):
            parts.append(mod.__doc__ or "")
    return "\n".join(parts)


def docstring_text(names):
    """The docstrings of standard-library modules, their public classes, functions and methods."""
    parts = []
    for name in names:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr, obj in vars(mod).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                parts += [inspect.getdoc(m) or "" for a, m in vars(obj).items()
                          if not a.startswith("_") and inspect.isfunction(m)]
    return "\n\n".join(p for p in parts if p)


def encode(text):
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def random_batches(data, n, batch, seq, gen):
    """``n`` batches of ``batch`` random windows of ``seq`` bytes, each after a BOS token."""
    for _ in range(n):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
        windows = torch.stack([data[s:s + seq] for s in starts.tolist()])
        yield torch.cat([torch.full((batch, 1), BOS), windows], dim=1)


def eval_windows(data, seq, max_windows):
    """Fixed, non-overlapping windows for a held-out loss."""
    n = min(max_windows, len(data) // seq)
    return torch.cat([torch.full((n, 1), BOS), data[:n * seq].view(n, seq)], dim=1)


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def held_out_loss(model, windows, batch):
    model.eval()
    losses = [lm_loss(model, windows[i:i + batch]).item() * len(windows[i:i + batch])
              for i in range(0, len(windows), batch)]
    model.train()
    return sum(losses) / len(windows)


def bits(t):
    """A tensor's bytes as same-width integers: equal bits, not just equal values (NaN, -0.0)."""
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 3 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="bytes per training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="dense steps on Python source")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--score-batches", type=int, default=8, help="fine-tuning batches for the gradient score")
    parser.add_argument("--density", type=float, default=0.01, help="fraction of each gate/up_proj weight to train")
    parser.add_argument("--steps", type=int, default=150, help="masked fine-tuning steps on docstrings")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--step-in-backward", action=argparse.BooleanOptionalAction, default=True,
                        help="step each parameter inside loss.backward() and free its gradient at once; the "
                             "results are bit-identical either way")
    parser.add_argument("--out", default=None, help="directory for delta.safetensors (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    # 1. Text shipped with Python: code to pretrain on, prose to fine-tune on (90% train, 10% held out).
    code, prose = encode(source_text(PRETRAIN_MODULES)), encode(docstring_text(FINETUNE_MODULES))
    code_train, code_test = code[:int(0.9 * len(code))], code[int(0.9 * len(code)):]
    prose_train, prose_test = prose[:int(0.9 * len(prose))], prose[int(0.9 * len(prose)):]
    code_eval = eval_windows(code_test, args.seq, args.eval_windows)
    prose_eval = eval_windows(prose_test, args.seq, args.eval_windows)
    print(f"text: {len(code) / 1e3:.0f} KB of Python source (pretraining), "
          f"{len(prose) / 1e3:.0f} KB of docstrings (fine-tuning); 10% of each held out")

    # 2. A small Llama, pretrained densely for a few steps on the code.
    config = LlamaConfig(vocab_size=257, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq + 1,
                         bos_token_id=BOS, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    dense_opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr)
    for batch in random_batches(code_train, args.pretrain_steps, args.batch, args.seq, gen):
        lm_loss(model, batch).backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)
    del dense_opt
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({args.dtype}), pretrained {args.pretrain_steps} dense steps "
          f"({time.perf_counter() - t0:.1f} s)")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # the weights we fine-tune from
    before = {"prose": held_out_loss(model, prose_eval, args.batch), "code": held_out_loss(model, code_eval, args.batch)}

    # 3. Which tensors: the preset that fits (hf_llama: gate_proj and up_proj weights); freeze the rest.
    targets = fastmask.find_targets(model)
    fastmask.freeze(model, targets)
    print(f"targets: preset {targets.preset!r}: {targets}")

    # 4. Which entries: |sum of gradients| over a few fine-tuning batches, top `density` of each tensor.
    scores = fastmask.score(model, list(random_batches(prose_train, args.score_batches, args.batch, args.seq, gen)),
                            lm_loss, targets=targets, progress=False)
    masks = fastmask.select(scores, density=args.density)
    print(f"selected {masks.k} of {masks.numel} entries ({masks.density:.2%}) in {len(masks)} tensors; "
          f"{masks.k / n_params:.3%} of the model")

    # 5. Train: state only for the selected entries; with step_in_backward the step happens inside
    #    loss.backward() and each gradient is freed at once (opt.step() then finds nothing to do).
    opt = fastmask.MaskedAdamW(targets.parameters(), lr=args.lr, masks=masks, model=model,
                               step_in_backward=args.step_in_backward)
    t1 = time.perf_counter()
    for batch in random_batches(prose_train, args.steps, args.batch, args.seq, gen):
        lm_loss(model, batch).backward()  # with step_in_backward, the step happens in here
        opt.step()                        # ... and this finds no gradient left: a no-op then
        opt.zero_grad(set_to_none=True)
    print(f"fine-tuned {args.steps} steps in {time.perf_counter() - t1:.1f} s "
          f"(step in backward: {'on' if args.step_in_backward else 'off'})")
    after = {"prose": held_out_loss(model, prose_eval, args.batch), "code": held_out_loss(model, code_eval, args.batch)}
    print(f"held-out loss, docstrings (fine-tuned on): {before['prose']:.4f} -> {after['prose']:.4f}")
    print(f"held-out loss, Python source (pretrained on): {before['code']:.4f} -> {after['code']:.4f}")

    # 6. Bit-exactness: compare the bits of every tensor with the base.
    changed_selected = changed_unselected = changed_other = 0
    for name, p in model.named_parameters():
        diff = (bits(p) != bits(base[name])).reshape(-1)
        if name in masks:
            selected = masks[name].to_bool().reshape(-1)
            changed_selected += int(diff[selected].sum())
            changed_unselected += int(diff[~selected].sum())
        elif name not in targets.dense:
            changed_other += int(diff.sum())
    bit_exact = changed_unselected == 0 and changed_other == 0
    print(f"selected entries changed: {changed_selected} of {masks.k}; unselected entries of masked weights "
          f"changed: {changed_unselected}; entries of other tensors changed: {changed_other} "
          f"-> bit-exact outside the mask: {bit_exact}")

    # 7. The delta: indices + XOR bits of the selected entries, then apply/revert on a fresh base copy.
    out_dir = args.out or tempfile.mkdtemp(prefix="fastmask-finetune-lm-")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "delta.safetensors")
    report = fastmask.delta.export(model, base, masks, path, dense=list(targets.dense) or None)
    lora = (f"; a LoRA adapter with as many trainable entries: {report['lora_bytes'] / 1024:.1f} KiB"
            if report["lora_bytes"] is not None else "")
    print(f"delta: {path}: {report['file_bytes'] / 1024:.1f} KiB vs the full model {report['model_bytes'] / 1024:.1f} KiB "
          f"({report['file_bytes'] / report['model_bytes']:.2%}){lora}")
    fresh = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    fresh.load_state_dict(base)
    fastmask.delta.apply(fresh, path)
    applied = all(torch.equal(bits(p), bits(q)) for p, q in zip(fresh.parameters(), model.parameters()))
    fastmask.delta.revert(fresh, path)
    reverted = all(torch.equal(bits(p), bits(base[n])) for n, p in fresh.named_parameters())
    print(f"apply(base) == fine-tuned, bit for bit: {applied}; revert(that) == base, bit for bit: {reverted}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return {"loss_before": before["prose"], "loss_after": after["prose"], "code_loss_before": before["code"],
            "code_loss_after": after["code"], "preset": targets.preset, "selected": masks.k,
            "changed_selected": changed_selected, "changed_unselected": changed_unselected,
            "changed_other": changed_other, "bit_exact": bit_exact, "delta_path": path,
            "delta_bytes": report["file_bytes"], "model_bytes": report["model_bytes"],
            "lora_bytes": report["lora_bytes"], "apply_exact": applied, "revert_exact": reverted,
            "step_in_backward": args.step_in_backward}


if __name__ == "__main__":
    main()
