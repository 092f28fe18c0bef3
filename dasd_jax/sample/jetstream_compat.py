"""Our `Engine` under JetStream's orchestrator (`google-jetstream` 0.2.2, an optional extra).

Consumes an `engine.Engine` and its tokenizer; produces a `jetstream.engine.engine_api.Engine`
(`JetStreamEngine`) that JetStream's `orchestrator.Driver` (prefill, transfer, generate and
detokenize threads over a free-slot queue) and its gRPC `LLMOrchestrator` can serve, and
`decode_with_orchestrator`, which runs token-id requests through that Driver in process.

Install: `pip install --no-deps google-jetstream==0.2.2 grpcio shortuuid` (requirements-dev
pins them; protobuf, prometheus-client and tiktoken come with our runtime set).

Why this shim exists (each item is a defect of the 2024 PyPI release, archived upstream):
1. `jetstream.engine.token_utils` imports `seqio` at module level, only for SentencePiece
   vocabularies we never use; `seqio` pulls TensorFlow (~1.9 GB). Without seqio installed, a
   stub module with the two class names it imports is registered before JetStream loads.
2. Its orchestrator calls `jax.tree_map` after every insert; current jax removed it (its
   thread wrapper then SIGKILLs the process). The alias `jax.tree_map = jax.tree.map` is
   restored if missing.
3. Importing its orchestrator sets the root logger to DEBUG with a stdout handler; that is
   undone.
4. Its padding prepends a BOS id to every prompt. Qwen3 and gpt-oss prompts have none, so
   the tokenizer adapter reports a sentinel BOS id (-1) that `JetStreamEngine.prefill` strips.
Sampling under the orchestrator is the engine's default (greedy, full decode budget): the
0.2.2 contract passes no per-request sampling parameters.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import types
from typing import Any

import jax
import numpy as np

from dasd_jax.sample.engine import Engine

BOS_SENTINEL = -1
INSTALL_HINT = (
    "google-jetstream is not installed: pip install --no-deps "
    "google-jetstream==0.2.2 grpcio shortuuid (see README, 'JetStream')"
)


def _stub_seqio() -> None:
    if "seqio" in sys.modules or importlib.util.find_spec("seqio") is not None:
        return
    seqio = types.ModuleType("seqio")
    vocabularies = types.ModuleType("seqio.vocabularies")

    class Vocabulary:  # only named by jetstream's type hints and isinstance checks
        pass

    class SentencePieceVocabulary(Vocabulary):
        pass

    vocabularies.Vocabulary = Vocabulary
    vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
    seqio.vocabularies = vocabularies
    seqio.__dasd_stub__ = True
    sys.modules["seqio"] = seqio
    sys.modules["seqio.vocabularies"] = vocabularies


def available() -> bool:
    return importlib.util.find_spec("jetstream") is not None


def import_jetstream() -> types.SimpleNamespace:
    """JetStream's modules, with the shims above applied; ImportError with the install line."""
    if not available():
        raise ImportError(INSTALL_HINT)
    _stub_seqio()
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from jetstream.core import orchestrator
        from jetstream.core.proto import jetstream_pb2
        from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2
    finally:
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
    return types.SimpleNamespace(
        orchestrator=orchestrator,
        jetstream_pb2=jetstream_pb2,
        engine_api=engine_api,
        token_utils=token_utils,
        tokenizer_api=tokenizer_api,
        tokenizer_pb2=tokenizer_pb2,
    )


def make_jetstream_engine(engine: Engine, tokenizer, tokenizer_path: str = "") -> Any:
    """A JetStream `engine_api.Engine` delegating to `engine` (see the module docstring)."""
    js = import_jetstream()

    class Tokenizer(js.tokenizer_api.Tokenizer):
        def encode(
            self,
            s: str,
            is_bos: bool = True,
            max_prefill_length: int | None = None,
            jax_padding: bool = True,
            **kwargs,
        ):
            ids = np.asarray(tokenizer.encode(s, add_special_tokens=False), np.int32)
            return js.token_utils.pad_tokens(
                ids,
                self.bos_id,
                self.pad_id,
                is_bos=is_bos,
                max_prefill_length=max_prefill_length,
                jax_padding=jax_padding,
            )

        def decode(self, token_ids: list[int], **kwargs) -> str:
            return tokenizer.decode(token_ids)

        @property
        def pad_id(self) -> int:
            return 0

        @property
        def eos_id(self) -> int:
            return engine.eos_ids[0] if engine.eos_ids else -2

        @property
        def bos_id(self) -> int:
            return BOS_SENTINEL

        @property
        def stop_tokens(self) -> set[int]:
            return set(engine.eos_ids)

    class JetStreamEngine(js.engine_api.Engine):
        def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length: int):
            tokens = np.asarray(jax.device_get(padded_tokens)).reshape(-1)[:true_length]
            if len(tokens) and tokens[0] == BOS_SENTINEL:
                tokens = tokens[1:]
            return engine.prefill(
                params=params,
                existing_prefix=existing_prefix,
                padded_tokens=tokens,
                true_length=len(tokens),
            )

        def generate(self, params, decode_state):
            decode_state, res = engine.generate(params, decode_state)
            return decode_state, js.engine_api.ResultTokens(
                data=res.data,
                tokens_idx=res.tokens_idx,
                valid_idx=res.valid_idx,
                length_idx=res.length_idx,
                samples_per_slot=res.samples_per_slot,
            )

        def insert(self, prefix, decode_state, slot: int):
            return engine.insert(prefix, decode_state, slot)

        def load_params(self, *args, **kwargs):
            return engine.load_params()

        def get_prefix_destination_sharding(self):
            return engine.get_prefix_destination_sharding()

        def get_tokenizer(self):
            return js.tokenizer_pb2.TokenizerParameters(path=tokenizer_path)

        def build_tokenizer(self, metadata):
            return Tokenizer()

        def init_decode_state(self, *args, **kwargs):
            return engine.init_decode_state()

        @property
        def max_concurrent_decodes(self) -> int:
            return engine.max_concurrent_decodes

        @property
        def samples_per_slot(self) -> int:
            return 1

        @property
        def max_prefill_length(self) -> int:
            # JetStream pads to its own power-of-two buckets up to this and prepends BOS, so
            # one position is kept free for the sentinel
            return engine.max_prefill_length

        @property
        def mesh(self):
            return engine.mesh

        @property
        def colocated_cpus(self):
            return None

    return JetStreamEngine()


def decode_with_orchestrator(
    engine: Engine, tokenizer, prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """Token-id prompts through JetStream's own Driver (interleaved: one engine prefills and
    generates), all requests concurrently; the generated ids of each, in order."""
    js = import_jetstream()
    je = make_jetstream_engine(engine, tokenizer)
    params = je.load_params()
    driver = js.orchestrator.Driver(
        prefill_engines=[je],
        generate_engines=[je],
        prefill_params=[params],
        generate_params=[params],
        interleaved_mode=True,
    )
    client = js.orchestrator.LLMOrchestrator(driver=driver)
    pb = js.jetstream_pb2

    async def one(ids: list[int]) -> list[int]:
        req = pb.DecodeRequest(
            session_cache="",
            max_tokens=max_tokens,
            token_content=pb.DecodeRequest.TokenContent(token_ids=ids),
        )
        out: list[int] = []
        async for resp in client.Decode(req):
            out.extend(resp.stream_content.samples[0].token_ids)
        return out

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    try:
        return asyncio.run(main())
    finally:
        driver.stop()
