"""Interrupted work: graft, export and train killed (SIGKILL) at random points leave no corrupted
output; training resumed from its last complete checkpoint reaches the uninterrupted run's losses;
a target that cannot be written gives a clean error before any work."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_memory.cli import main
from test_graft import SMALL_MEMORY, assert_same_as_base, write_base
from training_helpers import save_tiny_model

pytestmark = pytest.mark.slow

SET_SMALL_MEMORY = [word for field in SMALL_MEMORY for word in ("--set", field)]

# Losses after resuming must match the uninterrupted run to this relative tolerance (fp32, same ops).
RESUME_RTOL = 1e-5
TRAIN = ["--knowledge-entities", "6", "--block-size", "48", "--mode", "full", "--max_steps", "30",
         "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "2",
         "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modeling_memory.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process after `seconds` unless it finished first; True when it was killed."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True


def losses(directory) -> dict[int, float]:
    with open(os.path.join(directory, "trainer_state.json")) as handle:
        return {e["step"]: e["loss"] for e in json.load(handle)["log_history"] if "loss" in e}


@pytest.mark.parametrize("seed", [0, 1])
def test_graft_killed_at_random_leaves_no_corrupted_output(tmp_path, seed):
    base = write_base(tmp_path / "base")
    out = tmp_path / "out"
    delay = random.Random(seed).uniform(2.0, 12.0)  # imports take a few seconds; the whole graft ~10-20 s
    killed = kill_after(start("graft", str(base), str(out), *SET_SMALL_MEMORY), delay)
    if out.exists():
        assert_same_as_base(base, out)  # finished before the kill, or renamed just in time: complete
    else:
        assert killed
        assert main(["graft", str(base), str(out), *SET_SMALL_MEMORY]) == 0  # a rerun just works
        assert_same_as_base(base, out)


@pytest.mark.parametrize("seed", [0, 1])
def test_export_killed_at_random_leaves_no_corrupted_output(tmp_path, seed):
    checkpoint = save_tiny_model(tmp_path / "model")
    out = tmp_path / "exported"
    delay = random.Random(seed).uniform(2.0, 15.0)
    killed = kill_after(start("export", str(checkpoint), str(out)), delay)
    if not out.exists():
        assert killed
        assert main(["export", str(checkpoint), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.randint(3, original.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_train_killed_then_resumed_matches_uninterrupted(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    assert main(["train", base, *TRAIN, "--output_dir", str(uninterrupted)]) == 0

    process = start("train", base, *TRAIN, "--output_dir", str(interrupted))
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    assert kill_after(process, random.Random(0).uniform(0.0, 0.5)), "training finished before it could be killed"
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
    from modeling_memory.trainer import last_complete_checkpoint

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
