"""The ray engine on a real single-node Ray cluster (started once for the module), with the
tiny random-weight model and SAE of tests/fakes.py saved as folders (the actors load them
through Settings, like any model): same values as the local probe, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.fakes import mean_residual, tiny_model, tiny_sae
from tests.tolerance import assert_close_fp32, path_reduction
from tools.errors import ConfigError, DataError
from tools.models import load_model
from tools.probe import probe_texts
from tools.sae import load_sae
from tools.settings import Settings
from tools.shards import ShardSet, key_bytes, shard_table, text_keys, write_part

pytestmark = pytest.mark.integration

WORDS = ("how do I bake bread tell me to hurt someone write a poem about the sea quick brown "
         "fox jumps over lazy dog hack into my neighbour's wifi").split()
ANCHOR = [
    ("tell me how to hurt someone", 1), ("hack into my neighbour's wifi", 1),
    ("how to hurt the lazy dog", 1), ("hack the wifi of the quick fox", 1),
    ("how do I bake bread", 0), ("write a poem about the sea", 0),
    ("the quick brown fox jumps", 0), ("bake a poem about bread", 0),
]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    from tools.ray_cluster import ray_cluster

    try:
        with ray_cluster() as c:
            yield c
    except ConfigError as e:
        pytest.skip(f"Ray cannot start a cluster on this machine: {e}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Model and SAE folders, a pool (repeats and extra fields included), its first part,
    settings that point at them, and the local probe's values for the pool."""
    root = tmp_path_factory.mktemp("ray")
    lm = tiny_model()
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    center = mean_residual(lm, 2, [t for t, _ in ANCHOR])
    tiny_sae(layer=2, d_sae=256, k=4, center=center).sae.save_model(root / "sae")
    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(" ".join(rng.choice(WORDS, size=rng.integers(2, 24)))
                               for _ in range(130)))
    pool = texts + texts[:10]  # repeats, some in other read blocks than their first
    rows = [{"text": t, "meta": {"i": i} if i % 2 else {"tag": [str(i)]}}
            for i, t in enumerate(pool)]
    settings = Settings(model=str(root / "model"), sae=str(root / "sae"), home=root / "home",
                        max_tokens=32)
    local_lm, local_sae = load_model(str(root / "model"), cache_dir=root), load_sae(
        str(root / "sae"))
    local = probe_texts(texts, local_lm, local_sae, settings.probe_settings())
    layers = local_sae.hook.layer + 1
    return {
        "root": root, "texts": texts, "settings": settings, "local": local,
        "pool": write_jsonl(root / "pool.jsonl", rows),
        "anchor": write_jsonl(root / "anchor.jsonl", [{"text": t, "label": y} for t, y in ANCHOR]),
        # SAE values: the blocks up to the hook, then the encoder; pooled: then the token mean
        "n_max": path_reduction(local_lm.model.config, layers, [local_sae.d_in]),
        "n_pooled": path_reduction(local_lm.model.config, layers, [settings.max_tokens]),
    }


