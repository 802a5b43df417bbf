"""Training with memory tables on disk: a run killed with SIGKILL in the middle of a checkpoint leaves every earlier
checkpoint whole (the working copy is never the checkpoint), and resuming from it gives bit for bit the weights of a
run that never stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from training_helpers import train_with_placement

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains as `train_with_placement` does, and stops for good inside the save of checkpoint-4, just before its first
# table file is streamed, after writing a marker file.
_KILLED_RUN = r"""
import os, sys, time
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
import modeling_memory.memory_llama.modeling_memory_llama as modeling
from training_helpers import train_with_placement

write = modeling.write_safetensors_streaming
def blocked(path, *args, **kwargs):
    if "checkpoint-4" in path:
        open(sys.argv[4], "w").close()
        time.sleep(600)
    return write(path, *args, **kwargs)
modeling.write_safetensors_streaming = blocked
train_with_placement(sys.argv[2], sys.argv[3], max_steps=6)
"""


@pytest.mark.slow
def test_sigkill_mid_checkpoint_corrupts_nothing_and_resume_is_exact(tmp_path):
    killed_out, killed_offload, marker = tmp_path / "killed", tmp_path / "killed-offload", tmp_path / "blocked"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, TESTS, str(killed_out), str(killed_offload), str(marker)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before checkpoint-4: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    # The checkpoint written before the kill is whole and loads with plain from_pretrained.
    checkpoint = killed_out / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()
    saved = MemoryLlamaForCausalLM.from_pretrained(checkpoint)
    assert set(saved.memory_tables()) == {
        "model.layers.0.engram.table.weight", "model.chapter_bank.weight", "model.pkm_values.weight"
    }

    resumed = train_with_placement(killed_out, killed_offload, max_steps=6, resume=True)
    uninterrupted = train_with_placement(tmp_path / "whole", tmp_path / "whole-offload", max_steps=6)
    for name, param in uninterrupted.named_parameters():
        assert torch.equal(resumed.get_parameter(name), param), name
    assert resumed.memory_placement == "disk"
