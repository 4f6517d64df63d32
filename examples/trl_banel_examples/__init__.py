"""What the repository's recipes and benchmarks use beside the method (`trl_banel`); not needed to use BaNEL.

- :mod:`trl_banel_examples.tasks`: small tasks with their models and reward oracles (the addition attack, rare
  letters, digits 0-to-6, the hard attack);
- :mod:`trl_banel_examples.baselines`: what BaNEL is compared against, usable with TRL's `GRPOTrainer`;
- :mod:`trl_banel_examples.plotting`: success curves against reward evaluations;
- :mod:`trl_banel_examples.cli`: the command-line helpers the scripts share.
"""
