"""The standing adversarial suite: each test reproduces an attack and asserts what reached the upstream."""
