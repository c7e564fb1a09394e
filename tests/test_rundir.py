"""The run directory: what --restart may delete, which directories are refused, and the one-run-at-a-time lock.

The lock and restart cases run real processes: a holder process takes the lock and sleeps, the CLI is a second
process, and a holder killed with SIGKILL leaves a lock file that must not block the next run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_BASE_PATCH
from frugal_spin import rundir
from frugal_spin.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny.yaml"
RUNNER = f"import sys; {SMALL_BASE_PATCH}; from frugal_spin.__main__ import main; sys.exit(main(sys.argv[1:]))"
TINY = ["data.fraction=0.02", "data.eval_size=8", "spin.iterations=0", "sft.epochs=1", "generation.max_new_tokens=4",
        "eval.max_new_tokens=4", "eval.batch_size=8", "generation.batch_size=8"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _cli(*args, cwd, cache, env_extra=None, timeout=300):
    env = {**os.environ, "FRUGAL_SPIN_CACHE": str(cache), "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("FRUGAL_SPIN_CRASH_AT", None)
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]


def _fake_run_dir(path: Path) -> Path:
    """A run directory as the tool leaves it (identity file, markers, outputs), without running anything."""
    (path / "stages").mkdir(parents=True)
    rundir.write_identity(path, ["recipe.yaml", "metrics.jsonl", "sft", "iter_0", "traces"])
    (path / "stages" / "setup.json").write_text('{"stage": "setup", "fingerprint": "abc"}\n')
    (path / "recipe.yaml").write_text("output_dir: x\n")
    (path / "metrics.jsonl").write_text('{"stage": "setup"}\n')
    (path / "sft" / "adapter").mkdir(parents=True)
    (path / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "iter_0").mkdir()
    (path / "iter_0" / "pairs.jsonl").write_text("{}\n")
    (path / ".metrics.jsonl.abc1_3x9.tmp").write_text("left by a SIGKILL")
    return path


# ---------------------------------------------------------------------------------------------------- identity


def test_only_a_directory_with_the_tools_identity_file_is_a_run_directory(tmp_path):
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "recipe.yaml").write_text("my own recipe\n")
    (user / "stages").mkdir()
    assert not rundir.is_run_dir(user)  # recipe.yaml and stages/ are not enough
    assert rundir.is_run_dir(_fake_run_dir(tmp_path / "run"))
    legacy = tmp_path / "legacy"  # written before identity files existed
    (legacy / "stages").mkdir(parents=True)
    (legacy / "recipe.yaml").write_text("output_dir: x\n")
    (legacy / "stages" / "setup.json").write_text('{"stage": "setup", "fingerprint": "0123"}')
    assert rundir.is_run_dir(legacy)
    (legacy / "stages" / "setup.json").write_text('{"stage": "setup"}')
    assert not rundir.is_run_dir(legacy)


def test_restart_deletes_exactly_what_a_run_writes_and_never_follows_a_link(tmp_path):
    run = _fake_run_dir(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "precious.txt").write_text("mine too")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    (run / "traces").symlink_to(outside, target_is_directory=True)
    removed = rundir.delete_run_outputs(run)
    assert sorted(removed) == [".metrics.jsonl.abc1_3x9.tmp", "iter_0", "metrics.jsonl", "recipe.yaml", "sft",
                               "stages", "traces"]
    assert sorted(p.name for p in run.iterdir()) == ["data", "notes.txt"]
    assert (run / "data" / "precious.txt").read_text() == "mine too"
    assert (outside / "keep.txt").read_text() == "not the run's"


@pytest.mark.parametrize("where", ["root", "home", "cwd_parent", "cwd_grandparent", "top_level"])
def test_obviously_wrong_roots_are_refused(tmp_path, monkeypatch, where):
    home = tmp_path / "home" / "me"
    cwd = home / "projects" / "p"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    path = {"root": Path("/"), "home": home, "cwd_parent": cwd.parent, "cwd_grandparent": Path(".."), "top_level":
            Path("/tmp")}[where]
    if where == "cwd_grandparent":
        path = Path("../..")
    for restart in (False, True):
        with pytest.raises(UserError, match="give the run a directory of its own"):
            rundir.check_output_dir(path, restart=restart, allow_existing=True)
    rundir.check_output_dir(cwd / "run", restart=True, allow_existing=False)  # a directory of its own is fine


def test_a_non_empty_directory_that_is_no_run_directory_needs_the_explicit_flag(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "report.md").write_text("my report")
    with pytest.raises(UserError, match="not empty and is not a frugal_spin run directory.*--allow-existing-dir"):
        rundir.check_output_dir(user, restart=False, allow_existing=False)
    # The user's report.md has a name the run writes: never replaced, even with the flag.
    with pytest.raises(UserError, match="already holds report.md, which the run writes but frugal_spin did not"):
        rundir.check_output_dir(user, restart=False, allow_existing=True)
    (user / "report.md").rename(user / "my_report.md")
    rundir.check_output_dir(user, restart=False, allow_existing=True)
    with pytest.raises(UserError, match="--restart: .* is not a frugal_spin run directory"):
        rundir.check_output_dir(user, restart=True, allow_existing=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.check_output_dir(empty, restart=True, allow_existing=False)


# ---------------------------------------------------------------------------------------------------- the lock


def _start_holder(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from frugal_spin.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_locked_directory_gets_one_line_with_the_holders_pid(tmp_path, small_base_cache):
    run = _fake_run_dir(tmp_path / "run")
    holder = _start_holder(run)
    try:
        before = _tree(run)
        result = _cli(str(RECIPE), f"output_dir={run}", *TINY, cwd=tmp_path, cache=small_base_cache)
        _one_error_line(result, f"is in use by another frugal_spin run (pid {holder.pid}")
        result = _cli(str(RECIPE), f"output_dir={run}", *TINY, "--restart", cwd=tmp_path, cache=small_base_cache)
        _one_error_line(result, f"(pid {holder.pid}")
        assert _tree(run) == before  # nothing deleted or rewritten while another run holds it
    finally:
        holder.kill()
        holder.wait()
    # The holder died with SIGKILL: its lock file (still naming it) must not block the next run.
    assert json.loads((run / rundir.LOCK_NAME).read_text())["pid"] == holder.pid
    with rundir.locked(run) as lock:
        assert json.loads((run / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.uses_flock
    assert (run / rundir.LOCK_NAME).read_text() == ""  # released: names no holder


def test_the_lock_is_released_on_exit_and_taken_again_by_the_next_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = "import sys; from frugal_spin.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); sys.exit(0)"
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code, str(run)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_without_flock_a_dead_holders_pid_is_stale_and_a_live_one_blocks(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_file = run / rundir.LOCK_NAME
    lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = rundir.lock_run_dir(run)  # the recorded holder is dead: stale, taken over
    assert not lock.uses_flock
    lock.release()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"in use by another frugal_spin run \\(pid {sleeper.pid}"):
            rundir.lock_run_dir(run)
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------------- restart, for real


@pytest.mark.parametrize("case", ["user_dir_with_recipe_yaml", "root", "home", "cwd_ancestor"])
def test_restart_refusals_through_the_cli_leave_everything_as_it_was(tmp_path, small_base_cache, case):
    home = tmp_path / "home"
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    home.mkdir()
    (home / "diary.txt").write_text("private")
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "recipe.yaml").write_text("output_dir: mine\n")
    (user / "data" / "precious.txt").write_text("years of work")
    output_dir = {"user_dir_with_recipe_yaml": str(user), "root": "/", "home": str(home),
                  "cwd_ancestor": str(cwd.parent)}[case]
    before = _tree(tmp_path)
    result = _cli(str(RECIPE), f"output_dir={output_dir}", *TINY, "--restart", cwd=cwd, cache=small_base_cache,
                  env_extra={"HOME": str(home)})
    _one_error_line(result, "not a frugal_spin run directory" if case == "user_dir_with_recipe_yaml"
                    else "give the run a directory of its own")
    assert _tree(tmp_path) == before


def test_restart_of_a_finished_run_keeps_the_users_own_files_and_runs_again(tmp_path, small_base_cache):
    """Also: an output_dir whose name reads as rich markup ("[/x]") is printed as text after a complete run."""
    run = tmp_path / "odd[" / "x]"
    first = _cli(str(RECIPE), f"output_dir={run}", *TINY, cwd=tmp_path, cache=small_base_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "odd[/x]" in "".join(first.stdout.split())  # printed as text, not taken as a closing tag
    assert rundir.is_run_dir(run)
    (run / "notes.txt").write_text("my notes")
    (run / "data").mkdir()
    (run / "data" / "precious.txt").write_text("years of work")
    rundir.claim(run, ["iter_7"])  # what a longer earlier run left: recorded as the tool's, so restart removes it
    (run / "iter_7").mkdir()
    (run / "iter_7" / "pairs.jsonl").write_text("{}\n")
    (run / "iter_8").mkdir()  # the same shape, but the user's: kept
    second = _cli(str(RECIPE), f"output_dir={run}", *TINY, "--restart", cwd=tmp_path, cache=small_base_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "data" / "precious.txt").read_text() == "years of work"
    assert not (run / "iter_7").exists() and (run / "iter_8").is_dir()
    assert "sft: complete, skipped" not in second.stdout  # really started over
    assert rundir.is_run_dir(run)


# ---------------------------------------------------------------------------------------------------- issue 20: a
# planted lock, a user's entries, links


@pytest.mark.parametrize("planted", ["symlink", "hardlink", "fifo"])
def test_a_planted_lock_file_is_refused_and_its_target_never_truncated(tmp_path, planted):
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    run = _fake_run_dir(tmp_path / "run")
    lock = run / rundir.LOCK_NAME
    {"symlink": lambda: lock.symlink_to(victim), "hardlink": lambda: os.link(victim, lock),
     "fifo": lambda: os.mkfifo(lock)}[planted]()
    with pytest.raises(UserError, match=r"\.frugal_spin\.lock is (a symbolic link|a file with 2 hard links|not a "
                                        r"regular file).*remove it"):
        rundir.lock_run_dir(run)
    assert victim.read_text() == "a user's file"


def test_a_directory_holding_only_a_planted_lock_link_is_not_empty(tmp_path, small_base_cache):
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    target = tmp_path / "target"
    target.mkdir()
    (target / rundir.LOCK_NAME).symlink_to(victim)
    with pytest.raises(UserError, match="is not empty and is not a frugal_spin run directory"):
        rundir.check_output_dir(target, restart=False, allow_existing=False)
    result = _cli(str(RECIPE), f"output_dir={target}", *TINY, "--allow-existing-dir", cwd=tmp_path,
                  cache=small_base_cache)
    _one_error_line(result, ".frugal_spin.lock is a symbolic link")
    assert victim.read_text() == "a user's file"
    assert [p.name for p in target.iterdir()] == [rundir.LOCK_NAME]


@pytest.mark.parametrize("theirs", ["base", "eval", "traces", "report.md"])
def test_allow_existing_dir_never_writes_into_or_replaces_a_projects_own_entry(tmp_path, small_base_cache, theirs):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    if "." in theirs:
        (project / theirs).write_text("my own")
    else:
        (project / theirs).mkdir()
        (project / theirs / "mine.txt").write_text("my own")
    before = _tree(project)
    result = _cli(str(RECIPE), f"output_dir={project}", *TINY, "--allow-existing-dir", cwd=tmp_path,
                  cache=small_base_cache)
    _one_error_line(result, f"already holds {theirs}, which the run writes but frugal_spin did not write there")
    assert _tree(project) == before and sorted(p.name for p in project.iterdir()) == sorted(["notes.txt", theirs])


def test_restart_deletes_only_the_entries_the_tool_recorded_writing(tmp_path, small_base_cache):
    """A run with --allow-existing-dir in a project, then the user adds entries of the tool's shapes (spin_*,
    iter_*, dot-files, a hidden file that looks like a temporary of a name the tool does not own): --restart keeps
    every one of them and the project's own files."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.jsonl").write_text("{}\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    first = _cli(str(RECIPE), f"output_dir={project}", *TINY, "--allow-existing-dir", cwd=tmp_path,
                 cache=small_base_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    mask = os.umask(0o022)
    os.umask(mask)  # the run's files have the modes open/mkdir give under the umask (not mkstemp's or safetensors' 0600)
    assert {p.stat().st_mode & 0o777 for p in project.rglob("*") if p.is_file()} == {0o666 & ~mask}
    assert {p.stat().st_mode & 0o777 for p in project.rglob("*") if p.is_dir()} == {0o777 & ~mask}
    owned = json.loads((project / rundir.IDENTITY).read_text())["owned"]
    assert "sft" in owned and "base" in owned and "data" not in owned and "iter_0" not in owned  # 0 iterations
    users = {"spin_notes/a.txt": "mine", "iter_0/plan.txt": "mine", ".env": "SECRET=1", "tb/x": "mine",
             ".notes.txt.abcdefgh.tmp": "mine", "my.metrics.jsonl": "mine"}
    for rel, text in users.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    (project / ".metrics.jsonl.k2j4h6g8.tmp").write_text("a dead run's temporary")
    second = _cli(str(RECIPE), f"output_dir={project}", *TINY, "--restart", cwd=tmp_path, cache=small_base_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    for rel, text in users.items():
        assert (project / rel).read_text() == text, rel
    assert (project / "data" / "rows.jsonl").is_file() and (project / ".git" / "HEAD").is_file()
    assert not (project / ".metrics.jsonl.k2j4h6g8.tmp").exists()
    assert "sft: complete, skipped" not in second.stdout  # really started over


def test_a_run_directory_of_the_previous_format_is_migrated(tmp_path):
    """Identity file without `owned` (today's main): the entries that code writes count as the tool's."""
    run = _fake_run_dir(tmp_path / "run")
    identity = json.loads((run / rundir.IDENTITY).read_text())
    del identity["owned"]
    identity["format"] = 1
    (run / rundir.IDENTITY).write_text(json.dumps(identity))
    (run / "notes.txt").write_text("mine")
    (run / ".hidden").write_text("mine")
    assert rundir.owned_entries(run) == {"recipe.yaml", "metrics.jsonl", "sft", "iter_0", "stages"}
    rundir.delete_run_outputs(run)
    assert sorted(p.name for p in run.iterdir()) == [".hidden", "notes.txt"]


def test_a_hand_edited_owned_list_never_reaches_outside_the_tools_names(tmp_path):
    run = _fake_run_dir(tmp_path / "run")
    (tmp_path / "precious").mkdir()
    (run / "thesis").mkdir()
    identity = json.loads((run / rundir.IDENTITY).read_text())
    identity["owned"] += ["../precious", "thesis", "/etc", ".."]
    (run / rundir.IDENTITY).write_text(json.dumps(identity))
    rundir.delete_run_outputs(run)
    assert (tmp_path / "precious").is_dir() and (run / "thesis").is_dir()


@pytest.mark.parametrize("link", ["sft/adapter", "base", "sft"])
def test_an_owned_entry_replaced_by_a_symlink_is_one_line_and_nothing_is_written_through_it(
        tmp_path, small_base_cache, link):
    run = tmp_path / "run"
    first = _cli(str(RECIPE), f"output_dir={run}", *TINY, cwd=tmp_path, cache=small_base_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / link, elsewhere)
    (run / link).symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    result = _cli(str(RECIPE), f"output_dir={run}", *TINY, "sft.learning_rate=0.002", cwd=tmp_path,
                  cache=small_base_cache)
    _one_error_line(result, f"{link} is a symbolic link")
    assert _tree(elsewhere) == before


def test_report_writes_only_into_a_run_directory(tmp_path, capsys):
    from frugal_spin.__main__ import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    (mine / "metrics.jsonl").write_text('{"stage": "setup", "metrics": {}, "wall_time_s": 1}\n')
    assert main(["report", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report: ") and "is not a frugal_spin run directory" in err and err.count("\n") == 1
    assert (mine / "report.md").read_text() == "my own report"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "report.md"]


def test_compare_writes_only_into_a_compare_directory_of_its_own(tmp_path):
    users = tmp_path / "out" / "compare"
    users.mkdir(parents=True)
    (users / "comparison.md").write_text("my own comparison")
    with pytest.raises(UserError, match="was not written by frugal_spin compare"):
        rundir.own_directory(users, "compare")
    assert [p.name for p in users.iterdir()] == ["comparison.md"]
    fresh = tmp_path / "fresh" / "compare"
    assert rundir.own_directory(fresh, "compare") == fresh and (fresh / rundir.OWNER_FILE).is_file()
    rundir.own_directory(fresh, "compare")  # its own: taken again


def test_outputs_respect_the_umask(tmp_path):
    from frugal_spin import io

    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.txt", "x")
        made = io.mkdtemp(prefix=".d.", dir=tmp_path)
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        assert made.stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        io.write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_claims_are_kept_until_the_run_ends_and_then_only_what_it_created(tmp_path):
    """compare claims its arms inside an open run directory: the run's own claims must survive that, and only the
    claims the run did not use are dropped at the end."""
    run = tmp_path / "run"
    with rundir.open_run_dir(run, entries=["recipe.yaml", "metrics.jsonl", "stages", "traces"]):
        rundir.claim(run, ["sft_equal_steps", "sft_equal_time"])
        (run / "metrics.jsonl").write_text("{}\n")  # written after the claim
        (run / "sft_equal_steps").mkdir()
        assert {"metrics.jsonl", "traces", "sft_equal_time"} <= rundir.owned_entries(run)
    assert rundir.owned_entries(run) == {"metrics.jsonl", "sft_equal_steps", "stages"}
    (run / "traces").mkdir()  # the user's, after the run: not the tool's
    assert "traces" not in rundir.owned_entries(run)
