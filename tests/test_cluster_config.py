"""cluster.yaml cannot be launched here; its structure is checked against Ray's own schema."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_follows_ray_schema_and_our_layout():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing scheduled on the head
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] > 0 for t in workers)
    setup = " ".join(config["setup_commands"])
    assert "[gpu]" in setup and "/mnt/shared" in setup  # GPU extras and shared storage on every node
    assert config["file_mounts"] == {"~/fspo-ray": "."}
