"""Training: optimizer, jitted sharded steps, the loop over context stages
(checkpoints, resume, preemption), metrics, FLOPs and the Markov baselines
of the pretraining report."""
