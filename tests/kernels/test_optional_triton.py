"""Triton stays optional (megafusion imports, builds and runs without it) and the kernels are valid GPU programs
(compiled for a CUDA target without a GPU)."""

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code_or_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_everything_works_without_triton(tmp_path):
    """`import triton` made to fail: the package, the kernels package, auto backends and flex all still work, and
    asking for the Triton backend says what is missing."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import megafusion, megafusion.kernels
        from megafusion.kernels import triton_available
        from megafusion.model import LlamaFusion
        from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama
        assert not triton_available()
        save_tiny_llama({str(tmp_path)!r})
        m = LlamaFusion.from_llama({str(tmp_path)!r}, image=TINY_IMAGE, unet=TINY_UNET,
                                   attention="auto", routing="auto")
        ids = torch.tensor([[1, 5, m.boi_id, 0, 0, 0, 0, m.eoi_id, 7]])
        mod = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0]])
        kw = dict(modality=mod, images=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([3]))
        ref = m(ids, **kw).logits
        m.attention_backend = "flex"
        assert torch.allclose(m(ids, **kw).logits, ref, atol=1e-5)
        m.attention_backend = "triton"
        try:
            m(ids, **kw)
        except ModuleNotFoundError as e:
            assert "needs Triton" in str(e), e
            print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MEGAFUSION_FLEX_COMPILE"] = "0"
    result = _run(["-c", code], env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not find_spec("triton"), reason="triton is not installed (pip install triton)")
def test_kernels_compile_for_a_cuda_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run(["-m", "tests.kernels.compile_for_gpu", "--dtype", "bf16", "--arch", "80"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok, ") == 5, result.stdout
