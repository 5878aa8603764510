"""utils/distributed.py and the multi-host pieces of utils/mesh.py that one process can check (the job itself:
tests/test_multihost.py)."""
import ml_collections
import numpy as np
import pytest

from diffchat_jax.configs import base
from diffchat_jax.errors import ConfigError
from diffchat_jax.utils import distributed, mesh as mesh_lib


def section(**fields):
    d = ml_collections.ConfigDict(base.get_config().distributed)
    d.update(fields)
    return d


def test_settings_follow_the_config(monkeypatch):
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    assert distributed.settings(section()) is None  # nothing set, no cluster: one process
    assert distributed.settings(section(num_processes=1, coordinator_address="h:1")) is None  # 1 = off
    explicit = distributed.settings(section(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                                            initialization_timeout_s=60))
    assert explicit == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                            cluster_detection_method=None, initialization_timeout=60, heartbeat_timeout_seconds=100)
    with pytest.raises(ConfigError, match="set all of coordinator_address .*num_processes and process_id"):
        distributed.settings(section(num_processes=2))
    with pytest.raises(ConfigError, match=r"process_id \(2\) must be < num_processes \(2\)"):
        distributed.settings(section(coordinator_address="h:1", num_processes=2, process_id=2))
    monkeypatch.setattr(distributed, "detected_cluster", lambda: "SlurmCluster")
    detected = distributed.settings(section())
    assert detected["coordinator_address"] is None and detected["num_processes"] is None
    assert detected["process_id"] is None and detected["cluster_detection_method"] is None
    assert distributed.settings(section(detect="off")) is None
    assert distributed.settings(section(detect="mpi4py"))["cluster_detection_method"] == "mpi4py"


def test_one_process_helpers_are_the_identity():
    mesh = mesh_lib.make_mesh()
    assert mesh_lib.process_rows(mesh, 8) == slice(0, 8) and mesh_lib.process_local(mesh) is mesh
    x = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(mesh_lib.local_rows(mesh_lib.shard_global(x, mesh)), x)
    np.testing.assert_array_equal(distributed.gather_rows(x), x)
    assert distributed.gather_objects([{"a": 1}, [2]]) == [{"a": 1}, [2]]
    assert distributed.any_process(True) and not distributed.any_process(False)


def test_process_blocks_cover_the_rows_once_in_order(monkeypatch):
    import jax
    from diffchat_jax.utils import distributed
    for total, count in [(6, 2), (7, 3), (2, 4), (0, 2)]:
        monkeypatch.setattr(jax, "process_count", lambda: count)
        blocks = []
        for me in range(count):
            monkeypatch.setattr(jax, "process_index", lambda: me)
            blocks.append(distributed.process_block(total))
        assert [r for b in blocks for r in b] == list(range(total))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1  # as even as it gets
