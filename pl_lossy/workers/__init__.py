"""The virtual workers: where the replicas live, how their steps run, their samples, checkpoints, failures and buffers."""
