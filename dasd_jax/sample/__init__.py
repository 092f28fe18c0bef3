"""The `sample` stage: teacher responses with per-token log-probs (paper step 1).

Modules: `sampling` (per-slot temperature/top-k/top-p and seeds), `engine` (JetStream Engine
contract: prefill, insert, generate over a sharded KV cache), `driver` (continuous batching),
`text` (prompt formats, token text and offsets, harmony mapping), `stage` (`run(cfg)`, the
continuation API), `shards` (journaled, resumable output files for any backend),
`openai_client` / `openai_server` (external teachers, a local server for tests and demos),
`jetstream_compat` (running the engine under JetStream's orchestrator), `config`
(`SampleConfig`). Importing the package imports none of them.
"""
