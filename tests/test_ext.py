"""How ``catdpo_kernels._ext`` provides the op: JIT build, pure-torch fallback, disabled.

Each case runs in a fresh interpreter: a process can register the ``catdpo``
op library only once, and this one already loaded the ahead-of-time module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_segment_reduce import oracle, random_ids, random_multi_hot

from catdpo_kernels import _ext

CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from catdpo_kernels import _ext
        from catdpo_kernels.ops.segment_reduce import segment_reduce
        data = torch.load(sys.argv[1])
        outs = [segment_reduce(data["values"], data["ids"], 7) for _ in range(3)]
        outs.append(segment_reduce(data["values"], data["member"], 7))
        outs.append(segment_reduce(data["values"][:0], data["ids"][:0], 7))
        info = _ext.build_info()
    torch.save(outs, sys.argv[2])
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("RESULT" + json.dumps(dict(info=info, runtime_warnings=runtime)))
    """
)


def run_child(tmp_path: Path, env: dict, timeout: float = 600):
    gen = torch.Generator().manual_seed(21)
    n = 20_000
    data = dict(
        values=torch.randn(n, 6, generator=gen),
        ids=random_ids(n, 7, gen, bad_frac=0.05),
        member=random_multi_hot(n, 7, gen),
    )
    torch.save(data, tmp_path / "in.pt")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CATDPO_")}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    report = json.loads(line[len("RESULT") :])
    outs = torch.load(tmp_path / "out.pt")
    expected = [oracle(data["values"], data["ids"], 7)] * 3 + [
        oracle(data["values"], data["member"], 7),
        torch.zeros(8, 6),
    ]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    return report, outs, data


def test_jit_build_matches_aot(tmp_path):
    """CATDPO_FORCE_JIT=1 builds csrc/ with ninja into torch's extension cache (once; later runs reuse it)."""
    if _ext.source_dir() is None:
        pytest.skip("csrc/ sources not available next to the package")
    report, outs, data = run_child(tmp_path, {_ext.ENV_FORCE_JIT: "1"})
    info = report["info"]
    assert info["source"] == "jit", info
    assert info["cpu_kernel"] and not report["runtime_warnings"]
    assert (os.environ.get("TORCH_EXTENSIONS_DIR") or "torch_extensions") in info["module_file"]
    # A JIT build on a CPU-only machine never compiles the CUDA source.
    assert info["cuda"] == info["cuda_kernel"] == (torch.cuda.is_available() and info["cuda"])
    if _ext.has_compiled_op("cpu"):
        # Same sources, same flags: the AOT op in this process gives the same bits.
        assert torch.equal(outs[0], torch.ops.catdpo.segment_reduce(data["values"], data["ids"], 7))
        assert torch.equal(outs[3], torch.ops.catdpo.segment_reduce(data["values"], data["member"], 7))


def test_fallback_warns_once(tmp_path):
    report, _, _ = run_child(tmp_path, {_ext.ENV_FORCE_JIT: "1", _ext.ENV_NO_JIT: "1"})
    assert report["info"]["source"] == "fallback"
    assert not report["info"]["cpu_kernel"]
    assert len(report["runtime_warnings"]) == 1, report
    assert "pure-torch fallback" in report["runtime_warnings"][0]


def test_disabled_is_silent(tmp_path):
    report, _, _ = run_child(tmp_path, {_ext.ENV_DISABLE: "1"})
    assert report["info"]["source"] == "disabled"
    assert report["runtime_warnings"] == []
