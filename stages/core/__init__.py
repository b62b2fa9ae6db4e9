"""Shared plumbing for every stage: storage, config, manifests and the stage runner, datatrove helpers,
and the binary token-shard format."""
