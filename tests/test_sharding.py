"""--shard-tables: plain tables sharded across 2 ranks by TorchRec (gloo, CPU) train the model one process
trains with the same optimizer, and what cannot be sharded is refused by name."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from recompress.checkpoint import load_checkpoint
from recompress.cli import main
from recompress.compress.registry import check_sharding, parse_methods
from recompress.data import open_dataset
from recompress.data.synthetic import make_synthetic
from recompress.errors import UserError
from recompress.evaluation import evaluate_model
from recompress.families import get_family
from recompress.spec import ModelSpec, TableSpec
from recompress.tables import DenseTable
from recompress.trainconfig import TORCHREC, TrainConfig

from .test_distributed import die_at_third_step, max_diff, run, torchrun

needs_torchrec = pytest.mark.skipif(find_spec("torchrec") is None or find_spec("fbgemm_gpu") is None,
                                    reason=f"TorchRec is not installed ({TORCHREC})")
TRAIN = ("train", "--data", "ctr", "--dim", "8", "--batch-size", "255", "--lr", "0.1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    make_synthetic(root / "ctr", samples=5000, table_rows=[400, 120, 30], seed=1)
    one(root, "base", "train", "--data", "ctr", "--dim", "8", "--epochs", "1")
    return root


def one(work: Path, name: str, *args: str) -> Path:
    """A run in this process (the reference: no second interpreter to start)."""
    here = os.getcwd()
    os.chdir(work)
    try:
        r = CliRunner().invoke(main, [*args, "-o", name])
    finally:
        os.chdir(here)
    assert r.exit_code == 0, r.output[-2000:]
    return work / name


def sharded(work: Path, name: str, how: str, *args: str) -> Path:
    r = run(*args, "--shard-tables", how, "-o", name, cwd=work, nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    return work / name


@needs_torchrec
@pytest.mark.parametrize(("how", "optimizer"), [("column-wise", "adagrad"), ("table-wise", "rowwise-adagrad")])
def test_sharded_tables_train_the_model_one_process_trains(work, how, optimizer):
    # FBGEMM's fused EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD against torch's Adagrad and recompress's row-wise
    # Adagrad in one process (EXACT_SGD: the next test); 16 steps, 128 + 127 rows per rank. Measured: 9.8e-7,
    # 1.5e-7 (with TorchRec's default gradient division by the ranks, SGD differed by more than 1e-3).
    ref = one(work, f"one-{optimizer}", *TRAIN, "--optimizer", optimizer)
    two = sharded(work, f"{how}-{optimizer}", how, *TRAIN, "--optimizer", optimizer)
    assert max_diff(ref, two) < 1e-5
    data = open_dataset(work / "ctr")  # the gathered tables are the trained ones: the test split scores alike
    auc = [evaluate_model(load_checkpoint(p).model, data).metrics(("auc",))["auc"] for p in (ref, two)]
    assert auc[0] == pytest.approx(auc[1], abs=1e-6)


@needs_torchrec
def test_a_rank_with_no_rows_of_a_batch_still_takes_part(work):
    # Table-wise SGD (EXACT_SGD). 3,974 training rows in batches of 3,973: the second batch's one row goes to
    # rank 0 and rank 1 has none.
    # Its forward and backward passes are TorchRec collectives, so it must run them anyway (it skipped them,
    # and the other rank waited for it until gloo's timeout; found by review).
    args = (*TRAIN[:5], "--batch-size", "3973", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.1")
    assert open_dataset(work / "ctr").size("train") % 3973 == 1
    ref = one(work, "one-tail", *args)
    assert max_diff(ref, sharded(work, "tail", "table-wise", *args)) < 1e-5


@needs_torchrec
def test_a_rank_that_dies_mid_run_is_one_clear_error_and_nothing_is_written(work, tmp_path):
    # TorchRec's all-to-alls ran outside recompress's collective guard: the survivor printed a traceback. Rank 1
    # dies at its third SGD step (the dense layers'), between two sharded lookups.
    r = torchrun(tmp_path, "die.py", die_at_third_step("SGD"), "train", "--data", str(work / "ctr"), "--dim", "8",
                 "--batch-size", "64", "--optimizer", "sgd", "--shard-tables", "table-wise",
                 "-o", str(tmp_path / "out" / "ck"))
    assert r.returncode != 0
    # rank 0 notices the lost peer, or torchrun's SIGTERM reaches it first (seen in CI)
    assert "lost contact with another rank" in r.stderr or "no partial output was kept" in r.stderr, r.stderr[-2000:]
    assert "/recompress/" not in r.stderr, r.stderr[-3000:]  # no traceback through our code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["die.py"]


@needs_torchrec
def test_column_wise_rowwise_adagrad_keeps_one_accumulator_per_column_block(work):
    # One step from the base model. The table gradient g comes from a 1-process SGD step with lr 1 (w0 - w1);
    # FBGEMM's row-wise Adagrad on a 4 + 4 column cut scales each block by its own mean square (TorchRec's
    # behaviour), not the row's: written out here in float64.
    step = ("checkpoint", "base", "--method", "finetune", "--data", "ctr", "--steps", "1", "--no-keep-best",
            "--batch-size", "255")
    one(work, "sgd1", *step, "--optimizer", "sgd", "--lr", "1")
    cw = sharded(work, "cw1", "column-wise", *step, "--optimizer", "rowwise-adagrad", "--lr", "0.1")
    w0, w1, got = (load_file(str(work / n / "weights.safetensors")) for n in ("base", "sgd1", cw.name))
    for key in [k for k in w0 if k.startswith("tables.")]:
        g = w0[key].astype(np.float64) - w1[key].astype(np.float64)
        blocks = [g[:, :4], g[:, 4:]]
        scale = np.concatenate([np.repeat(np.sqrt((b ** 2).mean(1, keepdims=True)), 4, 1) for b in blocks], 1)
        expect = w0[key] - 0.1 * g / (scale + 1e-8)
        whole_row = w0[key] - 0.1 * g / (np.sqrt((g ** 2).mean(1, keepdims=True)) + 1e-8)
        assert np.abs(got[key] - expect).max() < 1e-4, key
        assert np.abs(got[key] - whole_row).max() > 1e-2, key  # the cut matters on these rows


@needs_torchrec
def test_sharded_fine_tunes_with_keep_best_and_replicated_tables(work):
    # C1 hashed (replicated, SGD on its rows in this loop), C2 and C3 sharded; two fine-tunes in one run: the
    # second loads the shards from rank 0 (rank 1 kept no values after the first); keep-best restores shards.
    # lr 1 overshoots: the first fine-tune's best step is not its last, so keep-best must restore the shards
    # (with a restore that did nothing, the weights differed by 5.3e-3; found by review).
    args = ("checkpoint", "base", "--method", "hash@C1,finetune,finetune", "--ratio", "4", "--data", "ctr",
            "--optimizer", "sgd", "--lr", "1", "--batch-size", "127", "--epochs", "2")
    one(work, "chain1", *args)
    two = sharded(work, "chain2", "table-wise", *args)
    assert max_diff(work / "chain1", two) < 1e-5
    one_h, two_h = (json.loads((work / n / "spec.json").read_text())["history"] for n in ("chain1", "chain2"))
    best = [h["finetune"]["keep_best"]["best_step"] for h in two_h[-2:]]
    assert best == [h["finetune"]["keep_best"]["best_step"] for h in one_h[-2:]]
    assert any(b < h["finetune"]["steps"] for b, h in zip(best, two_h[-2:])), best
    assert two_h[-1]["finetune"]["config"]["shard"] == "table-wise" and two_h[-1]["finetune"]["ranks"] == 2


def test_shard_tables_refusals_before_any_work(work):
    cases = [(["--optimizer", "sgd"], "this run has one"),
             (["--optimizer", "adam"], "which have no Adam")]
    for extra, message in cases:
        r = CliRunner().invoke(main, [*TRAIN[:1], "--data", str(work / "ctr"), "--shard-tables", "table-wise",
                                      *extra, "-o", str(work / "never")])
        assert r.exit_code != 0 and message in r.output, r.output
        assert not (work / "never").exists()


@needs_torchrec
def test_with_nproc_a_refusal_comes_once_before_any_process_starts(work):
    """Noticed last stop: with --nproc, train and checkpoint launched torchrun first, so every rank printed the
    refusal of an option that no rank count makes possible, then the launcher blamed a rank. Now the command
    refuses before it launches anything: once, and the launcher blames no rank."""
    cases = [(("train", "--data", "ctr", "--optimizer", "adam"), "which have no Adam"),
             (("checkpoint", "base", "--method", "finetune,int8", "--data", "ctr", "--optimizer", "sgd"),
              "int8 cannot follow a fine-tune")]
    for args, message in cases:
        r = run(*args, "--shard-tables", "table-wise", "-o", "never", cwd=work, nproc=2)
        said = " ".join(r.stderr.split())
        assert r.returncode == 2 and said.count(message) == 1 and "failed first" not in said, r.stderr[-2000:]
        assert not (work / "never").exists()


def test_torchrec_missing_is_named_with_the_install_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchrec" else real(name, *a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        TrainConfig(optimizer="sgd", shard="table-wise").validate()
    assert "needs TorchRec" in e.value.message and "pip install --no-deps torchrec" in e.value.hint


def test_no_data_free_step_may_follow_a_sharded_fine_tune():
    cfg = TrainConfig(optimizer="sgd", shard="table-wise")
    with pytest.raises(UserError, match="int8 cannot follow a fine-tune"):
        check_sharding(parse_methods("finetune,int8"), cfg)
    with pytest.raises(UserError, match="hash cannot follow a fine-tune"):  # it fine-tunes, but reads the tables
        check_sharding(parse_methods("finetune,hash", {"finetune": True}), cfg)  # first (found by review)
    check_sharding(parse_methods("hash,finetune,finetune", {"finetune": True}), cfg)
    check_sharding(parse_methods("int8,finetune"), cfg)  # before the fine-tune: every rank has the values
    check_sharding(parse_methods("finetune,int8"), TrainConfig())  # replicated tables: anything goes


def models() -> dict[str, tuple[object, object]]:
    dlrm, sasrec = get_family("dlrm"), get_family("sasrec")
    narrow = dlrm.build(ModelSpec("dlrm", {"num_dense": 2, "emb_dim": 6, "bottom": [6], "top": [1]}, []),
                        {"C1": DenseTable(10, 6, torch.zeros(10, 6))})
    items = sasrec.from_spec(ModelSpec("sasrec", sasrec.hparams({"dim": 8, "max_len": 5}),
                                       [TableSpec("item", 20, 8, role="item")]))
    return {"narrow": (dlrm, narrow), "sasrec": (sasrec, items)}


@pytest.mark.parametrize(("case", "message"), [("narrow", "multiples of 4: C1 (6)"),
                                               ("sasrec", "a sasrec model's tables are not")])
def test_models_that_cannot_be_sharded_are_refused_by_name(case, message):
    from recompress.sharding import ShardedTables
    family, model = models()[case]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ShardedTables(model, family, TrainConfig(optimizer="sgd", shard="table-wise"))


def test_a_deferred_table_draws_in_blocks_what_an_eager_one_draws(monkeypatch):
    # Training from scratch with sharded tables, no rank draws a table whole: the values come in row blocks
    # (here 3 rows of 16 values each) from the recorded generator state, and the generator moves on as far.
    monkeypatch.setattr(DenseTable, "DRAW_ROWS_BYTES", 3 * 16 * 4)
    eager, deferred = DenseTable(10, 16), DenseTable(10, 16, deferred=True)
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    eager.reset_parameters(gens[0])
    deferred.reset_parameters(gens[1])
    assert deferred.weight.is_meta
    blocks = list(deferred.initial_rows())
    assert [s for s, _ in blocks] == [0, 3, 6, 9]
    assert torch.equal(torch.cat([b for _, b in blocks]), eager.weight.detach())
    assert torch.equal(torch.rand(5, generator=gens[0]), torch.rand(5, generator=gens[1]))
