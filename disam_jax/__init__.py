"""disam_jax: Domain-Inspired Sharpness-Aware Minimization (DISAM) for JAX/Optax."""
