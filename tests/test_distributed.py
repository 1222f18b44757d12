"""Data-parallel training under torchrun (2 processes, gloo): the same global batch and seed give the model
one process trains; a rank that dies fails the run with nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from recompress.checkpoint import load_checkpoint
from recompress.cli import main
from recompress.data.synthetic import make_synthetic
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.distributed import shard
from recompress.errors import UserError

from .test_stream import _bench

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recompress", *args, *([f"--nproc={nproc}"] if nproc > 1 else [])]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)).max()) for k in wa)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_synthetic(root / "ctr", samples=5000, table_rows=[400, 120, 30], seed=1)
    make_synthetic_sequences(root / "seq", users=300, items=80, clusters=6, mean_len=12, seed=1)
    return root


def test_shard_is_numpys_array_split():
    for n in (0, 1, 5, 255, 256):
        for ranks in (1, 2, 3, 8):
            expect = np.array_split(np.arange(n), ranks)
            assert [np.arange(n)[shard(n, (r, ranks))].tolist() for r in range(ranks)] == [e.tolist() for e in expect]


def one_vs_two(work: Path, name: str, *args: str) -> float:
    for n in (1, 2):
        r = run(*args, "-o", f"{name}{n}", cwd=work, nproc=n)
        assert r.returncode == 0, r.stderr[-2000:]
    return max_diff(work / f"{name}1", work / f"{name}2")


@pytest.mark.parametrize("optimizer", ["adam", "rowwise-adagrad"])
def test_dlrm_training_on_two_ranks_equals_one_process(work, optimizer):
    # Adam + SparseAdam, or Adagrad + row-wise Adagrad (row gradients all-gathered); batch 255 over 2 ranks:
    # 128 + 127 rows, and a short last batch; 16 steps. Float summation order is the only difference:
    # measured 3e-8 with either (Adam, ranks averaged with equal weights instead of by rows: 3.8e-4).
    assert one_vs_two(work, f"dlrm-{optimizer}", "train", "--data", "ctr", "--dim", "8", "--batch-size", "255",
                      "--optimizer", optimizer) < 1e-5


def test_sequential_training_weights_ranks_by_their_loss_terms(work):
    # SASRec's loss is a mean over valid positions, and the two halves of a batch hold different numbers of
    # them: averaging the ranks' gradients with equal weights gives a different model (measured 4.9e-3 here;
    # weighted: 1.5e-7). SGD keeps the comparison tight (with Adam, which divides tiny differences by tiny
    # second moments, the same run differs by 7.6e-5).
    diff = one_vs_two(work, "sasrec", "train", "--data", "seq", "--model", "sasrec", "--dim", "16",
                      "--dropout", "0", "--batch-size", "63", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.5")
    assert diff < 1e-5


def test_finetune_of_compressed_tables_with_keep_best_on_two_ranks(work):
    # TT cores (dense gradients) and QR rows (sparse), validation scored on rank 0 and broadcast.
    r = run("train", "--data", "ctr", "--dim", "8", "--epochs", "2", "-o", "base", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = one_vs_two(work, "tq", "checkpoint", "base", "--method", "tt@C1,qr@C2", "--tt-rank", "4",
                      "--collisions", "4", "--finetune", "--data", "ctr", "--batch-size", "127")
    assert diff < 1e-5
    one, two = (load_checkpoint(work / f"tq{n}") for n in (1, 2))  # the 2-rank checkpoint loads in one process
    assert [h["finetune"]["ranks"] for h in two.spec.history[-2:]] == [2, 2]
    for a, b in zip(one.spec.history[-2:], two.spec.history[-2:]):  # rank 0 scored the same validation curve
        assert a["finetune"]["keep_best"]["best_step"] == b["finetune"]["keep_best"]["best_step"]
        assert a["val_after_finetune"] == pytest.approx(b["val_after_finetune"], abs=1e-6)


def die_at_third_step(optimizer: str) -> str:
    """A launcher script whose rank 1 dies at its third ``torch.optim.<optimizer>`` step."""
    return f"""
