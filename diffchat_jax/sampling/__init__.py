"""Sampling: pure logit transforms and the draw (logits), the jitted KV-cache decode loop with ADM (rollout)."""
