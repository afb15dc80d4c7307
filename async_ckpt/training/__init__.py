"""Training helpers built on the public API: RNG state, a resumable sampler, save/eval schedules,
divergence detectors and the divergence monitor."""
