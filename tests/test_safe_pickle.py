"""The restricted unpickler: hostile files are refused by the callable they reach and never run; the
inert objects upstream projects store (numpy scalars, RecBole's Config) load without their packages."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recompress.adapters import load_any
from recompress.adapters.torch_files import safe_torch_load
from recompress.errors import UserError

from .conftest import shared_path, tree_hash


class Reduce:
    """An object that unpickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _zip(path: Path, pkl: bytes) -> Path:
    """A torch-style zip whose data.pkl is ``pkl`` (hand-written opcodes)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
    return path


def _evil_files(tmp: Path, marker: Path) -> list[tuple[Path, str]]:
    cmd = f"touch {marker}"
    weights = {"emb_l.0.weight": torch.zeros(3, 2)}
    cases = [
        ("system", {"state_dict": weights, "x": [1, {"y": Reduce(os.system, cmd)}]}, "posix.system"),
        ("popen", {"state_dict": collections.OrderedDict(a=Reduce(subprocess.Popen, ["touch", str(marker)]))},
         "subprocess.Popen"),
        ("eval", {"state_dict": weights, "m": (Reduce(eval, f"__import__('os').system('{cmd}')"),)}, "builtins.eval"),
        ("exec", [Reduce(exec, f"open('{marker}', 'w')")], "builtins.exec"),
        ("getattr", {"k": Reduce(getattr, os, "system")}, "os.system"),
        ("numpy-load", {"k": Reduce(np.load, str(marker))}, "numpy.load"),
        ("torch-load", {"k": Reduce(torch.load, str(marker))}, "torch.serialization.load"),
    ]
    out = []
    for name, obj, callable_ in cases:
        try:
            torch.save(obj, tmp / f"{name}.pt")
        except (TypeError, pickle.PicklingError):  # a module object (getattr's first argument) does not pickle
            _zip(tmp / f"{name}.pt", b"cbuiltins\ngetattr\n(cos\nsystem\nS'x'\ntR.")
        out.append((tmp / f"{name}.pt", callable_))
    # hand-written opcodes: protocol 0 GLOBAL with Python 2 names, INST, protocol 4 STACK_GLOBAL, copyreg
    out += [
        (_zip(tmp / "py2.pt", f"c__builtin__\neval\n(S'open(\"{marker}\", \"w\")'\ntR.".encode()), "builtins.eval"),
        (_zip(tmp / "inst.pt", f"(S'{cmd}'\nios\nsystem\n.".encode()), "os.system"),
        (_zip(tmp / "stack.pt", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x05runpy\x8c\t_run_code\x93"
              + pickle.dumps(f"open('{marker}', 'w')", 4)[11:-1] + b"}\x86R."), "runpy._run_code"),
        (_zip(tmp / "copyreg.pt", b"ccopyreg\n_reconstructor\n(cposix\nsystem\ncbuiltins\nobject\nNtR."), "posix.system"),
        # getattr reaches only stubbed enum members: on anything else (here ndarray.tofile) it is refused
        (_zip(tmp / "method.pt", b"cbuiltins\ngetattr\n(cnumpy\nndarray\nS'tofile'\ntR."), "builtins.getattr"),
        # not code, but a terabyte allocation: bytearray(2**40)
        (_zip(tmp / "alloc.pt", b"\x80\x02cbuiltins\nbytearray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R."),
         "builtins.bytearray"),
    ]
    legacy = tmp / "legacy.pt"
    torch.save({"a": Reduce(os.system, cmd)}, legacy, _use_new_zipfile_serialization=False)
    out.append((legacy, "posix.system"))
    return out


def test_hostile_files_are_refused_by_the_callable_they_reach_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    files = _evil_files(tmp_path, marker)
    before = {p: tree_hash(p) for p, _ in files}
    for path, callable_ in files:
        for read in (safe_torch_load, load_any):
            with pytest.raises(UserError) as e:
                read(path)
            assert f"would run code when unpickled: it calls {callable_} (refused; nothing was run)" in e.value.message, \
                (path.name, e.value.message)
        assert tree_hash(path) == before[path]
    assert not marker.exists()


def test_the_cli_refuses_a_hostile_file_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"emb_l.0.weight": torch.zeros(3, 2)}, "x": Reduce(os.system, f"touch {marker}")}, path)
    for cmd in (["inspect", str(path)], ["checkpoint", str(path), "--method", "int8", "-o", str(tmp_path / "out")]):
        r = subprocess.run([sys.executable, "-m", "recompress", *cmd], capture_output=True, text=True, check=False)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {path} would run code when unpickled: it calls posix.system")
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class Inert:
    pass


def test_an_inert_unknown_type_gets_its_own_message(tmp_path):
    path = tmp_path / "inert.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": Inert()}, path)
    with pytest.raises(UserError, match=r"holds an object of type tests\.test_safe_pickle\.Inert that recompress does "
                                        r"not know \(refused; nothing was run\)"):
        safe_torch_load(path)


def test_numpy_scalars_arrays_and_containers_load_as_written(tmp_path):
    # facebookresearch/dlrm --mlperf-logging stores test_auc as a numpy scalar (weights_only=True refuses it)
    obj = {"state_dict": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3)[:, 1:]), "test_auc": np.float64(0.7812),
           "hist": np.array([1, 2, 3], dtype=np.int32), "n": np.int64(7), "dt": np.dtype("float32"),
           "opt": collections.defaultdict(list, a=[1]), "dev": torch.device("cpu"), "s": {1, 2}, "b": b"\x00\x01",
           "bf": torch.tensor([1.5], dtype=torch.bfloat16), "p": torch.nn.Parameter(torch.ones(2))}
    path = tmp_path / "mlperf.pt"
    torch.save(obj, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    got = safe_torch_load(path)
    assert torch.equal(got["state_dict"]["w"], obj["state_dict"]["w"]) and got["state_dict"]["w"].stride() == (3, 1)
    assert got["test_auc"] == 0.7812 and isinstance(got["test_auc"], np.float64)
    assert got["hist"].tolist() == [1, 2, 3] and got["hist"].dtype == np.int32 and got["n"] == 7
    assert got["dt"] == np.float32 and got["opt"]["a"] == [1] and got["dev"] == torch.device("cpu")
    assert got["s"] == {1, 2} and got["b"] == b"\x00\x01" and got["bf"].dtype == torch.bfloat16
    assert torch.equal(got["p"], torch.ones(2))


def _fake_recbole():
    """Classes importable as recbole.* while pickling, removed before loading (recbole is not installed)."""
    names = ["recbole", "recbole.config", "recbole.config.configurator", "recbole.utils", "recbole.utils.enum_type"]
    mods = {n: types.ModuleType(n) for n in names}

    class Config:
        def __init__(self):
            self.final_config_dict = {"n_heads": 2, "hidden_size": 32, "MAX_ITEM_LIST_LENGTH": 20}

    import enum

    class ModelType(enum.Enum):
        SEQUENTIAL = 2

    for cls, mod in ((Config, "recbole.config.configurator"), (ModelType, "recbole.utils.enum_type")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    return mods, Config, ModelType


def test_recbole_config_loads_as_an_inert_stub_without_recbole(tmp_path, monkeypatch):
    mods, config_cls, model_type = _fake_recbole()
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    cfg = config_cls()
    cfg.model_type = model_type.SEQUENTIAL
    path = tmp_path / "SASRec-Nov-22-2026_01-58-40.pth"
    torch.save({"config": cfg, "state_dict": {"item_embedding.weight": torch.ones(3, 2)},
                "best_valid_score": np.float64(0.0185)}, path, pickle_protocol=4)
    for n in mods:
        monkeypatch.delitem(sys.modules, n)
    got = safe_torch_load(path)
    cfg = got["config"].attr("final_config_dict")
    assert cfg["n_heads"] == 2 and cfg["MAX_ITEM_LIST_LENGTH"] == 20
    assert type(got["config"]).__module__ == "recbole.config.configurator"
    assert got["config"].state["model_type"].args == (2,) and got["best_valid_score"] == 0.0185


@pytest.mark.parametrize("damage", ["truncate-storage", "bad-storage-ref", "bomb", "not-a-zip-member"])
def test_broken_files_are_one_clear_error(tmp_path, damage):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    storage = next(n for n in entries if "/data/" in n)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            if damage == "truncate-storage" and n == storage:
                b = b[:100]
            if damage == "bomb" and n == storage:
                z.writestr(n, b"\0" * 40_000_000, compress_type=zipfile.ZIP_DEFLATED)
                continue
            if damage == "not-a-zip-member" and n == storage:
                continue
            if damage == "bad-storage-ref" and n.endswith("data.pkl"):
                b = b.replace(b"storage", b"storagX")
            z.writestr(n, b)
    with pytest.raises(UserError, match=f"{path} is not a readable torch file"):
        safe_torch_load(path)


@pytest.mark.shared_data
def test_the_real_recbole_checkpoint_loads_without_recbole():
    ck = safe_torch_load(shared_path("fixtures/checkpoints/recbole_SASRec.pth"))
    cfg = ck["config"].attr("final_config_dict")
    assert (cfg["n_layers"], cfg["n_heads"], cfg["hidden_size"], cfg["inner_size"]) == (2, 2, 32, 64)
    assert cfg["MAX_ITEM_LIST_LENGTH"] == 20 and cfg["hidden_act"] == "gelu"
    assert tuple(ck["state_dict"]["item_embedding.weight"].shape) == (1683, 32)
    assert float(ck["best_valid_score"]) == pytest.approx(0.0185, abs=5e-5)


@pytest.mark.parametrize("kind", ["object-array", "byte-array", "stride-0", "pickle-bomb"])
def test_files_that_would_allocate_far_more_than_their_size_are_refused(tmp_path, kind):
    """Found by an independent review: each of these made a file of under 1 MB allocate gigabytes."""
    path = tmp_path / "x.pt"
    shape = b"J\x00\x84\xd7\x17\x85"  # (400000000,)
    if kind in ("object-array", "byte-array"):
        dtype = b"O" if kind == "object-array" else b"b"
        _zip(path, b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + shape
             + b"X\x01\x00\x00\x00" + dtype + b"\x87R.")
    elif kind == "stride-0":
        torch.save({"state_dict": {"emb_l.0.weight": torch.zeros(1).expand(200_000_000, 16)}}, path)
    else:
        with zipfile.ZipFile(path, "w") as z:  # a 50 MB data.pkl deflated to about 50 KB
            z.writestr("archive/data.pkl", b"\x80\x02}." + b"\0" * 50_000_000, compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(UserError, match=f"{path} is not a readable torch file"):
        safe_torch_load(path)


def test_a_file_cannot_change_how_later_files_are_read(tmp_path):
    """BUILD on an allowed object (here the FloatStorage type's entry) would have made every later float
    tensor int32."""
    _zip(tmp_path / "poison.pt", b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypectorch\nint32\nsb0}.")
    with pytest.raises(UserError, match="sets the state of a _Storage"):
        safe_torch_load(tmp_path / "poison.pt")
    torch.save({"w": torch.arange(3.0)}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["w"].dtype == torch.float32
