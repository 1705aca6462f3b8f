"""Training reelforge's causal video VAE (models/causal_vae.py) on curated clips, through the same loop, DeepSpeed
engine, checkpoints and MLflow tracking as the diffusion model: its config, held-out split, quality metrics and
the task the loop runs."""
