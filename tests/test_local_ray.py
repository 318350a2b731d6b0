"""The tests' own Ray (conftest.start_local_ray) records a state API address that knows its own actors: Ray
Train's placement-group cleaner asks there whether a run lives, and tears down the runs it does not find
(start_local_ray says how another cluster's dashboard did so in CI)."""


def test_the_state_api_address_of_the_tests_ray_knows_its_own_actors(local_ray):
    from ray.util.state import get_actor

    ray = local_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ready(self) -> bool:
            return True

    probe = Probe.remote()
    try:
        assert ray.get(probe.ready.remote())
        # The address the cluster records for its state API, as the cleaner resolves it from the GCS.
        state = get_actor(probe._actor_id.hex(), address=ray.get_runtime_context().gcs_address, timeout=30)
        assert state is not None and state.state == "ALIVE", state
    finally:
        ray.kill(probe)
