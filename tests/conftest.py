"""Test set-up: 8 fake CPU devices for the mesh tests."""

import jax

# Before any backend starts: sharding tests use meshes of these 8 CPU devices.
jax.config.update('jax_num_cpu_devices', 8)
