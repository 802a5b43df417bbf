"""`memory-llama train` under `accelerate launch` with 2 CPU processes (DDP, the packaged ddp_cpu
config) against the same run in one process with the same global batch; and FSDP requested on CPU
processes, which accelerate 1.15 does not support, refused with a clear error instead of silently
training plain data parallel.

Same data order (sequential sampling), global batch 4 = 1 process x 4 = 2 processes x 2. The
router z-loss is a per-token mean, so with full rows the mean over micro-batches equals the
whole-batch mean; the load-balancing loss is a product of batch means and would differ between
a batch of 4 and two of 2, so it is switched off here (its scaling is tested in test_trainer.py).
Tolerance (fp32): losses agree to rtol 1e-5 per step (gradient all-reduce sums in another order);
the saved models' logits to atol 1e-4.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from modeling_memory.training_cli import accelerate_config_path
from training_helpers import save_tiny_model

pytestmark = pytest.mark.slow

STEPS, GLOBAL_BATCH, BLOCK = 4, 4, 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model(root / "model", router_aux_loss_coef=0.0, router_z_loss_coef=0.01)
    from modeling_memory.knowledge import KnowledgeSet

    with open(root / "train.txt", "w") as handle:
        handle.write("\n".join(KnowledgeSet.generate(40, seed=5).training_documents()) + "\n")
    return root


def _train(workspace, name, processes_per_run, config=None, expect_failure=False):
    output = workspace / name
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    train = [
        "-m", "modeling_memory.cli", "train", str(workspace / "model"), "--data", str(workspace / "train.txt"),
        "--block-size", str(BLOCK), "--output_dir", str(output), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // processes_per_run), "--learning_rate", "1e-2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--train_sampling_strategy", "sequential", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--use_cpu", "true",
    ]
    if config is None:
        command = [sys.executable, *train]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes_per_run), "--main_process_port", str(_free_port()), *train,
        ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if expect_failure:
        assert result.returncode != 0
        return result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    with open(output / "trainer_state.json") as handle:
        losses = [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]
    assert len(losses) == STEPS
    return output, losses, result.stdout


def _logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(3, 3 + 2 * BLOCK).reshape(2, BLOCK) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def single_process(workspace):
    return _train(workspace, "single", 1)


def test_two_ddp_processes_match_one(workspace, single_process):
    reference_dir, reference_losses, _ = single_process
    output, losses, stdout = _train(workspace, "ddp", 2, accelerate_config_path("ddp_cpu"))
    assert "MULTI_CPU on 2 process(es)" in stdout
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert reference_losses[-1] < reference_losses[0]
    # The checkpoint is consolidated (one full state dict) and loads with from_pretrained.
    assert os.path.isfile(output / "model.safetensors")
    torch.testing.assert_close(_logits(output), _logits(reference_dir), rtol=0, atol=1e-4)


FSDP_ON_CPU = """
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
machine_rank: 0
num_processes: 2
use_cpu: true
mixed_precision: "no"
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: MemoryLlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_fsdp_on_cpu_processes_is_refused_not_silently_replaced(workspace):
    config = workspace / "fsdp_cpu.yaml"
    config.write_text(FSDP_ON_CPU)
    output = _train(workspace, "fsdp", 2, config, expect_failure=True)
    assert "FSDP was requested, but these are CPU processes" in output
    assert not (workspace / "fsdp").exists()
