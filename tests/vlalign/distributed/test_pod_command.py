"""The Kubernetes Job's container command runs here: the launcher renders the stage's Indexed Job (2 pods, 1 process
each), and each pod's command runs as a local process with exactly the environment the Job gives that pod (the
downward-API fields resolved for it), except that the master's DNS name (``<job>-0.<service>``) is replaced by
127.0.0.1 and PATH is kept so ``torchrun`` is found. The 2 ranks (gloo) write the same checkpoint as the stage run
in one local process. No cluster runs here; this is what stands in for one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from vlalign.launch.config import KubernetesConfig, StorageConfig
from vlalign.launch.k8s import stage_manifests
from vlalign.launch.render import load_template_file, pod_command_env
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, train_stage
from vlalign.train.spec import TrainSpec

from shared import TINY, make_manifest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_jobs_pod_commands_run_locally_and_match_a_local_run(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # the RWX volume: the pods mount it where it is here
    manifest = make_manifest(shared / "images")
    manifest.to_parquet(shared / "manifest.parquet")
    cfg = get_model_config("tiny-vit-bert", **{**TINY, "text.dropout": 0.0})
    stage = StageConfig(name="k8s", trainable=["all"], max_steps=3, batch_size=8, lr=1e-3, warmup_steps=1,
                        checkpoint_every=0, log_every=1, caption_langs=["en"], seed=0, device="cpu",
                        compute="kubernetes")
    local = train_stage(cfg, stage, manifest, None, CheckpointStore(tmp_path / "local"))

    template = load_template_file(REPO / "k8s/base/train-podtemplate.yaml")
    mounts = template["template"]["spec"]["containers"][0]["volumeMounts"]
    next(m for m in mounts if m["name"] == "data")["mountPath"] = str(shared)
    # the pipeline's MLflow run (the parent); the pods log the stage's run into it, from rank 0 only
    tracking = f"sqlite:///{shared / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.create_experiment("pods")
    parent = client.create_run(experiment).info.run_id
    config = KubernetesConfig(nnodes=2, nproc_per_node=1, master_port=_free_port(), mlflow_tracking_uri=tracking,
                              storage=StorageConfig(local_root=str(shared), mount_path=str(shared)))
    spec = TrainSpec(model=cfg.to_dict(), stage=stage.to_dict(), data=str(shared / "manifest.parquet"),
                     out_dir=str(shared / "06_models" / "k8s"),
                     mlflow={"tracking_uri": tracking, "experiment_id": experiment, "parent_run_id": parent})
    manifests = stage_manifests(spec, config, template, echo=lambda _: None)

    processes = []
    for index in range(2):
        command, env = pod_command_env(manifests, index)
        assert env["PET_NODE_RANK"] == str(index) and env["PET_NNODES"] == "2"
        assert env["PET_MASTER_ADDR"].endswith("-0." + manifests[0]["metadata"]["name"])  # pod 0's DNS name
        env = {**env, "PET_MASTER_ADDR": "127.0.0.1", "PATH": os.environ["PATH"],
               **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
        env["HOME"] = env["TMPDIR"] = str(tmp_path / f"pod{index}")  # the pod's /tmp emptyDir
        Path(env["HOME"]).mkdir()
        env.pop("MPLCONFIGDIR", None)
        command[0] = str(Path(os.sys.executable).parent / command[0])  # torchrun of this environment
        processes.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)

    stage_runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(stage_runs) == 1, "one MLflow run per stage, not one per rank"
    assert stage_runs[0].data.tags["vlalign.stage"] == "k8s" and stage_runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(stage_runs[0].info.run_id, "loss")) == 3
    final = load_checkpoint(shared / "06_models" / "k8s" / "final.pt")
    assert final["world_size"] == 2 and final["completed"]
    for key, value in local["model"].items():
        assert torch.allclose(final["model"][key], value, atol=2e-5), key