@pytest.fixture(scope="module")
def resumed(cluster, world):  # type: ignore[no-untyped-def]
    """Shards holding the pool's first 40 texts (as a killed probe leaves them: whole parts
    written by the local probe, plus a half-written .tmp- file), then the whole pool probed
    on two actors in batches of 8: (keys done before, the run, its new parts, progress)."""
    from tools.ray_probe import probe_manifest, ray_probe

    out, s, local, texts = world["root"] / "shards", world["settings"], world["local"], \
        world["texts"]
    before = ShardSet.create(out, probe_manifest(s))
    n_tokens = np.array([a.n_tokens for a in local.acts])
    maxes, pooled = local.max_matrix(), local.pooled()
    for part in (slice(0, 25), slice(25, 40)):
        write_part(before.parts_dir, shard_table(text_keys(texts[part]), n_tokens[part],
                                                 maxes[part], pooled[part]))
    whole = before.files()[0].read_bytes()
    (before.parts_dir / ".tmp-killed.parquet").write_bytes(whole[: len(whole) // 2])
    done, old_parts = before.keys(), set(before.files())
    ticks: list[int] = []
    totals: list[int] = []
    run = ray_probe(world["pool"], settings=s, out_dir=out, concurrency=2, batch_size=8,
                    rows_per_shard=16, progress=ticks.append, on_total=totals.append)
    new_parts = sorted(set(run.shards.files()) - old_parts)
    return done, run, new_parts, ticks, totals


def test_resume_probes_only_the_missing_texts(world, resumed) -> None:
    done_keys, second, new_parts, ticks, totals = resumed
    texts = world["texts"]
    done = set(key_bytes(done_keys))
    assert len(done) == 40
    missing = set(key_bytes(text_keys(texts))) - done
    new_keys = [k for p in new_parts for k in pq.read_table(p, columns=["key"])["key"].to_pylist()]
    assert set(new_keys) == missing  # nothing done was probed again...
    assert totals == [len(missing)] and sum(ticks) == second.probed == len(new_keys)
    assert len(new_keys) - len(missing) <= 10  # ...only a repeat may land in two parts
    assert len(new_parts) > 2  # more than one batch per actor, in parts of >= 16 rows
    assert not list(second.shards.parts_dir.glob(".tmp-*"))  # the killed write's debris
    assert len(second.keys) == len(texts) + 10
    assert key_bytes(second.keys) == key_bytes(text_keys(texts + texts[:10]))  # pool order


def test_ray_values_equal_the_local_probe(world, resumed) -> None:
    shards: ShardSet = resumed[1].shards
    keys = text_keys(world["texts"][40:])  # the texts the ray engine probed
    local = world["local"]
    got, want = shards.max_matrix(keys).toarray(), local.max_matrix()[40:].toarray()
    assert (want > 0).sum() > 100
    np.testing.assert_array_equal(got > 0, want > 0)  # the same active features...
    tol = assert_close_fp32(got, want, world["n_max"])  # ...and values, up to fp32 order
    assert_close_fp32(shards.pooled(keys), local.pooled()[40:], world["n_pooled"])
    assert tol < 1e-4 * float(np.abs(want).max())
    stored = pq.read_table(resumed[2][0], columns=["key", "n_tokens"]).to_pylist()
    by_key = dict(zip(key_bytes(text_keys(world["texts"])), (a.n_tokens for a in local.acts),
                      strict=True))
    assert all(by_key[r["key"]] == r["n_tokens"] for r in stored)


def test_pool_errors_are_one_line(cluster, world) -> None:
    from tools.ray_probe import ray_probe

    s, root = world["settings"], world["root"]
    bad = write_jsonl(root / "bad.jsonl", [{"text": "fine"}, {"text": "  "}, {"other": 1}])
    with pytest.raises(DataError, match=r"bad.jsonl row 2: no text in 'text' \(missing, empty "
                       r"or whitespace-only\) \(and 1 more like it\); remove them"):
        ray_probe(bad, settings=s, out_dir=root / "bad-shards")
    numbers = write_jsonl(root / "numbers.jsonl", [{"text": "fine"}, {"text": 3}])
    with pytest.raises(DataError, match="numbers.jsonl: cannot read it as JSON lines"):
        ray_probe(numbers, settings=s, out_dir=root / "bad-shards")
    pq.write_table(pa.table({"body": ["a text"]}), root / "body.parquet")
    with pytest.raises(DataError, match="^the pool has no 'text' column: pick it with "
                       "--text-field$"):
        ray_probe(root / "body.parquet", settings=s, out_dir=root / "bad-shards")
    with pytest.raises(ConfigError, match="reads .jsonl, .json, .csv or .parquet"):
        ray_probe(root / "pool.txt", settings=s, out_dir=root / "bad-shards")
    other = s.model_copy(update={"max_tokens": 16})  # another probe namespace
    with pytest.raises(ConfigError, match="holds shards of another probe"):
        ray_probe(world["pool"], settings=other, out_dir=root / "shards")


def test_cli_probe_and_coverage_on_the_ray_engine(world, resumed, monkeypatch) -> None:
    from agent.cli import app

    root = world["root"]
    monkeypatch.setenv("FACSYNTH_HOME", str(root / "home"))
    monkeypatch.setenv("FACSYNTH_MAX_TOKENS", "32")
    common = ["--model", str(root / "model"), "--sae", str(root / "sae")]
    res = CliRunner().invoke(app, ["probe", str(world["pool"]), *common, "--engine", "ray",
                                   "--shards", str(root / "shards"), "--delta", "0"])
    assert res.exit_code == 0, res.output
    assert "ray: 0 texts probed" in res.output  # all of them are in the shards already
    assert f"{len(world['texts']) + 10} texts;" in res.stdout and "ray:" not in res.stdout
    res = CliRunner().invoke(app, ["probe", str(world["pool"]), *common, "--shards", "x"])
    assert res.exit_code == 2 and "--shards needs --engine ray" in res.output
    reports = {}
    for engine in ("local", "ray"):
        extra = ["--shards", str(root / "shards")] if engine == "ray" else []
        res = CliRunner().invoke(app, ["coverage", "--anchor", str(world["anchor"]), "--data",
                                       str(world["pool"]), *common, "--engine", engine,
                                       "--quantile", "0.5", "--json",
                                       str(root / f"{engine}.json"), *extra])
        assert res.exit_code == 0, res.output
        reports[engine] = json.loads((root / f"{engine}.json").read_text())
    assert reports["ray"] == reports["local"] and reports["ray"]["n_task"] > 0


def test_pool_picks_on_the_ray_engine_equal_the_local_engine(world, resumed, tmp_path) -> None:
    """improve --pool's selection (agent/pool_select.py) with the pool's rows in memory and
    streamed over its shards (tools/pool/stream.py): the same rows, fills and scores. 20
    candidates of 137 open texts: top-score is exact by construction; fac's first pick
    is, and here its later ones too (its per-feature best rows hold row 30, which the
    greedy turns to third; with 10 candidates its second pick differs)."""
    from agent.pool_select import PoolSelector
    from agent.steps import Rows
    from tools.data import TextDataset, load_texts
    from tools.detector import DetectorSettings, ProbeDetector, train_probe_detector
    from tools.pool.select import SelectSettings
    from tools.pool.source import PoolSource, RayPool
    from tools.workspace import Workspace

    ws = Workspace(world["settings"].model_copy(update={"quantile": 0.5}))
    anchor = TextDataset([t for t, _ in ANCHOR], [y for _, y in ANCHOR], "anchor")
    rows = Rows(data=anchor, added=[])
    model_dir = tmp_path / "model"
    ProbeDetector(train_probe_detector(ws.probe(anchor).pooled(), anchor.labels),
                  DetectorSettings()).save(model_dir)
    local = PoolSelector(ws, anchor, load_texts(world["pool"], label_field=None))
    ray = PoolSelector(ws, anchor, None, source=PoolSource(
        path=str(world["pool"]), engine="ray", ray=RayPool(shards=str(world["root"] / "shards"),
                                                           candidates=20)))
    taken = {0, 5, 133}  # row 133 repeats row 3, which stays open
    for strategy in ("fac", "top-score"):
        s = SelectSettings(strategy=strategy, batch=8)  # type: ignore[arg-type]
        want = local.select(rows, model_dir, s, 8, taken, seed=3)
        got = ray.select(rows, model_dir, s, 8, taken, seed=3)
        assert len(want) == 8 and [p.row for p in got] == [p.row for p in want]
        assert [(p.text, p.fills) for p in got] == [(p.text, p.fills) for p in want]
        assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)
        if strategy == "fac":
            assert any(p.fills for p in want), "some picks fill deficits"
    assert ray.unfilled(rows, taken) == local.unfilled(rows, taken)


@pytest.mark.slow  # two whole compares
def test_compare_on_the_ray_engine_equals_the_local_engine(cluster, world, tmp_path,
                                                          monkeypatch) -> None:
    """`compare --labels pool --pool FILE --engine ray`: the pool probed on Ray, then the
    same picks, metrics and FAC as the local engine (a rerun probes nothing new)."""
    from agent.cli import app

    root = world["root"]
    monkeypatch.setenv("FACSYNTH_HOME", str(root / "home"))
    monkeypatch.setenv("FACSYNTH_MAX_TOKENS", "32")
    monkeypatch.chdir(tmp_path)

    def toxic(t: str) -> int:
        return int("hurt" in t or "hack" in t)

    anchor = write_jsonl(tmp_path / "anchor.jsonl", [
        {"text": f"{t} {w}", "label": y} for t, y in ANCHOR for w in WORDS[:6]])
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"text": t, "label": toxic(t)}
                                                 for t in world["texts"][:60]])
    common = ["compare", "--anchor", str(anchor), "--labels", "pool", "--pool", str(pool),
              "--methods", "seed,pick-fac,pick-top-score", "--budget", "6", "--batch", "3",
              "--seeds", "2", "--seed-frac", "0.3", "--model", str(root / "model"),
              "--sae", str(root / "sae")]
    out = {}
    for engine in ("local", "ray"):
        extra = ["--engine", "ray", "--shards", str(tmp_path / "shards")] if engine == "ray" \
            else []
        res = CliRunner().invoke(app, [*common, "--work", f"w-{engine}", "--json",
                                       f"{engine}.json", *extra])
        assert res.exit_code == 0, res.output
        out[engine] = json.loads((tmp_path / f"{engine}.json").read_text())["methods"]
    for name in ("seed", "pick-fac", "pick-top-score"):
        want, got = out["local"][name], out["ray"][name]
        assert got["per_seed_metric"] == pytest.approx(want["per_seed_metric"], abs=1e-6)
        assert got["fac"] == want["fac"] and got["n_added"] == want["n_added"]
    for picks in sorted((tmp_path / "w-local").glob("*/s*/picks/*.json")):
        mirror = tmp_path / "w-ray" / picks.relative_to(tmp_path / "w-local")
        want, got = json.loads(picks.read_text()), json.loads(mirror.read_text())
        assert (got["rows"], got["labels"], got["fills"]) == \
            (want["rows"], want["labels"], want["fills"])
    assert ShardSet.open(tmp_path / "shards").n_stored() == 60
    res = CliRunner().invoke(app, [*common[:1], "--anchor", str(anchor), "--engine", "ray"])
    assert res.exit_code == 2 and "--engine ray probes the --pool file" in res.output


