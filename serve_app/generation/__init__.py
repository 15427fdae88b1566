"""The generation engine: planning, samplers, the FLUX pipeline runner, the scheduler, speed-ups."""
