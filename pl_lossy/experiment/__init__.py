"""The experiment side: the Hydra app, its data and models, runs, sweeps and `pl-lossy compare`."""
