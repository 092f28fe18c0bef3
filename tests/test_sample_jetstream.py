"""Our engine under JetStream's own orchestrator (google-jetstream 0.2.2, installed without its
TensorFlow dependencies; skipped, visibly, where it is absent)."""

import jax
import numpy as np
import pytest

from dasd_jax.models.checkpoint import load_hf
from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.sample import jetstream_compat
from dasd_jax.sample.driver import Request, generate
from dasd_jax.sample.engine import Engine, EngineConfig
from dasd_jax.sample.sampling import SamplingParams
from dasd_jax.sharding import make_mesh

pytestmark = pytest.mark.skipif(
    not jetstream_compat.available(), reason=jetstream_compat.INSTALL_HINT
)


def test_orchestrator_serves_our_engine_with_the_same_tokens(tmp_path):
    from conftest import make_hf_qwen3

    make_hf_qwen3(tmp_path / "hf", seed=5)
    model = load_hf(
        tmp_path / "hf",
        make_mesh((1, 1, 1), devices=jax.devices()[:1]),
        ModelOptions(dtype="float32", attention="xla"),
    )
    model.lm_head.set_value(model.lm_head[...] * 25.0)  # sharp logits: no argmax near-ties
    cfg = EngineConfig(
        max_concurrent_decodes=2,
        max_prefill_length=32,
        max_decode_length=16,
        prefill_chunk=16,
        decode_steps=4,
    )
    probe = generate(
        Engine(model, cfg),
        [Request(0, [5, 6, 7], [SamplingParams(temperature=0.0, max_tokens=12)])],
    )[0][0].token_ids
    eng = Engine(model, cfg, eos_ids=[probe[4]])  # an EOS that greedy decoding does reach
    prompts = [[5, 6, 7], [100, 101, 3, 4, 9, 12], [42], [7, 7, 7, 7]]
    js = jetstream_compat.import_jetstream()
    assert getattr(js.engine_api, "Engine", None) is not None
    got = jetstream_compat.decode_with_orchestrator(
        eng, tokenizer=None, prompts=prompts, max_tokens=6
    )
    ours = generate(
        eng,
        [
            Request(i, p, [SamplingParams(temperature=0.0, max_tokens=6)])
            for i, p in enumerate(prompts)
        ],
    )
    assert got == [ours[i][0].token_ids for i in range(len(prompts))]
    assert len(got[0]) == probe.index(probe[4])  # stopped by the EOS
    assert all(len(g) <= 6 for g in got)
    assert any(len(g) == 6 for g in got)  # and by max_tokens
    assert np.isfinite(ours[1][0].logprobs).all()
