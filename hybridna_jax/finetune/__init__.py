"""Understanding fine-tuning: echo / RC-echo embeddings, heads, task data,
metrics and the `tasks.Task` that trains them (see task.py)."""
