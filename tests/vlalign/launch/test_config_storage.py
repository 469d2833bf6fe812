"""KubernetesConfig from conf/, the strict TrainJob schema, the conf/ ConfigMaps, and the storage mapping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from vlalign.errors import ConfigError
from vlalign.launch.config import KubernetesConfig, StorageConfig
from vlalign.launch.confmap import conf_configmaps, main as confmap_main
from vlalign.launch.crd import CustomResourceError, known_kinds, validate_custom_resource
from vlalign.launch.render import load_template_file, render_stage
from vlalign.launch.storage import SharedStorage
from vlalign.train.spec import TrainSpec

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_conf_base_parameters_build_the_config():
    params = yaml.safe_load((REPO / "conf/base/parameters_kubernetes.yml").read_text(encoding="utf-8"))
    config = KubernetesConfig.from_dict(params["kubernetes"])
    assert config == KubernetesConfig()  # the file states the defaults, each with a comment
    overlay = yaml.safe_load((REPO / "conf/k8s/parameters_kubernetes.yml").read_text(encoding="utf-8"))
    assert KubernetesConfig.from_dict({**params["kubernetes"], **overlay["kubernetes"]}).mlflow_tracking_uri


def test_every_config_field_has_a_comment():
    source = (REPO / "src/vlalign/launch/config.py").read_text(encoding="utf-8")
    for cls in (KubernetesConfig, StorageConfig):
        for name in cls.__dataclass_fields__:
            line = next(line for line in source.splitlines() if line.strip().startswith(f"{name}:"))
            assert "#" in line, f"{cls.__name__}.{name} has no comment"


@pytest.mark.parametrize("data, message", [
    ({"engin": "job"}, r"kubernetes: unknown key\(s\) \['engin'\]"),
    ({"storage": {"kind": "nfs"}}, r"kubernetes.storage.kind='nfs'"),
    ({"storage": {"kind": "fsspec"}}, r"needs kubernetes.storage.url"),
    ({"storage": {"claim": "x"}}, r"kubernetes.storage: unknown key\(s\) \['claim'\]"),
    ({"engine": "mpi"}, r"kubernetes.engine='mpi'"),
    ({"nnodes": 0}, r"kubernetes.nnodes=0"),
    ({"resources": {"limit": {}}}, r"kubernetes.resources="),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        KubernetesConfig.from_dict(data)


# ------------------------------------------------------------------------------------------------
# Strict schema of the custom resources
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def trainjob() -> dict:
    template = load_template_file(REPO / "k8s/base/train-podtemplate.yaml")
    return render_stage(template, KubernetesConfig(engine="trainjob"), stage="s", spec_path="/x").workload


def test_trainjob_validates(trainjob):
    assert validate_custom_resource(trainjob) == "trainer.kubeflow.org/v1alpha1/TrainJob"
    assert ("trainer.kubeflow.org/v1alpha1", "TrainJob") in known_kinds()


@pytest.mark.parametrize("breaker, message", [
    (lambda t: t["spec"]["trainer"].__setitem__("numProcsPerNode", 2), "'numProcsPerNode' was unexpected"),
    (lambda t: t["spec"].__setitem__("podTemplateOverrides", []), "'podTemplateOverrides' was unexpected"),  # 2.1 name
    (lambda t: t["spec"]["trainer"].__setitem__("numNodes", "2"), "'2' is not of type 'integer'"),
    (lambda t: t["spec"]["trainer"].__setitem__("image", None), "None is not of type 'string'"),
    (lambda t: t.__setitem__("apiVersion", "trainer.kubeflow.org/v1"), "no schema for"),
    (lambda t: t["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    (lambda t: t["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]
     ["spec"]["template"]["spec"]["containers"][0].__setitem__("resources", {}), "'resources' was unexpected"),
])
def test_trainjob_schema_rejects(trainjob, breaker, message):
    broken = copy.deepcopy(trainjob)
    breaker(broken)
    with pytest.raises(CustomResourceError, match=message):
        validate_custom_resource(broken)


# ------------------------------------------------------------------------------------------------
# conf/ as ConfigMaps
# ------------------------------------------------------------------------------------------------


def test_committed_conf_configmaps_match_conf(capsys):
    """k8s/base/conf-configmaps.yaml is generated from conf/base and conf/k8s; regenerate it when conf/ changes."""
    committed = list(yaml.safe_load_all((REPO / "k8s/base/conf-configmaps.yaml").read_text(encoding="utf-8")))
    expected = conf_configmaps(REPO / "conf")
    assert committed == expected, (
        "k8s/base/conf-configmaps.yaml is out of date with conf/: run `python -m vlalign.launch.confmap` "
        "from the repository root and commit the result"
    )
    base = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "conf/base").glob("*.yml")}
    assert committed[0]["data"] == base  # every config file of conf/base, byte for byte
    assert confmap_main(["--conf", str(REPO / "conf"), "--output", str(REPO / "k8s/base/conf-configmaps.yaml"), "--check"]) == 0


def test_confmap_check_detects_drift(tmp_path):
    conf = tmp_path / "conf"
    for env in ("base", "k8s"):
        (conf / env).mkdir(parents=True)
        (conf / env / "parameters.yml").write_text("a: 1\n")
    out = tmp_path / "cm.yaml"
    assert confmap_main(["--conf", str(conf), "--output", str(out)]) == 0
    assert confmap_main(["--conf", str(conf), "--output", str(out), "--check"]) == 0
    (conf / "base" / "catalog.yml").write_text("x: {type: pandas.CSVDataset}\n")
    assert confmap_main(["--conf", str(conf), "--output", str(out), "--check"]) == 1
    (conf / "k8s" / "sub").mkdir()
    (conf / "k8s" / "sub" / "nested.yml").write_text("b: 2\n")
    with pytest.raises(ConfigError, match="cannot have config files in sub-folders"):
        conf_configmaps(conf)


# ------------------------------------------------------------------------------------------------
# Storage
# ------------------------------------------------------------------------------------------------


def _spec(**fields) -> TrainSpec:
    values = dict(model={}, stage={"name": "s"}, data="data/03_primary/m.parquet", out_dir="data/06_models/s", mlflow=None)
    values.update(fields)
    return TrainSpec(**values)


def test_pvc_paths_map_to_the_mount(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = SharedStorage(StorageConfig(local_root="data", mount_path="/app/data"))
    pod, spec_path, configmap = storage.pod_spec(_spec(init="data/06_models/prev/final.pt", image_roots=["data/01_raw/img"]), None)
    assert pod.data == "/app/data/03_primary/m.parquet" and pod.out_dir == "/app/data/06_models/s"
    assert pod.init == "/app/data/06_models/prev/final.pt" and pod.image_roots == ["/app/data/01_raw/img"]
    assert spec_path == "/app/data/06_models/s/k8s-spec.json" and configmap is None
    # a submitter running in a pod with the volume at the same path passes its paths through
    assert storage.to_pod("/app/data/03_primary/m.parquet", "data") == "/app/data/03_primary/m.parquet"
    with pytest.raises(ConfigError, match=r"train spec init='/elsewhere/x.pt' is not on the shared volume"):
        storage.pod_spec(_spec(init="/elsewhere/x.pt"), None)


def test_mlflow_must_be_reachable_from_pods(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = SharedStorage(StorageConfig())
    local = {"tracking_uri": "sqlite:///mlflow.db", "experiment_id": "1", "parent_run_id": "abc"}
    with pytest.raises(ConfigError, match="kubernetes.mlflow_tracking_uri"):
        storage.pod_spec(_spec(mlflow=local), None)
    pod, _, _ = storage.pod_spec(_spec(mlflow=local), "http://vlalign-mlflow:5000")
    assert pod.mlflow == {**local, "tracking_uri": "http://vlalign-mlflow:5000"}
    server = dict(local, tracking_uri="http://mlflow.example.com")
    assert storage.pod_spec(_spec(mlflow=server), None)[0].mlflow == server


def test_object_storage_needs_self_contained_data(tmp_path):
    storage = SharedStorage(StorageConfig(kind="fsspec", url=f"file://{tmp_path}/bucket"))
    with pytest.raises(ConfigError, match="WebDataset shards"):
        storage.pod_spec(_spec(), None)
    with pytest.raises(ConfigError, match="image_roots"):
        storage.pod_spec(_spec(data="s3://b/shards.json", image_roots=["/img"]), None)
    with pytest.raises(ConfigError, match="not found, so it cannot be uploaded"):
        storage.pod_spec(_spec(data=str(tmp_path / "missing" / "shards.json")), None)


def test_object_storage_upload_skips_files_already_there(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shards.json").write_text("{}")
    (shards / "a.tar").write_bytes(b"a")
    storage = SharedStorage(StorageConfig(kind="fsspec", url=f"file://{tmp_path}/bucket"))
    said = []
    url = storage.upload(str(shards / "shards.json"), "data", said.append)
    assert url.endswith("/shards/shards.json") and said == [f"uploaded 2 of 2 file(s) of data to {storage.remote(str(shards))}"]
    said.clear()
    storage.upload(str(shards / "shards.json"), "data", said.append)
    assert said == []  # nothing copied twice


def test_stage_manifests_give_a_locally_runnable_pod_command(tmp_path):
    """What the local torchrun test needs: a Job whose pods see the shared folder at the same path as here."""
    from vlalign.launch.k8s import stage_manifests
    from vlalign.launch.render import pod_command_env

    shared = str(tmp_path / "shared")
    template = load_template_file(REPO / "k8s/base/train-podtemplate.yaml")
    mounts = template["template"]["spec"]["containers"][0]["volumeMounts"]
    next(m for m in mounts if m["name"] == "data")["mountPath"] = shared  # the pods mount it where it is here
    config = KubernetesConfig(nnodes=2, storage=StorageConfig(local_root=shared, mount_path=shared))
    spec = _spec(data=f"{shared}/03_primary/m.parquet", out_dir=f"{shared}/06_models/s")
    manifests = stage_manifests(spec, config, template, echo=lambda _: None)
    command, env = pod_command_env(manifests, 1)
    assert command[:5] == ["torchrun", "-m", "vlalign", "train", "--spec"]
    written = TrainSpec.load(command[5])  # the pod-side spec is on the shared folder, readable here
    assert written.out_dir == spec.out_dir and written.data == spec.data
    assert env["PET_NODE_RANK"] == "1" and env["PET_NNODES"] == "2" and env["PET_MASTER_PORT"] == "29500"
    assert env["PET_MASTER_ADDR"].endswith("-0." + manifests[-1]["metadata"]["name"])
