"""forked_runs.py: a forked run behaves as `python script args` would, as one process or as torchrun's several."""

import json
import os
import subprocess
import sys
import time

import pytest

from forked_runs import ForkedRuns

SCRIPT = """
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "env": {k: os.environ.get(k) for k in ("MINE", "BASE", "RANK", "WORLD_SIZE", "MASTER_PORT")}}))
print("to stderr", file=sys.stderr)
if "--fail" in sys.argv:
    raise ValueError("bad input")
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[-1]))
if "--message" in sys.argv:
    sys.exit("stopped: a message")
if "--sleep" in sys.argv:
    import time
    time.sleep(60)
if "--rank_fails" in sys.argv and os.environ.get("RANK") == "1":
    sys.exit(3)
if "--rank_fails" in sys.argv:
    import time
    time.sleep(60)  # stopped by the server once the other process failed, as torchrun stops them
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forked")
    (folder / "script.py").write_text(SCRIPT)
    with ForkedRuns({**os.environ, "BASE": "server"}, cwd=folder, preload=("json",)) as forked:
        forked.folder = folder
        yield forked


def test_a_run_gets_its_arguments_environment_folder_and_outputs(runs, tmp_path):
    result = runs.run([runs.folder / "script.py", "a", "b c"], env={"MINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "to stderr\n"
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["a", "b c"] and seen["cwd"] == str(tmp_path) and seen["name"] == "__main__"
    assert seen["path0"] == str(runs.folder)  # the script's folder first on sys.path, as `python script` has it
    assert seen["env"] == {"MINE": "1", "BASE": "server", "RANK": None, "WORLD_SIZE": None, "MASTER_PORT": None}
    # a later run does not see the earlier run's variables
    assert json.loads(runs.run([runs.folder / "script.py"]).stdout)["env"]["MINE"] is None


def test_exit_codes_and_errors_are_those_of_a_plain_run(runs):
    for flags in (["--fail"], ["--exit", "4"], ["--message"]):
        forked = runs.run([runs.folder / "script.py", *flags])
        plain = subprocess.run([sys.executable, str(runs.folder / "script.py"), *flags], capture_output=True,
                               text=True)
        assert forked.returncode == plain.returncode != 0
        assert forked.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    assert "ValueError: bad input" in runs.run([runs.folder / "script.py", "--fail"]).stderr


def test_a_run_past_its_timeout_is_killed_and_the_server_serves_on(runs):
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        runs.run([runs.folder / "script.py", "--sleep"], timeout=2)
    assert time.monotonic() - started < 30 and "to stderr" in stopped.value.stderr
    assert runs.run([runs.folder / "script.py"]).returncode == 0


def test_several_processes_get_torchruns_variables_and_the_first_failure_ends_the_run(runs):
    result = runs.run([runs.folder / "script.py"], processes=2)
    assert result.returncode == 0
    seen = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(s["env"]["RANK"] for s in seen) == ["0", "1"] and {s["env"]["WORLD_SIZE"] for s in seen} == {"2"}
    assert len({s["env"]["MASTER_PORT"] for s in seen}) == 1
    started = time.monotonic()
    assert runs.run([runs.folder / "script.py", "--rank_fails"], processes=2, timeout=50).returncode == 3
    assert time.monotonic() - started < 30


def test_runs_from_two_threads_at_once_each_get_their_own_outputs(runs):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: runs.run([runs.folder / "script.py", str(i)]), range(4)))
    assert [json.loads(r.stdout)["argv"] for r in results] == [["0"], ["1"], ["2"], ["3"]]
