"""Interrupted work: graft, export and train killed in the middle of their work leave no corrupted output, and
a rerun just works; a terminated (SIGTERM) run also removes its staging folder; training resumed from its last
complete checkpoint reaches the uninterrupted run's losses; a target that cannot be written gives a clean
error before any work.

A killed run must be killed mid-work, not after it finished, and without guessing how long the work takes: the
command runs in a child process in which one function of the pipeline is replaced by one that writes a marker
file and waits; the test kills the child once the marker is there, so the kill always lands at that point."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from memory_llama_cli import main
from test_graft import SMALL_MEMORY, assert_same_as_base, write_base
from training_helpers import save_tiny_model

pytestmark = pytest.mark.slow

SET_SMALL_MEMORY = [word for field in SMALL_MEMORY for word in ("--set", field)]

# Losses after resuming must match the uninterrupted run to this relative tolerance (fp32, same ops).
RESUME_RTOL = 1e-5
TRAIN = ["--knowledge-entities", "6", "--block-size", "48", "--mode", "full", "--max_steps", "30",
         "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "2",
         "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]

# `memory-llama ARGS...` in which the CALL-th call of MODULE:ATTRIBUTE (an attribute path, e.g. a method of a
# class) writes MARKER and waits for a signal instead of running.
_BLOCKED_COMMAND = r"""
import functools, importlib, signal, sys
# Ctrl-C raises KeyboardInterrupt, as in a shell's foreground job: a test run from a background job (`cmd &`,
# nohup) would otherwise hand down SIGINT ignored, and the Ctrl-C test would wait forever.
signal.signal(signal.SIGINT, signal.default_int_handler)
target, call, marker, *arguments = sys.argv[1:]
module_name, attribute_path = target.split(":")
owner = importlib.import_module(module_name)
*owners, attribute = attribute_path.split(".")
for name in owners:
    owner = getattr(owner, name)
original = getattr(owner, attribute)
calls = []

@functools.wraps(original)
def blocked(*args, **kwargs):
    calls.append(None)
    if len(calls) == int(call):
        open(marker, "w").close()
        while True:
            signal.pause()  # until the test's signal
    return original(*args, **kwargs)

