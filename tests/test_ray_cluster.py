import pytest

pytestmark = pytest.mark.ray


def test_session_cluster_has_two_nodes(ray_cluster):
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    assert ray.cluster_resources()["CPU"] == 4
