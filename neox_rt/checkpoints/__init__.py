"""Checkpoints: HF weights (:mod:`.hf`), gpt-neox native layer files (:mod:`.neox`) and YAML configs
(:mod:`.neox_yaml`); each streams tensors into a built model, one rank's slice at a time."""
