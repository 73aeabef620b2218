"""``spon-exp-collect``: many runs -> paper-shaped tables (Markdown + CSV) and plots.

Reads every ``results.json`` under a folder (and optionally the runs of a W&B project),
and for each Hydra sweep folder (one with ``multirun.yaml``) also lists the runs the sweep
asked for that never wrote a result, so missing and failed runs show as such.

Values with a 95 % interval in the run's results show as ``30.58 ± 0.90`` (± the half-width;
the interval may be asymmetric, so the CSVs carry its exact ends as ``*_ci_low`` /
``*_ci_high`` columns); runs written before intervals existed show the plain number.

    spon-exp-collect outputs/sweeps/sparsity_curve_cpu --out outputs/tables/sparsity_curve_cpu

One job per module: :mod:`.runs` reads, :mod:`.groups` groups seeds and summarises each
configuration once, :mod:`.tables` and :mod:`.plots` write, :mod:`.studies` reads recipe
searches, :mod:`.compare` compares two configurations, :mod:`.cli` is the command line.
Nothing here imports torch until a summary needs the bootstrap.
"""

from spon_exp.collect.cli import main
from spon_exp.collect.groups import configurations, group_summary, seed_groups
from spon_exp.collect.plots import write_plots
from spon_exp.collect.runs import read_runs, read_wandb
from spon_exp.collect.studies import read_studies
from spon_exp.collect.tables import write_tables

__all__ = ["configurations", "group_summary", "main", "read_runs", "read_studies", "read_wandb", "seed_groups",
           "write_plots", "write_tables"]
