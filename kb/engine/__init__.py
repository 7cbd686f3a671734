"""The serving engine: sequences, scheduler, unique-KV block manager, runner, sampler."""