setattr(owner, attribute, blocked)
from memory_llama_cli import main
sys.exit(main(arguments))
"""


def run_blocked(tmp_path, target: str, arguments: list[str], call: int = 1) -> subprocess.Popen:
    """Start `memory-llama ARGUMENTS` and return once it is blocked in the `call`-th call of `target`."""
    marker = tmp_path / "blocked"
    process = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_COMMAND, target, str(call), str(marker), *arguments],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the command ended (status {process.returncode}) before reaching {target}: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen, signum: int) -> int:
    assert process.poll() is None  # still at work: the signal lands mid-run
    process.send_signal(signum)
    try:
        return process.wait(timeout=300)  # a guard against a hang, far above the seconds it takes
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the command did not end on signal {signal.Signals(signum).name}")


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def losses(directory) -> dict[int, float]:
    with open(os.path.join(directory, "trainer_state.json")) as handle:
        return {e["step"]: e["loss"] for e in json.load(handle)["log_history"] if "loss" in e}


# Points inside a graft / export: writing the weights into the staging folder, checking what was written.
GRAFT_STOPS = ["transformers.modeling_utils:safe_save_file", "modeling_memory.tools.graft_to_folder:max_abs_difference"]
EXPORT_STOPS = ["transformers.modeling_utils:safe_save_file", "modeling_memory.tools.export:logits_without_package"]


@pytest.mark.parametrize("target", GRAFT_STOPS)
def test_graft_killed_mid_work_leaves_no_output_and_a_rerun_works(tmp_path, target):
    base = write_base(tmp_path / "base")
    out = tmp_path / "out"
    assert stop(run_blocked(tmp_path, target, ["graft", str(base), str(out), *SET_SMALL_MEMORY]), signal.SIGKILL) == -signal.SIGKILL
    assert not out.exists()
    assert [name.endswith(".partial") for name in hidden(tmp_path)] == [True]  # the staging folder it was writing
    assert main(["graft", str(base), str(out), *SET_SMALL_MEMORY]) == 0
    assert_same_as_base(base, out)


@pytest.mark.parametrize("target", EXPORT_STOPS)
def test_export_killed_mid_work_leaves_no_output_and_a_rerun_works(tmp_path, target):
    checkpoint = save_tiny_model(tmp_path / "model")
    out = tmp_path / "exported"
    assert stop(run_blocked(tmp_path, target, ["export", checkpoint, str(out)]), signal.SIGKILL) == -signal.SIGKILL
    assert not out.exists()
    assert main(["export", checkpoint, str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.randint(3, original.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, original(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("signum, cause", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_terminated_or_interrupted_graft_removes_its_staging_folder_and_says_one_line(tmp_path, signum, cause):
    """SIGTERM (or Ctrl-C, SIGINT) mid-graft: the staging folder is removed, and the command ends with one line
    and status 130, as an interrupted program does in a shell, without a traceback."""
    base = write_base(tmp_path / "base")
    out = tmp_path / "out"
    process = run_blocked(tmp_path, GRAFT_STOPS[1], ["graft", str(base), str(out), *SET_SMALL_MEMORY])
    assert stop(process, signum) == 130
    errors = process.stderr.read()  # transformers' loading progress bars, then the command's last word
    assert errors.endswith(f"\nmemory-llama graft: interrupted ({cause})\n") and "Traceback" not in errors, errors[-3000:]
    assert not out.exists() and hidden(tmp_path) == []


def test_train_killed_then_resumed_matches_uninterrupted(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    assert main(["train", base, *TRAIN, "--output_dir", str(uninterrupted)]) == 0

    # Killed while writing its second checkpoint: model and optimizer written, trainer state not yet.
    arguments = ["train", base, *TRAIN, "--output_dir", str(interrupted)]
    process = run_blocked(tmp_path, "transformers.trainer:Trainer._save_rng_state", arguments, call=2)
    assert stop(process, signal.SIGKILL) == -signal.SIGKILL
    assert (interrupted / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (interrupted / "checkpoint-4" / "trainer_state.json").exists()  # the half-written one
    assert not (interrupted / "model.safetensors").exists()  # the final model is written only at the end

    assert main(["train", base, *TRAIN, "--output_dir", str(interrupted), "--resume_from_checkpoint", "last"]) == 0
    expected, actual = losses(uninterrupted), losses(interrupted)
    assert sorted(actual) == sorted(expected) == list(range(1, 31))
    for step in range(1, 31):
        assert actual[step] == pytest.approx(expected[step], rel=RESUME_RTOL), step
    final_expected = AutoModelForCausalLM.from_pretrained(uninterrupted, dtype=torch.float32).state_dict()
    final_actual = AutoModelForCausalLM.from_pretrained(interrupted, dtype=torch.float32).state_dict()
    for name, tensor in final_expected.items():
        torch.testing.assert_close(final_actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    from modeling_memory.training.trainer import last_complete_checkpoint

    for step, state in ((2, '{"log_history": []}'), (4, '{"log_hist'), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None


def test_unwritable_targets_give_clean_errors(tmp_path, capsys):
    base = write_base(tmp_path / "base")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as error:
        main(["graft", str(base), str(blocker / "out"), *SET_SMALL_MEMORY])
    assert "a-file" in str(error.value.code)
    checkpoint = save_tiny_model(tmp_path / "model")
    with pytest.raises(SystemExit) as error:
        main(["export", checkpoint, str(blocker / "exported")])
    assert "a-file" in str(error.value.code)
    with pytest.raises(SystemExit) as error:
        main(["train", checkpoint, *TRAIN, "--output_dir", str(blocker / "trained")])
    assert "a-file" in str(error.value.code)
