"""Progress switches: only public hooks of transformers, huggingface_hub and tqdm are used."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (nothing imported yet), without the switches set."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",
                                                              "EXPERTKIT_QUIET")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_transformers_bars_follow_the_switch_without_patching_its_modules():
    proc = run_fresh("""
        import os
        from expertkit.progress import set_hf_bars
        set_hf_bars(False)                 # before transformers is imported: the documented variable
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        import transformers.utils.logging as hf_logging
        import huggingface_hub.constants as hub_constants
        assert not hf_logging.is_progress_bar_enabled()
        set_hf_bars(True)
        assert hf_logging.is_progress_bar_enabled()
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ   # taken back for child processes
        assert hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is True  # read at import; never patched
        import importlib
        assert importlib.import_module("huggingface_hub.utils.tqdm").HF_HUB_DISABLE_PROGRESS_BARS is True
        set_hf_bars(False)
        assert not hf_logging.is_progress_bar_enabled()
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "Cannot enable progress bars" not in proc.stderr


def test_quiet_silences_tqdm_bars_of_other_libraries():
    proc = run_fresh("""
        from expertkit.progress import set_quiet
        set_quiet(True)
        from tqdm.auto import tqdm         # e.g. transformers' GGUF reader draws its bar with it
        for _ in tqdm(range(3), desc="converting"):
            pass
    """)
    assert proc.returncode == 0, proc.stderr
    assert "converting" not in proc.stderr
    loud = run_fresh("""
        from tqdm.auto import tqdm
        for _ in tqdm(range(3), desc="converting"):
            pass
    """)
    assert "converting" in loud.stderr  # the check above can fail
