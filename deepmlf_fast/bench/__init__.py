"""`deepmlf bench` (`command`): the kernels' self-check, microbenchmarks at the recipes' shapes
(`kernels`, at `shapes`, timed by `timing`) and a short whole-step comparison (`step`) on the
user's GPU, written as Markdown and CSV, and what `--backend auto` should run there."""