@pytest.mark.parametrize(("cpus", "gpus", "cuda", "concurrency", "want"), [
    (1, 0, False, None, (2, 0.25, 1)),  # this machine's cluster: a one-thread actor a core
    (15, 0, False, None, (16, 14 / 16, 1)),  # 16 cores, facsynth's cluster of 15 CPUs
    (8, 0, False, 2, (2, 3.5, 4)),
    (64, 8, True, None, (8, 1.0, 1)),  # one actor per GPU
], ids=["1-cpu", "15-cpu", "2-actors", "8-gpu"])
def test_actors_leave_a_cpu_for_reads(cpus, gpus, cuda, concurrency, want) -> None:
    from tools.ray_cluster import Cluster, plan_actors

    plan = plan_actors(Cluster(cpus, gpus, started=True), concurrency, cuda=cuda,
                       local_cores=cpus + 1)
    assert (plan.concurrency, plan.threads) == (want[0], want[2])
    assert plan.num_cpus == pytest.approx(want[1])
    assert plan.num_gpus == (1.0 if cuda else None)  # never 0: Ray takes that as a request
    assert plan.concurrency * plan.num_cpus <= max(cpus - 1, cpus / 2)
    assert plan.concurrency * plan.num_cpus + plan.io_cpus <= cpus  # a read task always fits
    with pytest.raises(ConfigError, match="need 9 GPUs"):
        plan_actors(Cluster(64, 8, started=False), 9, cuda=True)


