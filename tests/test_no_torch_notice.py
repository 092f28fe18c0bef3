"""The runtime needs no torch, so transformers' "PyTorch was not found" notice is silenced.

transformers decides with `importlib.util.find_spec("torch")`, which returns None when
`sys.modules["torch"]` is None: the subprocesses below hide torch that way, as in an install
from requirements.txt alone. dasd_jax first imports transformers in `tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dasd_jax.tokenizer import build_qwen3_tokenizer

REPO = Path(__file__).resolve().parents[1]
NOTICE = "PyTorch was not found."
HIDE_TORCH = "import sys\nsys.modules['torch'] = None\n"
QUIETING = ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")  # would hide it anyway


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + code],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in QUIETING},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_loading_a_tokenizer_without_torch_prints_no_torch_notice():
    # Control: with torch hidden, transformers itself prints the notice (else this test
    # could not fail).
    assert NOTICE in _python("import transformers").stderr

    folder = build_qwen3_tokenizer()
    proc = _python(
        "from dasd_jax.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({str(folder)!r})\n"
        "import transformers\n"
        "import transformers.utils.logging as hf_logging\n"
        "assert not transformers.is_torch_available()\n"
        "print(tok('<|im_start|>user').input_ids)\n"
        "hf_logging.get_logger('transformers').warning('another notice')\n"
    )
    assert proc.stdout.strip() == "[151644, 872]"
    assert NOTICE not in proc.stderr, proc.stderr
    assert "another notice" in proc.stderr  # only that message is dropped
