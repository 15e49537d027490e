"""The CPU import shim: on only with SGLANG_USE_CPU_ENGINE=1, never shadows a real module, and
a placeholder that is actually used fails loudly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _run(code: str, env_flag: str | None, extra_path: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    if env_flag is not None:
        env["SGLANG_USE_CPU_ENGINE"] = env_flag
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )


def test_active_with_cpu_engine_flag():
    out = _run(
        """
        from torchvision.io import decode_jpeg
        import sgl_kernel, torchvision
        from sglang_kvcomm.cpu_shim import is_active
        assert is_active()
        assert torchvision.__kvcomm_cpu_shim__ and sgl_kernel.__kvcomm_cpu_shim__
        try:
            decode_jpeg(b"")
        except RuntimeError as exc:
            print(exc)
        """,
        env_flag="1",
    )
    assert out.returncode == 0, out.stderr
    assert "torchvision.io.decode_jpeg is not available" in out.stdout
    assert "SGLANG_USE_CPU_ENGINE=1" in out.stdout


def test_inactive_without_flag():
    for flag in (None, "0"):
        out = _run(
            """
            from sglang_kvcomm.cpu_shim import is_active
            assert not is_active()
            import torchvision
            """,
            env_flag=flag,
        )
        assert out.returncode != 0
        assert "No module named 'torchvision'" in out.stderr


def test_real_module_wins(tmp_path):
    real = tmp_path / "sgl_kernel"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    out = _run("import sgl_kernel; print(sgl_kernel.REAL)", env_flag="1", extra_path=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_sglang_imports_on_cpu():
    out = _run("import sglang, sglang.srt.server_args; print('ok')", env_flag="1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
