"""The examples run, offline, and report what they promise (tiny settings, one intra-op thread)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# A small model that still learns: 2 layers, hidden 64, 1% of gate/up_proj (488 entries).
TINY = ["--layers", "2", "--hidden", "64", "--seq", "32", "--batch", "16", "--pretrain-steps", "100",
        "--steps", "100", "--score-batches", "4", "--eval-windows", "32", "--lr", "3e-2", "--seed", "0"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune_lm():
    return _load("finetune_lm")


@pytest.fixture
def one_thread():
    # The machines that run these tests are shared: two intra-op threads under load are slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(finetune_lm, tmp_path_factory):
    """One run with the step in backward and one without (module-scoped: both are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for flag in ("--step-in-backward", "--no-step-in-backward"):
            d = tmp_path_factory.mktemp(flag.strip("-"))
            out[flag] = finetune_lm.main(TINY + [flag, "--out", str(d)])
        return out
    finally:
        torch.set_num_threads(threads)


def test_finetune_lm_reports(runs):
    r = runs["--step-in-backward"]
    assert r["step_in_backward"] is True
    assert r["preset"] == "hf_llama"
    assert r["selected"] == 488  # 1% of 2 layers x (gate_proj + up_proj) of 192 x 64
    assert r["bit_exact"] and r["changed_unselected"] == 0 and r["changed_other"] == 0
    assert 0 < r["changed_selected"] <= r["selected"]
    assert r["loss_after"] < r["loss_before"] - 0.02, (r["loss_before"], r["loss_after"])
    assert r["apply_exact"] and r["revert_exact"]
    assert 0 < r["delta_bytes"] < r["model_bytes"] / 10
    assert os.path.getsize(r["delta_path"]) == r["delta_bytes"]
    assert r["lora_bytes"] is not None and r["lora_bytes"] > 0


def test_finetune_lm_step_in_backward_is_bit_identical(runs):
    """The step in backward changes when parameters are stepped, not what they become."""
    on, off = runs["--step-in-backward"], runs["--no-step-in-backward"]
    assert off["step_in_backward"] is False and off["bit_exact"]
    assert on["loss_after"] == off["loss_after"]
    # Same tensors and metadata (not the same bytes: safetensors writes metadata keys in hash order).
    from safetensors import safe_open

    with safe_open(on["delta_path"], "pt") as a, safe_open(off["delta_path"], "pt") as b:
        assert a.metadata() == b.metadata()  # incl. each tensor's SHA-256 of its fine-tuned bytes
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_finetune_lm_bf16(finetune_lm, tmp_path, one_thread, capsys):
    tiny = TINY[:TINY.index("--pretrain-steps")] + ["--pretrain-steps", "20", "--steps", "10", "--score-batches", "2",
                                                    "--eval-windows", "8", "--out", str(tmp_path)]
    r = finetune_lm.main(tiny + ["--dtype", "bfloat16"])
    assert r["bit_exact"] and r["apply_exact"] and r["revert_exact"] and r["changed_selected"] > 0
    out = capsys.readouterr().out
    assert "bit-exact outside the mask: True" in out and "delta:" in out


def test_quickstart_runs():
    pytest.importorskip("open_clip")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"), "--steps", "5"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unselected c_fc entries changed: 0 (bit-exact: True)" in proc.stdout
