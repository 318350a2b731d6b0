import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module, sized like the machine CI runs on."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