import os, sys
import torch
if os.environ["RANK"] == "1":
    steps, real_step = [0], torch.optim.{optimizer}.step
    def step(self, *a, **k):
        steps[0] += 1
        if steps[0] == 3:
            os._exit(7)
        return real_step(self, *a, **k)
    torch.optim.{optimizer}.step = step
from recompress.cli import main
main(sys.argv[1:], prog_name="recompress")
"""


def torchrun(tmp_path: Path, name: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` written to ``tmp_path/name`` and run on 2 ranks by torchrun with ``args``. Its monitor looks
    every second, not every 0.1 s: it stops the other ranks once one has failed, which could come before a rank
    that lost its peer has said so (seen once in a full run)."""
    (tmp_path / name).write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--monitor-interval=1", str(tmp_path / name), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def test_a_rank_that_dies_fails_the_run_and_nothing_is_written(work, tmp_path):
    out = tmp_path / "out" / "ck"  # the missing parent is created, and must be removed again
    r = torchrun(tmp_path, "die.py", die_at_third_step("Adam"), "train", "--data", str(work / "ctr"), "--dim", "8",
                 "--batch-size", "64", "-o", str(out))
    assert r.returncode != 0
    assert "lost contact with another rank" in r.stderr or "no partial output was kept" in r.stderr, r.stderr[-2000:]
    assert "/recompress/" not in r.stderr  # no traceback through our code (torchrun prints its own report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["die.py"]


AFTER = """
import os, sys
import recompress.training as training
trained = training.train_model
def train_model(*a, **k):  # rank 1 dies after training, before rank 0 writes
    ckpt = trained(*a, **k)
    if os.environ["RANK"] == "1":
        os._exit(7)
    return ckpt
training.train_model = train_model
from recompress.cli import main
main(sys.argv[1:], prog_name="recompress")
"""


def test_rank_0_writes_only_once_every_rank_has_finished(work, tmp_path):
    # Rank 0 used to write as soon as its own part was done, then failed waiting for the others: a run that
    # failed left a checkpoint behind, under an error saying nothing was written.
    r = torchrun(tmp_path, "after.py", AFTER, "train", "--data", str(work / "ctr"), "--dim", "8", "--steps", "2",
                 "-o", str(tmp_path / "ck"))
    assert r.returncode != 0
    assert "lost contact with another rank" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.py"]


