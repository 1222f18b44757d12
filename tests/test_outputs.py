"""The one output mechanism: never destroy what recompress did not write, swap atomically, roll back."""

import json
import os
import stat

import pytest

from recompress import outputs
from recompress.errors import UserError
from recompress.outputs import (
    MARKER,
    check_output,
    is_ours,
    output_dir,
    run_folder,
    write_json,
)

from .conftest import tree_hash


def make(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def ours(path, text="old"):
    with output_dir(path, kind="test", overwrite=True) as tmp:
        (tmp / "data.txt").write_text(text)
    return path


def no_temporaries(parent):
    return not [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name or ".old-" in p.name]


def test_new_folder_is_marked_and_complete(tmp_path):
    out = ours(tmp_path / "a" / "b" / "out", "new")  # missing parents are created
    assert (out / "data.txt").read_text() == "new" and is_ours(out)
    assert json.loads((out / MARKER).read_text())["written_by"] == "recompress"
    assert no_temporaries(out.parent)


def test_refuses_a_folder_with_foreign_content_even_with_overwrite(tmp_path):
    scratch = make(tmp_path / "scratch", **{"notes.txt": "mine"})
    before = tree_hash(scratch)
    with pytest.raises(UserError, match="holds files recompress did not write"):
        ours(scratch)
    assert tree_hash(scratch) == before and no_temporaries(tmp_path)


def test_refuses_a_folder_we_wrote_once_a_foreign_file_was_added(tmp_path):
    out = ours(tmp_path / "out")
    (out / MARKER).unlink()
    with pytest.raises(UserError, match="did not write"):
        ours(out)


def test_refuses_to_replace_a_plain_file_or_a_link(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep")
    with pytest.raises(UserError, match="is a file"):
        ours(f)
    assert f.read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(ours(tmp_path / "real"))
    with pytest.raises(UserError, match="symbolic link"):
        ours(link)
    assert link.is_symlink()


def test_existing_output_needs_overwrite(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(UserError, match="already exists"):
        with output_dir(out, kind="test"):
            pass
    assert (out / "data.txt").read_text() == "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_overwrite_replaces_our_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    out = ours(tmp_path / "out", "old")
    ours(out, "new")
    assert (out / "data.txt").read_text() == "new" and no_temporaries(tmp_path)


def test_empty_folder_may_be_used(tmp_path):
    (tmp_path / "empty").mkdir()
    ours(tmp_path / "empty", "new")
    assert (tmp_path / "empty" / "data.txt").read_text() == "new"


@pytest.mark.parametrize("rel", ["in", "in/sub", "."], ids=["is the input", "inside the input", "contains the input"])
def test_output_may_not_overlap_an_input(tmp_path, rel):
    src = ours(tmp_path / "in")
    before = tree_hash(src)
    with pytest.raises(UserError, match="input"):
        with output_dir(tmp_path / rel, kind="test", overwrite=True, inputs=[src]):
            pass
    assert tree_hash(src) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
@pytest.mark.parametrize("stage", ["body", "marker", "swap", "second rename"])
def test_interruption_at_every_stage_keeps_the_old_output(tmp_path, monkeypatch, stage, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    out = ours(tmp_path / "nest" / "out", "old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    if stage == "marker":
        monkeypatch.setattr(outputs, "marker", boom)
    if stage == "swap":
        monkeypatch.setattr(outputs, "exchange", boom)
        monkeypatch.setattr(outputs.os, "rename", boom)
    if stage == "second rename":
        if exchange:
            pytest.skip("an exchange is one step")
        real, calls = os.rename, []

        def second_fails(a, b):
            calls.append(a)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(a, b)
        monkeypatch.setattr(outputs.os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, kind="test", overwrite=True) as tmp:
            (tmp / "data.txt").write_text("new")
            if stage == "body":
                raise KeyboardInterrupt
    monkeypatch.undo()
    assert (out / "data.txt").read_text() == "old" and is_ours(out)
    assert no_temporaries(out.parent)


def test_failure_removes_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "x" / "y" / "out", kind="test"):
            raise RuntimeError
    assert not (tmp_path / "x").exists()


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = ours(tmp_path / "out")
        f = write_json({"a": 1}, tmp_path / "r.json", "results")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "data.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(f.stat().st_mode) == 0o644


def test_file_outputs_replace_only_our_json(tmp_path):
    r = write_json({"a": 1}, tmp_path / "r.json", "results")
    write_json({"a": 2}, r, "results")
    assert json.loads(r.read_text())["a"] == 2
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"a": 1}')
    with pytest.raises(UserError, match="not written by recompress"):
        write_json({"a": 3}, foreign, "results")
    assert foreign.read_text() == '{"a": 1}'
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path, kind="file")


def test_file_output_in_a_missing_folder_is_created(tmp_path):
    write_json({"a": 1}, tmp_path / "new" / "r.json", "results")
    assert (tmp_path / "new" / "r.json").exists()


def test_run_folder_resumes_ours_and_refuses_foreign(tmp_path):
    with run_folder(tmp_path / "run") as f:
        (f / "cache").mkdir()
        (f / "cache" / "step").write_text("done")
    with run_folder(tmp_path / "run") as f:  # resume in place
        assert (f / "cache" / "step").read_text() == "done"
    foreign = make(tmp_path / "foreign", **{"x.txt": "mine"})
    with pytest.raises(UserError, match="did not write"):
        with run_folder(foreign, overwrite=True):
            pass
    assert (foreign / "x.txt").read_text() == "mine"


def test_run_overwrite_keeps_the_old_run_until_the_new_one_completes(tmp_path):
    with run_folder(tmp_path / "run") as f, outputs.output_file(f / "report.md", owner=f) as tmp:
        tmp.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with run_folder(tmp_path / "run", overwrite=True) as f:
            assert f != tmp_path / "run"
            raise KeyboardInterrupt
    assert (tmp_path / "run" / "report.md").read_text() == "old" and no_temporaries(tmp_path)
    with run_folder(tmp_path / "run", overwrite=True) as f, outputs.output_file(f / "report.md", owner=f) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "run" / "report.md").read_text() == "new"


def test_a_run_that_fails_before_any_step_leaves_nothing(tmp_path):
    with pytest.raises(UserError):
        with run_folder(tmp_path / "a" / "run") as f:
            (f / "cache").mkdir()
            raise UserError("bad recipe")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("where", ["top", "nested"])
def test_overwrite_refuses_our_folder_once_a_user_file_was_added(tmp_path, where):
    out = ours(tmp_path / "out")
    (out / "sub").mkdir()
    note = out / "mynotes.txt" if where == "top" else out / "sub" / "mynotes.txt"
    note.write_text("mine")
    before = tree_hash(out)
    with pytest.raises(UserError, match="mynotes.txt"):
        ours(out)
    assert tree_hash(out) == before and no_temporaries(tmp_path)


def test_a_run_folder_records_what_it_wrote_and_not_what_the_user_added(tmp_path):
    with run_folder(tmp_path / "run") as f:
        write_json({"a": 1}, f / "results.json", "results", owner=f)
        with output_dir(f / "cache" / "step", kind="test") as tmp:
            (tmp / "w.bin").write_text("w")
    (tmp_path / "run" / "mynotes.txt").write_text("mine")
    with run_folder(tmp_path / "run") as f:  # resuming keeps the user's file and does not adopt it
        write_json({"a": 2}, f / "results.json", "results", owner=f)
    with pytest.raises(UserError, match="mynotes.txt"):
        with run_folder(tmp_path / "run", overwrite=True):
            pass
    assert (tmp_path / "run" / "mynotes.txt").read_text() == "mine"
    (tmp_path / "run" / "mynotes.txt").unlink()
    with run_folder(tmp_path / "run", overwrite=True) as f:  # without it, the run is ours again
        pass


def test_a_file_output_inside_our_folder_never_replaces_a_user_file(tmp_path):
    with run_folder(tmp_path / "run") as f:
        pass
    (tmp_path / "run" / "results.csv").write_text("mine")
    with pytest.raises(UserError, match="results.csv"):
        with outputs.output_file(tmp_path / "run" / "results.csv", owner=tmp_path / "run") as tmp:
            tmp.write_text("ours")
    assert (tmp_path / "run" / "results.csv").read_text() == "mine"


def test_a_marked_folder_copied_in_by_the_user_is_not_ours(tmp_path):
    out = ours(tmp_path / "out")
    other = ours(tmp_path / "other", "theirs")
    import shutil
    shutil.copytree(other, out / "my_copy")  # carries its own marker: still not written into out by recompress
    with pytest.raises(UserError, match="my_copy"):
        ours(out)
    assert (out / "my_copy" / "data.txt").read_text() == "theirs"


def test_files_added_while_a_run_is_writing_are_never_adopted(tmp_path):
    with run_folder(tmp_path / "run") as f:
        (f / "notes.txt").write_text("mine")  # a user's file appears mid-run
        with output_dir(f / "cache" / "step", kind="test") as tmp:
            (tmp / "w.bin").write_text("w")
        write_json({"a": 1}, f / "results.json", "results", owner=f)
    assert outputs.foreign(tmp_path / "run") == ["notes.txt"]
    with pytest.raises(UserError, match="notes.txt"):
        with run_folder(tmp_path / "run", overwrite=True):
            pass
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_sigterm_removes_the_staged_output_and_exits_as_interrupted(tmp_path):
    """`kill` (SIGTERM) on a running command unwinds as Ctrl-C does: its hidden staging folder is removed and
    it says so (before, the process died with the folder left behind)."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "syn"
    proc = subprocess.Popen([sys.executable, "-m", "recompress", "data", "synthetic", "-o", str(out), "--samples",
                             "20000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".syn.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".syn.*.tmp")), "the command never staged its output"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; no partial output was kept" in err, (proc.returncode, err[-500:])
    assert list(tmp_path.iterdir()) == []
