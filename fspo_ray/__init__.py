"""fspo-ray: few-shot preference optimization (FSPO) on Ray.

The package is a house of floors, lowest first. A module imports only from its own floor or the floors
below it, and no two parts import each other; tests/test_layers.py walks every import and holds this.
"""

FLOORS: tuple[tuple[str, ...], ...] = (
    # plumbing: typed settings, the console, folders that appear whole
    ("fspo_ray.config", "fspo_ray.console", "fspo_ray.files"),
    # what several stages share: models, losses and log-probs, engines, the judge, run info, Ray scheduling
    ("fspo_ray.models", "fspo_ray.losses", "fspo_ray.attention", "fspo_ray.logprobs", "fspo_ray.engines",
     "fspo_ray.judge", "fspo_ray.runinfo", "fspo_ray.scheduling"),
    ("fspo_ray.batch_inference",),  # engines as Ray Data replicas, for evaluation and data generation
    # the stages, in the order data flows through them
    ("fspo_ray.data",),  # readers → episodes → prompts → tokens; synthetic users
    ("fspo_ray.train",),  # the Ray Data pipeline, reference scoring, DeepSpeed on Ray Train, export
    ("fspo_ray.evaluate", "fspo_ray.generate"),  # accuracy over shots, win rates; data generation
    ("fspo_ray.serve",),  # the API's bodies and the request router (the app itself is serve/)
)