def test_commands_that_do_not_run_distributed_refuse_under_torchrun(work, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(main, ["evaluate", str(work / "ctr"), "--data", str(work / "ctr")])
    assert r.exit_code == 2 and "'recompress evaluate' does not run on several processes" in r.output


def test_nproc_is_refused_under_torchrun(work, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("recompress.distributed.join", lambda *a: None)  # no peers in this test
    r = CliRunner().invoke(main, ["train", "--data", str(work / "ctr"), "-o", str(work / "never"), "--nproc", "2"])
    assert r.exit_code == 2 and "--nproc is for a run started in one process" in r.output
    assert not (work / "never").exists()


GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:20401. This is typically caused by a remote worker crashing.")  # torch 2.13, a peer's exit


SIGNALS = f"""
import os, signal, sys
os.environ.update(RANK="0", WORLD_SIZE="2")
from recompress import distributed
from recompress.errors import UserError
signal.signal(signal.SIGTERM, distributed._terminated)
try:
    distributed.collective(lambda: (_ for _ in ()).throw(RuntimeError({GLOO_CLOSED!r})))
except UserError:
    print("lost contact")
os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM while this rank cleans up and exits: changes nothing
print("cleaned up")
signal.signal(signal.SIGTERM, distributed._terminated)
try:
    os.kill(os.getpid(), signal.SIGTERM)
except KeyboardInterrupt:
    print("interrupted")
os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM does not interrupt the clean-up of the first
print("cleaned up")
"""


def test_after_a_lost_peer_or_a_first_sigterm_a_rank_cleans_up_without_interruption():
    r = subprocess.run([sys.executable, "-c", SIGNALS], env=ENV, capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout.split("\n") == ["lost contact", "cleaned up", "interrupted", "cleaned up", ""], r.stderr


LEAVES = """
import os, sys
import torch.distributed as dist
real_exit = os._exit
def _exit(code):
    print(f"exit {code}, process group open: {dist.is_initialized()}", flush=True)
    real_exit(code)
os._exit = _exit
from recompress.cli import main
main(sys.argv[1:], prog_name="recompress")
"""


def test_a_run_that_succeeds_closes_its_process_group_before_exit(work, tmp_path):
    # A rank that exits through the interpreter's finalization can abort there, with its gloo process group
    # open or even closed ("terminate called without an active exception", pytorch/pytorch#190489; seen in CI
    # here and, after closing the group, in 1 of 12 runs on a loaded machine): ranks leave the group, then
    # exit without finalization.
    r = torchrun(tmp_path, "leave.py", LEAVES, "train", "--data", str(work / "ctr"), "--dim", "8", "--steps", "3",
                 "-o", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr[-2000:]
    # two ranks print into one pipe, so their lines may interleave: count the phrases
    assert r.stdout.count("exit 0, process group open: False") == 2 and "open: True" not in r.stdout, r.stdout


BROADCAST = """
import re, sys
from pathlib import Path
import torch
from recompress import distributed
from recompress.checkpoint import load_checkpoint
distributed.join("train", ["train"])
model = load_checkpoint(sys.argv[1]).model
anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) << 10
if distributed.rank() == 1:
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if not n.startswith("tables.")).add_(1.0)
before = anon()
distributed.broadcast_module(model)
grown = anon() - before
state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("tables.")}
torch.save(state, f"{sys.argv[2]}/rank{distributed.rank()}.pt")
print(f"rank {distributed.rank()} grew {grown}")
distributed.leave()
"""


def test_ranks_that_loaded_the_same_checkpoint_receive_only_what_differs(tmp_path):
    """Two ranks map the same 100k x 256 table (102 MB); rank 1 then changes one dense weight. Starting the
    ranks equal sends that weight (both end with rank 0's values) but not the table, which all hold bit for bit:
    receiving it wrote every page of rank 1's mapped table (1x the table of its own memory)."""
    table = _bench().make_checkpoint(tmp_path / "c", 100_000, 256)
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST)
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "c"), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = {int(m[0]): int(m[1]) for m in re.findall(r"rank (\d) grew (\d+)", out.stdout)}
    assert grown.keys() == {0, 1} and grown[1] < 0.1 * table, (grown, table)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("error, lost", [
    (RuntimeError(GLOO_CLOSED), True),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv "
                  "operation to complete"), True),
    ("DistNetworkError", True),
    (RuntimeError("index 7 is out of bounds for dimension 0 with size 5"), False),  # the lookup a collective ran
    (RuntimeError("one of the variables needed for gradient computation has been modified by an inplace operation"),
     False)])  # the backward pass a collective ran
def test_only_a_peer_that_is_gone_is_called_lost_contact(error, lost, monkeypatch):
    """A collective's guard names a dead or silent peer (gloo's transport errors, torch's DistError family) as
    such; an error of the computation it ran (a sharded lookup, the backward pass) is that error, not "lost
    contact" (it was: any RuntimeError)."""
    import torch.distributed as dist

    from recompress import distributed
    monkeypatch.setattr(distributed, "stopping", lambda: None)  # this test process keeps its SIGTERM handler
    if isinstance(error, str):
        error = getattr(dist, error)("Connection reset by peer")
    with pytest.raises(UserError if lost else RuntimeError) as e:
        distributed.collective(lambda: (_ for _ in ()).throw(error))
    assert ("lost contact with another rank" in str(e.value)) == lost
    assert lost or e.value is error
