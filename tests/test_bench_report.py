"""bench/report.py's sections: the GPU section that scripts/gpu_check.sh writes into RESULTS.md
survives every other report, and replaces only itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

report = pytest.importorskip("bench.report", reason="bench/ is not in this tree (an sdist)")

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = """# fastmask GPU check

- GPU: NVIDIA H200 (sm_90)
- date: 2026-12-01T12:00Z

| stage | status | seconds | log |
| --- | --- | --- | --- |
| build | PASSED | 61 | build.log |
"""


def _report(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bench.report", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_gpu_section_is_spliced_and_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    md = out / "RESULTS.md"
    md.write_text("# fastmask benchmark results\n\nCPU tables\n\n<!-- lm:start -->\nLM\n<!-- lm:end -->\n")
    run_dir = tmp_path / "gpu-check-H200"
    run_dir.mkdir()
    (run_dir / "SUMMARY.md").write_text(SUMMARY)
    r = _report("--gpu-summary", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    text = md.read_text()
    assert text.startswith("# fastmask benchmark results\n\nCPU tables") and "<!-- lm:start -->\nLM" in text
    block = report._block(text, report.GPU_START, report.GPU_END)
    assert block is not None and "NVIDIA H200" in block and "| build | PASSED |" in block
    assert "# fastmask GPU check" not in block  # the summary's title gives way to the section's
    (run_dir / "SUMMARY.md").write_text(SUMMARY.replace("H200", "H100").replace("PASSED", "FAILED (exit 1)"))
    assert _report("--gpu-summary", run_dir / "SUMMARY.md", "--out", out).returncode == 0
    text2 = md.read_text()
    assert text2.count(report.GPU_START) == 1 and "H100" in text2 and "H200" not in text2
    assert text2.replace(report._block(text2, report.GPU_START, report.GPU_END), "") == \
        text.replace(block, "")  # everything else as it was


def test_cpu_report_keeps_the_gpu_section(tmp_path):
    """A report from a CPU run (the committed bench/results-cpu.json) rewrites everything else."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("old text\n\n" + report.gpu_block(SUMMARY) + "\n")
    r = _report(ROOT / "bench" / "results-cpu.json", "--out", out)
    assert r.returncode == 0, r.stderr
    text = (out / "RESULTS.md").read_text()
    assert "old text" not in text and "## Masked step" in text
    assert report._block(text, report.GPU_START, report.GPU_END) == report.gpu_block(SUMMARY)


def test_a_json_without_cases_is_refused(tmp_path):
    js = tmp_path / "empty.json"
    js.write_text(json.dumps({"benchmarks": []}))
    r = _report(js, "--out", tmp_path)
    assert r.returncode == 2 and "no benchmark cases" in r.stderr


@pytest.mark.parametrize("args,match", [([], "one of them"), (["x.json", "--gpu-summary", "d"], "one of them"),
                                        (["--gpu-summary", "no/such/dir"], "does not exist")])
def test_arguments(args, match):
    r = _report(*args)
    assert r.returncode == 2 and match in r.stderr