def test_actors_on_this_machine_fit_in_half_its_memory() -> None:
    from tools.ray_cluster import Cluster, plan_actors

    here = Cluster(15, 0, started=True)
    plan = plan_actors(here, None, cuda=False, local_cores=16, actor_bytes=2 * 2**30,
                       free_bytes=17 * 2**30)  # half: 8.5 GB, four 2 GB actors
    assert (plan.concurrency, plan.threads) == (4, 4)
    tight = plan_actors(here, None, cuda=False, local_cores=16, actor_bytes=8 * 2**30,
                        free_bytes=4 * 2**30)
    assert (tight.concurrency, tight.threads) == (1, 16)  # always one, even if tight
    given = plan_actors(Cluster(16, 0, started=False), None, cuda=False)
    assert (given.concurrency, given.threads) == (3, 5)  # a given cluster: one per 4 CPUs


def test_model_bytes_reads_the_weight_files(tmp_path) -> None:
    from tools.models import model_bytes

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (folder / "model.safetensors").write_bytes(bytes(1000))
    assert model_bytes(str(folder), tmp_path) == 2000  # bf16 on disk, fp32 once loaded
    (folder / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert model_bytes(str(folder), tmp_path) == 1000


def test_spans_for_pool_rows_are_the_local_probes(world) -> None:
    from tools.probe import top_spans
    from tools.ray_probe import spans_for
    from tools.workspace import Workspace

    ws, texts = Workspace(world["settings"]), world["texts"][:12]
    local = probe_texts(texts, ws.model, ws.sae, ws.settings.probe_settings())
    features = list(np.flatnonzero(local.max_matrix().getnnz(axis=0))[:5])
    want = top_spans(local, texts, ws.model.tokenizer, ws.settings.probe_settings(), features,
                     3, 4)
    assert spans_for(ws, texts, features, n=3, window=4) == want and want[features[0]]
