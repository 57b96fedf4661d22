"""Graph analysis, read-only: the repeated block lists and cache units (`blocks`), the timestep and
latents inputs (`timestep`), the group that shards the tokens under context parallel
(`sequence_parallel`), and the FX helpers the passes share (`blocks.example_value`, module paths)."""
