"""The tests' own Ray (conftest.start_local_ray): its state API answers for this cluster, not another one.

Ray Train's placement-group cleaner asks the state API each second whether a run's controller is alive, and
removes the run's placement group when the answer is "no such actor". A cluster without a dashboard gives
127.0.0.1:8265 as that API's address, where another Ray on this machine may answer: it then tears down a live
run (CI's demo test once lost both its workers so)."""

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

